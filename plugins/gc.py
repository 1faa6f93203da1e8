"""Garbage-collection control: Python's automatic GC off during training, a collection every N optimizer steps.

What: at train start automatic garbage collection is disabled (`gc.disable()`, and optionally `gc.freeze()`
after one full collection, so the objects that exist then, the model, the data pipeline, are never scanned
again); then `gc.collect(generation)` runs every `every_n_steps` optimizer steps, on every rank at the same
step. Automatic collection (and the frozen objects) are given back at train end, also when training fails.

Why: CPython's automatic collector starts whenever enough objects were allocated, so it pauses each process at
a different moment; in data- or model-parallel training the other ranks then wait for the slowest one at the
next collective, and a pause of a few hundred milliseconds becomes a step-time straggler on all of them. OLMo
(`gen1_gc_interval`, every step for OLMo 2 7B), OLMo-core (`GarbageCollectorCallback`, every 1000 steps) and
torchtitan (`training.gc_freq`, every 50 steps) all disable it and collect generation 1 at fixed steps instead.

The step is the optimizer step (`trainer.global_step`), checked once per step: the micro-batches of gradient
accumulation do not collect several times, and a skipped update (no step) does not collect. Collections that
take longer than `warn_seconds` are recorded in events.jsonl as `gc` events with their duration (each process
collects; rank 0's time is the one written); a faster one leaves no trace, to keep the file small.

Options (`plugins.gc.<option>`):
- every_n_steps (int, default 1000): optimizer steps between two collections.
- generation (int, default 1): the oldest generation collected, 0, 1 or 2 (2: a full collection).
- freeze (bool, default false): collect fully once at train start and `gc.freeze()` what survives.
- warn_seconds (float, default 1.0): record a collection in events.jsonl when it takes longer than this.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

from lit_open.errors import UserError
from lit_open.plugin import Plugin


class GarbageCollection(Plugin):
    """Disables automatic GC for the run and collects every `every_n_steps` optimizer steps on all ranks."""

    name = "gc"

    @dataclass
    class Config:
        every_n_steps: int = 1000
        generation: int = 1
        freeze: bool = False
        warn_seconds: float = 1.0

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
        self._last_step: int | None = None
        self.collections = 0  # collections run by this plugin in this process

    def on_train_start(self, trainer, pl_module) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()
        if self.cfg.freeze:
            gc.collect()
            gc.freeze()
            self._frozen = True
        self._last_step = trainer.global_step  # a resumed run does not collect at the step it resumes from
        self.log_event(
            trainer,
            pl_module,
            "gc",
            action="disable",
            every_n_steps=self.cfg.every_n_steps,
            generation=self.cfg.generation,
            freeze=self.cfg.freeze,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a micro-batch within the step, or a skipped update
            return
        self._last_step = step
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
