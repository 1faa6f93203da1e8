"""The DataModule: prepared litdata token streams, mixed by weight in a global order that resumes exactly."""

from __future__ import annotations

import functools
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lit_open.config import DataConfig, SourceConfig
from lit_open.data.manifest import read_manifest
from lit_open.data.order import GlobalOrder, PhasedOrder
from lit_open.data.released import SampleReader, open_released
from lit_open.data.released_order import ReleasedOrder, build_released_order
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
    # released formats: the reader opened at start-up, for locate() and the chunk files (not sent to workers)
    reader: SampleReader | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "reader": None}

    def chunk_files(self) -> list[tuple[str, int]]:
        """(file name, samples) per file of a released source, in sample order; litdata: the whole source."""
        return self.reader.chunk_files() if self.reader is not None else [(self.path.name, self.samples)]

    def locate(self, index: int) -> tuple[str, int] | None:
        """(released file, sample index in it) of sample `index`; None for prepared (litdata) data."""
        return self.reader.locate(index) if self.reader is not None else None

    def open(self, block_size: int) -> Any:
        """A reader of this source's samples by index (in each DataLoader worker)."""
        if self.format == "litdata":
            # the chunks read in place, a pread per sample (StreamingDataset maps a chunk file per sample when the
            # samples come in a random order); StreamingDataset for chunks that are not plain token arrays
            from lit_open.glue import litdata_token_reader

            reader = litdata_token_reader(self.path, block_size)
            if reader is not None:
                return reader
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
            opened.append(Source(path, source.weight, reader.samples, None, source.format, source.dtype, reader))
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


def released_order_of(cfg: DataConfig, sources: list[Source], seed: int) -> ReleasedOrder:
    """The publisher's order cfg.order over the opened `sources`, from released step cfg.start_step on."""
    return build_released_order(
        cfg.order,
        [s.samples for s in sources],
        [f for s in sources for f in s.chunk_files()],
        cfg.global_batch_size,
        cfg.start_step or 0,
        seed=seed if cfg.order_seed is None else cfg.order_seed,
        first_epoch=cfg.order_first_epoch,
        global_indices=cfg.global_indices,
        chunk_shuffle=cfg.chunk_shuffle,
    )


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

    def __getitem__(self, key: tuple) -> dict[str, Any]:
        source, index, *meta = key  # meta: data_step, micro, n_micro (and `scored` for held-out samples)
        reader = self._open()[source]
        tokens = np.asarray(reader.read(index) if isinstance(reader, SampleReader) else reader[index], dtype=np.int64)
        return {"tokens": torch.from_numpy(tokens), "sample": (source, index), "meta": tuple(meta)}

    def collate(self, items: list[dict[str, Any]]) -> Any:
        """The batch dict of `items`; in a DataLoader worker, an object that is unpickled as that dict."""
        tokens = torch.stack([item["tokens"] for item in items])
        samples = torch.tensor([item["sample"] for item in items], dtype=torch.long)
        doc_ids = None if self.eos_id is None else doc_ids_from_tokens(tokens[:, :-1], self.eos_id)
        if torch.utils.data.get_worker_info() is not None:  # in a DataLoader worker: the batch goes to the trainer
            arrays = (tokens.numpy(), samples.numpy(), None if doc_ids is None else doc_ids.numpy())
            return TokenSamples._Pickled(*arrays, items[0]["meta"])
        return TokenSamples._batch(tokens, samples, doc_ids, items[0]["meta"])

    @staticmethod
    def _batch(tokens: torch.Tensor, samples: torch.Tensor, doc_ids: torch.Tensor | None, meta: tuple) -> dict:
        data_step, micro, n_micro, *held_out = meta
        batch = {
            **({} if doc_ids is None else {"doc_ids": doc_ids}),
            "input_ids": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "samples": samples,
            "data_step": data_step,
            "micro": micro,
            "n_micro": n_micro,
        }
        if held_out:  # a held-out micro-batch holds one val source's samples (DataModule.val_batches)
            batch.update(source=int(samples[0, 0]), scored=held_out[0])
        return batch

    @staticmethod
    def _unpickle(tokens: np.ndarray, samples: np.ndarray, doc_ids: np.ndarray | None, meta: tuple) -> dict:
        doc_ids_tensor = None if doc_ids is None else torch.from_numpy(doc_ids)
        return TokenSamples._batch(torch.from_numpy(tokens), torch.from_numpy(samples), doc_ids_tensor, meta)

    class _Pickled:
        """A batch on its way out of a DataLoader worker: pickled as its arrays (bytes in the result pipe), it is
        unpickled as the batch (the same tensors) in the process that receives it.

        Why: torch sends each tensor from a worker through shared memory, the file descriptor of each (three per
        batch) over a socket with a handshake; on two cores that took about 1 ms per micro-batch of 4 x 2049
        tokens, several times the reading, and the pipe takes about 0.2 ms.
        """

        __slots__ = ("arrays",)

        def __init__(self, *arrays: Any) -> None:
            self.arrays = arrays

        def __reduce__(self) -> tuple:
            return TokenSamples._unpickle, self.arrays


class StepBatchSampler:
    """This rank's micro-batches of global batches start, start+1, ...: yields lists of sample keys, to the end of
    the order's data (forever for lit-open's mixture).

    `jump_to(step)` moves it forward (after a rollback): the global batches in between are never read. It runs in
    the main process (DataLoader workers only read the samples), so the jump applies from the next micro-batch it
    hands out; batches already handed out are recognised by their data step and dropped by LitLM.
    """

    def __init__(self, order: GlobalOrder, start: int, rank: int, world_size: int, micro_batch_size: int) -> None:
        self.order, self.start, self.rank, self.world_size = order, start, rank, world_size
        self.micro_batch_size = micro_batch_size
        self._jump: int | None = None
        self._ended = False

    def jump_to(self, step: int) -> None:
        self._jump = step

    def _take_jump(self, step: int) -> int | None:
        target, self._jump = self._jump, None
        return target if target is not None and target > step else None

    def __iter__(self):
        step, end = self.start, self.order.data_steps
        if self._ended:  # Lightning starts another pass when one ends before trainer.max_steps
            raise UserError(
                f"The training data ran out after {end} global batches (data.order={self.order.name}): updates "
                "skipped by plugins used up batches that trainer.max_steps did not count. Lower trainer.max_steps."
            )
        # a released order ends with its data: the loader stops there (start-up checked that trainer.max_steps fits)
        while end is None or step < end:
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
        self._ended = True


class DataModule(L.LightningDataModule):
    """Training batches in the global order of `DataOrder`; held-out batches from `data.val_sources`.

    The data position is `RunState.consumed_batches` (global batches consumed so far), which the module saves in
    its checkpoints: `train_dataloader` starts from it, so a resumed run sees exactly the batches the
    uninterrupted run would have seen, with any number of processes.
    """

    def __init__(self, cfg: DataConfig, seed: int, phases: list[DataPhase] = (), stop_signals: list[str] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        self.stop_signals = list(stop_signals)  # ignored by the DataLoader workers: the main process stops the run
        self.seed = seed
        self.phases = sorted(phases, key=lambda phase: phase.start)  # mixtures after the first (data.sources)
        self.block_size = cfg.seq_len + 1
        self.train_sources: list[Source] = []  # the sources of every phase, each once
        self.val_sources: list[Source] = []
        self.order: PhasedOrder | ReleasedOrder | None = None
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
            if self.cfg.order == "mixture":
                sizes = [s.samples for s in self.train_sources]
                self.order = PhasedOrder(sizes, self.phase_sources, self.cfg.global_batch_size, self.seed)
            elif len(self.phase_sources) > 1:
                keys = ", ".join(key for _, _, key in mixtures[1:])
                raise UserError(
                    f"data.order={self.cfg.order} replays a released run's data; it cannot switch to other sources "
                    f"midway ({keys}). Use data.order=mixture for data phases."
                )
            else:
                self.order = released_order_of(self.cfg, self.train_sources, self.seed)
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
        batches = self.val_batches(run.data_parallel_rank, run.data_parallel_size)
        # a few batches per validation: worker processes would cost more to start than the reading they save
        return self._loader(self.val_sources, batches, workers=0)

    def val_indices(self) -> list[list[int]]:
        """The held-out samples scored at each validation, per val source: `val_samples` shared equally by the
        sources (at least one each; a source smaller than its share is scored whole, and what it leaves goes to the
        others), each source's spread evenly over it."""
        sizes = [s.samples for s in self.val_sources]
        counts, left = [0] * len(sizes), self.cfg.val_samples
        least = 1 if left > 0 else 0  # val_samples=0 scores nothing
        for position, source in enumerate(sorted(range(len(sizes)), key=sizes.__getitem__)):  # smallest first
            counts[source] = min(sizes[source], max(least, left // (len(sizes) - position)))
            left -= counts[source]
        return [
            np.unique(np.linspace(0, size - 1, count).round().astype(np.int64)).tolist()
            for size, count in zip(sizes, counts)
        ]

    def val_batches(self, rank: int, world_size: int) -> list[list[tuple]]:
        """Data-parallel rank `rank`'s held-out micro-batches (sample keys), each of one source's samples.

        Every rank gets as many micro-batches of each source as the rank with the most: each forward pass of a
        sharded model is a collective. A rank short of samples repeats one unscored (`scored` False)."""
        size, batches = self.cfg.micro_batch_size, []
        for source, indices in enumerate(self.val_indices()):
            own = indices[rank::world_size]
            for start in range(0, len(indices[::world_size]), size):  # rank 0 has the most
                chunk = own[start : start + size]
                batches.append([(source, i, -1, 0, 1, bool(chunk)) for i in chunk or indices[:1]])
        return batches

    def val_bytes_per_token(self) -> list[float | None]:
        """Per val source, the UTF-8 bytes per token that `lit-open prepare` recorded in its manifest; None when it
        recorded none (a released format, or data prepared before lit-open counted bytes)."""
        return [
            s.manifest["bytes"] / s.manifest["tokens"] if s.manifest and s.manifest.get("bytes") else None
            for s in self.val_sources
        ]

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
            worker_init_fn=functools.partial(_ignore_signals, self.stop_signals) if self.stop_signals else None,
        )


def _ignore_signals(names: list[str], worker_id: int) -> None:
    """A DataLoader worker ignores the run's stop signals: a scheduler signals every process of a job, and a worker
    that died of one would fail the step the main process finishes before it stops (lit_open.train.stopping)."""
    for name in names:
        signal.signal(signal.Signals[name], signal.SIG_IGN)
