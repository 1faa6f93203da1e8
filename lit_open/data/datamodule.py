"""The DataModule: prepared litdata token streams, mixed by weight in a global order that resumes exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lit_open.config import DataConfig, SourceConfig
from lit_open.data.manifest import read_manifest
from lit_open.data.order import PhasedOrder
from lit_open.data.released import SampleReader, open_released
from lit_open.errors import UserError
from lit_open.model.attention import doc_ids_from_tokens

if TYPE_CHECKING:
    from lit_open.plugin import DataPhase


@dataclass
class Source:
    path: Path
    weight: float
    samples: int  # sequences of seq_len + 1 tokens
    manifest: dict | None  # what `lit-open prepare` recorded; None for a released format (lit_open.data.released)
    format: str = "litdata"
    dtype: str | None = None

    def open(self, block_size: int) -> Any:
        """A reader of this source's samples by index (in each DataLoader worker)."""
        if self.format == "litdata":
            # litdata is slow to import; it is needed where the streams are opened (each DataLoader worker)
            from litdata import StreamingDataset, TokensLoader

            return StreamingDataset(str(self.path), item_loader=TokensLoader(block_size=block_size), shuffle=False)
        return open_released(self.format, self.path, block_size, str(self.path), self.dtype)


def open_sources(sources: list[SourceConfig], block_size: int, key: str, vocab_size: int | None = None) -> list[Source]:
    """Check the sources under config key `key` and count their samples of `block_size` tokens (a released
    format's ids are checked against `vocab_size` when given)."""
    opened = []
    for i, source in enumerate(sources):
        path = Path(source.path).expanduser()
        if source.format != "litdata":
            reader = open_released(source.format, path, block_size, f"{key}[{i}]", source.dtype, vocab_size)
            opened.append(Source(path, source.weight, reader.samples, None, source.format, source.dtype))
            continue
        index = path / "index.json"
        if not index.is_file():
            hint = "it does not exist" if not path.exists() else "it has no litdata index.json"
            raise UserError(
                f"{key}[{i}].path={source.path!r} is not a prepared dataset ({hint}). Create one with "
                f"`lit-open prepare inputs=[YOUR_FILES] output=DIR` and point {key}[{i}].path at DIR/train."
            )
        manifest = read_manifest(path)
        chunks = json.loads(index.read_text())["chunks"]
        samples = sum(chunk["dim"] // block_size for chunk in chunks)
        if samples == 0:
            raise UserError(
                f"{key}[{i}].path={source.path!r} holds {manifest.get('tokens', 0)} tokens: not one sequence of "
                f"data.seq_len+1={block_size} tokens. Prepare more data or lower data.seq_len."
            )
        opened.append(Source(path=path, weight=source.weight, samples=samples, manifest=manifest))
    prepared = [s for s in opened if s.manifest is not None]
    hashes = {s.manifest["tokenizer"]["sha256"] for s in prepared}
    if len(hashes) > 1:
        listing = "; ".join(f"{s.path}: {s.manifest['tokenizer']['sha256'][:12]}" for s in prepared)
        raise UserError(f"The sources under {key} were tokenized with different tokenizers ({listing}).")
    return opened


def micro_batches_per_step(cfg: DataConfig, data_parallel_size: int) -> int:
    per_pass = cfg.micro_batch_size * data_parallel_size
    if cfg.global_batch_size % per_pass:
        raise UserError(
            f"data.global_batch_size={cfg.global_batch_size} must be a multiple of data.micro_batch_size="
            f"{cfg.micro_batch_size} x {data_parallel_size} data-parallel processes = {per_pass}."
        )
    return cfg.global_batch_size // per_pass


class TokenSamples(Dataset):
    """Sequences of block_size tokens read by (source, index): litdata token streams or released files (random
    access)."""

    def __init__(self, sources: list[Source], block_size: int, eos_id: int | None = None) -> None:
        self.sources = sources
        self.block_size = block_size
        self.eos_id = eos_id  # set: batches carry document ids for document-masked attention
        self._readers: list | None = None  # opened lazily, once per DataLoader worker process

    def _open(self) -> list:
        if self._readers is None:
            self._readers = [source.open(self.block_size) for source in self.sources]
        return self._readers

    def __getitem__(self, key: tuple[int, ...]) -> dict[str, Any]:
        source, index, data_step, micro, n_micro = key
        reader = self._open()[source]
        tokens = np.asarray(reader.read(index) if isinstance(reader, SampleReader) else reader[index], dtype=np.int64)
        return {"tokens": torch.from_numpy(tokens), "sample": (source, index), "meta": (data_step, micro, n_micro)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = torch.stack([item["tokens"] for item in items])
        data_step, micro, n_micro = items[0]["meta"]
        doc_ids = {} if self.eos_id is None else {"doc_ids": doc_ids_from_tokens(tokens[:, :-1], self.eos_id)}
        return {
            **doc_ids,
            "input_ids": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "samples": torch.tensor([item["sample"] for item in items], dtype=torch.long),
            "data_step": data_step,
            "micro": micro,
            "n_micro": n_micro,
        }


class StepBatchSampler:
    """This rank's micro-batches of global batches start, start+1, ...: yields lists of sample keys, forever.

    `jump_to(step)` moves it forward (after a rollback): the global batches in between are never read. It runs in
    the main process (DataLoader workers only read the samples), so the jump applies from the next micro-batch it
    hands out; batches already handed out are recognised by their data step and dropped by LitLM.
    """

    def __init__(self, order: PhasedOrder, start: int, rank: int, world_size: int, micro_batch_size: int) -> None:
        self.order, self.start, self.rank, self.world_size = order, start, rank, world_size
        self.micro_batch_size = micro_batch_size
        self._jump: int | None = None

    def jump_to(self, step: int) -> None:
        self._jump = step

    def _take_jump(self, step: int) -> int | None:
        target, self._jump = self._jump, None
        return target if target is not None and target > step else None

    def __iter__(self):
        step = self.start
        while True:
            samples = self.order.rank_slice(step, self.rank, self.world_size)
            n_micro = len(samples) // self.micro_batch_size
            for micro in range(n_micro):
                target = self._take_jump(step)
                if target is not None:
                    break
                chunk = samples[micro * self.micro_batch_size : (micro + 1) * self.micro_batch_size]
                yield [(int(s), int(i), step, micro, n_micro) for s, i in chunk]
            else:
                step += 1
                continue
            step = target


class DataModule(L.LightningDataModule):
    """Training batches in the global order of `DataOrder`; held-out batches from `data.val_sources`.

    The data position is `RunState.consumed_batches` (global batches consumed so far), which the module saves in
    its checkpoints: `train_dataloader` starts from it, so a resumed run sees exactly the batches the
    uninterrupted run would have seen, with any number of processes.
    """

    def __init__(self, cfg: DataConfig, seed: int, phases: list[DataPhase] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.phases = sorted(phases, key=lambda phase: phase.start)  # mixtures after the first (data.sources)
        self.block_size = cfg.seq_len + 1
        self.train_sources: list[Source] = []  # the sources of every phase, each once
        self.val_sources: list[Source] = []
        self.order: PhasedOrder | None = None
        self.phase_sources: list[tuple[int, list[int], list[float]]] = []  # (first data step, sources, weights)
        self._sampler: StepBatchSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.order is None:
            mixtures = [(p.start, p.sources, p.key) for p in self.phases]
            if not mixtures or mixtures[0][0] > 0:  # a switch at the very start replaces data.sources
                if not self.cfg.sources:
                    raise UserError("data.sources is empty: give 'data.sources=[{path:DIR,weight:1.0},...]'.")
                mixtures.insert(0, (0, self.cfg.sources, "data.sources"))
            by_path: dict[Path, int] = {}
            for start, sources, key in mixtures:
                ids = []
                for source in open_sources(sources, self.block_size, key):
                    resolved = source.path.resolve()
                    if resolved not in by_path:
                        by_path[resolved] = len(self.train_sources)
                        self.train_sources.append(source)
                    ids.append(by_path[resolved])
                self.phase_sources.append((start, ids, [s.weight for s in sources]))
            tokenizers = {s.manifest["tokenizer"]["sha256"] for s in self.train_sources if s.manifest is not None}
            if len(tokenizers) > 1:
                keys = ", ".join(key for _, _, key in mixtures)
                raise UserError(f"The training sources ({keys}) were tokenized with different tokenizers.")
            self.order = PhasedOrder(
                [s.samples for s in self.train_sources], self.phase_sources, self.cfg.global_batch_size, self.seed
            )
        if not self.val_sources and self.cfg.val_sources:
            self.val_sources = open_sources(self.cfg.val_sources, self.block_size, "data.val_sources")

    def train_dataloader(self) -> DataLoader:
        run = self.trainer.lightning_module.run
        micro_batches_per_step(self.cfg, run.data_parallel_size)  # fail early on a batch size that does not divide
        self._sampler = StepBatchSampler(
            self.order, run.consumed_batches, run.data_parallel_rank, run.data_parallel_size, self.cfg.micro_batch_size
        )
        return self._loader(self.train_sources, self._sampler)

    def skip_to(self, data_step: int) -> None:
        """Go on with global batch `data_step`: the ones before it that were not read yet are skipped."""
        self._sampler.jump_to(data_step)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        run = self.trainer.lightning_module.run  # tensor-parallel peers score the same samples
        keys = self.val_keys()[run.data_parallel_rank :: run.data_parallel_size]
        size = self.cfg.micro_batch_size
        batches = [[(s, i, -1, 0, 1) for s, i in keys[start : start + size]] for start in range(0, len(keys), size)]
        # a few batches per validation: worker processes would cost more to start than the reading they save
        return self._loader(self.val_sources, batches, workers=0)

    def val_keys(self) -> list[tuple[int, int]]:
        """The held-out samples scored at each validation: `val_samples` spread evenly over all val sources."""
        sizes = np.array([s.samples for s in self.val_sources])
        total = int(sizes.sum())
        picks = np.unique(np.linspace(0, total - 1, min(self.cfg.val_samples, total)).round().astype(np.int64))
        source = np.searchsorted(np.cumsum(sizes), picks, side="right")
        offset = picks - np.concatenate([[0], np.cumsum(sizes)[:-1]])[source]
        return list(zip(source.tolist(), offset.tolist()))

    def _loader(self, sources: list[Source], batch_sampler, workers: int | None = None) -> DataLoader:
        workers = self.cfg.num_workers if workers is None else workers
        eos_id = sources[0].manifest["tokenizer"]["eos_id"] if self.cfg.document_mask else None
        samples = TokenSamples(sources, self.block_size, eos_id)
        return DataLoader(
            samples,
            batch_sampler=batch_sampler,
            num_workers=workers,
            collate_fn=samples.collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )
