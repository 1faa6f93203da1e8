"""spike_rollback: loss (and optionally grad-norm) spikes are detected against a rolling window; a spike back to
baseline within `patience` batches is benign and only logged, a malignant one is rolled back to an in-memory
snapshot from before it, and its batches plus `skip_after` more are skipped (PaLM); optionally the LR is lowered for
a while or QK-norm switched on. Design, memory and options: docs/plugins/spike_rollback.md; `lit-open list plugins`
shows the options and their defaults.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from lit_open.checkpoint.resumable import checkpoint_step, list_checkpoints
from lit_open.errors import UserError
from lit_open.plugin import Plugin, Rollback, RolledBack, SnapshotPolicy, option

WATCHABLE = ("loss", "grad_norm")
ESCALATIONS = ("qk_norm",)


class SpikeRollback(Plugin):
    """Classifies spikes as benign or malignant and asks the trainer to roll back from malignant ones."""

    name = "spike_rollback"

    @dataclass
    class Config:
        watch: list[str] = option(["loss"], "loss and/or grad_norm")
        window: int = option(128, "normal steps the baseline mean and standard deviation are taken over")
        min_history: int = option(0, "normal steps needed before anything is flagged; 0: window // 2")
        z_threshold: float = option(
            6.0, "a spike starts above mean + z_threshold * std (and above ratio_threshold * mean)"
        )
        ratio_threshold: float = option(1.1, "a spike also needs the value above ratio_threshold * mean")
        recover_z: float = option(2.0, "back to baseline below mean + recover_z * std (or below recover_ratio * mean)")
        recover_ratio: float = option(1.02, "also back to baseline below recover_ratio * mean")
        patience: int = option(50, "global batches a spike may last and still be benign")
        snapshot_every: int = option(
            100, "optimizer steps between in-memory snapshots (CPU memory: see the `snapshots` event)"
        )
        rewind: int = option(10, "the restored state is at least this many steps older than the spike's first step")
        skip_after: int = option(100, "global batches skipped after the spike window (PaLM skipped 200-500 in all)")
        lr_factor: float = option(1.0, "LR multiplier for the lr_steps updates after a rollback (1.0: unchanged)")
        lr_steps: int = option(0, "updates after a rollback that train at lr_factor x the scheduled LR")
        max_rollbacks: int = option(
            3, "rollbacks allowed; a further malignant spike then stops the run (exit status 2)"
        )
        escalate: list[str] = option(
            [], "switch features on after a rollback: [qk_norm] (with plugins.qk_norm.start=on_rollback)"
        )

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
        directory = self._run.checkpoint_dir if self._run is not None else None
        found = list_checkpoints(directory) if directory is not None else []
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
