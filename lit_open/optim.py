"""AdamW with parameter groups, and the learning-rate schedules (cosine, linear, WSD, constant; linear warmup)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from lit_open.config import OptimConfig, ScheduleConfig


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split parameters into a decayed and a non-decayed group (embeddings, norms, biases: configurable)."""
    no_decay: set[int] = set()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.Embedding) and not cfg.decay_embeddings:
            no_decay.update(id(p) for p in own)
        elif _is_norm(module) and not cfg.decay_norms:
            no_decay.update(id(p) for p in own)
    for name, p in model.named_parameters():
        if name.endswith("bias") and not cfg.decay_biases:
            no_decay.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"name": "decay", "params": [p for p in params if id(p) not in no_decay], "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=on_cuda or None)


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """The LR of optimizer step `step` (1 = the first update) as a fraction of the peak LR.

    Warmup is linear: step/warmup_steps. After it, over the remaining steps up to `total_steps`:
    cosine and linear decay to min_lr_ratio; WSD holds the peak, then decays linearly to min_lr_ratio over its
    last decay_steps (or decay_fraction of all steps); constant holds the peak. Past total_steps the final value
    is kept.
    """
    warmup = cfg.warmup_steps
    if warmup > 0 and step <= warmup:
        return step / warmup
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "wsd":
        decay = cfg.decay_steps if cfg.decay_steps is not None else max(1, round(cfg.decay_fraction * total_steps))
        start = total_steps - decay
        progress = min(1.0, max(0.0, (step - start) / decay))
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup)))
    if cfg.name == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    raise ValueError(f"unknown schedule {cfg.name!r}")


def _lambda(epoch: int, cfg: ScheduleConfig, total_steps: int) -> float:
    # LambdaLR counts from 0 and applies the factor of `epoch` to the next update, i.e. update number epoch + 1
    return lr_factor(epoch + 1, cfg, total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int):
    total = cfg.total_steps or max_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_lambda, cfg=cfg, total_steps=total))
