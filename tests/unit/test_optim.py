"""Parameter groups and LR schedules, checked by their values at chosen steps."""

import math

import pytest
import torch

from lit_open.config import OptimConfig, ScheduleConfig
from lit_open.model import ModelConfig, Transformer
from lit_open.optim import build_optimizer, build_scheduler, lr_factor, param_groups


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
