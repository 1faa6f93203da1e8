"""Rollbacks: going back to an earlier training state and on with later data, for any plugin that asks.

A plugin declares a `SnapshotPolicy`; `Rollbacks` then keeps in-memory snapshots of this process's share of the state
(`lit_open.train.snapshots`). When a plugin's `rollback` hook returns a request, global rank 0's request is carried
out on every rank: the newest snapshot at or before the target step (or, when none is that old, the newest
single-file checkpoint on disk) is restored in place, the step counter goes back with it, and the data position
jumps forward past the batches of the spike. Every callback's `on_rollback` hook is then called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lit_open.checkpoint.resumable import CHECKPOINT_KEY, checkpoint_step, list_checkpoints
from lit_open.errors import UserError
from lit_open.glue import set_optimizer_step_count
from lit_open.plugin import Rollback, RolledBack, SnapshotPolicy
from lit_open.train.snapshots import Snapshot, SnapshotRing, restore_snapshot, snapshot_from_checkpoint, take_snapshot

if TYPE_CHECKING:
    from lit_open.train.module import LitLM


class Rollbacks:
    """The snapshots a LitLM keeps for its plugins' rollbacks, and the rollbacks themselves."""

    def __init__(self, module: LitLM, policies: list[SnapshotPolicy]) -> None:
        self.module = module
        self.ring = SnapshotRing(min(p.every for p in policies), max(p.horizon for p in policies))

    def take(self) -> None:
        """A snapshot of the state now (after an update, or the state training starts or resumes from)."""
        module = self.module
        self.ring.add(
            take_snapshot(
                module.model,
                module.optimizers().optimizer,
                module.lr_schedulers(),
                module.global_step,
                module.run.consumed_batches,
            )
        )

    def due(self, step: int) -> bool:
        return self.ring.due(step)

    def roll_back(self, request: Rollback, data_step: int) -> RolledBack:
        """Restore the newest snapshot at or before `request.to_step` and go on at `request.resume_data_step`."""
        module, run = self.module, self.module.run
        snapshot = self.ring.newest_at_or_before(request.to_step)
        if snapshot.step > request.to_step:  # e.g. a spike that began before this session resumed
            snapshot = checkpoint_snapshot(run.checkpoint_dir, request.to_step) or snapshot
        from_step = module.global_step
        restore_snapshot(snapshot, module.model, module.optimizers().optimizer, module.lr_schedulers())
        set_optimizer_step_count(module.trainer, snapshot.step)
        self.ring.drop_after(snapshot.step)
        for history in run.history.values():
            history[:] = [(step, value) for step, value in history if step <= snapshot.step]
        resume = max(request.resume_data_step, data_step + 1)  # data only moves forward
        run.consumed_batches = resume
        module.trainer.datamodule.skip_to(resume)
        run.rollbacks += 1
        rolled_back = RolledBack(
            request=request,
            from_step=from_step,
            to_step=snapshot.step,
            undone=(snapshot.consumed_batches, data_step + 1),
            skipped=(data_step + 1, resume),
        )
        run.events.write(
            snapshot.step,
            "rollback",
            reason=request.reason,
            requested_by=request.requested_by,
            requested_to_step=request.to_step,  # the restored to_step is older or, when nothing older is kept, newer
            from_step=from_step,
            to_step=snapshot.step,
            undone_data_steps=list(rolled_back.undone),
            skipped_data_steps=list(rolled_back.skipped),
            escalate=list(request.escalate),
            rollbacks=run.rollbacks,
        )
        return rolled_back


def agreed_rollback(strategy: Any, request: Rollback | None) -> Rollback | None:
    """Global rank 0's request when any rank has one, on every rank; None when no rank asks (a collective)."""
    if not strategy.reduce_boolean_decision(request is not None, all=False):
        return None
    return strategy.broadcast(request, src=0)


def no_snapshots(request: Rollback) -> UserError:
    return UserError(
        f"A plugin asked for a rollback ({request.reason}) but no plugin declared a snapshot_policy, so no state to "
        "roll back to was kept. Plugins that call for rollbacks must declare one."
    )


def checkpoint_snapshot(directory: Path | None, step: int) -> Snapshot | None:
    """The newest single-file checkpoint in `directory` at or before `step`, as a snapshot (None if there is none).

    Sharded checkpoint directories are not read back mid-run: the oldest in-memory snapshot serves instead.
    """
    found = [p for p in list_checkpoints(directory) if p.is_file()] if directory is not None else []
    found = [p for p in found if checkpoint_step(p) <= step]
    if not found:
        return None
    checkpoint = torch.load(found[-1], map_location="cpu", weights_only=False)
    state = checkpoint[CHECKPOINT_KEY]
    return snapshot_from_checkpoint(checkpoint, state["consumed_batches"], state["rng"])
