"""spike_rollback: detect loss spikes, let benign ones pass, and roll back from malignant ones, skipping their data.

What: each optimizer step's loss (and, if watched, its gradient norm before clipping; both already agreed across
ranks) is tested against a rolling window of the last `window` normal steps. A spike begins at the first step whose
value is both more than `z_threshold` standard deviations above the window's mean and more than `ratio_threshold`
times that mean (the ratio test keeps a very quiet loss, with a tiny deviation, from raising false alarms). From then
on each step is compared with that pre-spike baseline:
- benign: the value is back (within `recover_z` deviations or `recover_ratio` times the mean) within `patience`
  global batches (batches, not updates: a skipped update does not stop the clock). Logged as a `spike` event
  (phase `benign`, with its length and peak); nothing else happens, as in K2's report, where most spikes
  recovered on their own.
- malignant: still up after `patience` batches. The trainer rolls the model, optimizer, LR schedule, RNGs and
  step counter back to an in-memory snapshot from at least `rewind` steps before the spike began, and goes on
  with data it has not seen: the global batches trained since that snapshot are undone and the next `skip_after`
  batches are skipped too (PaLM restarted about 100 steps before a spike and skipped 200-500 batches).
  Optionally the LR is multiplied by `lr_factor` for the `lr_steps` updates after the rollback, and other
  plugins are asked to switch features on (`escalate: [qk_norm]` with `plugins.qk_norm.start=on_rollback`).

A value that is not finite starts a spike as well (and never counts as recovered): with `nan_guard`, which skips
that update, training goes on and the spike is benign; without it the NaN update spoils the weights and the spike
is rolled back `patience` batches later. Use both in long runs.

Rollbacks are decided on global rank 0 and carried out on every rank (see `Plugin.rollback`). The trainer writes a
`rollback` event with the restored step and the data steps undone and skipped (`[first, end)`), moves checkpoints
written after the restored step to `checkpoints/rolled-back/` (so that `resume=auto` cannot pick a state from the
bad trajectory), and marks the data-sequence log. After `max_rollbacks` rollbacks, a further malignant spike stops
the run with a clear error (exit status 2): repeated spikes call for a change of recipe, not more rollbacks.

Memory: the trainer keeps snapshots every `snapshot_every` steps in CPU memory, as many as are needed to reach
`patience + rewind + 1` steps back (two with the defaults); each holds this process's share of the parameters and
optimizer state (about 12 bytes per parameter for fp32 AdamW, divided by the number of sharding ranks). The
`snapshots` event gives the size.

State: the detector's window, any spike in progress, the rollbacks done and the LR lowering survive a resume (they
are in the checkpoint), so a resumed run keeps its rollback budget and knows what it skipped.

Options (`plugins.spike_rollback.<option>`):
- watch (list, default [loss]): loss and/or grad_norm.
- window (int, default 128), min_history (int, default 0 = window // 2): the rolling window of normal steps and the
  steps needed before anything is flagged.
- z_threshold (float, default 6.0), ratio_threshold (float, default 1.1): the onset tests (both must hold).
- recover_z (float, default 2.0), recover_ratio (float, default 1.02): back to baseline if either holds.
- patience (int, default 50): global batches a spike may last and still be benign.
- snapshot_every (int, default 100), rewind (int, default 10): snapshot interval, and how many steps before the
  spike's first step the restored state must be.
- skip_after (int, default 100): global batches skipped after the spike window.
- lr_factor (float, default 1.0), lr_steps (int, default 0): LR multiplier for the updates after a rollback.
- max_rollbacks (int, default 3).
- escalate (list, default []): features to switch on after a rollback (`qk_norm`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_open.checkpoint.resumable import CheckpointWriter, checkpoint_step, list_checkpoints
from lit_open.errors import UserError
from lit_open.plugin import Plugin, Rollback, RolledBack, SnapshotPolicy

WATCHABLE = ("loss", "grad_norm")
ESCALATIONS = ("qk_norm",)


class SpikeRollback(Plugin):
    """Classifies spikes as benign or malignant and asks the trainer to roll back from malignant ones."""

    name = "spike_rollback"

    @dataclass
    class Config:
        watch: list[str] = field(default_factory=lambda: ["loss"])
        window: int = 128
        min_history: int = 0
        z_threshold: float = 6.0
        ratio_threshold: float = 1.1
        recover_z: float = 2.0
        recover_ratio: float = 1.02
        patience: int = 50
        snapshot_every: int = 100
        rewind: int = 10
        skip_after: int = 100
        lr_factor: float = 1.0
        lr_steps: int = 0
        max_rollbacks: int = 3
        escalate: list[str] = field(default_factory=list)

        def __post_init__(self) -> None:
            key = "plugins.spike_rollback"
            unknown = sorted(set(self.watch) - set(WATCHABLE)) or (not self.watch and ["(nothing)"])
            if unknown:
                raise UserError(f"{key}.watch has {', '.join(unknown)}; watch one or both of: {', '.join(WATCHABLE)}.")
            if self.window < 2:
                raise UserError(f"{key}.window={self.window} must be at least 2 steps.")
            if not 0 <= self.min_history <= self.window:
                raise UserError(
                    f"{key}.min_history={self.min_history} must be between 0 (window // 2) and {key}.window="
                    f"{self.window}."
                )
            for name in ("z_threshold", "recover_z"):
                if not getattr(self, name) > 0:
                    raise UserError(f"{key}.{name}={getattr(self, name)} must be a positive number of deviations.")
            for name in ("ratio_threshold", "recover_ratio"):
                if not getattr(self, name) >= 1:
                    raise UserError(f"{key}.{name}={getattr(self, name)} must be a ratio to the mean of at least 1.")
            if self.recover_z > self.z_threshold or self.recover_ratio > self.ratio_threshold:
                raise UserError(
                    f"{key}: the recovery thresholds (recover_z={self.recover_z}, recover_ratio={self.recover_ratio})"
                    f" must not exceed the onset ones (z_threshold={self.z_threshold}, ratio_threshold="
                    f"{self.ratio_threshold})."
                )
            for name in ("patience", "snapshot_every", "max_rollbacks"):
                if getattr(self, name) < 1:
                    raise UserError(f"{key}.{name}={getattr(self, name)} must be at least 1.")
            for name in ("rewind", "skip_after", "lr_steps"):
                if getattr(self, name) < 0:
                    raise UserError(f"{key}.{name}={getattr(self, name)} must be 0 or more.")
            if not 0 < self.lr_factor <= 1:
                raise UserError(f"{key}.lr_factor={self.lr_factor} must be in (0, 1]: it lowers the LR.")
            if self.lr_factor != 1 and self.lr_steps == 0:
                raise UserError(f"{key}.lr_factor={self.lr_factor} needs {key}.lr_steps > 0 (updates it applies to).")
            bad = sorted(set(self.escalate) - set(ESCALATIONS))
            if bad:
                raise UserError(f"{key}.escalate has {', '.join(bad)}; known escalations: {', '.join(ESCALATIONS)}.")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.history: dict[str, deque[float]] = {k: deque(maxlen=self.cfg.window) for k in self.cfg.watch}
        self.spike: dict[str, Any] | None = None  # the spike in progress: onset step, baseline, peak
        self.benign = 0  # spikes that recovered on their own
        self.rollbacks: list[dict[str, Any]] = []  # what each rollback did (steps, data steps undone and skipped)
        self.lowered_until = 0  # updates up to this step get lr_factor
        self._trainer = self._module = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer, self._module = trainer, pl_module

    def snapshot_policy(self) -> SnapshotPolicy:
        return SnapshotPolicy(every=self.cfg.snapshot_every, horizon=self.cfg.patience + self.cfg.rewind + 1)

    def lr_multiplier(self, step: int, data_step: int) -> float:
        return self.cfg.lr_factor if step <= self.lowered_until else 1.0

    # -- detection -----------------------------------------------------------------------------------------
    def _test(self, key: str, value: float, z_limit: float, ratio_limit: float, baseline: tuple | None) -> dict:
        """z-score and ratio of `value` against `baseline` (mean, std), and whether both exceed the limits."""
        if not math.isfinite(value):
            return {"value": value, "why": "not finite", "above": True}
        if baseline is None:
            return {"value": value, "above": False}
        mean, std = baseline
        z = (value - mean) / std if std > 0 else (math.inf if value > mean else 0.0)
        ratio = value / mean if mean > 0 else math.inf
        return {"value": value, "z": z, "ratio": ratio, "above": z > z_limit and ratio > ratio_limit}

    def _baseline(self, key: str) -> tuple[float, float] | None:
        values = self.history[key]
        if len(values) < (self.cfg.min_history or self.cfg.window // 2):
            return None
        std, mean = torch.std_mean(torch.tensor(list(values), dtype=torch.float64))
        return float(mean), float(std)

    def rollback(self, metrics: dict[str, float]) -> Rollback | None:
        step, values = metrics["step"], {k: float(metrics[k]) for k in self.cfg.watch}
        finite = all(math.isfinite(v) for v in values.values())
        if self.spike is None:
            baselines = {k: self._baseline(k) for k in values}
            tests = {
                k: self._test(k, v, self.cfg.z_threshold, self.cfg.ratio_threshold, baselines[k])
                for k, v in values.items()
            }
            if not any(t["above"] for t in tests.values()):
                for key, value in values.items():
                    self.history[key].append(value)
                return None
            self.spike = {
                "onset_step": step,
                "onset_data_step": metrics["data_step"],
                "baseline": baselines,
                "peak": values,
            }
            self._event("spike", phase="onset", data_step=metrics["data_step"], tests=tests)
        else:
            self.spike["peak"] = {k: _higher(v, self.spike["peak"][k]) for k, v in values.items()}
            if finite and all(self._recovered(k, v) for k, v in values.items()):
                self.benign += 1
                onset, lasted = self.spike["onset_step"], metrics["data_step"] - self.spike["onset_data_step"]
                self._event("spike", phase="benign", onset_step=onset, batches=lasted, peak=self.spike["peak"])
                self.spike = None
                for key, value in values.items():
                    self.history[key].append(value)
                return None
        lasted = metrics["data_step"] - self.spike["onset_data_step"]  # batches: skipped updates count too
        if lasted < self.cfg.patience:
            return None
        return self._malignant(metrics, lasted)

    def _recovered(self, key: str, value: float) -> bool:  # value is finite
        baseline = self.spike["baseline"][key]
        if baseline is None:  # flagged for a non-finite value before any history: finite again is back
            return True
        test = self._test(key, value, self.cfg.recover_z, self.cfg.recover_ratio, baseline)
        return not test["above"]

    def _malignant(self, metrics: dict[str, float], lasted: int) -> Rollback:
        onset = self.spike["onset_step"]
        reason = (
            f"spike_rollback: malignant spike from step {onset} (still above baseline after {lasted} batches; peak "
            + ", ".join(f"{k} {v:.4g}" for k, v in self.spike["peak"].items())
            + ")"
        )
        self._event("spike", phase="malignant", onset_step=onset, batches=lasted, peak=self.spike["peak"])
        if len(self.rollbacks) >= self.cfg.max_rollbacks:
            raise UserError(
                f"{reason}, after {len(self.rollbacks)} rollbacks already (plugins.spike_rollback.max_rollbacks="
                f"{self.cfg.max_rollbacks}, at steps {[r['at_step'] for r in self.rollbacks]}). The run stops here, "
                f"without writing a checkpoint of this state. {self._checkpoint_advice(onset)} Spikes that keep "
                "coming back call for a recipe change: a lower LR (optim.lr), z_loss, qk_norm "
                "(plugins.spike_rollback.escalate=[qk_norm]), or a larger plugins.spike_rollback.max_rollbacks."
            )
        return Rollback(
            to_step=max(onset - 1 - self.cfg.rewind, 0),
            resume_data_step=metrics["data_step"] + 1 + self.cfg.skip_after,
            reason=reason,
            escalate=tuple(self.cfg.escalate),
            requested_by=self.name,
        )

    def _checkpoint_advice(self, onset: int) -> str:
        """Which checkpoint to resume from: the newest written before the spike began (resume=auto may be newer)."""
        callbacks = self._trainer.callbacks if self._trainer is not None else []
        writer = next((c for c in callbacks if isinstance(c, CheckpointWriter)), None)
        found = list_checkpoints(writer.directory) if writer is not None else []
        before = [p for p in found if checkpoint_step(p) < onset]
        if not before:
            return "No checkpoint from before the spike is on disk: start again from an earlier run or from scratch."
        during = [p.name for p in found if checkpoint_step(p) >= onset]
        auto = f" (resume=auto would take the newest, {during[-1]}, written during the spike)" if during else ""
        return f"Resume from the newest checkpoint from before the spike with resume={before[-1]}{auto}."

    def on_rollback(self, trainer, pl_module, rolled_back: RolledBack) -> None:
        """Any rollback (also another plugin's) ends the spike in progress; ours are recorded and counted."""
        onset = self.spike["onset_step"] if self.spike is not None else None
        self.spike = None
        if rolled_back.request.requested_by != self.name:
            return
        self.rollbacks.append(
            {
                "at_step": rolled_back.from_step,
                "onset_step": onset,
                "to_step": rolled_back.to_step,
                "undone_data_steps": list(rolled_back.undone),
                "skipped_data_steps": list(rolled_back.skipped),
            }
        )
        if self.cfg.lr_steps:
            self.lowered_until = rolled_back.to_step + self.cfg.lr_steps
            self._event("lr_lowered", factor=self.cfg.lr_factor, until_step=self.lowered_until)

    def _event(self, event: str, **fields: Any) -> None:
        if self._trainer is not None:
            self.log_event(self._trainer, self._module, event, **fields)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "spike": self.spike,
            "benign": self.benign,
            "rollbacks": self.rollbacks,
            "lowered_until": self.lowered_until,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, values in state["history"].items():
            if key in self.history:
                self.history[key].extend(values)
        self.spike = state["spike"]
        self.benign = state["benign"]
        self.rollbacks = list(state["rollbacks"])
        self.lowered_until = state["lowered_until"]


def _higher(value: float, peak: float) -> float:
    """The larger of two values where a non-finite one counts as the highest."""
    if not math.isfinite(value) or not math.isfinite(peak):
        return value if not math.isfinite(value) else peak
    return max(value, peak)
