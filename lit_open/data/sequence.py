"""`<run.dir>/data_sequence/`: which samples went into each optimizer step, as LLM360 publishes it.

Layout: `sources.json` (the sources, their weights and sizes, seq_len, the seed, and the mixture phases: from which
global batch on which sources are mixed with which weights) and one JSON-lines file per
1000 global batches, `NNNNNNNN.jsonl`, with lines `{"data_step": d, "step": s, "samples": [[source, index], ...]}`
(`data_step`: the global batch; `step`: the optimizer step it fed; `index`: the sample of seq_len + 1 tokens
within its source, i.e. tokens [index * (seq_len + 1), (index + 1) * (seq_len + 1)) of that source's stream).
With a released order (data.order, docs/data.md) each line also has `"released_step"`, the publisher's global batch
number, and with released sources `"files": [[file, index], ...]`, each sample's file and sample (line, instance,
sequence) index in that file as the publisher numbers them (null for samples of prepared data).
On resume, entries from the resumed position on are rewritten, so the log always describes the run as it went.
A global batch whose update a plugin skipped (skip_step, nan_guard: trained on, never applied) gets
`"update_skipped": "<plugins>"`, the names of the plugins that asked, comma-separated (`"unknown"` when only another
rank's asked), and carries the step of the update before it; its `skip` or `non_finite` event tells why. After a
rollback the entries of the global batches whose updates were undone get `"undone": "rollback"`, and the global
batches jumped over are logged with `"step": null, "skipped": "rollback"`. The samples that shaped the final model
are exactly those of the entries with none of these marks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lit_open.config import ORDER_KEYS

FILE_STEPS = 1000


def sequence_file(directory: Path, data_step: int) -> Path:
    return directory / f"{data_step - data_step % FILE_STEPS:08d}.jsonl"


def read_data_sequence(directory: str | Path) -> list[dict[str, Any]]:
    """All entries of a run's data-sequence log, in order."""
    entries = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        entries.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return entries


class DataSequenceLog(Callback):
    """Appends one line per consumed global batch (global rank 0 only)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._written = 0
        self._undone: tuple[int, int] = (0, 0)  # data steps [first, end) whose updates the latest rollback undid
        self._skipped: tuple[int, int] = (0, 0)  # data steps [first, end) jumped over by the latest rollback
        self._skips = 0  # run.skipped_updates when the latest batch was logged

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._written = pl_module.run.consumed_batches
        self._skips = pl_module.run.skipped_updates
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        self.directory.mkdir(parents=True, exist_ok=True)
        sources = {
            "format": "lit-open-data-sequence/1",
            "seq_len": datamodule.cfg.seq_len,
            "global_batch_size": datamodule.cfg.global_batch_size,
            "seed": datamodule.seed,
            "sources": [
                {
                    "id": i,
                    "path": str(s.path.resolve()),
                    "weight": s.weight,
                    "samples": s.samples,
                    "format": s.format,
                    "tokens": s.manifest.get("tokens") if s.manifest else None,
                    "tokenizer_sha256": s.manifest["tokenizer"]["sha256"] if s.manifest else None,
                }
                for i, s in enumerate(datamodule.train_sources)
            ],
            # mixtures by global batch: from data_step on, the sources with these ids and weights
            "phases": [
                {"data_step": start, "sources": ids, "weights": weights}
                for start, ids, weights in datamodule.phase_sources
            ],
            # how global batches are formed: lit-open's mixture, or a publisher's order replayed from a step
            "order": {key: getattr(datamodule.cfg, key) for key in ORDER_KEYS},
        }
        (self.directory / "sources.json").write_text(json.dumps(sources, indent=2) + "\n")
        self._truncate(self._written)

    def _truncate(self, start: int) -> None:
        """Drop entries at or after data step `start`: a resumed run writes them again as it replays them."""
        current = sequence_file(self.directory, start)
        for path in self.directory.glob("*.jsonl"):
            if path.name > current.name:
                path.unlink()
        if current.exists():
            kept = [line for line in current.read_text().splitlines() if json.loads(line)["data_step"] < start]
            current.write_text("".join(line + "\n" for line in kept))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        run = pl_module.run
        # a skip counted since the last batch: the update of the batch consumed last was skipped
        skipped_update = run.consumed_batches - 1 if run.skipped_updates > self._skips else None
        self._skips = run.skipped_updates
        if not trainer.is_global_zero:
            self._written = run.consumed_batches
            return
        datamodule = trainer.datamodule
        released = any(source.reader is not None for source in datamodule.train_sources)
        while self._written < run.consumed_batches:
            data_step = self._written
            samples = datamodule.order.global_batch(data_step).tolist()
            record = {"data_step": data_step, "step": trainer.global_step, "samples": samples}
            if datamodule.cfg.order != "mixture":
                record["released_step"] = (datamodule.cfg.start_step or 0) + data_step
            if released:  # the publisher's file and sample index of each sample (null: prepared data)
                record["files"] = [datamodule.train_sources[s].locate(i) for s, i in samples]
            if data_step == skipped_update:
                record["update_skipped"] = ",".join(run.skipped_by) or "unknown"
            if self._undone[0] <= data_step < self._undone[1]:  # the batch whose update was replaced by the rollback
                record["undone"] = "rollback"
            if self._skipped[0] <= data_step < self._skipped[1]:
                record.update(step=None, skipped="rollback")
            with sequence_file(self.directory, data_step).open("a") as f:
                f.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._written += 1

    def on_rollback(self, trainer: Trainer, pl_module: LightningModule, rolled_back: Any) -> None:
        self._undone, self._skipped = rolled_back.undone, rolled_back.skipped
        if not trainer.is_global_zero:
            return
        first, end = rolled_back.undone
        for data_step in range(first - first % FILE_STEPS, end, FILE_STEPS):
            path = sequence_file(self.directory, data_step)
            if not path.exists():
                continue
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for record in records:
                if first <= record["data_step"] < end:
                    record["undone"] = "rollback"
            tmp = path.with_name(f".tmp-{path.name}")
            tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
            tmp.replace(path)
