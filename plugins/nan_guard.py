"""nan_guard: a non-finite loss or gradient is skipped, repeated ones (`rollback_after` within `within` batches) are
rolled back to an in-memory snapshot, and a checkpoint holding a NaN or inf is never written (the run stops instead).
Design, events and options: docs/plugins/nan_guard.md; `lit-open list plugins` shows the options and their defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lit_open.errors import UserError
from lit_open.plugin import Plugin, Rollback, RolledBack, SnapshotPolicy, option


def _all_finite(tensors) -> bool:
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return False
    return True


class NanGuard(Plugin):
    """Skips non-finite updates, rolls back when they repeat, and refuses to write non-finite checkpoints."""

    name = "nan_guard"

    @dataclass
    class Config:
        rollback_after: int = option(
            3, "non-finite steps within `within` global batches that trigger a rollback (1: at the first)"
        )
        within: int = option(
            100, "the window, in global batches, within which rollback_after non-finite steps trigger a rollback"
        )
        rewind: int = option(0, "the restored state is at least this many steps older than the first non-finite step")
        skip_after: int = option(0, "global batches skipped after the one that triggered the rollback")
        snapshot_every: int = option(100, "optimizer steps between in-memory snapshots")
        max_rollbacks: int = option(
            3, "rollbacks allowed; a further series of non-finite steps then stops the run (exit status 2)"
        )

        def __post_init__(self) -> None:
            for name in ("rollback_after", "within", "snapshot_every", "max_rollbacks"):
                if getattr(self, name) < 1:
                    raise UserError(f"plugins.nan_guard.{name}={getattr(self, name)} must be at least 1.")
            for name in ("rewind", "skip_after"):
                if getattr(self, name) < 0:
                    raise UserError(f"plugins.nan_guard.{name}={getattr(self, name)} must be 0 or more.")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.recent: list[dict[str, Any]] = []  # non-finite steps since the last rollback: step, data_step
        self.skipped = 0  # non-finite updates skipped over the run
        self.rollbacks = 0
        self._trainer = self._module = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer, self._module = trainer, pl_module

    def snapshot_policy(self) -> SnapshotPolicy:
        # a series may start `within` batches back; skipped updates do not advance the step, so that is enough
        return SnapshotPolicy(every=self.cfg.snapshot_every, horizon=self.cfg.within + self.cfg.rewind + 1)

    def _series(self, data_step: int) -> list[dict[str, Any]]:
        return [r for r in self.recent if data_step - r["data_step"] < self.cfg.within]

    def skip_step(self, metrics: dict[str, float]) -> bool:
        bad = {k: metrics[k] for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])}
        if not bad:
            return False
        self.recent = self._series(metrics["data_step"]) + [
            {"step": metrics["step"], "data_step": metrics["data_step"]}
        ]
        action = "rollback" if len(self.recent) >= self.cfg.rollback_after else "skip"
        self.skipped += action == "skip"
        self._event(
            "non_finite",
            action=action,
            update=metrics["step"],
            data_step=metrics["data_step"],
            values=bad,
            in_window=len(self.recent),
        )
        return True

    def rollback(self, metrics: dict[str, float]) -> Rollback | None:
        if not self.recent or self.recent[-1]["data_step"] != metrics["data_step"]:
            return None
        if len(self.recent) < self.cfg.rollback_after:
            return None
        first = self.recent[0]
        reason = (
            f"nan_guard: {len(self.recent)} non-finite steps within {self.cfg.within} global batches (data steps "
            f"{[r['data_step'] for r in self.recent]})"
        )
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise UserError(
                f"{reason}, after {self.rollbacks} rollbacks already (plugins.nan_guard.max_rollbacks="
                f"{self.cfg.max_rollbacks}). The run stops here; every checkpoint in <run.dir>/checkpoints is "
                "finite. Non-finite values that survive rollbacks point at the recipe: lower optim.lr, raise "
                "optim.eps, use bf16 rather than fp16, add z_loss, then resume=auto."
            )
        return Rollback(
            to_step=max(first["step"] - 1 - self.cfg.rewind, 0),
            resume_data_step=metrics["data_step"] + 1 + self.cfg.skip_after,
            reason=reason,
            requested_by=self.name,
        )

    def on_rollback(self, trainer, pl_module, rolled_back: RolledBack) -> None:
        self.recent = []  # whoever asked: the state is from before the series
        self.rollbacks += rolled_back.request.requested_by == self.name

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        tensors = list(pl_module.model.parameters())
        for optimizer in trainer.optimizers:
            tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        if not trainer.strategy.reduce_boolean_decision(not _all_finite(tensors), all=False):
            return
        self._event("non_finite", action="refused_checkpoint", update=trainer.global_step)
        raise UserError(
            f"nan_guard: refusing to write the checkpoint of step {trainer.global_step}: some parameters or "
            "optimizer states are NaN or infinite (a finite gradient can still overflow a weight). The run stops; "
            "the checkpoints in <run.dir>/checkpoints are all finite: resume from the newest (resume=auto), "
            "with a lower optim.lr or optim.grad_clip."
        )

    def _event(self, event: str, **fields: Any) -> None:
        if self._trainer is not None:
            self.log_event(self._trainer, self._module, event, **fields)

    def state_dict(self) -> dict[str, Any]:
        return {"recent": self.recent, "skipped": self.skipped, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = list(state["recent"])
        self.skipped = state["skipped"]
        self.rollbacks = state["rollbacks"]
