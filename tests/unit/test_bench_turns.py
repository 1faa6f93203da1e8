"""The benchmark runners' turns (`lit_open.bench.turns`): their order, what is timed, failures, and ratios that
survive a machine whose speed drifts while the runners run."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lit_open.bench import throughput
from lit_open.bench.turns import Turns, ratio_stats
from lit_open.errors import UserError

CPU = torch.device("cpu")


def recording_loop(name: str, events: list, lock: threading.Lock, fail_at: int | None = None, step_s: float = 0.0):
    def loop(clock):
        for step in range(clock.total_steps):
            clock.step_begins(step)
            with lock:
                events.append((name, step))
            if step == fail_at:
                raise RuntimeError(f"{name} broke at step {step}")
            time.sleep(step_s)
            clock.step_ends(step, torch.tensor(float(step)))

    return loop


def test_interleaved_turns_rotate_and_each_turn_times_all_but_its_first_step():
    events, lock = [], threading.Lock()
    turns = Turns(CPU, warmup=2, rounds=3, round_steps=3, schedule="interleaved")
    turns.run({n: recording_loop(n, events, lock) for n in "abc"})
    turn = [(events[i][0], [s for _, s in events[i : i + 3]]) for i in range(6, len(events), 3)]
    assert events[:6] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]  # build + warmup, in order
    assert turn == [  # then rounds of 3 steps each, the order rotated every round
        ("a", [2, 3, 4]), ("b", [2, 3, 4]), ("c", [2, 3, 4]),
        ("b", [5, 6, 7]), ("c", [5, 6, 7]), ("a", [5, 6, 7]),
        ("c", [8, 9, 10]), ("a", [8, 9, 10]), ("b", [8, 9, 10]),
    ]  # fmt: skip
    for name in "abc":
        assert len(turns.logs[name].seconds) == 3 and all(s >= 0 for s in turns.logs[name].seconds)
        assert turns.logs[name].losses == [float(s) for s in range(11)]  # every step's loss, read back at the end
        assert turns.logs[name].peak["peak_memory_gib"] > 0


def test_sequential_turns_run_one_runner_to_its_end_before_the_next():
    events, lock = [], threading.Lock()
    turns = Turns(CPU, warmup=1, rounds=2, round_steps=2, schedule="sequential")
    turns.run({n: recording_loop(n, events, lock) for n in "ab"})
    assert events == [("a", s) for s in range(5)] + [("b", s) for s in range(5)]
    assert len(turns.logs["a"].seconds) == len(turns.logs["b"].seconds) == 2


def test_a_failing_runner_is_recorded_and_the_others_finish():
    events, lock = [], threading.Lock()
    turns = Turns(CPU, warmup=1, rounds=3, round_steps=2, schedule="interleaved")
    turns.run({"a": recording_loop("a", events, lock), "b": recording_loop("b", events, lock, fail_at=4)})
    assert "b broke at step 4" in turns.logs["b"].error and turns.logs["b"].losses == []
    assert turns.logs["a"].error is None
    assert turns.logs["a"].losses == [float(s) for s in range(7)] and len(turns.logs["a"].seconds) == 3
    assert ("b", 5) not in events and ("a", 6) in events


def test_turns_reject_a_turn_without_a_timed_step():
    with pytest.raises(ValueError, match="round_steps must be at least 2"):
        Turns(CPU, warmup=1, rounds=1, round_steps=1, schedule="interleaved")


def test_ratio_stats_are_per_round_ratios():
    stats = ratio_stats([100.0, 200.0, 100.0], [110.0, 200.0, 130.0])
    assert stats["per_round"] == pytest.approx([1.1, 1.0, 1.3])
    assert (stats["median"], stats["min"], stats["max"], stats["rounds"]) == (pytest.approx(1.1), 1.0, 1.3, 3)


def drifting_loop(step_s: float, steps_done: list[int], slow_after: int):
    """Steps of `step_s` seconds, three times as long once the machine 'gets loaded': after `slow_after` steps of
    all runners together."""

    def loop(clock):
        for step in range(clock.total_steps):
            clock.step_begins(step)
            time.sleep(step_s * (3.0 if steps_done[0] >= slow_after else 1.0))
            steps_done[0] += 1  # one runner steps at a time
            clock.step_ends(step, 0.0)

    return loop


@pytest.mark.parametrize("schedule", ["interleaved", "sequential"])
def test_interleaved_ratio_survives_a_machine_that_slows_down_midway(schedule):
    """Runner b is 1.5x slower than a. The machine triples every step's time once 19 steps are done: timed one
    after the other, a runs before the slowdown and b after it (ratio 4.5); taking turns, each round sees one load
    but the round in which it changes."""
    turns = Turns(CPU, warmup=1, rounds=6, round_steps=3, schedule=schedule)
    steps_done = [0]
    turns.run({"a": drifting_loop(0.01, steps_done, 19), "b": drifting_loop(0.015, steps_done, 19)})
    a, b = turns.logs["a"].seconds, turns.logs["b"].seconds
    stats = ratio_stats(a, b)  # b seconds / a seconds: a's speed over b's
    if schedule == "interleaved":
        assert stats["median"] == pytest.approx(1.5, rel=0.1)
        assert stats["max"] > 2  # the round in which the machine slowed down
    else:
        assert stats["median"] == pytest.approx(4.5, rel=0.1)  # what timing them one after the other reports


def test_runner_variants_replace_the_base_overrides_of_their_keys():
    specs = throughput.parse_runners("lightning, lightning+strategy.float8=tensorwise+data.micro_batch_size=8,bare")
    assert [(s.label, s.runner, s.overrides) for s in specs] == [
        ("lightning", "lightning", []),
        ("lightning+strategy.float8=tensorwise+data.micro_batch_size=8", "lightning",
         ["strategy.float8=tensorwise", "data.micro_batch_size=8"]),
        ("bare", "bare", []),
    ]  # fmt: skip
    base = ["model=quickstart", "strategy=auto", "strategy.float8=none"]
    assert throughput.with_overrides(base, ["strategy=fsdp", "x=1"]) == [
        "model=quickstart",
        "strategy.float8=none",
        "strategy=fsdp",
        "x=1",
    ]
    with pytest.raises(UserError, match="--runners ''"):
        throughput.parse_runners("")
