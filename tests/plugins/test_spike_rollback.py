"""spike_rollback: benign spikes pass, malignant ones are rolled back with their data skipped, through the CLI too."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import read_metrics, run_cli, tiny_overrides, train_losses

from lit_open.errors import UserError
from lit_open.plugins.spike_rollback import SpikeRollback
from lit_open.train.events import read_events

SMALL = {"window": 8, "patience": 4, "rewind": 1, "skip_after": 3}


def feed(plugin: SpikeRollback, losses: list[float], start: int = 1):
    """Ask the detector about consecutive updates `start`, `start + 1`, ... (data step = update - 1)."""
    metrics = [{"step": s, "data_step": s - 1, "loss": v, "grad_norm": 1.0} for s, v in enumerate(losses, start)]
    return [plugin.rollback(m) for m in metrics]


def quiet(n: int, level: float = 3.0) -> list[float]:
    return [level + 0.01 * ((i * 7) % 5 - 2) for i in range(n)]  # small, bounded wiggle around `level`


def test_a_spike_that_recovers_within_patience_is_benign():
    plugin = SpikeRollback(**SMALL)
    decisions = feed(plugin, [*quiet(10), 6.0, 4.0, 3.01, *quiet(5)])
    assert all(d is None for d in decisions)
    assert plugin.benign == 1 and plugin.spike is None
    # the spike's values never entered the window: the next identical spike is flagged just the same
    assert max(plugin.history["loss"]) < 3.05


def test_a_spike_that_persists_asks_for_a_rollback_past_its_window():
    plugin = SpikeRollback(**SMALL)
    decisions = feed(plugin, [*quiet(10), 6.0, 5.0, 5.0, 5.0, 5.0])
    rollback = decisions[-1]
    assert all(d is None for d in decisions[:-1])
    onset = 11  # the first spiking update; the request comes `patience` updates later, at update 15 (data step 14)
    assert rollback.to_step == onset - 1 - SMALL["rewind"]
    assert rollback.resume_data_step == 14 + 1 + SMALL["skip_after"]
    assert rollback.requested_by == "spike_rollback" and "from step 11" in rollback.reason


def test_a_non_finite_loss_starts_a_spike_that_ends_when_the_loss_is_back():
    plugin = SpikeRollback(**SMALL)
    assert feed(plugin, [*quiet(10), math.nan, 3.0, *quiet(3)]) == [None] * 15  # nan_guard skipped that update
    assert plugin.benign == 1
    decisions = feed(plugin, [math.nan] * 5, start=16)  # no guard: the NaN update spoiled the weights
    assert decisions[:4] == [None] * 4 and decisions[4].to_step == 16 - 1 - SMALL["rewind"]
    assert "peak loss nan" in decisions[4].reason


def test_the_ratio_test_ignores_large_z_on_a_very_quiet_loss():
    plugin = SpikeRollback(**SMALL)
    flat = [3.0 + 1e-5 * (i % 2) for i in range(10)]
    assert feed(plugin, [*flat, 3.01, 3.01, 3.01, 3.01, 3.01, 3.01]) == [None] * 16  # z is huge, ratio 1.003
    assert plugin.spike is None and plugin.benign == 0


def test_nothing_is_flagged_before_min_history():
    plugin = SpikeRollback(**SMALL)  # min_history 0: window // 2 = 4 values
    assert feed(plugin, [3.0, 3.0, 3.0, 9.0, 9.0, 9.0, 9.0, 9.0]) == [None] * 8
    assert plugin.spike is None


def test_state_survives_a_resume_mid_spike():
    losses = [*quiet(10), 6.0, 5.0, 5.0, 5.0, 5.0]
    uninterrupted = feed(SpikeRollback(**SMALL), losses)
    first = SpikeRollback(**SMALL)
    feed(first, losses[:12])
    resumed = SpikeRollback(**SMALL)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # checkpoints hold plain values
    assert feed(resumed, losses[12:], start=13) == uninterrupted[12:]


def test_after_max_rollbacks_a_malignant_spike_stops_the_run():
    plugin = SpikeRollback(**SMALL, max_rollbacks=1)
    plugin.rollbacks = [{"at_step": 5}]
    with pytest.raises(UserError, match=r"max_rollbacks=1, at steps \[5\]\).*No checkpoint from before the spike"):
        feed(plugin, [*quiet(10), 6.0, 5.0, 5.0, 5.0, 5.0])


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("watch", ["loss", "perplexity"], "watch has perplexity"),
        ("window", 1, "window=1"),
        ("z_threshold", 0, "z_threshold=0"),
        ("ratio_threshold", 0.9, "ratio_threshold=0.9"),
        ("recover_z", 7.0, "must not exceed"),
        ("patience", 0, "patience=0"),
        ("lr_factor", 2.0, "lr_factor=2.0"),
        ("lr_factor", 0.5, "needs plugins.spike_rollback.lr_steps"),
        ("escalate", ["bigger_batch"], "escalate has bigger_batch"),
    ],
)
def test_bad_options_name_the_key(option, value, message):
    with pytest.raises(UserError, match=message):
        SpikeRollback(**{option: value})


# -- end to end: the quickstart model, a spike injected by the chaos plugin --------------------------------------------
STEPS = 40
SPIKE = {"plugins.chaos.spike_steps": "[24,25]", "plugins.chaos.spike_lr_multiplier": 30}
ROLLBACK = {
    **{f"plugins.spike_rollback.{k}": v for k, v in SMALL.items()},
    "plugins.spike_rollback.snapshot_every": 5,
    "plugins.spike_rollback.lr_factor": 0.5,
    "plugins.spike_rollback.lr_steps": 3,
}


def quickstart(data, run_dir, **extra):
    settings = {
        "trainer.max_steps": STEPS,
        "trainer.val_check_interval": 20,
        "checkpoint.every_n_steps": 5,
        "checkpoint.keep_last": 0,
        "optim.lr": 3e-3,
    }
    return ["train", *tiny_overrides(data, run_dir, model="quickstart", **{**settings, **extra})]


def train(*args):
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_val_loss(run_dir) -> float:
    return [float(r["val/loss"]) for r in read_metrics(run_dir) if r["val/loss"]][-1]


@pytest.mark.slow
def test_an_injected_spike_is_rolled_back_and_training_ends_where_a_clean_run_does(tiny_data, tmp_path):
    clean, unguarded, guarded = tmp_path / "clean", tmp_path / "unguarded", tmp_path / "guarded"
    train(*quickstart(tiny_data, clean))
    train(*quickstart(tiny_data, unguarded, plugins="[chaos]", **SPIKE))
    train(*quickstart(tiny_data, guarded, plugins="[chaos,spike_rollback]", **SPIKE, **ROLLBACK))

    events = read_events(guarded / "events.jsonl")
    phases = [e["phase"] for e in events if e["event"] == "spike"]
    assert phases == ["onset", "malignant"]
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    # the spike began at update 25 (data step 24); still up 4 updates later, at update 29 (data step 28): back to
    # the newest snapshot at or before update 25 - 1 - rewind = 23, i.e. step 20; batches 20-28 undone, 29-31 skipped
    assert rollback["from_step"] == 28 and rollback["to_step"] == 20
    assert rollback["undone_data_steps"] == [20, 29] and rollback["skipped_data_steps"] == [29, 32]
    assert rollback["requested_by"] == "spike_rollback"
    # the checkpoint written on the way into the spike (step 25) is moved aside: resume=auto cannot pick it
    checkpoints = guarded / "checkpoints"
    assert [p.name for p in (checkpoints / "rolled-back").iterdir()] == ["step-00000025.ckpt"]
    assert (checkpoints / "latest").read_text().strip() == "step-00000040.ckpt"

    # the data-sequence log says which batches shaped the model: the skipped ones were never trained
    sequence = {r["data_step"]: r for r in map(json.loads, (guarded / "data_sequence/00000000.jsonl").open())}
    assert all(sequence[d].get("undone") == "rollback" for d in range(20, 29))
    assert all(sequence[d]["step"] is None and sequence[d]["skipped"] == "rollback" for d in range(29, 32))
    assert sequence[32]["step"] == 21 and "undone" not in sequence[32] and "skipped" not in sequence[32]
    assert max(sequence) == STEPS - 1 + 9 + 3  # 40 updates: the last on data step 51 (9 undone, 3 skipped)

    # the LR is halved for the 3 updates after the rollback, then back on the schedule
    rows = {int(r["step"]): float(r["train/lr"]) for r in read_metrics(guarded) if r["train/lr"]}
    reference = {int(r["step"]): float(r["train/lr"]) for r in read_metrics(clean) if r["train/lr"]}
    for step in (21, 22, 23):
        assert rows[step] == pytest.approx(reference[step] * 0.5, rel=1e-9)
    assert rows[24] == pytest.approx(reference[24], rel=1e-9)

    # validations stay on multiples of trainer.val_check_interval, between optimizer steps, despite the extra batches
    assert [int(r["step"]) for r in read_metrics(guarded) if r["val/loss"]] == [0, 20, 40]
    # the clean run's loss, where the unguarded run is visibly worse
    assert final_val_loss(guarded) == pytest.approx(final_val_loss(clean), rel=0.05)
    assert final_val_loss(unguarded) > 1.05 * final_val_loss(clean)

    # a resume after the rollback continues the same run: same losses, and the plugin remembers its rollback
    resumed = tmp_path / "resumed"
    shutil.copytree(guarded, resumed)
    checkpoint = resumed / "checkpoints" / "step-00000030.ckpt"
    state = torch.load(checkpoint, weights_only=False)["callbacks"]["SpikeRollback"]
    assert state["rollbacks"][0]["skipped_data_steps"] == [29, 32]
    args = quickstart(tiny_data, resumed, plugins="[chaos,spike_rollback]", **SPIKE, **ROLLBACK)
    train(*args, f"resume={checkpoint}")
    expected, got = train_losses(guarded), train_losses(resumed)
    for step in range(31, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step

    # a crash in the middle of the spike (after update 26; the newest checkpoint is step 25's): the resumed run
    # remembers the spike in progress, and as no snapshot from before it is in memory, restores the step-20
    # checkpoint from disk; from there it repeats the uninterrupted run
    crashed = tmp_path / "crashed"
    args = quickstart(tiny_data, crashed, plugins="[chaos,spike_rollback]", **SPIKE, **ROLLBACK)
    assert run_cli(*args, "plugins.chaos.crash_steps=[26]").returncode == -9
    train(*args, "plugins.chaos.crash_steps=[26]", "resume=auto")
    (rollback,) = [e for e in read_events(crashed / "events.jsonl") if e["event"] == "rollback"]
    assert (rollback["requested_to_step"], rollback["to_step"], rollback["from_step"]) == (23, 20, 28)
    got = train_losses(crashed)
    for step in range(21, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


@pytest.mark.slow
def test_a_rollback_can_switch_qk_norm_on(tiny_data, tmp_path):
    run_dir = tmp_path / "escalated"
    escalate = {
        "plugins.spike_rollback.escalate": "[qk_norm]",
        "plugins.qk_norm.start": "on_rollback",
        "plugins.qk_norm.ramp_steps": 4,
        "trainer.max_steps": 30,
    }
    train(*quickstart(tiny_data, run_dir, plugins="[chaos,spike_rollback,qk_norm]", **SPIKE, **ROLLBACK, **escalate))
    events = read_events(run_dir / "events.jsonl")
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    assert rollback["escalate"] == ["qk_norm"] and rollback["to_step"] == 20
    actions = [(e["action"], e["step"]) for e in events if e["event"] == "qk_norm"]
    assert actions == [("inserted", 0), ("activated", 20), ("calibrated", 20), ("ramped_in", 24)]
    # dormant (alpha 0) until the rollback; from the restored step 20 it is blended in over 4 updates
    alpha = {int(r["step"]): float(r["qk_norm/alpha"]) for r in read_metrics(run_dir) if r["train/loss"]}
    assert [alpha[s] for s in range(21, 27)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.slow
def test_past_max_rollbacks_the_run_stops_with_a_clear_error_and_its_checkpoints_intact(tiny_data, tmp_path):
    run_dir = tmp_path / "twice"
    twice = {"plugins.chaos.spike_steps": "[24,25,40,41]", "plugins.spike_rollback.max_rollbacks": 1}
    args = quickstart(tiny_data, run_dir, plugins="[chaos,spike_rollback]", **{**SPIKE, **ROLLBACK, **twice})
    result = run_cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr[result.stderr.index("lit-open: error:") :]
    assert "after 1 rollbacks already (plugins.spike_rollback.max_rollbacks=1" in message
    # the second spike began at update 29 (data step 40, after the first rollback's jump): step 25's checkpoint is
    # the newest from before it; step 30's was written during it
    assert f"resume={run_dir / 'checkpoints' / 'step-00000025.ckpt'}" in message
    assert "resume=auto would take the newest, step-00000030.ckpt, written during the spike" in message
    events = read_events(run_dir / "events.jsonl")
    assert [e["event"] for e in events if e["event"] in ("rollback", "spike")].count("rollback") == 1
    assert [e["phase"] for e in events if e["event"] == "spike"] == ["onset", "malignant", "onset", "malignant"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
