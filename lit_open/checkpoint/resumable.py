"""Resumable checkpoints in `<run.dir>/checkpoints/`: atomic, step-numbered, with a pointer to the newest.

A checkpoint is written under a temporary name (`.tmp-step-NNNNNNNN.ckpt`), flushed to disk, and renamed to
`step-NNNNNNNN.ckpt` only when complete; then `latest` (a one-line text file) is replaced atomically to name it.
A crash at any moment leaves either the previous set of checkpoints or the new one, never a half checkpoint
under a name that `resume=auto` would pick.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.distributed.checkpoint import FileSystemReader

from lit_open import glue
from lit_open.checkpoint.background import SHARDED_METADATA, CheckpointThread
from lit_open.errors import UserError

POINTER = "latest"
CHECKPOINT_KEY = "lit_open"  # lit-open's own part of a checkpoint: the run config, data position, RNG states, ...
ROLLED_BACK = "rolled-back"  # where checkpoints written after the state a rollback restored are moved
_NAME = re.compile(r"^step-(\d{8})\.ckpt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def checkpoint_step(path: Path) -> int:
    """The optimizer step in a checkpoint's name (step-NNNNNNNN.ckpt)."""
    return int(_NAME.match(path.name).group(1))


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class CheckpointWriter(Callback):
    """Saves a resumable checkpoint every `every_n_steps` optimizer steps and at the end of training, while training
    goes on with `asynchronous` (lit_open.checkpoint.background); calls every callback's `on_checkpoint_written`
    (complete under the temporary name) and `on_checkpoint_saved` (published)."""

    def __init__(
        self, directory: str | Path, every_n_steps: int, keep_last: int, keep_every: int = 0, asynchronous: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.asynchronous = asynchronous
        self.last_saved = -1  # the step of the newest checkpoint written (or being written) or resumed from
        self.longest_save_s: float | None = None  # the slowest save of this session, start to complete (StopGuard)
        self.blocked_s: dict[int, float] = {}  # step -> seconds training waited for its save (this session)
        self._thread: CheckpointThread | None = None
        self._pending: _Pending | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.last_saved = trainer.global_step  # a resumed run does not rewrite the checkpoint it came from
        if trainer.is_global_zero and self.directory.is_dir():
            for leftover in self.directory.glob(".tmp-step-*"):  # saves a crash cut short
                _remove(leftover)
        if self.asynchronous:
            self._thread = CheckpointThread(sharded=glue.saves_sharded(trainer.strategy))

    def on_step_end(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        self._collect(trainer, pl_module, wait=False)
        if step != self.last_saved and step % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self.last_saved:
            self.save(trainer, pl_module)
        self.finish(trainer, pl_module)
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Let this rank's write in flight end (global rank 0 then publishes the checkpoint if every rank's part is
        complete) before the process goes, without collectives: the other ranks may never join them."""
        if self._pending is not None:
            wait([self._pending.job])
            self._pending = None
        self._close()

    def finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Wait until the checkpoint in flight, if any, is published. Every rank calls it at the same point."""
        self._collect(trainer, pl_module, wait=True)

    def save(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        """Write the checkpoint of this step (every rank calls it); with `asynchronous`, return once it is staged."""
        with pl_module.run.busy("checkpoint"):
            return self._save(trainer, pl_module)

    def _save(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        entered = time.monotonic()
        self.finish(trainer, pl_module)  # at most one save in flight
        started = time.monotonic()
        step = trainer.global_step
        final = self.directory / checkpoint_name(step)
        tmp = self.directory / f".tmp-{final.name}"
        if trainer.is_global_zero:
            self.directory.mkdir(parents=True, exist_ok=True)
            _remove(tmp)  # left over from a crash during an earlier save
            for logger in trainer.loggers:  # so the logged history is on disk up to every checkpoint
                logger.save()
        trainer.strategy.barrier("lit_open_checkpoint_begin")
        if self._thread is not None:
            job = self._thread.start(
                trainer,
                tmp,
                written=lambda: self._written(trainer, pl_module, step, tmp),
                publish=lambda: self._publish(pl_module, step, tmp, final, started),
            )
            self._pending = _Pending(step, final, started, job)
            self.last_saved = step  # in flight: not to be written again
            self.blocked_s[step] = time.monotonic() - entered
            return final
        trainer.save_checkpoint(tmp)
        trainer.strategy.barrier("lit_open_checkpoint_written")
        self._written(trainer, pl_module, step, tmp)
        if trainer.is_global_zero:
            self._publish(pl_module, step, tmp, final, started)
        trainer.strategy.barrier("lit_open_checkpoint_done")
        self.last_saved = step
        self.blocked_s[step] = time.monotonic() - entered
        self._saved(trainer, pl_module, step, final, time.monotonic() - started)
        return final

    def _written(self, trainer: Trainer, pl_module: LightningModule, step: int, tmp: Path) -> None:
        for callback in trainer.callbacks:
            if callable(getattr(callback, "on_checkpoint_written", None)):
                callback.on_checkpoint_written(trainer, pl_module, step, tmp)

    def _publish(self, pl_module: LightningModule, step: int, tmp: Path, final: Path, started: float) -> None:
        """Make a complete checkpoint visible to resume=auto (global rank 0; in the writer's thread when async)."""
        _fsync_tree(tmp)
        _remove(final)  # a resumed run that re-reaches a step replaces that step's checkpoint
        os.replace(tmp, final)
        point_latest(self.directory, final)
        seconds = round(time.monotonic() - started, 3)
        pl_module.run.events.write(step, "checkpoint", path=str(final), seconds=seconds, asynchronous=self.asynchronous)
        self._prune(step)

    def _saved(self, trainer: Trainer, pl_module: LightningModule, step: int, final: Path, seconds: float) -> None:
        self.longest_save_s = max(self.longest_save_s or 0.0, seconds)
        for callback in trainer.callbacks:
            if callable(getattr(callback, "on_checkpoint_saved", None)):
                callback.on_checkpoint_saved(trainer, pl_module, step, final)

    def _collect(self, trainer: Trainer, pl_module: LightningModule, wait: bool) -> None:
        """Once the checkpoint in flight is complete on every rank (the ranks agree), report it saved; raise if its
        write failed on any rank. Every rank calls it at the same points (each step end, each save)."""
        pending = self._pending
        if pending is None:
            return
        if wait:
            pending.job.exception()  # blocks until the job ends
        done = pending.job.done()
        failed = done and pending.job.exception() is not None
        if trainer.world_size > 1 and dist.is_initialized():
            flags = torch.tensor([int(not done), int(failed)], dtype=torch.int32, device=pl_module.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            done, failed = not flags[0].item(), bool(flags[1].item())
        if not done:
            return
        self._pending = None
        if failed:
            error = pending.job.exception()
            cause = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
            raise CheckpointWriteFailed(
                f"Writing the checkpoint of step {pending.step} in the background failed ({cause}); it was never "
                f"made visible, and the newest complete checkpoint in {self.directory} is intact. Check the file "
                "system (space, permissions), then continue with resume=auto."
            ) from error
        self._saved(trainer, pl_module, pending.step, pending.final, pending.job.result() - pending.started)

    def _close(self) -> None:
        if self._thread is not None:
            self._thread.close()
            self._thread = None

    def on_rollback(self, trainer: Trainer, pl_module: LightningModule, rolled_back: Any) -> None:
        """Move checkpoints newer than the restored step to `rolled-back/`: `resume=auto` must not pick them."""
        self.finish(trainer, pl_module)  # a checkpoint in flight is published first, then moved like the others
        if trainer.is_global_zero:
            newer = [p for p in list_checkpoints(self.directory) if checkpoint_step(p) > rolled_back.to_step]
            if newer:
                aside = self.directory / ROLLED_BACK
                aside.mkdir(exist_ok=True)
                for path in newer:
                    _remove(aside / path.name)
                    os.replace(path, aside / path.name)
                kept = list_checkpoints(self.directory)
                if kept:
                    point_latest(self.directory, kept[-1])
                else:
                    (self.directory / POINTER).unlink(missing_ok=True)
                pl_module.run.events.write(
                    rolled_back.to_step, "checkpoints_moved", to=str(aside), paths=[p.name for p in newer]
                )
        trainer.strategy.barrier("lit_open_rollback_checkpoints")
        if (self.directory / checkpoint_name(rolled_back.to_step)).exists():
            self.last_saved = rolled_back.to_step  # the restored state is on disk already
        else:
            self.last_saved = min(self.last_saved, rolled_back.to_step - 1)

    def _prune(self, step: int) -> None:
        """Delete all but the newest keep_last checkpoints up to `step` (and those at multiples of keep_every).

        Only checkpoints of this run's lineage are in the directory (lit_open.train.rundir); none after `step`
        is ever deleted, and the one just written, which `latest` names, is always kept."""
        if self.keep_last <= 0:
            return
        lineage = [p for p in list_checkpoints(self.directory) if checkpoint_step(p) <= step]
        for old in lineage[: -self.keep_last]:
            if not (self.keep_every and checkpoint_step(old) % self.keep_every == 0):
                _remove(old)


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint written in the background could not be completed (the message says what to do)."""


@dataclass
class _Pending:
    """A checkpoint in flight: its step, final path, start time and this rank's job (which returns its end time)."""

    step: int
    final: Path
    started: float
    job: Future


def point_latest(directory: Path, checkpoint: Path) -> None:
    """Make `latest` name `checkpoint` (atomically: a reader sees the old name or the new one)."""
    pointer_tmp = directory / f".tmp-{POINTER}"
    pointer_tmp.write_text(checkpoint.name + "\n")
    os.replace(pointer_tmp, directory / POINTER)


def find_resume_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint `resume` (auto | none | a path) points at, or None to start fresh."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if not path.exists():
            raise UserError(
                f"resume={resume!r}: no such checkpoint. Use resume=auto, resume=none or a checkpoint path."
            )
        return path
    directory = run_dir / "checkpoints"
    pointer = directory / POINTER
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        if named.exists():
            return named
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _check_shards(path: Path) -> None:
    """Every shard file that the distributed checkpoint's index names must be there, and long enough."""
    metadata = FileSystemReader(str(path)).read_metadata()
    for info in metadata.storage_data.values():
        shard = path / info.relative_path
        if not shard.is_file() or shard.stat().st_size < info.offset + info.length:
            raise ValueError(f"its shard {info.relative_path} is missing or truncated")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint's metadata (not its tensors' data) or raise a UserError that says what to do.

    A sharded checkpoint (a directory of per-process shards, written under strategy=fsdp/tp/fsdp_tp) keeps
    everything but the model and optimizer tensors in its `meta.pt`.
    """
    try:
        if path.is_dir():
            _check_shards(path)
        file = path / SHARDED_METADATA if path.is_dir() else path
        checkpoint = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        if not isinstance(checkpoint, dict) or "global_step" not in checkpoint or CHECKPOINT_KEY not in checkpoint:
            raise ValueError("it is not a lit-open training checkpoint")
    except Exception as err:  # any failure to read means a truncated, corrupt or foreign file
        others = [p for p in list_checkpoints(path.parent) if p != path]
        hint = (
            f" Older checkpoints in the same directory: {', '.join(p.name for p in others)}; resume from one with "
            f"resume={others[-1]}"
            if others
            else " Start afresh with resume=none move_aside=true (the unreadable checkpoint is kept in superseded/),"
            " or in another run.dir"
        )
        raise UserError(f"Cannot read checkpoint {path}: {type(err).__name__}: {err}.{hint}.") from err
    return checkpoint
