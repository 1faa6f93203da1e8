"""straggler: finds the rank that slows every step. Each rank times its own forward passes; every N steps the ranks'
means are gathered, logged as `train/step_time_min` / `train/step_time_max`, and a rank slower than the median rank
by a factor in several windows in a row gets a `straggler` event that names it. Design and options:
docs/plugins/straggler.md; `lit-open list plugins` shows the defaults.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lit_open.errors import UserError
from lit_open.plugin import Plugin, option


class Straggler(Plugin):
    """Gathers every rank's forward time per step every N steps; names a rank persistently slower than the median."""

    name = "straggler"

    @dataclass
    class Config:
        every_n_steps: int = option(20, "optimizer steps per window: the ranks' mean forward times are compared then")
        factor: float = option(1.25, "a rank whose mean exceeds the median rank's by this factor is slow in a window")
        windows: int = option(3, "a rank slow in this many windows in a row gets a `straggler` event")

        def __post_init__(self) -> None:
            for key in ("every_n_steps", "windows"):
                if getattr(self, key) < 1:
                    raise UserError(f"plugins.straggler.{key}={getattr(self, key)} must be at least 1.")
            if not self.factor > 1.0:  # also refuses nan
                raise UserError(
                    f"plugins.straggler.factor={self.factor} must be above 1 (e.g. 1.25: 25% slower than the median)."
                )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._forward_s = 0.0  # this window's forward time on this rank
        self._steps = 0  # updates in this window
        self._started: Any = None  # the running forward's start: a perf_counter value or a CUDA event
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: timed once the window ends
        self._slow_windows: dict[int, int] = {}  # rank -> windows in a row it was slow in

    # Each micro-batch's forward: from the batch's start to the loss's backward. Data parallelism puts no collective
    # there (its gradient reductions are in the backward), so a rank's own slowness shows instead of the wait for
    # the slowest rank that makes every rank's whole step equally long.
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._started is None:
            return
        if isinstance(self._started, torch.cuda.Event):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._started, end))
        else:
            self._forward_s += time.perf_counter() - self._started
        self._started = None

    def step_metrics(self, trainer, pl_module) -> dict[str, float]:
        self._steps += 1
        if self._steps < self.cfg.every_n_steps:
            return {}
        if self._events:  # complete by now: the update waited for the backward that followed them
            self._forward_s += sum(start.elapsed_time(end) for start, end in self._events) / 1000
        mean_ms = 1000 * self._forward_s / self._steps
        self._forward_s, self._steps, self._events = 0.0, 0, []
        times = torch.tensor([mean_ms], dtype=torch.float64, device=pl_module.device)
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered = [torch.zeros_like(times) for _ in range(trainer.world_size)]
            dist.all_gather(gathered, times)
            times = torch.cat(gathered)
        per_rank = times.cpu().tolist()
        median = float(torch.tensor(per_rank).median())
        for rank, ms in enumerate(per_rank):
            slow = ms > self.cfg.factor * median
            self._slow_windows[rank] = self._slow_windows.get(rank, 0) + 1 if slow else 0
            if self._slow_windows[rank] == self.cfg.windows:
                self.log_event(
                    trainer,
                    pl_module,
                    "straggler",
                    rank=rank,
                    forward_ms=round(ms, 3),
                    median_ms=round(median, 3),
                    ratio=round(ms / median, 3) if median > 0 else None,
                    windows=self.cfg.windows,
                    every_n_steps=self.cfg.every_n_steps,
                )
        return {"train/step_time_min": min(per_rank), "train/step_time_max": max(per_rank)}
