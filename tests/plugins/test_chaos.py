"""The chaos plugin: each fault it injects, what the core and the other plugins make of it, and its options."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import bind_run, read_metrics, run_cli, tiny_overrides, train_losses

import lit_open.plugins.chaos as chaos_module
from lit_open.compose import load_train_config
from lit_open.errors import UserError
from lit_open.plugin import Plugin, build_plugins
from lit_open.plugins.chaos import Chaos
from lit_open.train import run
from lit_open.train.events import read_events
from lit_open.train.optim import lr_factor

VOCAB = 512  # tiny_data's tokenizer and the tiny model
FAST = {"trainer.val_check_interval": 0, "trainer.validate_at_start": "false", "checkpoint.every_n_steps": 100}


def chaos_events(run_dir, kind: str) -> list[dict]:
    return [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "chaos" and e["kind"] == kind]


def rows(run_dir) -> dict[int, dict[str, float]]:
    """metrics.csv's training rows by optimizer step."""
    return {
        int(r["step"]): {k: float(v) for k, v in r.items() if v and k.startswith("train/")}
        for r in read_metrics(run_dir)
        if r["train/loss"]
    }


# -- options ----------------------------------------------------------------------------------------------------


def test_does_nothing_unless_told():
    (plugin,) = build_plugins(load_train_config(["plugins=[chaos]"]).plugins)
    assert isinstance(plugin, Chaos)
    cfg = plugin.cfg
    assert cfg.spike_steps == cfg.nan_steps == cfg.crash_steps == cfg.corrupt_checkpoint_steps == []
    assert cfg.spike_lr_multiplier == 1.0 and cfg.spike_tokens is True


@pytest.mark.parametrize(
    ("option", "key"),
    [
        ("spike_steps=[3,-1]", "spike_steps"),
        ("nan_steps=[-2]", "nan_steps"),
        ("crash_steps=[-1]", "crash_steps"),
        ("corrupt_checkpoint_steps=[-4]", "corrupt_checkpoint_steps"),
        ("spike_lr_multiplier=0", "spike_lr_multiplier"),
        ("spike_lr_multiplier=-2.0", "spike_lr_multiplier"),
        ("spike_lr_multiplier=nan", "spike_lr_multiplier"),
        ("crash_steps=[soon]", "crash_steps"),
    ],
)
def test_bad_options_name_the_key(option, key):
    cfg = load_train_config(["plugins=[chaos]", f"plugins.chaos.{option}"])
    with pytest.raises(UserError, match=rf"plugins\.chaos.*{key}|{key}"):
        build_plugins(cfg.plugins)


def test_a_spike_that_injects_nothing_is_refused():
    with pytest.raises(UserError, match=r"spike_tokens=false.*spike_lr_multiplier"):
        Chaos(spike_steps=[3], spike_tokens=False)


def test_random_tokens_are_seeded_by_seed_step_micro_and_data_parallel_rank():
    plugin = Chaos(spike_steps=[5])
    config = SimpleNamespace(run=SimpleNamespace(seed=42), model=SimpleNamespace(vocab_size=96))
    run = bind_run(plugin, config=config)
    module = None

    def spiked(data_step=5, micro=0, rank=0, seed=42):
        config.run.seed = seed
        run.data_parallel_rank = rank
        trainer = SimpleNamespace()
        tokens = torch.arange(3 * 17).reshape(3, 17) % 50
        targets = tokens[:, 1:].clone()
        targets[0, :4] = -100
        batch = {"input_ids": tokens[:, :-1].clone(), "targets": targets, "data_step": data_step, "micro": micro}
        plugin._randomize(trainer, module, batch)
        return batch

    batch = spiked()
    ids, targets = batch["input_ids"], batch["targets"]
    assert ids.shape == (3, 16) and ids.dtype == torch.int64 and int(ids.max()) < 96
    assert (targets[0, :4] == -100).all()  # ignored targets stay ignored
    assert torch.equal(targets[1:, :-1], ids[1:, 1:]) and torch.equal(targets[0, 4:-1], ids[0, 5:])  # shifted by one
    assert torch.equal(spiked()["input_ids"], ids)  # a rerun injects the same tokens
    for other in (spiked(micro=1), spiked(rank=1), spiked(data_step=6), spiked(seed=43)):
        assert not torch.equal(other["input_ids"], ids)


# -- spike, LR spike and NaN in real runs ---------------------------------------------------------------------


class OptimizerProbe(Plugin):
    """Records the LR of every parameter group as the optimizer steps (after chaos has had its say)."""

    name = "probe"

    def __init__(self):
        super().__init__()
        self.lrs: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


def train(data, run_dir, monkeypatch, *overrides: str, steps: int = 12) -> OptimizerProbe:
    import lit_open.train.runner as train_module

    probe = OptimizerProbe()
    real_build = train_module.build_plugins
    monkeypatch.setattr(train_module, "build_plugins", lambda cfg: [*real_build(cfg), probe])
    run(load_train_config([*tiny_overrides(data, run_dir, **{**FAST, "trainer.max_steps": steps}), *overrides]))
    monkeypatch.setattr(train_module, "build_plugins", real_build)
    return probe


def test_spike_lr_spike_and_nan_without_a_guard(tiny_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    probe = train(
        tiny_data,
        run_dir,
        monkeypatch,
        "plugins=[chaos]",
        "plugins.chaos.spike_steps=[9]",  # the 10th global batch: update 10
        "plugins.chaos.spike_lr_multiplier=10",
        "plugins.chaos.nan_steps=[11]",  # the last one: update 12
    )
    metrics = rows(run_dir)
    assert sorted(metrics) == list(range(1, 13))
    loss = {step: r["train/loss"] for step, r in metrics.items()}
    # random tokens: the loss jumps to ln(vocab) or above (the model is confidently wrong), its neighbours do not
    assert loss[10] > math.log(VOCAB)
    assert loss[9] < loss[10] - 1.0 and loss[11] < loss[10] - 1.0
    # the LR spike: exactly update 10's LR (every parameter group) is 10x the schedule's; update 11 is back on it
    cfg = load_train_config(tiny_overrides(tiny_data, run_dir, **{**FAST, "trainer.max_steps": 12}))
    for step in range(1, 12):
        scheduled = cfg.optim.lr * lr_factor(step, cfg.schedule, 12)
        expected = scheduled * (10 if step == 10 else 1)
        assert metrics[step]["train/lr"] == pytest.approx(expected, rel=1e-9), step
        assert probe.lrs[step - 1] == pytest.approx([expected] * len(probe.lrs[step - 1]), rel=1e-9), step
    # NaN: that step's loss and gradient norm are NaN, and with no guard the core applies the NaN update
    assert math.isnan(loss[12]) and math.isnan(metrics[12]["train/grad_norm"])
    assert all(math.isfinite(loss[step]) for step in range(1, 12))
    weights = torch.load(run_dir / "checkpoints" / "step-00000012.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isnan(w).all() for w in weights.values() if w.is_floating_point())
    (spike,) = chaos_events(run_dir, "spike")
    assert spike["data_step"] == 9 and spike["update"] == 10 and spike["lr_multiplier"] == 10.0
    (nan,) = chaos_events(run_dir, "nan")
    assert nan["data_step"] == 11 and nan["update"] == 12


def test_skip_step_skips_the_spike_and_the_nan_and_training_goes_on(tiny_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    probe = train(
        tiny_data,
        run_dir,
        monkeypatch,
        "plugins=[chaos,skip_step]",
        "plugins.chaos.spike_steps=[9]",
        "plugins.chaos.spike_lr_multiplier=10",
        "plugins.chaos.nan_steps=[5]",
        "plugins.skip_step.window=6",  # a decision from 3 accepted steps on
    )
    events = read_events(run_dir / "events.jsonl")
    skipped = {e["data_step"] for e in events if e["event"] == "skip"}
    for kind, data_step in (("nan", 5), ("spike", 9)):
        (injected,) = chaos_events(run_dir, kind)
        assert injected["data_step"] == data_step and data_step in skipped
        # the chaos event is written before the skip event of the same data step
        skip = next(e for e in events if e["event"] == "skip" and e["data_step"] == data_step)
        assert events.index(injected) < events.index(skip)
    nan_skip = next(e for e in events if e["event"] == "skip" and e["data_step"] == 5)
    assert nan_skip["outliers"]["loss"]["why"] == "not finite"
    spike_skip = next(e for e in events if e["event"] == "skip" and e["data_step"] == 9)
    assert spike_skip["outliers"]["loss"]["value"] > math.log(VOCAB)
    metrics = rows(run_dir)
    assert sorted(metrics) == list(range(1, 13))  # 12 updates, the skipped batches did not count
    assert all(math.isfinite(r["train/loss"]) for r in metrics.values())
    assert all(metrics[step]["train/loss"] < 5.8 for step in range(4, 13))  # never a spike in metrics.csv
    # the skipped spike's multiplied LR was never applied, and the next update is back on the schedule
    cfg = load_train_config(tiny_overrides(tiny_data, run_dir, **{**FAST, "trainer.max_steps": 12}))
    for step, row in metrics.items():
        assert row["train/lr"] == pytest.approx(cfg.optim.lr * lr_factor(step, cfg.schedule, 12), rel=1e-9), step
    assert len(probe.lrs) == 12  # the optimizer stepped 12 times, never with the multiplied LR
    assert max(max(lrs) for lrs in probe.lrs) <= cfg.optim.lr


# -- crash and corrupted checkpoints ----------------------------------------------------------------------------


class Killed(Exception):
    pass


def test_a_crash_happens_once_per_run_dir(tiny_data, tmp_path, monkeypatch):
    """crash_steps=[3] with checkpoints every 2: the resumed run passes step 3 again and must go on."""

    def sigkill():
        raise Killed

    monkeypatch.setattr(chaos_module, "_sigkill", sigkill)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_data,
        run_dir,
        **{**FAST, "checkpoint.every_n_steps": 2, "trainer.max_steps": 5},
        plugins="[chaos]",
        **{"plugins.chaos.crash_steps": "[3]"},
    )
    with pytest.raises(Killed):
        run(load_train_config(overrides))
    (crash,) = chaos_events(run_dir, "crash")
    assert crash["step"] == 3 and crash["signal"] == "SIGKILL"
    assert (run_dir / "chaos" / "crash-step-00000003").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000002.ckpt"
    summary = run(load_train_config(overrides))  # resume=auto from step 2, through step 3 again
    assert summary["steps"] == 5
    assert len(chaos_events(run_dir, "crash")) == 1
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("key", ["corrupt_checkpoint_steps", "checkpoint_kill_steps"])
def test_a_corrupt_or_kill_step_needs_a_checkpoint_there(tiny_data, tmp_path, key):
    overrides = tiny_overrides(
        tiny_data,
        tmp_path / "run",
        **{**FAST, "checkpoint.every_n_steps": 2, "trainer.max_steps": 5},
        plugins="[chaos]",
        **{f"plugins.chaos.{key}": "[4,3]"},
    )
    with pytest.raises(UserError, match=rf"plugins\.chaos\.{key} has steps with no checkpoint \(3\).*every_n_steps=2"):
        run(load_train_config(overrides))


CLI_RUN = {
    "trainer.max_steps": 6,
    "checkpoint.every_n_steps": 2,
    "trainer.val_check_interval": 0,
    "trainer.validate_at_start": "false",
    "logger.tensorboard": "false",
}


@pytest.mark.slow
def test_crash_then_resume_auto_matches_the_uninterrupted_run(tiny_data, tmp_path):
    """The quickstart model through the CLI: SIGKILL after update 4, then resume=auto repeats steps 5-6 exactly."""
    reference = tmp_path / "reference"
    run(load_train_config(tiny_overrides(tiny_data, reference, model="quickstart", **CLI_RUN)))

    run_dir = tmp_path / "crashed"
    crash = {"plugins": "[chaos]", "plugins.chaos.crash_steps": "[4]"}
    args = tiny_overrides(tiny_data, run_dir, model="quickstart", **CLI_RUN, **crash)
    crashed = run_cli("train", *args)
    assert crashed.returncode == -9, crashed.stderr
    assert "Done" not in crashed.stderr
    (crash,) = chaos_events(run_dir, "crash")
    assert crash["step"] == 4
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000004.ckpt"  # written before

    resumed = run_cli("train", *args, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run_dir / 'checkpoints' / 'step-00000004.ckpt'}" in resumed.stderr
    assert len(chaos_events(run_dir, "crash")) == 1  # not again
    expected, got = train_losses(reference), train_losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in range(5, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_refused_naming_an_older_one(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    chaos = {"plugins": "[chaos]", "plugins.chaos.corrupt_checkpoint_steps": "[4]"}
    run(load_train_config(tiny_overrides(tiny_data, run_dir, **{**CLI_RUN, "trainer.max_steps": 4}, **chaos)))
    corrupt = run_dir / "checkpoints" / "step-00000004.ckpt"
    (event,) = chaos_events(run_dir, "corrupt")
    assert event["step"] == 4 and event["path"] == str(corrupt)
    assert corrupt.stat().st_size == event["size"] // 2

    refused = run_cli("train", *tiny_overrides(tiny_data, run_dir, **CLI_RUN, **chaos), "resume=auto")
    assert refused.returncode == 2, refused.stderr
    message = refused.stderr
    assert "Traceback" not in message
    assert f"Cannot read checkpoint {corrupt}" in message
    assert f"resume={run_dir / 'checkpoints' / 'step-00000002.ckpt'}" in message

    # the recovery the message offers works, and the resumed run does not corrupt step 4 again
    older = run_dir / "checkpoints" / "step-00000002.ckpt"
    summary = run(load_train_config([*tiny_overrides(tiny_data, run_dir, **CLI_RUN, **chaos), f"resume={older}"]))
    assert summary["steps"] == 6 and len(chaos_events(run_dir, "corrupt")) == 1
    assert torch.load(corrupt, weights_only=False)["global_step"] == 4
