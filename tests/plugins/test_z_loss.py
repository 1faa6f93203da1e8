"""The z_loss plugin: its value against the model's own logits, its gradient's effect, training runs, options."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics, tiny_overrides

from lit_open.compose import load_train_config
from lit_open.errors import UserError
from lit_open.model import ModelConfig, Transformer
from lit_open.plugin import Plugin, StepOutputs, build_plugins
from lit_open.plugins.z_loss import ZLoss
from lit_open.train import run
from lit_open.train.events import read_events
from lit_open.train.loss import lm_loss

TINY = dict(vocab_size=96, pad_vocab_multiple=32, n_layer=1, d_model=32, n_head=4, d_ff=64, max_seq_len=16)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**TINY))
    model.init_weights(seed=seed)
    return model


def mean_squared_logsumexp(model: Transformer, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference: from the full logits, over the tokens that have a target."""
    lse = model(input_ids).float().logsumexp(-1)
    return lse.pow(2)[targets != -100].mean()


def test_value_is_coefficient_times_mean_squared_logsumexp_of_the_logits():
    model = tiny_model()
    tokens = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(1))
    ids, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[0, :5] = -100  # ignored targets take no z-loss either, like the cross-entropy
    plugin = ZLoss(coefficient=0.01)
    with torch.no_grad():
        expected = 0.01 * mean_squared_logsumexp(model, ids, targets)
        for chunk in (0, 7):  # one piece, and chunks that do not divide the 48 tokens
            out = lm_loss(model(ids, return_hidden=True), model.output, targets, chunk_tokens=chunk)
            terms = plugin.loss_terms(StepOutputs(loss=out.loss, logsumexp=out.logsumexp, batch={"targets": targets}))
            assert list(terms) == ["z_loss"]
            torch.testing.assert_close(terms["z_loss"], expected, rtol=1e-6, atol=0)
    assert ZLoss().cfg.coefficient == 1e-4


def test_gradient_pulls_logsumexp_towards_zero():
    model = tiny_model()
    with torch.no_grad():
        model.output.weight.mul_(20.0)  # large logits, far from log Z = 0
    tokens = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(2))
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    plugin = ZLoss(coefficient=1.0)

    def z_loss() -> torch.Tensor:
        out = lm_loss(model(ids, return_hidden=True), model.output, targets)
        return plugin.loss_terms(StepOutputs(loss=out.loss, logsumexp=out.logsumexp, batch={"targets": targets}))[
            "z_loss"
        ]

    before = z_loss()
    before.backward()
    # the gradient through the logits is 2 * c * lse * softmax / N per token: exactly what autograd gives
    hidden = model(ids, return_hidden=True).detach()
    logits = model.output(hidden).float()
    lse = logits.logsumexp(-1, keepdim=True)
    expected_head_grad = (2.0 * lse * logits.softmax(-1) / lse.numel()).flatten(0, 1).T @ hidden.flatten(0, 1)
    torch.testing.assert_close(model.output.weight.grad, expected_head_grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # a small step against the gradient lowers mean(lse^2) and |lse|
        for p in model.parameters():
            p.sub_(1e-3 * p.grad)
    after = z_loss().detach()
    assert after < 0.99 * before.detach()


def test_options_are_validated():
    cfg = load_train_config(["plugins=[z_loss]", "plugins.z_loss.coefficient=1e-3"])
    assert cfg.plugins == {"z_loss": {"_target_": "lit_open.plugins.z_loss.ZLoss", "coefficient": 1e-3}}
    (plugin,) = build_plugins(cfg.plugins)
    assert isinstance(plugin, ZLoss) and plugin.cfg.coefficient == 1e-3
    assert build_plugins(load_train_config(["plugins=[z_loss]"]).plugins)[0].cfg.coefficient == 1e-4
    for bad in ("-1e-4", "nan"):
        cfg = load_train_config(["plugins=[z_loss]", f"plugins.z_loss.coefficient={bad}"])
        with pytest.raises(UserError, match=r"plugins\.z_loss\.coefficient"):
            build_plugins(cfg.plugins)
    cfg = load_train_config(["plugins=[z_loss]", "plugins.z_loss.coefficient=lots"])
    with pytest.raises(UserError, match=r"coefficient"):
        build_plugins(cfg.plugins)


class LogsumexpProbe(Plugin):
    """Records, before each micro-batch's forward, mean(lse^2) of the model's own full logits on that batch."""

    name = "probe"

    def __init__(self):
        super().__init__()
        self.per_step: dict[int, float] = {}  # optimizer step (as logged) -> mean over its micro-batches

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            value = mean_squared_logsumexp(pl_module.model, batch["input_ids"], batch["targets"]).item()
        step = trainer.global_step + 1  # the row this micro-batch is logged in
        self.per_step[step] = self.per_step.get(step, 0.0) + value / batch["n_micro"]


def train_with_probe(data, run_dir, monkeypatch, *plugin_overrides: str):
    import lit_open.train.runner as train_module

    probe = LogsumexpProbe()
    real_build = train_module.build_plugins
    monkeypatch.setattr(train_module, "build_plugins", lambda cfg: [*real_build(cfg), probe])
    # 2 micro-batches per step: the logged z-loss is their mean, like train/loss
    overrides = tiny_overrides(
        data,
        run_dir,
        **{"data.micro_batch_size": 4, "trainer.validate_at_start": "false", "trainer.val_check_interval": 0},
    )
    summary = run(load_train_config([*overrides, *plugin_overrides]))
    monkeypatch.setattr(train_module, "build_plugins", real_build)
    return summary, probe


def test_training_logs_the_z_loss_and_lowers_logsumexp(tiny_data, tmp_path, monkeypatch):
    coefficient = 1.0  # large, so that 6 steps show its effect (mean lse^2 starts near log(512)^2 = 39)
    with_z, probe_z = train_with_probe(
        tiny_data, tmp_path / "z", monkeypatch, "plugins=[z_loss]", f"plugins.z_loss.coefficient={coefficient}"
    )
    rows = [r for r in read_metrics(tmp_path / "z") if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:  # train/z_loss is coefficient * mean(lse^2), computed apart from the loss, on the same batches
        assert float(r["train/z_loss"]) == pytest.approx(coefficient * probe_z.per_step[int(r["step"])], rel=1e-5)
    events = [e for e in read_events(tmp_path / "z" / "events.jsonl") if e["event"] == "z_loss"]
    assert events == [{**events[0], "step": 0, "plugin": "z_loss", "coefficient": coefficient}]

    without, probe_plain = train_with_probe(tiny_data, tmp_path / "plain", monkeypatch)
    assert "train/z_loss" not in read_metrics(tmp_path / "plain")[0]
    # same start (same weights and batch), then the z-loss pulls log Z towards 0 faster than training alone
    assert probe_z.per_step[1] == pytest.approx(probe_plain.per_step[1], rel=1e-6)
    assert all(probe_z.per_step[step] < probe_plain.per_step[step] for step in (3, 4, 5, 6))
    assert probe_z.per_step[6] < 0.9 * probe_plain.per_step[6]
    assert with_z["steps"] == without["steps"] == 6
