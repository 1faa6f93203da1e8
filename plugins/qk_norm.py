"""qk_norm: QK-norm as a switch. It turns QK-norm on (full width as OLMo 2, or per head) and, in a model trained without
it, inserts it with unchanged outputs (gains calibrated to q's and k's typical RMS) and blends it in over
`ramp_steps`; or it stays dormant until a rollback escalates it. Design, caveats, events and options:
docs/plugins/qk_norm.md; `lit-open list plugins` shows the options and their defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lit_open.errors import UserError
from lit_open.plugin import Plugin, RolledBack, option

MODES = ("full", "head")
STARTS = ("now", "on_rollback")
FEATURE = "qk_norm"  # the name a rollback's `escalate` uses for this switch


class QKNorm(Plugin):
    """Inserts QK-norm (full width or per head) and ramps it in from alpha = 0, now or after an escalating rollback."""

    name = "qk_norm"

    @dataclass
    class Config:
        mode: str = option(
            "full", "full: one RMSNorm over all heads' width (OLMo 2) | head: one over each head's head_dim"
        )
        ramp_steps: int = option(
            100, "optimizer steps over which alpha (the blend towards the normed q, k) goes 0 -> 1; 0: on at once"
        )
        start: str = option(
            "now",
            "now: when training starts | on_rollback: dormant until a rollback escalates qk_norm (spike_rollback)",
        )
        calibrate: bool = option(
            True, "set the gains to q's and k's mean RMS at activation (keeps their scale); false: gains of 1"
        )

        def __post_init__(self) -> None:
            if self.mode not in MODES:
                raise UserError(
                    f"plugins.qk_norm.mode={self.mode!r} is not supported; choose full (one RMSNorm over all "
                    "heads' width, as OLMo 2) or head (an RMSNorm over each head's head_dim)."
                )
            if self.ramp_steps < 0:
                raise UserError(
                    f"plugins.qk_norm.ramp_steps={self.ramp_steps} must be zero (QK-norm on at once) or a positive "
                    "number of optimizer steps over which it is blended in."
                )
            if self.start not in STARTS:
                raise UserError(
                    f"plugins.qk_norm.start={self.start!r} is not supported; choose now (when training starts) or "
                    "on_rollback (dormant until a rollback escalates qk_norm, e.g. from spike_rollback)."
                )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.inserted = False  # configure_model added QK-norm: the blend applies
        self.model: nn.Module | None = None  # the model the hooks are on (set by on_model_built)
        self.norms: dict[str, nn.Module] = {}  # "layers.0.attention.q_norm" -> module, in model order
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.activation_step: int | None = None  # None: dormant
        self.step = 0  # optimizer updates the model has had, as last seen
        self.calibrated = False
        self.alpha = torch.zeros((), dtype=torch.float32)  # moved to the training device in setup
        self.value = 0.0  # alpha as a Python float
        self.phase = "off"  # off (alpha = 0) | ramp | on (alpha = 1): what the hooks do
        self._measured: dict[str, torch.Tensor] | None = None  # filled by the hooks during calibration
        self._ramped_in_logged = False

    # -- the model -------------------------------------------------------------------------------------------
    def configure_model(self, model_config):
        current = model_config.qk_norm
        if current == self.cfg.mode:
            return model_config  # part of the architecture already: nothing to insert
        if current != "none":
            raise UserError(
                f"plugins.qk_norm.mode={self.cfg.mode} but the model already has model.qk_norm={current}: full-width "
                "and per-head QK-norm are not interconvertible (their statistics differ), so the plugin cannot "
                f"switch one to the other. Set plugins.qk_norm.mode={current} (the plugin then only records that "
                "QK-norm is on) or leave qk_norm out of plugins."
            )
        self.inserted = True
        return dataclasses.replace(model_config, qk_norm=self.cfg.mode)

    def on_model_built(self, model: nn.Module) -> None:
        if not self.inserted:
            return
        self.model = model
        for name, module in model.named_modules():
            if name.endswith(("attention.q_norm", "attention.k_norm")):
                self.norms[name] = module
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def new_parameters(self) -> list[str]:
        """The parameters the plugin added to the model: those a checkpoint trained without QK-norm lacks."""
        return [f"{name}.weight" for name in self.norms]

    def _hook(self, name: str):
        def blend(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            x = args[0]
            if self._measured is not None:  # calibration pass: record q's / k's RMS, compute as without QK-norm
                self._measured[name] = mean_rms(x)
                return x
            if self.phase == "on":
                return None
            if self.phase == "off":
                return x
            alpha = self.alpha
            if isinstance(output, DTensor):  # tensor parallelism: alpha is the same on every rank
                alpha = DTensor.from_local(alpha, output.device_mesh, run_check=False)
            return alpha * output + (1.0 - alpha) * x

        return blend

    # -- alpha ------------------------------------------------------------------------------------------------
    def alpha_at(self, step: int) -> float:
        """The blend factor for a batch trained after `step` updates."""
        if self.activation_step is None or step < self.activation_step:
            return 0.0
        if self.cfg.ramp_steps == 0:
            return 1.0
        return min(1.0, (step - self.activation_step) / self.cfg.ramp_steps)

    def set_step(self, step: int) -> float:
        """Set alpha (the tensor, in place, and the hooks' phase) for a batch trained after `step` updates."""
        self.step = step
        value = self.alpha_at(step)
        if value != self.value:
            self.alpha.fill_(value)
            self.value = value
        self.phase = "off" if value == 0.0 else "on" if value == 1.0 else "ramp"
        return value

    def activate(self, step: int) -> None:
        self.activation_step = step
        self.calibrated = not self.cfg.calibrate

    # -- calibration ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, model: nn.Module, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None):
        """q's and k's mean RMS before each norm on this batch, computed as without QK-norm: 1-D float32 tensor
        in the order of `self.norms`."""
        self._measured = {}
        try:
            model(input_ids, doc_ids, return_hidden=True)
            measured = self._measured
        finally:
            self._measured = None
        return torch.stack([measured[name] for name in self.norms])

    @torch.no_grad()
    def set_gains(self, gains: list[float]) -> None:
        """Fill every gain of each norm with its value (each process writes its own shard)."""
        reshard(self.model)  # FSDP2 keeps some blocks gathered after a forward: write the shards it gathers from
        for module, gain in zip(self.norms.values(), gains):
            weight = module.weight
            (weight.to_local() if isinstance(weight, DTensor) else weight).fill_(gain)

    def _calibrate(self, trainer, pl_module, batch: dict[str, Any]) -> None:
        model = pl_module.model
        forward_context = getattr(trainer.precision_plugin, "forward_context", contextlib.nullcontext)
        # eager: the pass records values from inside the blocks, which compiled code should not have to trace
        stance = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else None
        with stance or contextlib.nullcontext(), forward_context():
            rms = self.measure(model, batch["input_ids"], batch.get("doc_ids"))
        rms = trainer.strategy.reduce(rms, reduce_op="mean")  # data-parallel ranks saw different batches
        gains = [float(g) for g in rms.cpu()]
        self.set_gains(gains)
        self.calibrated = True
        q = [g for name, g in zip(self.norms, gains) if name.endswith("q_norm")]
        k = [g for name, g in zip(self.norms, gains) if name.endswith("k_norm")]
        self.log_event(
            trainer,
            pl_module,
            "qk_norm",
            action="calibrated",
            data_step=batch.get("data_step"),
            q_gains=[round(g, 6) for g in q],
            k_gains=[round(g, 6) for g in k],
            q_gain_summary=_summary(q),
            k_gain_summary=_summary(k),
        )

    # -- Lightning hooks --------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        device = trainer.strategy.root_device
        if self.alpha.device != device:
            self.alpha = self.alpha.to(device)

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.inserted:
            self.log_event(trainer, pl_module, "qk_norm", action="already_on", mode=self.cfg.mode)
            return
        step = trainer.global_step
        # start=now activates at the first train start: step 0, or the step of a checkpoint trained without QK-norm
        activate = self.activation_step is None and self.cfg.start == "now"
        if activate:
            self.activate(step)
        # ramped_in is logged at the batch where alpha reaches 1; a run resumed past that batch does not repeat it
        self._ramped_in_logged = self.activation_step is not None and step > self.activation_step + self.cfg.ramp_steps
        self.log_event(
            trainer,
            pl_module,
            "qk_norm",
            action="inserted",
            mode=self.cfg.mode,
            ramp_steps=self.cfg.ramp_steps,
            start=self.cfg.start,
            calibrate=self.cfg.calibrate,
            activation_step=self.activation_step,
            alpha=self.set_step(step),
        )
        if activate:
            self.log_event(trainer, pl_module, "qk_norm", action="activated", reason="start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.inserted:
            return
        step = trainer.global_step
        if self.activation_step is not None and not self.calibrated:
            if batch["data_step"] >= self.run.consumed_batches:  # one that will be trained on
                self._calibrate(trainer, pl_module, batch)
        value = self.set_step(step)
        if value == 1.0 and not self._ramped_in_logged:
            self._ramped_in_logged = True
            self.log_event(trainer, pl_module, "qk_norm", action="ramped_in", activation_step=self.activation_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        # the model as it stands after the updates so far; a standalone validation (lit-open eval) of a checkpoint
        # counts no steps: alpha is then the checkpoint's, set by load_state_dict
        if self.inserted and getattr(getattr(trainer, "state", None), "fn", "fit") == "fit":
            self.set_step(trainer.global_step)

    def on_rollback(self, trainer, pl_module, rolled_back: RolledBack) -> None:
        escalate = FEATURE in tuple(rolled_back.request.escalate)
        if not self.inserted:
            if escalate:
                self.log_event(
                    trainer, pl_module, "qk_norm", action="already_on", mode=self.cfg.mode, reason="rollback"
                )
            return
        step = rolled_back.to_step
        if self.activation_step is None and escalate:
            self.activate(step)
            self.log_event(trainer, pl_module, "qk_norm", action="activated", reason="rollback")
        elif self.activation_step is not None and step <= self.activation_step:
            # the restored weights predate the calibration: activate again from the restored step
            self.activate(step)
            self.log_event(trainer, pl_module, "qk_norm", action="activated", reason="rollback before activation")
        if self.alpha_at(step) < 1.0:
            self._ramped_in_logged = False
        self.set_step(step)

    def step_metrics(self, trainer, pl_module) -> dict[str, float]:
        if not self.inserted:
            return {}
        self.step = trainer.global_step  # a checkpoint written after this update is of the model at this step
        return {"qk_norm/alpha": self.value}  # the blend the update was computed with

    def state_dict(self) -> dict[str, Any]:
        if not self.inserted:
            return {}
        return {
            "mode": self.cfg.mode,
            "activation_step": self.activation_step,
            "calibrated": self.calibrated,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.inserted or not state:
            return
        if state.get("mode", self.cfg.mode) != self.cfg.mode:
            raise UserError(
                f"The checkpoint was trained with plugins.qk_norm.mode={state['mode']} blended in; resume it with "
                f"that mode (now plugins.qk_norm.mode={self.cfg.mode})."
            )
        self.activation_step = state["activation_step"]
        self.calibrated = state["calibrated"]
        self.set_step(state.get("step", 0))  # the checkpoint's alpha, also for a validation without training


def mean_rms(x: torch.Tensor) -> torch.Tensor:
    """The mean over rows (tokens; tokens x heads for per-head input) of each row's RMS over the last dimension,
    as a 0-dim float32 tensor; a DTensor's statistics are over the whole tensor, the same value on every rank."""
    value = x.float().pow(2).mean(-1).sqrt().mean()
    return value.full_tensor() if isinstance(value, DTensor) else value


def reshard(model: nn.Module | None) -> None:
    """Put every FSDP2 module back to its sharded parameters (a no-op without FSDP2)."""
    for module in model.modules() if model is not None else ():
        if isinstance(module, FSDPModule):
            module.reshard()


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": round(min(values), 6), "mean": round(sum(values) / len(values), 6), "max": round(max(values), 6)}
