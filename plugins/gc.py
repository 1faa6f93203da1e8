"""Garbage-collection control: Python's automatic GC off while training, one collection every N optimizer steps on
every rank at the same step, so that collector pauses do not turn into stragglers (OLMo-core, torchtitan). Design,
events and options: docs/plugins/gc.md; `lit-open list plugins` shows the options and their defaults.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

from lit_open.errors import UserError
from lit_open.plugin import Plugin, option


class GarbageCollection(Plugin):
    """Disables automatic GC for the run and collects every `every_n_steps` optimizer steps on all ranks."""

    name = "gc"

    @dataclass
    class Config:
        every_n_steps: int = option(1000, "optimizer steps between two collections (OLMo-core 1000, torchtitan 50)")
        generation: int = option(1, "oldest generation collected: 0, 1 or 2 (2: a full collection)")
        freeze: bool = option(
            False, "one full collection at train start, then gc.freeze() what survives (never scanned again)"
        )
        warn_seconds: float = option(1.0, "a collection slower than this is recorded in events.jsonl as a `gc` event")

        def __post_init__(self) -> None:
            if self.every_n_steps < 1:
                raise UserError(f"plugins.gc.every_n_steps={self.every_n_steps} must be at least 1.")
            if self.generation not in (0, 1, 2):
                raise UserError(f"plugins.gc.generation={self.generation} must be 0, 1 or 2.")
            if not self.warn_seconds >= 0:
                raise UserError(f"plugins.gc.warn_seconds={self.warn_seconds} must be zero or positive.")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._was_enabled: bool | None = None  # None: not in control of the collector
        self._frozen = False
        self.collections = 0  # collections run by this plugin in this process

    def on_train_start(self, trainer, pl_module) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()
        if self.cfg.freeze:
            gc.collect()
            gc.freeze()
            self._frozen = True
        self.log_event(
            trainer,
            pl_module,
            "gc",
            action="disable",
            every_n_steps=self.cfg.every_n_steps,
            generation=self.cfg.generation,
            freeze=self.cfg.freeze,
        )

    def on_step_end(self, trainer, pl_module, step: int) -> None:
        if step % self.cfg.every_n_steps:
            return
        start = time.perf_counter()
        found = gc.collect(self.cfg.generation)
        seconds = time.perf_counter() - start
        self.collections += 1
        if seconds > self.cfg.warn_seconds:
            self.log_event(
                trainer,
                pl_module,
                "gc",
                action="collect",
                seconds=round(seconds, 4),
                generation=self.cfg.generation,
                collected=found,
            )

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()  # a safety net: a no-op once on_train_end or on_exception restored the collector

    def _restore(self) -> None:
        if self._frozen:
            gc.unfreeze()
            self._frozen = False
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None
