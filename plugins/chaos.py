"""chaos: fault rehearsal. At the steps you list it injects a loss spike (random tokens and/or an LR multiplier), a NaN,
a crash (SIGKILL of every process, once per run directory), a kill in the middle of a checkpoint write, a corrupted
checkpoint, a signal to rank 0 (SIGTERM as at a preemption, SIGINT as Ctrl-C; once per run directory), a hung rank or
a slow rank, each written to events.jsonl before it happens, so that a long run's recovery (skip_step,
spike_rollback, nan_guard, resume=auto, stopping on a signal, watchdog, straggler) is tried first. What each fault
should lead to, and the options: docs/plugins/chaos.md; `lit-open list plugins` shows the defaults.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_open.checkpoint.resumable import SHARDED_METADATA
from lit_open.errors import UserError
from lit_open.plugin import Plugin, option
from lit_open.train.loss import IGNORE_INDEX  # targets that take no loss: kept as they are in a spike

MARKER_DIR = "chaos"  # <run.dir>/chaos/: what was injected once already (crash, corrupt)


class Chaos(Plugin):
    """Injects spikes, NaNs, crashes and corrupted checkpoints at the configured steps, each logged first."""

    name = "chaos"

    @dataclass
    class Config:
        spike_steps: list[int] = option(
            [], "data steps (global batches, from 0) whose batch becomes random tokens and/or gets the LR spike"
        )
        spike_tokens: bool = option(
            True, "replace the spike steps' batches by uniformly random tokens (false: the LR spike alone)"
        )
        spike_lr_multiplier: float = option(
            1.0, "LR multiplier for the spike steps' updates (1.0: no LR spike); back on schedule after"
        )
        nan_steps: list[int] = option([], "data steps whose loss and gradients become NaN")
        crash_steps: list[int] = option(
            [], "optimizer steps after which every process SIGKILLs itself (once per run.dir, see chaos/)"
        )
        corrupt_checkpoint_steps: list[int] = option(
            [], "optimizer steps whose checkpoint is truncated once written (once per run.dir)"
        )
        checkpoint_kill_steps: list[int] = option(
            [],
            "optimizer steps whose checkpoint write kills every process (SIGKILL) once its files are written under "
            "the temporary name, before it is made visible (once per run.dir); with checkpoint.asynchronous in the "
            "writer's thread while training goes on",
        )
        signal_steps: list[int] = option(
            [], "optimizer steps after which global rank 0 sends itself `signal` (once per run.dir), as a scheduler"
        )
        signal: str = option("SIGTERM", "the signal of signal_steps: a stop signal (trainer.stop_signals) or SIGINT")
        hang_steps: list[int] = option(
            [], "optimizer steps at whose first micro-batch hang_rank stops responding (once per run.dir)"
        )
        hang_rank: int = option(0, "the global rank that hangs at hang_steps (the others then wait in a collective)")
        slow_rank: int = option(-1, "a global rank whose every forward pass takes slow_ms longer (-1: none)")
        slow_ms: float = option(0.0, "milliseconds added to each forward pass of slow_rank, as on a slower GPU")

        def __post_init__(self) -> None:
            for key in (
                "spike_steps",
                "nan_steps",
                "crash_steps",
                "corrupt_checkpoint_steps",
                "checkpoint_kill_steps",
                "signal_steps",
                "hang_steps",
            ):
                bad = [s for s in getattr(self, key) if s < 0]
                if bad:
                    raise UserError(
                        f"plugins.chaos.{key}={getattr(self, key)} has negative steps ({', '.join(map(str, bad))}); "
                        "give steps >= 0 (data steps count global batches from 0, optimizer steps updates from 1)."
                    )
            if self.signal not in [s.name for s in signal.valid_signals() if isinstance(s, signal.Signals)]:
                raise UserError(
                    f"plugins.chaos.signal={self.signal!r} is not a signal name; e.g. SIGTERM, SIGUSR1 or SIGINT."
                )
            if self.hang_rank < 0:
                raise UserError(f"plugins.chaos.hang_rank={self.hang_rank} must be a global rank (0 or more).")
            if not self.slow_ms >= 0 or (self.slow_rank >= 0) != (self.slow_ms > 0):
                raise UserError(
                    f"plugins.chaos.slow_rank={self.slow_rank} and plugins.chaos.slow_ms={self.slow_ms}: give both (a "
                    "rank >= 0 and milliseconds > 0) to slow a rank down, or neither."
                )
            if not self.spike_lr_multiplier > 0:  # also refuses nan
                raise UserError(
                    f"plugins.chaos.spike_lr_multiplier={self.spike_lr_multiplier} must be positive "
                    "(1.0 leaves the LR alone; e.g. 10 for a 10x LR spike)."
                )
            if self.spike_steps and not self.spike_tokens and self.spike_lr_multiplier == 1.0:
                raise UserError(
                    "plugins.chaos.spike_steps is set but plugins.chaos.spike_tokens=false and "
                    "plugins.chaos.spike_lr_multiplier=1.0 inject nothing: enable one of them."
                )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._start_step = 0  # the optimizer step this session started (or resumed) from
        self._done: set[tuple[str, int]] = set()  # (kind, step) injected once already, read at the start
        self._nan_hook = None

    # -- checks and state ----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        every, max_steps = self.run.config.checkpoint.every_n_steps, self.run.config.trainer.max_steps
        for key in ("corrupt_checkpoint_steps", "checkpoint_kill_steps"):
            missing = [s for s in getattr(self.cfg, key) if s % every and s != max_steps]
            if missing:
                raise UserError(
                    f"plugins.chaos.{key} has steps with no checkpoint ({', '.join(map(str, missing))}): "
                    f"checkpoints are written every checkpoint.every_n_steps={every} steps and at "
                    f"trainer.max_steps={max_steps}."
                )

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.cfg.slow_rank:
            self.log_event(trainer, pl_module, "chaos", kind="slow", rank=self.cfg.slow_rank, ms=self.cfg.slow_ms)
            seconds = self.cfg.slow_ms / 1000
            pl_module.model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
        # read once, before anything can be injected in this session, so that all ranks decide alike
        self._start_step = trainer.global_step
        self._done = set()
        markers = self._marker_dir(trainer)
        if markers.is_dir():
            for path in markers.iterdir():
                kind, _, step = path.name.rpartition("-step-")
                if step.isdigit():
                    self._done.add((kind, int(step)))

    def _marker_dir(self, trainer) -> Path:
        return self.run.run_dir / MARKER_DIR

    def _claim(self, trainer, kind: str, step: int) -> bool:
        """True (and the marker written by rank 0) when `kind` at `step` has not been injected in this run.dir."""
        if (kind, step) in self._done:
            return False
        self._done.add((kind, step))
        if trainer.is_global_zero:
            markers = self._marker_dir(trainer)
            markers.mkdir(parents=True, exist_ok=True)
            (markers / f"{kind}-step-{step:08d}").write_text(f"{kind} injected after optimizer step {step}\n")
        return True

    # -- spike and nan: before the forward pass of a data step's micro-batches ----------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        data_step, micro = batch["data_step"], batch["micro"]
        if data_step < self.run.consumed_batches:
            return  # read ahead before a rollback skipped it: it is not trained
        update = trainer.global_step + 1
        if micro == 0 and update in self.cfg.hang_steps and self._claim(trainer, "hang", update):
            self.log_event(trainer, pl_module, "chaos", kind="hang", rank=self.cfg.hang_rank, update=update)
            if trainer.global_rank == self.cfg.hang_rank:
                _hang_forever()
        if data_step in self.cfg.spike_steps:
            if micro == 0:
                self.log_event(
                    trainer,
                    pl_module,
                    "chaos",
                    kind="spike",
                    data_step=data_step,
                    update=trainer.global_step + 1,
                    random_tokens=self.cfg.spike_tokens,
                    lr_multiplier=self.cfg.spike_lr_multiplier,
                )
            if self.cfg.spike_tokens:
                self._randomize(trainer, pl_module, batch)
        if data_step in self.cfg.nan_steps:
            if micro == 0:
                self.log_event(
                    trainer, pl_module, "chaos", kind="nan", data_step=data_step, update=trainer.global_step + 1
                )
            self._nan_hook = pl_module.model.register_forward_hook(_times_nan)

    def _randomize(self, trainer, pl_module, batch: dict[str, Any]) -> None:
        """Uniformly random tokens in place of this micro-batch's, seeded by (seed, data step, micro, dp rank)."""
        ids, targets = batch["input_ids"], batch["targets"]
        seed = np.random.SeedSequence(
            [self.run.config.run.seed, batch["data_step"], batch["micro"], self.run.data_parallel_rank]
        ).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        rows, length = ids.shape
        tokens = torch.randint(0, self.run.config.model.vocab_size, (rows, length + 1), generator=generator)
        tokens = tokens.to(device=ids.device)
        new_targets = tokens[:, 1:].to(targets.dtype)
        ids.copy_(tokens[:, :-1])  # in place: the tensors training_step receives (doc_ids are left as they are)
        targets.copy_(torch.where(targets == IGNORE_INDEX, targets, new_targets))

    def lr_multiplier(self, step: int, data_step: int) -> float:
        return self.cfg.spike_lr_multiplier if data_step in self.cfg.spike_steps else 1.0

    # -- after an update: crash; while a checkpoint is written: kill; after it: corrupt ------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._nan_hook is not None:
            self._nan_hook.remove()
            self._nan_hook = None

    def on_checkpoint_written(self, trainer, pl_module, step: int, tmp: Path) -> None:
        # each rank kills itself once its own part is on disk; global rank 0 writes the marker and event first
        if step in self.cfg.checkpoint_kill_steps and step > self._start_step and self._claim(trainer, "kill", step):
            self.log_event(
                trainer, pl_module, "chaos", kind="checkpoint_kill", signal="SIGKILL", path=str(tmp), pid=os.getpid()
            )
            _sigkill()

    def on_checkpoint_saved(self, trainer, pl_module, step: int, path: Path) -> None:
        if (
            step in self.cfg.corrupt_checkpoint_steps
            and step > self._start_step
            and self._claim(trainer, "corrupt", step)
        ):
            self._corrupt(trainer, pl_module, path)

    def on_step_end(self, trainer, pl_module, step: int) -> None:
        # the step's checkpoint, when one is due, is complete on disk by now (the core's writer ends steps first)
        if step in self.cfg.crash_steps and step > self._start_step and self._claim(trainer, "crash", step):
            # the event (and the marker) reach the file system before any process dies: EventLog closes the file
            # after each line, and the other ranks wait here for rank 0 to have written both
            self.log_event(trainer, pl_module, "chaos", kind="crash", signal="SIGKILL", pid=os.getpid())
            trainer.strategy.barrier("lit_open_chaos_crash")
            _sigkill()  # every rank kills itself: no process is left waiting in a collective
        if step in self.cfg.signal_steps and step > self._start_step and self._claim(trainer, "signal", step):
            self.log_event(trainer, pl_module, "chaos", kind="signal", signal=self.cfg.signal, rank=0)
            if trainer.is_global_zero:  # one rank only: the stop must reach the others through the core
                os.kill(os.getpid(), signal.Signals[self.cfg.signal])

    def _corrupt(self, trainer, pl_module, path: Path) -> None:
        """Truncate the checkpoint file (a sharded one's meta.pt) to half its size; rank 0 only."""
        target = path / SHARDED_METADATA if path.is_dir() else path
        if not trainer.is_global_zero or not target.is_file():
            return
        size = target.stat().st_size
        self.log_event(trainer, pl_module, "chaos", kind="corrupt", path=str(target), size=size)
        with open(target, "r+b") as f:
            f.truncate(size // 2)
            os.fsync(f.fileno())


def _hang_forever() -> None:
    """Stop responding, as a rank stuck in a driver call or a deadlock would (only a signal or a kill ends it)."""
    while True:
        time.sleep(3600)


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _times_nan(module: torch.nn.Module, args: tuple, output: Any) -> Any:
    return output * float("nan") if isinstance(output, torch.Tensor) else output
