"""The skip_step plugin: its detector on hand-made sequences, and a real run where an injected spike is skipped."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_cli, tiny_overrides, train_losses

from lit_open.compose import load_train_config
from lit_open.data.sequence import read_data_sequence
from lit_open.errors import UserError
from lit_open.plugin import Plugin, build_plugins
from lit_open.plugins.skip_step import SkipStep
from lit_open.train import run
from lit_open.train.events import read_events


def metrics(step: int, loss: float, grad_norm: float = 1.0) -> dict[str, float]:
    return {"step": step, "data_step": step - 1, "loss": loss, "grad_norm": grad_norm, "lr": 1e-3}


def test_skips_only_upward_outliers_after_enough_history():
    plugin = SkipStep(window=10, sigma=3.0)
    losses = [5.0, 5.1, 4.9, 5.05, 4.95]  # mean 5, sample std 0.079: the band ends at 5.237
    assert not any(plugin.skip_step(metrics(i + 1, x)) for i, x in enumerate(losses))
    assert plugin.skip_step(metrics(6, 5.3))  # above the band
    assert not plugin.skip_step(metrics(6, 4.0))  # far below: not a spike
    assert plugin.skip_step(metrics(7, 5.0, grad_norm=50.0))  # the grad norm alone
    assert plugin.skipped == [5, 6]
    assert list(plugin.history["loss"]) == [*losses, 4.0]  # skipped values stay out of the history


def test_waits_for_half_a_window_but_never_lets_a_nan_through():
    plugin = SkipStep(window=8, sigma=1.0)
    assert not any(plugin.skip_step(metrics(i, x)) for i, x in enumerate([1.0, 1.1, 100.0], start=1))
    assert plugin.skip_step(metrics(4, math.nan))
    assert plugin.skip_step(metrics(4, 1.0, grad_norm=math.inf))


def test_state_survives_a_resume():
    plugin = SkipStep(window=4)
    for i, x in enumerate([1.0, 2.0, 3.0], start=1):
        plugin.skip_step(metrics(i, x))
    plugin.skip_step(metrics(4, math.nan))
    restored = SkipStep(window=4)
    restored.load_state_dict(plugin.state_dict())
    assert list(restored.history["loss"]) == [1.0, 2.0, 3.0] and restored.skipped == [3]


@pytest.mark.parametrize(
    ("option", "message"),
    [("window=1", "window=1"), ("sigma=0", "sigma=0"), ("min_history=200", "min_history=200"), ("watch=[lr]", "lr")],
)
def test_options_are_checked(option, message):
    key, value = option.split("=")
    with pytest.raises(UserError, match=f"plugins.skip_step.*{message}"):
        build_plugins(load_train_config(["plugins=[skip_step]", f"plugins.skip_step.{key}={value}"]).plugins)


class Spike(Plugin):
    """Test helper: blows the gradient up 1000x on one data step and checks the skipped update changed nothing."""

    name = "spike"

    def __init__(self, data_step: int) -> None:
        super().__init__()
        self.data_step = data_step
        self.unchanged: bool | None = None

    def loss_terms(self, outputs):
        if outputs.batch["data_step"] == self.data_step:
            return {"spike": 999.0 * outputs.loss}
        return {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch["data_step"] == self.data_step and batch["micro"] == 0:
            self.before = _state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch["data_step"] == self.data_step and batch["micro"] + 1 == batch["n_micro"]:
            after = _state(pl_module)
            self.unchanged = all(torch.equal(a, b) for a, b in zip(self.before, after)) and len(after) == len(
                self.before
            )


def _state(pl_module) -> list:
    optimizer = pl_module.optimizers().optimizer
    tensors = [p.detach().clone() for p in pl_module.parameters()]
    for state in optimizer.state.values():
        tensors += [v.clone() for v in state.values()]
    scheduler = pl_module.lr_schedulers()
    return [*tensors, torch.tensor(scheduler.last_epoch), torch.tensor(pl_module.global_step)]


def test_an_injected_spike_is_skipped_and_changes_nothing(tiny_data, tmp_path, monkeypatch):
    import lit_open.train.runner as train_module

    cfg = load_train_config(
        tiny_overrides(
            tiny_data,
            tmp_path / "run",
            plugins="[skip_step]",
            **{"plugins.skip_step.window": 6, "trainer.max_steps": 10, "trainer.val_check_interval": 0},
        )
    )
    spike = Spike(data_step=7)
    monkeypatch.setattr(train_module, "build_plugins", lambda spec: [*build_plugins(spec), spike])
    summary = run(cfg)
    assert spike.unchanged is True  # weights, both moments, the schedule and the step counter, bit for bit
    skips = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "skip"]
    assert [e["data_step"] for e in skips] == [7]
    assert "grad_norm" in skips[0]["outliers"]
    assert summary["steps"] == 10  # the skipped batch did not count as a step: 11 batches for 10 updates
    assert sorted(train_losses(tmp_path / "run")) == list(range(1, 11))


@pytest.mark.slow
def test_the_data_sequence_marks_the_batches_whose_updates_were_skipped_across_a_resume(tiny_data, tmp_path):
    nan_in = {"plugins": "[chaos,skip_step]", "plugins.chaos.nan_steps": "[3,6]", "trainer.val_check_interval": 0}
    for max_steps in (4, 6):  # the second session resumes from the checkpoint of step 4 (data step 4)
        overrides = tiny_overrides(tiny_data, tmp_path / "run", **nan_in, **{"trainer.max_steps": max_steps})
        result = run_cli("train", *overrides)
        assert result.returncode == 0, result.stderr[-3000:]
    entries = read_data_sequence(tmp_path / "run" / "data_sequence")
    # 8 global batches for 6 updates: data steps 3 and 6 were trained on, but their updates were never applied
    assert [(e["data_step"], e["step"], e.get("update_skipped")) for e in entries] == [
        (0, 1, None),
        (1, 2, None),
        (2, 3, None),
        (3, 3, "skip_step"),
        (4, 4, None),
        (5, 5, None),
        (6, 5, "skip_step"),
        (7, 6, None),
    ]
    assert not [e for e in entries if "undone" in e or "skipped" in e]
