"""Stopping early as a scheduler asks: a stop signal (SIGTERM), trainer.time_limit and Ctrl-C, through the CLI.

The signals come from the chaos plugin (global rank 0 signals itself after an optimizer step), as a scheduler's would.
"""

from __future__ import annotations

import pytest
from conftest import cli_here, run_cli, tiny_overrides, train_losses

from lit_open.errors import EXIT_INTERRUPTED, EXIT_STOPPED
from lit_open.train.events import read_events

STEPS = 6


def overrides(data, run_dir, **extra):
    settings = {"trainer.max_steps": STEPS, "trainer.val_check_interval": 0, "checkpoint.every_n_steps": 100}
    return tiny_overrides(data, run_dir, **{**settings, **extra})


def events(run_dir, name):
    return [e for e in read_events(run_dir / "events.jsonl") if e["event"] == name]


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_repeats_the_run(tiny_data, tmp_path):
    reference = cli_here("train", *overrides(tiny_data, tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "stopped"
    chaos = ["plugins=[chaos]", "plugins.chaos.signal_steps=[3]"]
    stopped = cli_here("train", *overrides(tiny_data, run_dir), *chaos)
    checkpoint = run_dir / "checkpoints" / "step-00000003.ckpt"
    assert stopped.returncode == EXIT_STOPPED == 75, stopped.stderr[-3000:]
    assert "received SIGTERM: finishing this optimizer step, then writing a checkpoint" in stopped.stderr
    assert f"stopped early on SIGTERM at step 3, with a checkpoint: {checkpoint}" in stopped.stderr
    assert checkpoint.is_file() and sorted(train_losses(run_dir)) == [1, 2, 3]
    (stop,) = events(run_dir, "stop")
    assert stop["step"] == 3 and stop["reason"] == "signal" and stop["signal"] == "SIGTERM"
    assert stop["checkpoint"] == str(checkpoint)

    resumed = cli_here("train", *overrides(tiny_data, run_dir), *chaos, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # the signal is not sent again (chaos/ marker)
    assert train_losses(run_dir) == pytest.approx(train_losses(tmp_path / "reference"), rel=1e-6)


def test_ctrl_c_says_which_checkpoint_is_intact_and_exits_130(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    chaos = ["plugins=[chaos]", "plugins.chaos.signal_steps=[2]", "plugins.chaos.signal=SIGINT"]
    result = cli_here("train", *overrides(tiny_data, run_dir, **{"checkpoint.every_n_steps": 1}), *chaos)
    assert result.returncode == EXIT_INTERRUPTED == 130, result.stderr[-3000:]
    intact = run_dir / "checkpoints" / "step-00000002.ckpt"
    assert f"lit-open: interrupted; the newest complete checkpoint, {intact}, is intact" in result.stderr
    assert [e["step"] for e in events(run_dir, "interrupted")] == [2]


def test_a_time_limit_stops_in_time_with_a_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    settings = {"trainer.max_steps": 100000, "checkpoint.every_n_steps": 1, "trainer.time_limit": "8s"}
    result = cli_here("train", *overrides(tiny_data, run_dir, **settings))
    assert result.returncode == EXIT_STOPPED, result.stderr[-3000:]
    (stop,) = events(run_dir, "stop")
    assert stop["reason"] == "time_limit" and stop["time_limit_s"] == 8.0
    assert stop["seconds"] < 8.0 and stop["step"] > 5  # in time, but not at the first step
    assert (run_dir / "checkpoints" / f"step-{stop['step']:08d}.ckpt").is_file()
    assert "stopped early before trainer.time_limit (8 s)" in result.stderr


def test_stop_options_are_checked_at_start_up(tiny_data, tmp_path):
    bad_limit = cli_here("train", *overrides(tiny_data, tmp_path / "a"), "trainer.time_limit=3 hours")
    assert bad_limit.returncode == 2 and "trainer.time_limit='3 hours' is not a duration" in bad_limit.stderr
    bad_signal = cli_here("train", *overrides(tiny_data, tmp_path / "b"), "trainer.stop_signals=[SIGKILL]")
    assert bad_signal.returncode == 2 and "trainer.stop_signals has 'SIGKILL'" in bad_signal.stderr


@pytest.mark.slow
def test_two_processes_stop_together_when_one_is_signalled(tiny_data, tmp_path):
    """Only rank 0 gets SIGTERM; both ranks stop after the same step and one checkpoint holds both."""
    run_dir = tmp_path / "ddp"
    args = overrides(tiny_data, run_dir, strategy="ddp", **{"trainer.devices": 2})
    chaos = ["plugins=[chaos]", "plugins.chaos.signal_steps=[2]"]
    stopped = run_cli("train", *args, *chaos, timeout=300)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert [e["step"] for e in events(run_dir, "stop")] == [2]
    assert (run_dir / "checkpoints" / "step-00000002.ckpt").exists()
    resumed = run_cli("train", *args, *chaos, "resume=auto", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))
