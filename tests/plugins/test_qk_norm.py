"""The qk_norm plugin: function-preserving insertion, calibration, the ramp, escalation on rollback, runs, TP."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import Crash, CrashAfterStep, bind_run, read_metrics, run_gloo, tiny_overrides, train_losses

from lit_open.compose import load_train_config
from lit_open.config import StrategyConfig
from lit_open.errors import UserError
from lit_open.model import ModelConfig, Transformer
from lit_open.model.model import RMSNorm
from lit_open.parallel import materialize, parallelize
from lit_open.plugin import Rollback, RolledBack, build_plugins
from lit_open.plugins.qk_norm import QKNorm
from lit_open.train import run
from lit_open.train.events import read_events

TINY = dict(vocab_size=96, pad_vocab_multiple=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64)
MODES = ("full", "head")
NORM_KEYS = [f"layers.{i}.attention.{n}.weight" for i in range(2) for n in ("q_norm", "k_norm")]


def checkpoint_model(seed: int = 1) -> Transformer:
    """A model trained without QK-norm: random weights stand in for the checkpoint."""
    model = Transformer(ModelConfig(**TINY, max_seq_len=16))
    model.init_weights(seed=seed)
    return model


def with_plugin(checkpoint: Transformer, **options) -> tuple[QKNorm, Transformer]:
    """The model a run with the plugin builds, loaded from `checkpoint`: only the norms' gains are missing."""
    plugin = QKNorm(**options)
    config = plugin.configure_model(checkpoint.config)
    assert plugin.inserted and config.qk_norm == plugin.cfg.mode and checkpoint.config.qk_norm == "none"
    model = Transformer(config)
    plugin.on_model_built(model)
    missing, unexpected = model.load_state_dict(checkpoint.state_dict(), strict=False)
    assert sorted(missing) == sorted(NORM_KEYS) == sorted(plugin.new_parameters()) and unexpected == []
    return plugin, model


def tokens(seed: int = 0, batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 96, (batch, 17), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model: Transformer, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def expected_gain(model: Transformer, ids: torch.Tensor, mode: str, which: str) -> float:
    """By hand, for layer 0: the mean over tokens (and heads) of the RMS of q or k before its norm."""
    with torch.no_grad():
        layer = model.layers[0]
        x = layer.attention_norm(model.tok_embeddings(ids))
        y = getattr(layer.attention, f"w{which}")(x)
        if mode == "head":
            y = y.view(*y.shape[:2], -1, model.config.head_dim)
        return float(y.pow(2).mean(-1).sqrt().mean())


@pytest.mark.parametrize("mode", MODES)
def test_inserted_at_alpha_zero_the_model_is_the_checkpoints_also_calibrated(mode):
    checkpoint = checkpoint_model()
    plugin, model = with_plugin(checkpoint, mode=mode)
    plugin.activate(0)
    assert plugin.set_step(0) == 0.0 and plugin.phase == "off"
    ids = tokens()
    ref_logits, ref_grads = logits_and_grads(checkpoint, ids)
    logits, grads = logits_and_grads(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert set(grads) == set(ref_grads)  # the gains get no gradient while alpha = 0: the first update is the same
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-8)

    gains = plugin.measure(model, ids[:, :-1])
    plugin.set_gains(gains.tolist())
    state = model.state_dict()
    for which in ("q", "k"):
        gain = state[f"layers.0.attention.{which}_norm.weight"]
        assert gain.shape == ((4 if which == "q" else 2) * 8 if mode == "full" else 8,)
        assert torch.all(gain == gain[0]) and float(gain[0]) == pytest.approx(
            expected_gain(checkpoint, ids[:, :-1], mode, which), rel=1e-5
        )
    assert len(set(gains.tolist())) == 4 and all(0.05 < g < 0.5 for g in gains.tolist())  # init_std 0.02 scale
    torch.testing.assert_close(logits_and_grads(model, ids)[0], ref_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_alpha_ramps_linearly_in_place_and_ends_at_the_native_qk_norm_model(mode):
    checkpoint = checkpoint_model()
    plugin, model = with_plugin(checkpoint, mode=mode, ramp_steps=8)
    alpha = plugin.alpha
    assert plugin.alpha_at(100) == 0.0  # dormant until activated
    plugin.activate(10)
    assert [plugin.alpha_at(s) for s in (0, 9, 10, 12, 14, 17, 18, 25)] == [0, 0, 0, 0.25, 0.5, 0.875, 1, 1]
    for step, phase in ((10, "off"), (14, "ramp"), (18, "on"), (12, "ramp")):
        plugin.set_step(step)
        assert plugin.phase == phase and float(plugin.alpha) == plugin.alpha_at(step)
    assert plugin.alpha is alpha  # one tensor, updated in place: compiled code does not see a new constant

    plugin.set_gains(plugin.measure(model, tokens()[:, :-1]).tolist())
    ids = tokens(seed=1)
    native = Transformer(model.config)
    native.load_state_dict(model.state_dict())  # the same weights, QK-norm built in
    plugin.set_step(18)
    torch.testing.assert_close(logits_and_grads(model, ids)[0], logits_and_grads(native, ids)[0], rtol=0, atol=1e-5)

    plugin.set_step(14)  # alpha = 0.5: each norm returns the average of its input and its normed input
    q_norm = model.layers[1].attention.q_norm
    x = torch.randn(2, 5, 32 if mode == "full" else 8)
    reference = RMSNorm(x.shape[-1], model.config.norm_eps)
    reference.weight.data.copy_(q_norm.weight)
    torch.testing.assert_close(q_norm(x), 0.5 * reference(x) + 0.5 * x)
    blended = logits_and_grads(model, ids)[0]
    for end in (checkpoint, native):  # neither end
        assert (blended - logits_and_grads(end, ids)[0]).abs().max() > 1e-5

    at_once = QKNorm(mode=mode, ramp_steps=0)
    at_once.activate(3)
    assert [at_once.alpha_at(s) for s in (2, 3, 4)] == [0.0, 1.0, 1.0]


def stub_run(plugin: QKNorm, model: Transformer, tmp_path, step: int = 0):
    """The trainer and module a plugin sees, reduced to what QKNorm uses, and its run state (events go to
    tmp_path/events.jsonl)."""
    trainer = SimpleNamespace(
        global_step=step,
        strategy=SimpleNamespace(root_device=torch.device("cpu"), reduce=lambda t, reduce_op: t),
        precision_plugin=SimpleNamespace(),
    )
    module = SimpleNamespace(model=model, run=bind_run(plugin, tmp_path))
    return trainer, module


def rolled_back(to_step: int, *escalate: str) -> RolledBack:
    request = Rollback(to_step=to_step, resume_data_step=9, reason="loss spike", escalate=tuple(escalate))
    return RolledBack(request=request, from_step=to_step + 3, to_step=to_step, undone=(2, 5), skipped=(5, 9))


def train_batch(plugin, trainer, module, step: int, data_step: int) -> None:
    trainer.global_step = step
    module.run.consumed_batches = data_step
    ids = tokens(seed=data_step)
    plugin.on_train_batch_start(trainer, module, {"input_ids": ids[:, :-1], "data_step": data_step}, 0)


def test_on_rollback_dormant_until_a_rollback_escalates_qk_norm(tmp_path):
    checkpoint = checkpoint_model()
    plugin, model = with_plugin(checkpoint, mode="head", ramp_steps=4, start="on_rollback")
    trainer, module = stub_run(plugin, model, tmp_path)
    plugin.setup(trainer, module, "fit")
    plugin.on_train_start(trainer, module)
    ids = tokens(seed=5)[:, :-1]
    for step in range(4):
        train_batch(plugin, trainer, module, step, data_step=step)
        assert plugin.value == 0.0 and plugin.step_metrics(trainer, module) == {"qk_norm/alpha": 0.0}
    torch.testing.assert_close(model(ids), checkpoint(ids), rtol=0, atol=1e-5)
    assert plugin.state_dict() == {"mode": "head", "activation_step": None, "calibrated": False, "step": 3}

    trainer.global_step = 2
    plugin.on_rollback(trainer, module, rolled_back(2))  # a rollback that does not ask for it: still dormant
    plugin.on_rollback(trainer, module, rolled_back(2, "something_else"))
    assert plugin.activation_step is None
    plugin.on_rollback(trainer, module, rolled_back(2, "something_else", "qk_norm"))
    assert plugin.activation_step == 2 and not plugin.calibrated
    train_batch(plugin, trainer, module, 2, data_step=9)  # the first batch after the rollback calibrates
    assert plugin.calibrated and plugin.value == 0.0
    gain = float(model.layers[0].attention.q_norm.weight.detach()[0])
    assert gain == pytest.approx(expected_gain(checkpoint, tokens(seed=9)[:, :-1], "head", "q"), rel=1e-5)
    torch.testing.assert_close(model(ids), checkpoint(ids), rtol=0, atol=1e-5)  # alpha 0 at the restored step
    values = {}
    for step, data_step in ((3, 10), (4, 11), (5, 12), (6, 13), (7, 14)):
        train_batch(plugin, trainer, module, step, data_step)
        values[step] = plugin.step_metrics(trainer, module)["qk_norm/alpha"]
    assert values == {3: 0.25, 4: 0.5, 5: 0.75, 6: 1.0, 7: 1.0}
    assert float(model.layers[0].attention.q_norm.weight.detach()[0]) == gain  # calibrated once

    resumed = QKNorm(mode="head", ramp_steps=4, start="on_rollback")  # the state a checkpoint carries
    resumed.configure_model(checkpoint.config)
    resumed.load_state_dict({**plugin.state_dict(), "step": 5})  # written after update 5
    assert (resumed.activation_step, resumed.calibrated, resumed.value) == (2, True, 0.75)  # also for a validation
    resumed.on_validation_start(SimpleNamespace(global_step=0, state=SimpleNamespace(fn="validate")), None)
    assert resumed.value == 0.75  # lit-open eval counts no steps: the checkpoint's alpha stays

    trainer.global_step = 1  # a later rollback to before the activation: on again from there, recalibrated
    plugin.on_rollback(trainer, module, rolled_back(1))
    assert (plugin.activation_step, plugin.calibrated, plugin.value) == (1, False, 0.0)

    events = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "qk_norm"]
    assert [(e["action"], e["step"]) for e in events] == [
        ("inserted", 0),
        ("activated", 2),
        ("calibrated", 2),
        ("ramped_in", 6),
        ("activated", 1),
    ]
    assert events[0]["start"] == "on_rollback" and events[0]["activation_step"] is None
    assert events[1]["reason"] == "rollback" and events[2]["data_step"] == 9
    assert events[2]["q_gains"][0] == pytest.approx(gain, rel=1e-5) and len(events[2]["k_gains"]) == 2


def test_a_model_with_qk_norm_already_is_left_alone(tmp_path):
    olmo2 = load_train_config(["model=olmo2_1b"]).model
    assert olmo2.qk_norm == "full"
    plugin = QKNorm()
    assert plugin.configure_model(olmo2) is olmo2 and not plugin.inserted
    model = Transformer(ModelConfig(**TINY, max_seq_len=16, qk_norm="full"))
    hooks = [len(m._forward_hooks) for m in model.modules()]
    plugin.on_model_built(model)
    assert [len(m._forward_hooks) for m in model.modules()] == hooks and plugin.norms == {}
    trainer, module = stub_run(plugin, model, tmp_path)
    plugin.on_train_start(trainer, module)
    plugin.on_rollback(trainer, module, rolled_back(0, "qk_norm"))
    assert plugin.step_metrics(trainer, module) == {} and plugin.state_dict() == {}
    events = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "qk_norm"]
    assert [(e["action"], e["mode"], e.get("reason")) for e in events] == [
        ("already_on", "full", None),
        ("already_on", "full", "rollback"),
    ]


def test_options_are_validated():
    cfg = load_train_config(["plugins=[qk_norm]", "plugins.qk_norm.mode=head", "plugins.qk_norm.ramp_steps=0"])
    assert cfg.plugins["qk_norm"]["_target_"] == "lit_open.plugins.qk_norm.QKNorm"
    (plugin,) = build_plugins(cfg.plugins)
    assert isinstance(plugin, QKNorm) and (plugin.cfg.mode, plugin.cfg.ramp_steps) == ("head", 0)
    defaults = build_plugins(load_train_config(["plugins=[qk_norm]"]).plugins)[0].cfg
    assert (defaults.mode, defaults.ramp_steps, defaults.start, defaults.calibrate) == ("full", 100, "now", True)
    bad = {
        "mode=diag": r"plugins\.qk_norm\.mode='diag'.*full.*head",
        "ramp_steps=-1": r"plugins\.qk_norm\.ramp_steps=-1 must be zero",
        "ramp_steps=lots": r"qk_norm.*ramp_steps",
        "start=later": r"plugins\.qk_norm\.start='later'.*now.*on_rollback",
        "calibrate=maybe": r"qk_norm.*calibrate",
    }
    for option, message in bad.items():
        with pytest.raises(UserError, match=message):
            build_plugins(load_train_config(["plugins=[qk_norm]", f"plugins.qk_norm.{option}"]).plugins)
    with pytest.raises(UserError, match=r"plugins\.qk_norm\.mode=head.*model\.qk_norm=full.*not interconvertible"):
        QKNorm(mode="head").configure_model(ModelConfig(**TINY, qk_norm="full"))
    resumed = QKNorm(mode="head")
    resumed.configure_model(ModelConfig(**TINY))
    with pytest.raises(UserError, match=r"plugins\.qk_norm\.mode=full"):
        resumed.load_state_dict({"mode": "full", "activation_step": 0, "calibrated": True})


# -- training runs --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_runs_same_first_step_ramp_in_metrics_and_events_and_resume_mid_ramp(tiny_data, tmp_path, monkeypatch):
    import lit_open.train.runner as train_module

    fast = {"trainer.validate_at_start": "false", "trainer.val_check_interval": 0, "logger.tensorboard": "false"}
    plugin = ["plugins=[qk_norm]", "plugins.qk_norm.ramp_steps=4"]

    def train(name: str, *overrides: str) -> dict:
        return run(load_train_config([*tiny_overrides(tiny_data, tmp_path / name, **fast), *overrides]))

    train("plain")
    train("qk", *plugin)
    real_build = train_module.build_plugins
    monkeypatch.setattr(train_module, "build_plugins", lambda cfg: [*real_build(cfg), CrashAfterStep(4)])
    with pytest.raises(Crash):
        train("split", *plugin)  # mid-ramp (alpha 0.75 for update 4); the newest checkpoint is step 3's
    monkeypatch.setattr(train_module, "build_plugins", real_build)
    train("split", *plugin)  # resume=auto from step 3

    plain, qk, split = (train_losses(tmp_path / name) for name in ("plain", "qk", "split"))
    assert qk[1] == plain[1]  # same weights, alpha 0: the first update is computed exactly as without the plugin
    assert qk[6] != plain[6]
    assert sorted(split) == sorted(qk) == list(range(1, 7))
    for step in qk:  # the resumed run continued the ramp where it was
        assert split[step] == pytest.approx(qk[step], rel=1e-6), step
    for name in ("qk", "split"):
        rows = [r for r in read_metrics(tmp_path / name) if r["train/loss"]]
        assert [float(r["qk_norm/alpha"]) for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert "qk_norm/alpha" not in read_metrics(tmp_path / "plain")[0]

    events = [e for e in read_events(tmp_path / "qk" / "events.jsonl") if e["event"] == "qk_norm"]
    assert [(e["action"], e["step"]) for e in events] == [
        ("inserted", 0),
        ("activated", 0),
        ("calibrated", 0),
        ("ramped_in", 4),
    ]
    assert events[0]["mode"] == "full" and events[0]["ramp_steps"] == 4 and events[0]["alpha"] == 0.0
    calibrated = events[2]
    assert calibrated["data_step"] == 0 and len(calibrated["q_gains"]) == len(calibrated["k_gains"]) == 2
    assert 0.01 < calibrated["q_gain_summary"]["min"] <= calibrated["q_gain_summary"]["max"] < 10
    events = [e for e in read_events(tmp_path / "split" / "events.jsonl") if e["event"] == "qk_norm"]
    assert [(e["action"], e["step"]) for e in events] == [
        ("inserted", 0),
        ("activated", 0),
        ("calibrated", 0),
        ("inserted", 3),  # the resumed session: activation and calibration came with the checkpoint
        ("ramped_in", 4),
    ]
    assert events[3]["activation_step"] == 0 and events[3]["alpha"] == 0.75

    # switching QK-norm on in a run trained without it: resume its checkpoint with the plugin
    shutil.copytree(tmp_path / "plain", tmp_path / "switched")
    train("switched", *plugin, f"resume={tmp_path / 'switched' / 'checkpoints' / 'step-00000003.ckpt'}")
    switched = train_losses(tmp_path / "switched")
    assert switched[4] == pytest.approx(plain[4], rel=1e-6)  # alpha 0 for update 4: the checkpoint's own model
    assert switched[6] != plain[6]  # blended in from update 5 (calibrated gains: the change is small)
    rows = [r for r in read_metrics(tmp_path / "switched") if r["train/loss"] and int(r["step"]) > 3]
    assert [float(r["qk_norm/alpha"]) for r in rows] == [0.0, 0.25, 0.5]
    events = read_events(tmp_path / "switched" / "events.jsonl")
    (added,) = [e for e in events if e["event"] == "new_parameters"]
    assert added["names"] == sorted(NORM_KEYS)
    actions = [(e["action"], e["step"]) for e in events if e["event"] == "qk_norm"]
    assert actions == [("inserted", 3), ("activated", 3), ("calibrated", 3)]  # the run ends before alpha reaches 1


# -- tensor parallelism -----------------------------------------------------------------------------------------


def tp_worker() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    for mode in MODES:  # both in one pair of processes: starting them is most of the cost
        check_tensor_parallel(mode, mesh)


def check_tensor_parallel(mode: str, mesh) -> None:
    ids = tokens()
    checkpoint = checkpoint_model(seed=3)
    reference, ref_model = with_plugin(checkpoint, mode=mode, ramp_steps=4)
    plugin = QKNorm(mode=mode, ramp_steps=4)
    config = plugin.configure_model(checkpoint.config)
    with torch.device("meta"):
        sharded = Transformer(config)
    plugin.on_model_built(sharded)  # as LitLM does: after build, before parallelize
    materialize(parallelize(sharded, StrategyConfig(name="tp"), mesh), torch.device("cpu"), seed=3)
    gains = plugin.measure(sharded, ids[:, :-1])  # statistics over all heads, the same on both ranks
    torch.testing.assert_close(gains, reference.measure(ref_model, ids[:, :-1]), rtol=1e-5, atol=0)
    plugin.set_gains(gains.tolist())
    reference.set_gains(gains.tolist())
    for p in (plugin, reference):
        p.activate(0)
    for step in (0, 2, 4):  # alpha 0, 0.5, 1
        plugin.set_step(step)
        reference.set_step(step)
        ref_logits, ref_grads = logits_and_grads(ref_model, ids)
        logits, grads = logits_and_grads(sharded, ids)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5, msg=f"{mode} step {step}")
        assert set(grads) == set(ref_grads), (mode, step)
        for name, grad in grads.items():
            grad = grad.full_tensor()
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7, msg=f"{mode} {step}: {name}")


@pytest.mark.slow
def test_tensor_parallel_blend_and_calibration_equal_one_process():
    """2 CPU processes (gloo), full and per-head: gains, logits and gradients at alpha 0, 0.5, 1 as in one process."""
    run_gloo(tp_worker)
