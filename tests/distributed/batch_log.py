"""A test plugin that records, on every process, which samples each micro-batch held (batches-rank<R>.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from lit_open.plugin import Plugin


class BatchLog(Plugin):
    name = "batch_log"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        mesh = pl_module.device_mesh
        row = {
            "rank": trainer.global_rank,
            "data_parallel_rank": mesh["data_parallel"].get_local_rank() if mesh is not None else trainer.global_rank,
            "tensor_parallel_rank": mesh["tensor_parallel"].get_local_rank() if mesh is not None else 0,
            "data_step": batch["data_step"],
            "micro": batch["micro"],
            "samples": batch["samples"].tolist(),
        }
        path = Path(trainer.default_root_dir) / f"batches-rank{trainer.global_rank}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
