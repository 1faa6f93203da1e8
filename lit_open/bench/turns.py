"""Runners that take turns: each training loop runs in its own thread, one at a time, in alternating rounds.

A ratio of two training loops timed one after the other drifts with whatever else the machine does meanwhile (on a
loaded CPU, Lightning/bare swung from 0.85 to 1.25 over three runs). Here every runner's loop runs in its own
thread and the threads hand a baton around: turn 0 of each runner builds its model and runs the warmup steps
(untimed), then each round gives every runner one turn of `round_steps` steps, the runners in a rotated order each
round. Within a turn the first step is untimed (it absorbs the switch from the other runner: caches, allocator) and
the clock runs from its end to the end of the turn's last step, so everything a loop does between two of its steps
(fetching the batch, its hooks, its bookkeeping) is timed. Each round thus yields one timing per runner, taken
within seconds of the others', and the ratio of two runners is a per-round ratio: its median and spread over the
rounds are what survives noise that drifts slowly.

`sequential` runs all turns of one runner before the next runner starts (and lets its memory go first): what a
device that cannot hold every runner's model at once needs.
"""

from __future__ import annotations

import statistics
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_open.bench.measure import peak_memory, reset_peak_memory, synchronized_clock

SCHEDULES = ("interleaved", "sequential")


@dataclass
class TurnLog:
    """What one runner's turns measured."""

    seconds: list[float] = field(default_factory=list)  # one per timed turn, in round order
    losses: list[float] = field(default_factory=list)  # every step's loss, read back at the end
    peak: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Turns:
    """The baton. A runner's loop calls `step_begins(i)` before step i's device work and `step_ends(i, loss)` after
    it, for steps 0 .. `total_steps` - 1 (`warmup + rounds * round_steps` of them)."""

    def __init__(self, device: torch.device, warmup: int, rounds: int, round_steps: int, schedule: str) -> None:
        if round_steps < 2:
            raise ValueError("round_steps must be at least 2: a turn's first step is not timed")
        if warmup < 1 or rounds < 1:
            raise ValueError("warmup and rounds must be at least 1")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
        self.device, self.warmup, self.rounds, self.round_steps = device, warmup, rounds, round_steps
        self.schedule = schedule
        self._cond = threading.Condition()
        self._holder: str | None = None  # the runner whose turn it is
        self._done: set[str] = set()  # runners whose loop has returned or raised
        self.logs: dict[str, TurnLog] = {}

    @property
    def total_steps(self) -> int:
        return self.warmup + self.rounds * self.round_steps

    def turn_bounds(self, step: int) -> tuple[bool, bool]:
        """Whether `step` is the first / the last step of its turn (turn 0 is the warmup)."""
        if step < self.warmup:
            return step == 0, step == self.warmup - 1
        offset = (step - self.warmup) % self.round_steps
        return offset == 0, offset == self.round_steps - 1

    # -- the runners' side, called from their threads ----------------------------------------------------------

    def _wait_for_turn(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._holder == name)

    def _end_turn(self, name: str) -> None:
        """Give the baton back and block until this runner's next turn."""
        with self._cond:
            self._holder = None
            self._cond.notify_all()
        self._wait_for_turn(name)

    # -- the scheduler's side, in the calling thread -----------------------------------------------------------

    def run(self, loops: dict[str, Callable[[RunnerClock], None]]) -> None:
        """Run every loop (a function of its clock that trains `total_steps` steps, reporting each to the clock) in
        turns. What each measured is in `logs[name]`: its timed turns, every step's loss, its peak memory, and the
        traceback of a loop that raised."""

        def body(name: str, loop: Callable[[RunnerClock], None]) -> None:
            try:
                self._wait_for_turn(name)
                reset_peak_memory(self.device)
                progress(f"{name}: building, {self.warmup} warmup steps")
                clock = RunnerClock(self, name)
                loop(clock)
                clock.read_losses()
                progress(f"{name}: done, {self.total_steps} steps")
            except BaseException:  # a runner's failure is its result; the others carry on
                self.logs[name].error = traceback.format_exc()
                progress(f"{name}: failed: {self.logs[name].error.strip().splitlines()[-1]}")
            finally:
                with self._cond:
                    self._done.add(name)
                    self._holder = None
                    self._cond.notify_all()
                    if self.schedule == "interleaved":  # a runner's thread (and its CPU thread pool) outlives its
                        # loop until every loop is done: no runner gets a last round with fewer threads beside it
                        self._cond.wait_for(lambda: self._done >= set(loops))

        threads = {}
        for name, loop in loops.items():
            self.logs[name] = TurnLog()
            threads[name] = threading.Thread(target=body, args=(name, loop), name=f"bench-{name}", daemon=True)
        order = list(loops)
        if self.schedule == "sequential":
            for name in order:
                threads[name].start()
                while name not in self._done:  # rounds + 1 turns, unless the loop stops sooner
                    self._give_turn(name)
                threads[name].join()
        else:
            for thread in threads.values():
                thread.start()
            turn = 0
            while not self._done >= set(order):
                shift = (turn - 1) % len(order) if turn else 0
                for name in order[shift:] + order[:shift]:
                    self._give_turn(name)
                turn += 1
            for thread in threads.values():
                thread.join()

    def _give_turn(self, name: str) -> None:
        """Hand the baton to `name` and wait until it gives it back (or its loop has ended)."""
        with self._cond:
            if name in self._done:
                return
            self._holder = name
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._holder != name or name in self._done)


class RunnerClock:
    """A runner's view of the baton: where its turns begin and end, its timings, losses and peak memory."""

    def __init__(self, turns: Turns, name: str) -> None:
        self.turns, self.name = turns, name
        self.log = turns.logs[name]
        self._start = 0.0
        self._losses: list[torch.Tensor | float] = []

    @property
    def total_steps(self) -> int:
        return self.turns.total_steps

    @property
    def device(self) -> torch.device:
        return self.turns.device

    def step_begins(self, step: int) -> None:
        """Before step `step`'s device work: a turn of an interleaved schedule starts a new peak-memory window."""
        first, _ = self.turns.turn_bounds(step)
        device = self.turns.device
        if first and step > 0 and self.turns.schedule == "interleaved" and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # (a CPU's high-water mark cannot be reset)

    def step_ends(self, step: int, loss: torch.Tensor | float) -> None:
        """After step `step`: its loss (a tensor is read back only at the end), the clock, the baton."""
        self._losses.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        turns = self.turns
        first, last = turns.turn_bounds(step)
        if first:
            self._start = synchronized_clock(turns.device)
        if last:
            if step >= turns.warmup:
                self.log.seconds.append(synchronized_clock(turns.device) - self._start)
            peak = peak_memory(turns.device)
            if not self.log.peak or peak["peak_memory_gib"] > self.log.peak["peak_memory_gib"]:
                self.log.peak = peak
            if step < turns.total_steps - 1:
                turns._end_turn(self.name)

    def read_losses(self) -> None:
        """Every step's loss into the log, as floats (the tensors read back at once, after the loop)."""
        tensors = [x for x in self._losses if isinstance(x, torch.Tensor)]
        values = iter(torch.stack(tensors).float().tolist() if tensors else [])
        self.log.losses = [next(values) if isinstance(x, torch.Tensor) else float(x) for x in self._losses]


def progress(message: str) -> None:
    """One line of progress (a long benchmark part shows where its time goes), with the seconds since start."""
    print(f"[{time.monotonic() - _STARTED:6.1f} s] {message}", flush=True)


_STARTED = time.monotonic()


def ratio_stats(reference: list[float], values: list[float]) -> dict[str, Any] | None:
    """`values` over `reference`, round by round (e.g. tokens/s of two runners in the same rounds): the median and
    the spread over the rounds."""
    ratios = [v / r for r, v in zip(reference, values) if r > 0]
    if not ratios:
        return None
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
        "per_round": ratios,
    }
