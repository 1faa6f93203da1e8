"""nan_guard: non-finite steps are skipped, repeated ones rolled back, and no non-finite checkpoint is ever written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_cli, tiny_overrides

import lit_open.train.runner as train_module
from lit_open.compose import load_train_config
from lit_open.data.sequence import read_data_sequence
from lit_open.errors import UserError
from lit_open.plugin import Plugin
from lit_open.plugins.nan_guard import NanGuard
from lit_open.train import run
from lit_open.train.events import EventLog, read_events


def ask(guard: NanGuard, step: int, data_step: int, loss: float, grad_norm: float = 1.0):
    metrics = {"step": step, "data_step": data_step, "loss": loss, "grad_norm": grad_norm, "lr": 1e-3}
    return guard.skip_step(metrics), guard.rollback(metrics)


def test_a_non_finite_step_is_skipped_and_a_finite_one_is_not():
    guard = NanGuard()
    assert ask(guard, 5, 4, 3.2) == (False, None)
    assert ask(guard, 5, 5, math.nan) == (True, None)
    assert ask(guard, 5, 6, 3.1, grad_norm=math.inf) == (True, None)
    assert guard.skipped == 2


def test_a_repeat_within_the_window_asks_for_a_rollback_to_before_the_first():
    guard = NanGuard(rollback_after=3, within=10, rewind=2, skip_after=4)
    assert ask(guard, 8, 7, math.nan) == (True, None)
    assert ask(guard, 8, 9, math.nan) == (True, None)
    skip, rollback = ask(guard, 8, 16, math.nan)  # 3 within 10 batches (7, 9, 16)
    assert skip and rollback.to_step == 8 - 1 - 2 and rollback.resume_data_step == 16 + 1 + 4
    assert rollback.requested_by == "nan_guard" and "[7, 9, 16]" in rollback.reason


def test_non_finite_steps_far_apart_are_only_skipped():
    guard = NanGuard(rollback_after=2, within=5)
    assert ask(guard, 3, 2, math.nan) == (True, None)
    assert ask(guard, 10, 10, math.nan) == (True, None)  # 8 batches later: a new series of one
    assert [r["data_step"] for r in guard.recent] == [10]


def test_after_max_rollbacks_the_run_stops():
    guard = NanGuard(rollback_after=1, max_rollbacks=2)
    guard.rollbacks = 2
    guard.skip_step({"step": 4, "data_step": 3, "loss": math.nan, "grad_norm": math.nan, "lr": 1e-3})
    with pytest.raises(UserError, match=r"max_rollbacks=2"):
        guard.rollback({"step": 4, "data_step": 3, "loss": math.nan, "grad_norm": math.nan, "lr": 1e-3})


@pytest.mark.parametrize("option", ["rollback_after", "within", "snapshot_every", "max_rollbacks"])
def test_bad_options_name_the_key(option):
    with pytest.raises(UserError, match=f"plugins.nan_guard.{option}=0"):
        NanGuard(**{option: 0})


class PoisonMoment(Plugin):
    """Makes one second-moment estimate infinite after update 4, as an overflow would: the losses stay finite (the
    element's updates become 0), so only the checkpoint check can see it."""

    name = "poison"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 4:
            optimizer = trainer.optimizers[0]
            optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg_sq"].view(-1)[0] = math.inf


def test_a_non_finite_checkpoint_is_refused_and_the_older_ones_stay(tiny_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_build = train_module.build_plugins
    monkeypatch.setattr(train_module, "build_plugins", lambda cfg: [*real_build(cfg), PoisonMoment()])
    overrides = tiny_overrides(tiny_data, run_dir, plugins="[nan_guard]", **{"trainer.val_check_interval": 0})
    with pytest.raises(UserError, match="refusing to write the checkpoint of step 6"):
        run(load_train_config(overrides))
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000003.ckpt"]  # no temporary left
    events = read_events(run_dir / "events.jsonl")
    assert [e["update"] for e in events if e.get("action") == "refused_checkpoint"] == [6]
    assert not [e for e in events if e["event"] == "non_finite" and e["action"] != "refused_checkpoint"]


@pytest.mark.slow
def test_injected_nans_are_skipped_then_rolled_back_and_no_checkpoint_holds_a_nan(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    settings = {
        "trainer.max_steps": 30,
        "trainer.val_check_interval": 10,
        "checkpoint.every_n_steps": 5,
        "checkpoint.keep_last": 0,
        "plugins": "[chaos,nan_guard]",
        "plugins.chaos.nan_steps": "[8,20,21,22]",
        "plugins.nan_guard.snapshot_every": 5,
        "plugins.nan_guard.within": 10,  # data step 8 is a series of its own
    }
    result = run_cli("train", *tiny_overrides(tiny_data, run_dir, model="quickstart", **settings))
    assert result.returncode == 0, result.stderr[-3000:]

    events = read_events(run_dir / "events.jsonl")
    actions = [(e["data_step"], e["action"]) for e in events if e["event"] == "non_finite"]
    assert actions == [(8, "skip"), (20, "skip"), (21, "skip"), (22, "rollback")]
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    # the series began at update 20 (data step 20, one behind since the skip of data step 8): back to the newest
    # snapshot at or before update 19, i.e. step 15; data steps 15-22 undone, none skipped
    assert rollback["to_step"] == 15 and rollback["requested_by"] == "nan_guard"
    assert rollback["undone_data_steps"] == [16, 23] and rollback["skipped_data_steps"] == [23, 23]

    rows = [r for r in read_metrics(run_dir) if r["train/loss"]]
    assert max(int(r["step"]) for r in rows) == 30
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    checkpoints = sorted((run_dir / "checkpoints").rglob("step-*.ckpt"))
    assert [int(p.name[5:13]) for p in checkpoints] == [5, 10, 15, 20, 25, 30]
    for path in checkpoints:
        checkpoint = torch.load(path, weights_only=False)
        tensors = list(checkpoint["state_dict"].values())
        tensors += [v for s in checkpoint["optimizer_states"][0]["state"].values() for v in s.values()]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), path


def strict_json(line: str):
    """json.loads that refuses NaN and Infinity, which strict JSON readers (jq, JavaScript, Go, ...) reject."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.slow
def test_a_nan_run_writes_strict_json_events_and_marks_the_skipped_batch(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    settings = {"plugins": "[chaos,nan_guard]", "plugins.chaos.nan_steps": "[2]", "trainer.val_check_interval": 0}
    result = run_cli("train", *tiny_overrides(tiny_data, run_dir, **{"trainer.max_steps": 4, **settings}))
    assert result.returncode == 0, result.stderr[-3000:]

    events = [strict_json(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    (non_finite,) = [e for e in events if e["event"] == "non_finite"]
    assert non_finite["action"] == "skip" and non_finite["data_step"] == 2
    assert non_finite["values"] == {"loss": "nan", "grad_norm": "nan"}  # a string tells nan from inf
    assert events == read_events(run_dir / "events.jsonl")

    entries = read_data_sequence(run_dir / "data_sequence")
    assert [(e["data_step"], e["step"], e.get("update_skipped")) for e in entries] == [
        (0, 1, None),
        (1, 2, None),
        (2, 2, "nan_guard"),  # trained on, but its update was skipped: it did not shape the model
        (3, 3, None),
        (4, 4, None),
    ]

    log = EventLog(tmp_path / "direct.jsonl")  # nested values, tuples and numpy scalars too
    log.write(1, "probe", values={"a": [math.inf, (-math.inf, 1.5)]}, x=np.float32("nan"), y=np.float64(2.0))
    (record,) = [strict_json(line) for line in (tmp_path / "direct.jsonl").read_text().splitlines()]
    assert record["values"] == {"a": ["inf", ["-inf", 1.5]]} and record["x"] == "nan" and record["y"] == 2.0
