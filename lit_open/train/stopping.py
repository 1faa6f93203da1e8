"""Stopping early and cleanly: a stop signal, `trainer.time_limit`, and Ctrl-C.

Schedulers warn a job before they end it: SLURM sends SIGTERM at preemption and, with `--signal=USR1@300`, SIGUSR1
five minutes before the time limit. On one of `trainer.stop_signals` every rank finishes the optimizer step it is in,
the ranks agree (a max all-reduce of a stop code each step, so a signal that reached one rank stops them all at the
same step), a checkpoint of that step is written, a `stop` event names it, and the run exits with `EXIT_STOPPED` (75,
EX_TEMPFAIL: "stopped early, try again"), so that a job script can requeue and `resume=auto` continues exactly.
`trainer.time_limit` does the same on its own, early enough to write the checkpoint: it stops once the time since
the run started plus twice the longest recent step plus twice the longest checkpoint save so far (30 s before the
first one is measured) reaches the limit.

Ctrl-C (SIGINT) stops at once: `RunInterrupted` is raised, an `interrupted` event is written, and the CLI says which
checkpoint is intact and exits 130. It is not a KeyboardInterrupt because Lightning turns those into exit status 1.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_open.checkpoint.resumable import POINTER, CheckpointWriter, checkpoint_name
from lit_open.config import check_stop_signals, parse_duration
from lit_open.errors import EXIT_STOPPED, RunInterrupted

FIRST_SAVE_ALLOWANCE_S = 30.0  # time_limit: the checkpoint time assumed before a save has been measured
_STOP_CODES = {0: None, 1: "time_limit", 2: "signal"}


class StopGuard(Callback):
    """Stops the run after an optimizer step on a stop signal or near the time limit, with a checkpoint; turns
    Ctrl-C into `RunInterrupted`. It is the last callback, so every other `on_step_end` has run first."""

    def __init__(self, signals: list[str], time_limit: str | None, started: float) -> None:
        self.signals = check_stop_signals(signals)
        self.time_limit_s = parse_duration(time_limit) if time_limit is not None else None
        self.started = started  # time.monotonic() when the run started
        self.received: str | None = None  # the stop signal's name, once one arrived
        self._step_clock: float | None = None
        self._recent_steps: list[float] = []
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread (e.g. a notebook's worker thread)
        # installed after Lightning's own (fit registers them), which Lightning restores at its teardown
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_stop_signal)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_interrupt)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        print(
            f"lit-open: received {self.received}: finishing this optimizer step, then writing a checkpoint",
            file=sys.stderr,
            flush=True,
        )

    def on_step_end(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        now = time.monotonic()
        if self._step_clock is not None:
            self._recent_steps = [*self._recent_steps[-19:], now - self._step_clock]
        self._step_clock = now
        writer = next(c for c in trainer.callbacks if isinstance(c, CheckpointWriter))
        code = 2 if self.received else 1 if self._near_time_limit(now, writer) else 0
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            flag = torch.tensor([code], dtype=torch.int32, device=pl_module.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a signal that reached one rank stops every rank
            code = int(flag.item())
        reason = _STOP_CODES[code]
        if reason is None:
            return
        saved = writer.directory / checkpoint_name(step)
        if writer.last_saved != step:
            saved = writer.save(trainer, pl_module)
        writer.finish(trainer, pl_module)  # an asynchronous save is complete before the run says it stopped
        # seconds since the run started, with the checkpoint written
        details = {"reason": reason, "checkpoint": str(saved), "seconds": round(time.monotonic() - self.started, 2)}
        if reason == "signal":
            details["signal"] = self.received or "another rank's"
        else:
            details["time_limit_s"] = self.time_limit_s
        pl_module.run.events.write(step, "stop", **details)
        pl_module.run.stopped = details
        trainer.should_stop = True

    def _near_time_limit(self, now: float, writer: CheckpointWriter) -> bool:
        if self.time_limit_s is None:
            return False
        save = writer.longest_save_s if writer.longest_save_s is not None else FIRST_SAVE_ALLOWANCE_S
        needed = 2 * max(self._recent_steps, default=0.0) + 2 * save
        return now - self.started + needed >= self.time_limit_s


def _on_interrupt(signum: int, frame: Any) -> None:
    raise RunInterrupted


def stopped_message(details: dict[str, Any], step: int) -> str:
    why = (
        f"on {details['signal']}"
        if details["reason"] == "signal"
        else f"before trainer.time_limit ({details['time_limit_s']:.0f} s)"
    )
    return (
        f"stopped early {why} at step {step:,}, with a checkpoint: {details['checkpoint']}. Run the same command "
        f"again with resume=auto to continue exactly (exit status {EXIT_STOPPED})."
    )


def interrupted_message(run_dir: Path) -> str:
    latest = run_dir / "checkpoints" / POINTER
    kept = (
        f"the newest complete checkpoint, {run_dir / 'checkpoints' / latest.read_text().strip()}, is intact "
        "(resume=auto continues from it)"
        if latest.is_file()
        else "no checkpoint had been written yet"
    )
    return f"interrupted; {kept}"
