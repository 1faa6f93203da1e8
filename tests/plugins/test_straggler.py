"""straggler: every rank's forward time gathered per window; a rank made slower by chaos is named, through the CLI."""

from __future__ import annotations

import pytest
from conftest import cli_here, read_metrics, run_cli, tiny_overrides

from lit_open.compose import load_train_config
from lit_open.errors import UserError
from lit_open.plugin import build_plugins
from lit_open.train.events import read_events


def stragglers(run_dir):
    return [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "straggler"]


def test_one_process_logs_its_forward_time_per_window_and_names_no_one(tiny_data, tmp_path):
    settings = {"trainer.max_steps": 6, "trainer.val_check_interval": 0, "plugins": "[straggler]"}
    result = cli_here("train", *tiny_overrides(tiny_data, tmp_path, **settings), "plugins.straggler.every_n_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {int(r["step"]): r for r in read_metrics(tmp_path) if r["train/loss"]}
    windows = [step for step, row in rows.items() if row["train/step_time_min"]]
    assert windows == [2, 4, 6]
    for step in windows:  # one rank: the minimum is the maximum, a positive number of milliseconds
        assert float(rows[step]["train/step_time_min"]) == float(rows[step]["train/step_time_max"]) > 0
    assert stragglers(tmp_path) == []


@pytest.mark.parametrize(
    "option, message",
    [
        ("every_n_steps=0", "plugins.straggler.every_n_steps=0 must be at least 1"),
        ("factor=1.0", "plugins.straggler.factor=1.0 must be above 1"),
        ("windows=0", "plugins.straggler.windows=0 must be at least 1"),
    ],
)
def test_options_are_checked_at_start_up(option, message):
    cfg = load_train_config(["plugins=[straggler]", f"plugins.straggler.{option}"])
    with pytest.raises(UserError, match=message):
        build_plugins(cfg.plugins)


@pytest.mark.slow
def test_a_rank_slowed_by_chaos_is_named_by_a_straggler_event(tiny_data, tmp_path):
    """2 DDP processes (gloo): rank 1's forward passes take 60 ms longer; every step of both ranks is equally long
    (they wait for each other), but the forward times tell the ranks apart."""
    settings = {
        "trainer.max_steps": 8,
        "trainer.val_check_interval": 0,
        "strategy": "ddp",
        "trainer.devices": 2,
        "plugins": "[chaos,straggler]",
        "plugins.chaos.slow_rank": 1,
        "plugins.chaos.slow_ms": 60,
        "plugins.straggler.every_n_steps": 2,
        "plugins.straggler.windows": 2,
    }
    result = run_cli("train", *tiny_overrides(tiny_data, tmp_path, **settings), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    events = stragglers(tmp_path)
    assert [(e["rank"], e["step"]) for e in events] == [(1, 4)]  # after its second slow window
    assert events[0]["forward_ms"] > 60 and events[0]["ratio"] > 1.25
    rows = [r for r in read_metrics(tmp_path) if r["train/step_time_max"]]
    assert len(rows) == 4 and all(float(r["train/step_time_max"]) - float(r["train/step_time_min"]) > 50 for r in rows)
