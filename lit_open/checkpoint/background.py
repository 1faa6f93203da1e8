"""Checkpoints written while training goes on (`checkpoint.asynchronous=true`).

The training loop is blocked only while the state is copied to host memory (staging); the copy is then written by a
background thread. A sharded checkpoint goes through torch.distributed.checkpoint's `async_save` (which stages and
writes per rank, and whose coordinator, global rank 0, writes the index after every rank's shards are on disk) on a
gloo process group of its own, so that its collectives never interleave with training's. A single-file checkpoint
(single device, ddp) is staged by global rank 0 (`host_copy`) and written with `torch.save`.

Each rank's writes run in one `CheckpointThread`; the job for one checkpoint writes this rank's part, calls the
plugins' `on_checkpoint_written` and then, on global rank 0 only, `publish`es it (fsync, rename from its temporary
name, `latest`, retention): by then every rank's part is complete, so `resume=auto` never sees a partial checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning_utilities.core.apply_func import apply_to_collection

from lit_open import glue

SHARDED_METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint


def host_copy(value: Any) -> Any:
    """`value` with every tensor copied to host memory, containers rebuilt: a snapshot that later training steps
    cannot change. Other objects (numbers, strings, RNG states as bytes) are immutable or rebuilt by Lightning's
    `dump_checkpoint` for each checkpoint."""
    return apply_to_collection(value, torch.Tensor, lambda tensor: tensor.detach().to("cpu", copy=True))


class CheckpointThread:
    """One background writer per process: at most one checkpoint in flight (the caller waits for the previous)."""

    def __init__(self, sharded: bool) -> None:
        self.sharded = sharded
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lit-open-checkpoint")
        # DCP's planning and index collectives run on their own gloo group: off training's (maybe NCCL) group,
        # and in another thread than training's collectives
        self._group = dist.new_group(backend="gloo") if sharded and dist.is_initialized() else None

    def start(self, trainer: Any, tmp: Path, written: Callable[[], None], publish: Callable[[], None]) -> Future:
        """Stage the trainer's checkpoint and write it to `tmp` in the background; returns this rank's job, whose
        result is the time.monotonic() at which it ended.

        Runs on every rank in the main thread; on return the checkpoint is independent of further training."""
        checkpoint = glue.dump_checkpoint(trainer)
        is_global_zero = trainer.is_global_zero
        if self.sharded:
            tensors = {"state_dict": checkpoint.pop("state_dict")}
            tensors.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
            if is_global_zero:
                tmp.mkdir(parents=True, exist_ok=True)
                torch.save(checkpoint, tmp / SHARDED_METADATA)  # small: loops, callbacks, lit-open's run state
            shards = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=self._group)
            shards = getattr(shards, "upload_completion", shards)  # an AsyncSaveResponse with some stagers

            def write() -> None:
                shards.result()

        elif is_global_zero:
            staged = host_copy(checkpoint)

            def write() -> None:
                torch.save(staged, tmp)

        else:

            def write() -> None:  # a single-file checkpoint is written by global rank 0 alone
                pass

        def job() -> float:
            write()
            written()
            if is_global_zero:
                publish()
            return time.monotonic()  # when this rank's part (and on rank 0 the publishing) was done

        return self._executor.submit(job)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
