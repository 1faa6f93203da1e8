"""watchdog: a step without progress becomes stack files of every rank, a `hang` event and exit status 124; checkpoint
saves, validations and in-loop evaluations get their own allowance. Hangs come from chaos (`hang_steps`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import cli_here, run_cli, tiny_overrides, train_losses

from lit_open.errors import EXIT_HUNG
from lit_open.train.events import read_events
from plugins.watchdog import Watchdog

STEPS = 5
UNIT_TESTS = Path(__file__).resolve().parents[1] / "unit"  # plugins_for_tests.py


def overrides(data, run_dir, **extra):
    settings = {
        "trainer.max_steps": STEPS,
        "trainer.val_check_interval": 0,
        "checkpoint.every_n_steps": 2,
        "plugins": "[chaos,watchdog]",
        "plugins.watchdog.timeout_s": 3,
        "plugins.chaos.hang_steps": "[3]",
    }
    return tiny_overrides(data, run_dir, **{**settings, **extra})


def events(run_dir, name):
    return [e for e in read_events(run_dir / "events.jsonl") if e["event"] == name]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("timeout_s=0", "plugins.watchdog.timeout_s=0.0 must be a positive number of seconds"),
        ("median_factor=0.5", "plugins.watchdog.median_factor=0.5 must be 0 (off) or above 1"),
        ("report_wait_s=-1", "plugins.watchdog.report_wait_s=-1.0 must be 0 or more seconds"),
    ],
)
def test_options_are_checked_at_start_up(tiny_data, tmp_path, option, message):
    result = cli_here("train", *overrides(tiny_data, tmp_path / "run"), f"plugins.watchdog.{option}")
    assert result.returncode == 2 and message in result.stderr


def test_the_limit_follows_what_is_in_progress_and_the_median_step():
    watchdog = Watchdog(timeout_s=600, median_factor=10, min_timeout_s=5, activity_timeout_s=900)
    watchdog.bind(SimpleNamespace(activity=None, run_dir=None))
    assert watchdog.limit() == ("first_step", 1800.0)
    watchdog._first_step_done = True
    assert watchdog.limit() == ("step", 600.0)  # too few steps for a median
    watchdog._durations = [2.0, 2.5, 3.0, 2.0, 2.2]
    assert watchdog.limit() == ("step", 22.0)  # ten times the median step
    watchdog._durations = [0.1] * 5
    assert watchdog.limit() == ("step", 5.0)  # never below min_timeout_s
    watchdog.run.activity = ("checkpoint", time.monotonic())
    assert watchdog.limit() == ("checkpoint", 900.0)


def test_a_hung_step_leaves_stacks_an_event_and_exit_124_and_resume_goes_on(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    hung = run_cli("train", *overrides(tiny_data, run_dir), timeout=120)
    assert hung.returncode == EXIT_HUNG == 124, hung.stderr[-3000:]
    assert time.monotonic() - started < 60
    (hang,) = events(run_dir, "hang")
    assert hang["in_step"] == 3 and hang["step"] == 2 and hang["waiting_in"] == "step"
    assert 3 <= hang["seconds"] < 10 and hang["limit_s"] == 3 and hang["not_arrived"] == []
    assert hang["where"] == {"0": "data step 1, micro-batch 1, step_end"}  # the hang comes before the marker moves
    (stacks,) = (run_dir / "hangs").glob("*/rank-00000.txt")
    assert str(stacks.parent) == hang["stacks"]
    text = stacks.read_text()
    assert "no progress for" in text and "_hang_forever" in text and "Thread" in text
    assert "step 3 hung: no progress for" in hung.stderr and f"Exiting with status {EXIT_HUNG}" in hung.stderr

    resumed = cli_here("train", *overrides(tiny_data, run_dir))  # chaos hangs once per run.dir
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))


def test_a_slow_checkpoint_save_is_not_a_hang(tiny_data, tmp_path):
    """A synchronous save longer than timeout_s is an activity (activity_timeout_s applies), not a hang."""
    run_dir = tmp_path / "run"
    slow_save = {"plugins": "[watchdog]", "+plugins.slow_save._target_": "plugins_for_tests.SlowSave"}
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(UNIT_TESTS), os.environ.get("PYTHONPATH")]))}
    args = overrides(tiny_data, run_dir, **{"plugins.watchdog.timeout_s": 1, **slow_save})
    result = run_cli("train", *[a for a in args if "chaos" not in a], env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not events(run_dir, "hang") and len(events(run_dir, "checkpoint")) == 3


@pytest.mark.slow
def test_one_hung_rank_of_two_is_named_and_both_leave_stacks(tiny_data, tmp_path):
    run_dir = tmp_path / "ddp"
    args = overrides(tiny_data, run_dir, strategy="ddp", **{"trainer.devices": 2, "plugins.chaos.hang_rank": 1})
    process = subprocess.Popen(
        [sys.executable, "-m", "lit_open.cli", "train", *args], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not [e for e in events(run_dir, "chaos") if e["kind"] == "hang"] if run_dir.exists() else True:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.1)
    hang_started = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_HUNG, stderr[-3000:]
    assert time.monotonic() - hang_started < 3 + 30  # within the limit + 30 s
    (hang,) = events(run_dir, "hang")
    assert hang["in_step"] == 3 and hang["not_arrived"] == [1] and hang["no_report"] == []
    assert hang["where"]["1"] == "data step 1, micro-batch 0, step_end"  # still at step 2's end
    assert hang["where"]["0"].startswith("data step 2, micro-batch 0")  # waiting in step 3's collectives
    stacks = {p.name: p.read_text() for p in (run_dir / "hangs").glob("*/rank-*.txt")}
    assert sorted(stacks) == ["rank-00000.txt", "rank-00001.txt"]
    assert "_hang_forever" in stacks["rank-00001.txt"] and "_hang_forever" not in stacks["rank-00000.txt"]
    assert "ranks that did not arrive where the others wait: 1" in stderr
