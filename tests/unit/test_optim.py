"""Parameter groups and LR schedules, checked by their values at chosen steps; the 8-bit AdamW against AdamW."""

import copy
import math
import sys

import pytest
import torch
from conftest import tiny_overrides, train_losses

from lit_open.compose import load_train_config
from lit_open.config import OptimConfig, ScheduleConfig
from lit_open.errors import UserError
from lit_open.model import ModelConfig, Transformer
from lit_open.train import run
from lit_open.train.events import read_events
from lit_open.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def tiny(**kw) -> Transformer:
    return Transformer(ModelConfig(vocab_size=64, n_layer=2, d_model=16, n_head=2, d_ff=32, max_seq_len=8, **kw))


def names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_embeddings_norms_and_biases_skip_weight_decay_by_default():
    model = tiny(norm="layernorm", bias=True, mlp="gelu", parallel_residual=True)
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(weight_decay=0.1))}
    no_decay = names(model, groups["no_decay"])
    assert "tok_embeddings.weight" in no_decay
    assert {"norm.weight", "norm.bias", "layers.0.attention_norm.weight", "layers.1.ffn_norm.bias"} <= no_decay
    assert "layers.0.attention.wq.bias" in no_decay and "layers.0.feed_forward.w1.bias" in no_decay
    decay = names(model, groups["decay"])
    assert {"layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight", "output.weight"} <= decay
    assert not decay & no_decay
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0


def test_decay_switches_and_tied_output_follow_the_embedding():
    model = tiny(tie_embeddings=True, qk_norm="full")
    all_in = param_groups(model, OptimConfig(decay_embeddings=True, decay_norms=True, decay_biases=True))
    assert [g["name"] for g in all_in] == ["decay"]
    groups = {g["name"]: g for g in param_groups(model, OptimConfig())}
    no_decay = names(model, groups["no_decay"])
    assert "tok_embeddings.weight" in no_decay and "layers.0.attention.q_norm.weight" in no_decay
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,step,expected",
    [
        # warmup 10 steps to the peak, then the schedule over steps 10..110, floor 0.1
        ("cosine", 1, 0.1),
        ("cosine", 5, 0.5),
        ("cosine", 10, 1.0),
        ("cosine", 60, 0.55),
        ("cosine", 110, 0.1),
        ("cosine", 200, 0.1),
        ("linear", 10, 1.0),
        ("linear", 35, 0.775),
        ("linear", 60, 0.55),
        ("linear", 110, 0.1),
        ("constant", 3, 0.3),
        ("constant", 10, 1.0),
        ("constant", 110, 1.0),
        # WSD: stable until 110 - 11 = 99 (decay_fraction 0.1 of 110 steps), then linear to the floor at 110
        ("wsd", 10, 1.0),
        ("wsd", 99, 1.0),
        ("wsd", 104.5, 0.55),
        ("wsd", 110, 0.1),
    ],
)
def test_schedule_values(name, step, expected):
    cfg = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.1)
    assert lr_factor(step, cfg, total_steps=110) == pytest.approx(expected, abs=1e-9)


def test_cosine_midpoint_formula():
    cfg = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(25, cfg, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_scheduler_applies_factor_of_step_n_to_the_nth_update():
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig(lr=1.0))
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="linear", warmup_steps=4, min_lr_ratio=0.0), 8)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0])
    # total_steps overrides trainer.max_steps
    cfg = ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0, total_steps=4)
    optimizer = build_optimizer(model, OptimConfig(lr=1.0))
    build_scheduler(optimizer, cfg, max_steps=1000)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.75)


def test_adamw_gets_the_configured_hyperparameters():
    optimizer = build_optimizer(tiny(), OptimConfig(lr=2e-3, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.05))
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (2e-3, (0.8, 0.9), 1e-6, 0.05)


# -- optim.name=adamw8bit (bitsandbytes) ---------------------------------------------------------------------------


def small_lm(device: str = "cpu") -> Transformer:
    """d_model 128: the attention/MLP matrices and embeddings exceed min_8bit_size (4096) and get 8-bit moments."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=256, pad_vocab_multiple=1, n_layer=2, d_model=128, n_head=4, d_ff=256, max_seq_len=64
    )
    return Transformer(config).to(device)


def train_fixed_batch(model, optimizer, batch, steps):
    losses = []
    for _ in range(steps):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_adamw8bit_follows_adamw_over_20_steps_with_8bit_moments(device):
    bnb = pytest.importorskip("bitsandbytes")
    batch = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(1)).to(device)
    cfg = OptimConfig(lr=3e-3)
    model = small_lm(device)
    reference = train_fixed_batch(model, build_optimizer(model, cfg), batch, 20)
    model = small_lm(device)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, name="adamw8bit"))
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    losses = train_fixed_batch(model, optimizer, batch, 20)
    # measured on CPU: at most 0.064% apart (step 17). AdamW with beta2 0.999 instead of 0.95 is 2.6% apart, without
    # weight decay 1.5%, with lr x1.25 48%
    for step, (ours, theirs) in enumerate(zip(losses, reference), start=1):
        assert ours == pytest.approx(theirs, rel=0.01), f"step {step}"
    assert losses[-1] < 0.2 * losses[0]  # 5.57 -> 0.29: the updates are real

    state = {name: optimizer.state[p] for name, p in model.named_parameters()}
    big = state["layers.0.attention.wq.weight"]  # 128 x 128 elements
    assert big["state1"].dtype == big["state2"].dtype == torch.uint8
    assert big["absmax1"].dtype == torch.float32 and big["absmax1"].numel() == 128 * 128 // 256  # a scale per block
    small = state["layers.0.attention_norm.weight"]  # 128 elements < min_8bit_size: 32-bit moments
    assert small["state1"].dtype == small["state2"].dtype == torch.float32


def test_adamw8bit_gets_the_groups_and_hyperparameters_of_adamw():
    pytest.importorskip("bitsandbytes")
    cfg = OptimConfig(name="adamw8bit", lr=2e-3, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.05)
    model = tiny()
    optimizer = build_optimizer(model, cfg)
    expected = param_groups(model, cfg)
    assert [g["name"] for g in optimizer.param_groups] == [g["name"] for g in expected] == ["decay", "no_decay"]
    for group, want in zip(optimizer.param_groups, expected):
        assert [id(p) for p in group["params"]] == [id(p) for p in want["params"]]
        assert (group["lr"], group["betas"], group["eps"]) == (2e-3, (0.8, 0.9), 1e-6)
        assert group["weight_decay"] == want["weight_decay"]


def test_adamw8bit_state_round_trips_in_torch_layout_and_a_checkpoint_rollback_restores_it():
    pytest.importorskip("bitsandbytes")
    from lit_open.train.snapshots import restore_snapshot, rng_state, snapshot_from_checkpoint

    model = small_lm()
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, name="adamw8bit"))
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="cosine"), 10)
    batch = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(2))
    train_fixed_batch(model, optimizer, batch, 2)
    saved = optimizer.state_dict()
    # torch's layout, which lit-open's checkpoint readers expect: the quantized moments directly in the state
    assert saved["state"][1]["state1"].dtype == torch.uint8 and "__bnb_optimizer_quant_state__" not in saved["state"][1]
    checkpoint = {
        "global_step": 2,
        "state_dict": {f"model.{k}": v.clone() for k, v in model.state_dict().items()},
        "optimizer_states": [copy.deepcopy(saved)],
        "lr_schedulers": [scheduler.state_dict()],
    }
    ahead = train_fixed_batch(model, optimizer, batch, 2)
    restore_snapshot(snapshot_from_checkpoint(checkpoint, 2, rng_state()), model, optimizer, scheduler)
    assert train_fixed_batch(model, optimizer, batch, 2) == ahead

    fresh_model = small_lm()
    fresh_model.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()})
    fresh = build_optimizer(fresh_model, OptimConfig(lr=3e-3, name="adamw8bit"))
    fresh.load_state_dict(checkpoint["optimizer_states"][0])
    assert train_fixed_batch(fresh_model, fresh, batch, 2) == ahead


@pytest.mark.parametrize("saved_with,loaded_with", [("adamw", "adamw8bit"), ("adamw8bit", "adamw")])
def test_optimizer_state_of_the_other_optimizer_is_refused_by_name(saved_with, loaded_with):
    pytest.importorskip("bitsandbytes")
    model = tiny()
    batch = torch.randint(0, 64, (2, 9))
    source = build_optimizer(model, OptimConfig(name=saved_with))
    train_fixed_batch(model, source, batch, 1)
    with pytest.raises(UserError, match=f"written with optim.name={saved_with}.*has optim.name={loaded_with}"):
        build_optimizer(model, OptimConfig(name=loaded_with)).load_state_dict(source.state_dict())


def test_a_missing_or_broken_bitsandbytes_is_a_user_error(monkeypatch):
    import lit_open.train.optim as optim

    optim._adamw8bit_class.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ModuleNotFoundError
    try:
        with pytest.raises(UserError, match=r"optim.name=adamw8bit needs bitsandbytes.*pip install bitsandbytes"):
            build_optimizer(tiny(), OptimConfig(name="adamw8bit"))
    finally:
        optim._adamw8bit_class.cache_clear()


def test_optim_name_accepts_adamw8bit_and_refuses_it_with_sharded_strategies():
    assert load_train_config(["optim.name=adamw8bit", "strategy=ddp"]).optim.name == "adamw8bit"
    with pytest.raises(UserError, match="optim.name='adam8bit' is not supported; choose one of: adamw, adamw8bit"):
        load_train_config(["optim.name=adam8bit"])
    for strategy in ("fsdp", "tp", "fsdp_tp"):
        with pytest.raises(UserError, match=f"optim.name=adamw8bit does not work with strategy={strategy}: "):
            load_train_config(["optim.name=adamw8bit", f"strategy={strategy}"])


@pytest.mark.parametrize("name", ["adamw8bit", "adamw"])
def test_a_run_resumes_exactly_from_a_checkpoint(tiny_data, tmp_path, monkeypatch, name):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    import lit_open.train.runner as train_module
    from lit_open.plugin import Plugin

    class Crash(Exception):
        pass

    class CrashAtStep3(Plugin):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                raise Crash("injected")

    extra = {"optim.name": name, "trainer.max_steps": 4, "checkpoint.every_n_steps": 2}
    extra["trainer.val_check_interval"] = 0

    def train(run_dir):
        return run(load_train_config(tiny_overrides(tiny_data, run_dir, **extra)))

    train(tmp_path / "full")
    real_build = train_module.build_plugins
    monkeypatch.setattr(train_module, "build_plugins", lambda cfg: [CrashAtStep3()])
    with pytest.raises(Crash):
        train(tmp_path / "split")
    monkeypatch.setattr(train_module, "build_plugins", real_build)
    saved = torch.load(tmp_path / "split" / "checkpoints" / "step-00000002.ckpt", weights_only=False)
    if name == "adamw8bit":
        moments = [s["state1"].dtype for s in saved["optimizer_states"][0]["state"].values()]
        assert torch.uint8 in moments and torch.float32 in moments  # 8-bit for big tensors, 32-bit for small ones
    train(tmp_path / "split")  # resume=auto: from the step-2 checkpoint
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(split) == sorted(full) == [1, 2, 3, 4]
    for step in full:
        assert split[step] == pytest.approx(full[step], rel=1e-6), f"step {step}"
    assert [e["step"] for e in read_events(tmp_path / "split" / "events.jsonl") if e["event"] == "resume"] == [2]
