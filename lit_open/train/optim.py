"""AdamW (torch, or bitsandbytes 8-bit) with parameter groups, and the learning-rate schedules (cosine, linear, WSD,
constant; linear warmup)."""

from __future__ import annotations

import math
from functools import cache, partial

import torch
from torch import nn

from lit_open.config import OptimConfig, ScheduleConfig
from lit_open.errors import UserError


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
    """`cfg.name`: adamw (torch, fused on CUDA) or adamw8bit (bitsandbytes, 8-bit moments); same groups and settings."""
    groups = param_groups(model, cfg)
    settings = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.name == "adamw8bit":
        # bitsandbytes keeps 32-bit moments for tensors below its min_8bit_size, 4096 elements by default (norms,
        # biases, small matrices, which hold little of the memory); that default is kept.
        return _adamw8bit_class()(groups, **settings)
    if cfg.name != "adamw":
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, **settings, fused=on_cuda or None)
    optimizer.register_load_state_dict_pre_hook(_refuse_foreign_state)
    return optimizer


_BNB_WRAPPED = "__bnb_optimizer_quant_state__"  # where bitsandbytes' own state_dict nests the quantized moments


def _check_saved_optimizer(state_dict: dict, name: str) -> None:
    """Refuse optimizer state written by the other optimizer: torch AdamW's moments (exp_avg, exp_avg_sq) and
    bitsandbytes' (state1, state2, absmax...) cannot stand in for each other (the first step would fail on a key)."""
    saved = None
    for state in state_dict["state"].values():
        if "exp_avg" in state:
            saved = "adamw"
        elif "state1" in state or _BNB_WRAPPED in state:
            saved = "adamw8bit"
        if saved is not None:
            break
    if saved is not None and saved != name:
        raise UserError(
            f"The saved optimizer state was written with optim.name={saved}, but this run has optim.name={name}; "
            f"the moments of one cannot be loaded into the other. Use optim.name={saved}, as the run that saved it did."
        )


def _refuse_foreign_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    _check_saved_optimizer(state_dict, "adamw")


@cache
def _adamw8bit_class() -> type[torch.optim.Optimizer]:
    try:
        import bitsandbytes as bnb  # only adamw8bit needs it, and its native library may fail to load
    except Exception as err:  # not installed, or a broken install (native library, CUDA mismatch)
        raise UserError(
            f"optim.name=adamw8bit needs bitsandbytes, which failed to import ({type(err).__name__}: {err}). "
            "Install it with `pip install bitsandbytes` (or choose optim.name=adamw)."
        ) from err

    class AdamW8bit(bnb.optim.AdamW8bit):
        """bitsandbytes' AdamW8bit whose state_dict keeps torch's flat layout (each parameter's tensors directly in
        its state, as AdamW's) instead of nesting the quantized moments for FSDP1: lit-open reads optimizer state
        out of checkpoints (rollback to a checkpoint) in that layout. Loading takes either layout."""

        def state_dict(self) -> dict:
            return torch.optim.Optimizer.state_dict(self)

        def load_state_dict(self, state_dict: dict, move_to_device: bool = True) -> None:
            _check_saved_optimizer(state_dict, "adamw8bit")
            super().load_state_dict(state_dict, move_to_device=move_to_device)

    return AdamW8bit


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


def final_factor(cfg: ScheduleConfig) -> float:
    """The LR a schedule ends at (and holds past its length), as a fraction of the peak LR."""
    return lr_factor(cfg.total_steps, cfg, cfg.total_steps)


def _lambda(epoch: int, cfg: ScheduleConfig, total_steps: int, start_step: int) -> float:
    # LambdaLR counts from 0 and applies the factor of `epoch` to the next update, i.e. update number epoch + 1
    return lr_factor(start_step + epoch + 1, cfg, total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int, start_step: int = 0):
    """The LR schedule; update n takes the LR of schedule step start_step + n (a replayed released run's
    data.start_step: it continues the released schedule where its checkpoint stopped)."""
    total = cfg.total_steps or start_step + max_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(_lambda, cfg=cfg, total_steps=total, start_step=start_step)
    )


def scheduled_lrs(scheduler: torch.optim.lr_scheduler.LambdaLR) -> list[float]:
    """The LR of each parameter group for the scheduler's next update (its base LR times its factor now)."""
    return [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
