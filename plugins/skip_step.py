"""skip_step: an update whose loss or grad norm exceeds mean + sigma x std of the recent accepted steps (or is not
finite) is skipped: weights, optimizer moments, schedule and step counter untouched (OLMo-core's rule, skipped values
kept out of the window). Design and options: docs/plugins/skip_step.md; `lit-open list plugins` shows the options and
their defaults.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from lit_open.errors import UserError
from lit_open.plugin import Plugin, option

WATCHABLE = ("loss", "grad_norm")


class SkipStep(Plugin):
    """Skips optimizer updates whose loss or grad norm exceeds mean + sigma * std of the recent accepted steps."""

    name = "skip_step"

    @dataclass
    class Config:
        window: int = option(128, "accepted steps the mean and standard deviation are taken over (OLMo-core: 128)")
        sigma: float = option(6.0, "standard deviations above the mean that make an outlier (OLMo-core: 6)")
        min_history: int = option(
            0, "accepted steps before anything is skipped; 0: window // 2 (non-finite values always are)"
        )
        watch: list[str] = option(list(WATCHABLE), "which of the step's metrics are tested")

        def __post_init__(self) -> None:
            if self.window < 2:
                raise UserError(f"plugins.skip_step.window={self.window} must be at least 2 steps.")
            if not self.sigma > 0:
                raise UserError(f"plugins.skip_step.sigma={self.sigma} must be positive (OLMo-core uses 6).")
            if not 0 <= self.min_history <= self.window:
                raise UserError(
                    f"plugins.skip_step.min_history={self.min_history} must be between 0 (window // 2) and "
                    f"plugins.skip_step.window={self.window}."
                )
            unknown = sorted(set(self.watch) - set(WATCHABLE)) or (not self.watch and ["(nothing)"])
            if unknown:
                raise UserError(
                    f"plugins.skip_step.watch has {', '.join(unknown)}; watch one or both of: {', '.join(WATCHABLE)}."
                )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.history: dict[str, deque[float]] = {k: deque(maxlen=self.cfg.window) for k in self.cfg.watch}
        self.skipped: list[int] = []  # data steps whose update was skipped, over the whole run
        self._trainer = self._module = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer, self._module = trainer, pl_module

    def skip_step(self, metrics: dict[str, float]) -> bool:
        needed = self.cfg.min_history or self.cfg.window // 2
        reasons = {}
        for key, values in self.history.items():
            value = metrics[key]
            if not math.isfinite(value):
                reasons[key] = {"value": value, "why": "not finite"}
            elif len(values) >= needed:
                mean, std = _mean_std(values)
                threshold = mean + self.cfg.sigma * std
                if value > threshold:
                    reasons[key] = {"value": value, "mean": mean, "std": std, "threshold": threshold}
        if reasons:
            self.skipped.append(metrics["data_step"])
            if self._trainer is not None:
                self.log_event(
                    self._trainer,
                    self._module,
                    "skip",
                    data_step=metrics["data_step"],
                    update=metrics["step"],
                    outliers=reasons,
                )
            return True
        for key, values in self.history.items():
            values.append(float(metrics[key]))
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}, "skipped": list(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, values in state["history"].items():
            if key in self.history:
                self.history[key].extend(values)
        self.skipped = list(state["skipped"])


def _mean_std(values: deque[float]) -> tuple[float, float]:
    std, mean = torch.std_mean(torch.tensor(list(values), dtype=torch.float64))  # unbiased, as OLMo-core
    return float(mean), float(std)
