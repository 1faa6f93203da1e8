"""chaos: inject faults at chosen steps (loss spike, NaN, crash, corrupted checkpoint) to rehearse recovery.

What: at the steps you list, the plugin breaks the run on purpose, the way a long run breaks by accident:
- spike: the global batch of a data step is replaced by uniformly random tokens (the loss jumps to about
  ln(vocab_size) or above), and/or the learning rate of that step's update is multiplied by `spike_lr_multiplier`;
- nan: the final hidden states of a data step's forward pass are multiplied by NaN, so its loss (`train/loss`) and
  all its gradients are NaN, as after a numerical overflow;
- crash: the process SIGKILLs itself right after an optimizer step (after that step's checkpoint, if one is due, has
  been written): no cleanup, no flushing of buffered logs, exactly like a node failure or an OOM kill;
- corrupt: right after a checkpoint has been written, its file is truncated to half its size (for a sharded
  checkpoint directory: its `meta.pt`, the file `resume` reads first), as a failing disk or an interrupted copy would.

Every injection is written to events.jsonl before it happens, as a `chaos` event with `kind` (spike, nan, crash or
corrupt), the optimizer `step` and, for spike and nan, the `data_step`.

Rehearsing recovery before a long run: run the recipe for a few hundred steps with the faults you want to survive,
with the plugins you will use for real, then check that the run did what you expect:

    lit-open train recipe=olmo2_1b run.dir=runs/rehearsal trainer.max_steps=400 checkpoint.every_n_steps=100 \\
        plugins=[chaos,skip_step] plugins.chaos.spike_steps=[150] plugins.chaos.nan_steps=[200] \\
        plugins.chaos.crash_steps=[300] plugins.chaos.corrupt_checkpoint_steps=[300]
    # the process dies after step 300 (exit status -9 / 137), with a corrupted step-00000300.ckpt
    lit-open train --config runs/rehearsal/config.yaml resume=auto
    # refused (exit status 2): the message names the corrupt checkpoint and the older ones
    lit-open train --config runs/rehearsal/config.yaml resume=runs/rehearsal/checkpoints/step-00000200.ckpt

What each fault should lead to:
- spike: without a guard the loss of that step is high (about ln(vocab_size) for random tokens) and the update
  perturbs the weights and AdamW's moments; with `skip_step`, once it has the history it decides from
  (`min_history`, by default half its `window` of accepted steps: put the spike after that), the update is skipped:
  a `skip` event at the same data step, after the `chaos` one, and no row in metrics.csv for it.
- nan: without a guard the NaN update is applied and every later loss is NaN (the run is lost); with `skip_step` the
  update is skipped (NaN is never accepted, even before the detector has history) and training goes on.
- crash: `resume=auto` continues from the newest checkpoint; the steps after it repeat the uninterrupted run's
  losses exactly (same data order, RNG and plugin state). Rows of metrics.csv after that checkpoint that were
  still buffered are lost with the process and logged again by the resumed run.
- corrupt: `resume=auto` refuses the checkpoint with exit status 2 and a message that names it and the older
  checkpoints to resume from (`resume=PATH`).

Once only: a crash or a corruption is injected at most once per run directory, so that a resumed run that passes
the same step again (it resumed from an older checkpoint) goes on. The plugin records what it injected in marker
files `<run.dir>/chaos/crash-step-NNNNNNNN` and `corrupt-step-NNNNNNNN`, written before the fault; delete them (or use
another run.dir) to rehearse again. Spikes and NaNs belong to their data step and are injected whenever that step
is trained, so a resumed run repeats the uninterrupted one: the random tokens are seeded by (run.seed, data step,
micro-batch, data-parallel rank), identical on tensor-parallel peers and from one rerun to the next.

Options (`plugins.chaos.<option>`; every list empty by default, so the plugin does nothing unless told):
- spike_steps (list of data steps, default []): data steps to spike. A data step numbers the global batches from 0;
  data step d is trained into update d + 1 as long as no update has been skipped.
- spike_tokens (bool, default true): replace the spike steps' batches by random tokens; false with a multiplier
  spikes the LR alone.
- spike_lr_multiplier (float, default 1.0): the LR of every parameter group is multiplied by this for the spike
  steps' updates (the `train/lr` logged for that step shows it), and is back on the schedule for the next update.
- nan_steps (list of data steps, default []): data steps whose loss and gradients become NaN.
- crash_steps (list of optimizer steps, default []): SIGKILL the process (every rank) after this update.
- corrupt_checkpoint_steps (list of optimizer steps, default []): truncate the checkpoint written at this step; a
  checkpoint must be written there (a multiple of checkpoint.every_n_steps, or trainer.max_steps).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_open.checkpoint.resumable import SHARDED_METADATA, CheckpointWriter, checkpoint_name
from lit_open.errors import UserError
from lit_open.plugin import Plugin

IGNORE_INDEX = -100  # targets that take no loss (lit_open.loss.lm_loss's default): kept as they are in a spike
MARKER_DIR = "chaos"  # <run.dir>/chaos/: what was injected once already (crash, corrupt)


class Chaos(Plugin):
    """Injects spikes, NaNs, crashes and corrupted checkpoints at the configured steps, each logged first."""

    name = "chaos"

    @dataclass
    class Config:
        spike_steps: list[int] = field(default_factory=list)
        spike_tokens: bool = True
        spike_lr_multiplier: float = 1.0
        nan_steps: list[int] = field(default_factory=list)
        crash_steps: list[int] = field(default_factory=list)
        corrupt_checkpoint_steps: list[int] = field(default_factory=list)

        def __post_init__(self) -> None:
            for key in ("spike_steps", "nan_steps", "crash_steps", "corrupt_checkpoint_steps"):
                bad = [s for s in getattr(self, key) if s < 0]
                if bad:
                    raise UserError(
                        f"plugins.chaos.{key}={getattr(self, key)} has negative steps ({', '.join(map(str, bad))}); "
                        "give steps >= 0 (data steps count global batches from 0, optimizer steps updates from 1)."
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
        writer = next((c for c in trainer.callbacks if isinstance(c, CheckpointWriter)), None)
        if writer is None or not self.cfg.corrupt_checkpoint_steps:
            return
        missing = [s for s in self.cfg.corrupt_checkpoint_steps if s % writer.every_n_steps and s != trainer.max_steps]
        if missing:
            raise UserError(
                f"plugins.chaos.corrupt_checkpoint_steps has steps with no checkpoint to corrupt "
                f"({', '.join(map(str, missing))}): checkpoints are written every checkpoint.every_n_steps="
                f"{writer.every_n_steps} steps and at trainer.max_steps={trainer.max_steps}."
            )

    def on_train_start(self, trainer, pl_module) -> None:
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
        return Path(trainer.default_root_dir) / MARKER_DIR

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
        if data_step < pl_module.consumed_batches:
            return  # read ahead before a rollback skipped it: it is not trained
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
            [pl_module.config.run.seed, batch["data_step"], batch["micro"], _data_parallel_rank(trainer)]
        ).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        rows, length = ids.shape
        tokens = torch.randint(0, pl_module.config.model.vocab_size, (rows, length + 1), generator=generator)
        tokens = tokens.to(device=ids.device)
        new_targets = tokens[:, 1:].to(targets.dtype)
        ids.copy_(tokens[:, :-1])  # in place: the tensors training_step receives (doc_ids are left as they are)
        targets.copy_(torch.where(targets == IGNORE_INDEX, targets, new_targets))

    def lr_multiplier(self, step: int, data_step: int) -> float:
        return self.cfg.spike_lr_multiplier if data_step in self.cfg.spike_steps else 1.0

    # -- after each micro-batch: corrupt and crash -------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._nan_hook is not None:
            self._nan_hook.remove()
            self._nan_hook = None
        if batch["micro"] + 1 == batch["n_micro"]:
            self._after_update(trainer, pl_module, at_end=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._after_update(trainer, pl_module, at_end=True)  # CheckpointWriter.on_train_end wrote the final one

    def _after_update(self, trainer, pl_module, at_end: bool) -> None:
        step = trainer.global_step
        if step <= self._start_step:  # nothing trained yet in this session (or a skipped update at the start)
            return
        # CheckpointWriter comes before the plugins in the Trainer's callbacks: when this step's checkpoint is due,
        # it is complete on disk by now (the final one only in on_train_end)
        writer = next((c for c in trainer.callbacks if isinstance(c, CheckpointWriter)), None)
        written = at_end or writer is None or step % writer.every_n_steps == 0
        if step in self.cfg.corrupt_checkpoint_steps and written and self._claim(trainer, "corrupt", step):
            directory = writer.directory if writer is not None else Path(trainer.default_root_dir) / "checkpoints"
            self._corrupt(trainer, pl_module, directory / checkpoint_name(step))
        if step in self.cfg.crash_steps and self._claim(trainer, "crash", step):
            # the event (and the marker) reach the file system before any process dies: EventLog closes the file
            # after each line, and the other ranks wait here for rank 0 to have written both
            self.log_event(trainer, pl_module, "chaos", kind="crash", signal="SIGKILL", pid=os.getpid())
            trainer.strategy.barrier("lit_open_chaos_crash")
            _sigkill()  # every rank kills itself: no process is left waiting in a collective

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


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _times_nan(module: torch.nn.Module, args: tuple, output: Any) -> Any:
    return output * float("nan") if isinstance(output, torch.Tensor) else output


def _data_parallel_rank(trainer) -> int:
    """This process's data-parallel rank (tensor-parallel peers share a batch, and so its random tokens)."""
    mesh = getattr(trainer.strategy, "_device_mesh", None)
    if mesh is not None:
        return mesh["data_parallel"].get_local_rank()
    return trainer.global_rank
