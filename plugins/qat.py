"""qat: torchao quantization-aware training of the linear layers from a given step (int8 dynamic activations + int4
grouped weights, or int8 weight-only), checkpoints staying float, and the really quantized model written to
`<run.dir>/quantized/step-N/` at the end (`load_quantized`). Design, strategies and options: docs/plugins/qat.md;
`lit-open list plugins` shows the options and their defaults.
"""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_open.checkpoint.atomic import atomic_directory
from lit_open.checkpoint.hf import METADATA_FILE
from lit_open.errors import UserError
from lit_open.model import ModelConfig, Transformer
from lit_open.parallel import full_state_dict
from lit_open.plugin import Plugin, option

SCHEMES = ("int8_dynamic_act_int4_weight", "int8_weight_only")
WEIGHTS_FILE = "model.pt"
METADATA_FORMAT = "lit-open-qat/1"


def ptq_config(scheme: str, group_size: int | None):
    """The torchao post-training quantization config of `scheme`; QATConfig derives the matching fake quantizers.

    Both produce `IntxUnpackedToInt8Tensor` weights, which run on the CPU (torchao's packed int4 formats need GPU
    kernels or extra packages to convert).
    """
    # torchao takes seconds to import, and this module is imported whenever the installed plugins are listed
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if scheme == "int8_dynamic_act_int4_weight":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


def quantized_layer_names(model: nn.Module, exclude: list[str]) -> list[str]:
    """Names of the linear layers that no `exclude` pattern matches."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]


def quantize(model: nn.Module, scheme: str, group_size: int | None, layers: list[str]) -> nn.Module:
    """Quantize the named linear layers of a float model for real (in place); returns the model."""
    from torchao.quantization import quantize_  # slow to import, as in scheme_config

    chosen = set(layers)
    quantize_(model, ptq_config(scheme, group_size), filter_fn=lambda module, name: name in chosen)
    return model


def load_quantized(path: str | Path) -> Transformer:
    """The quantized model of an export directory (`<run.dir>/quantized/step-NNNNNNNN/`), on the CPU, in eval mode."""
    path = Path(path)
    if not (path / METADATA_FILE).is_file():
        raise UserError(f"{str(path)!r} is not a qat export: it has no {METADATA_FILE}.")
    meta = json.loads((path / METADATA_FILE).read_text())
    config = ModelConfig(**meta["model"])
    with torch.device("meta"):  # the saved tensors replace the parameters: nothing is allocated twice
        model = Transformer(config)
    quantize(model, meta["scheme"], meta["group_size"], meta["layers"])
    return model.assign_weights(torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True))


class QAT(Plugin):
    """Fake-quantizes the linear layers from `start_step` on and exports the really quantized model at the end."""

    name = "qat"

    @dataclass
    class Config:
        scheme: str = option(
            "int8_dynamic_act_int4_weight", "int8 dynamic activations + int4 grouped weights | int8_weight_only"
        )
        group_size: int = option(
            32, "input features per int4 weight scale; must divide every quantized layer's in_features"
        )
        start_step: int = option(
            0, "fake quantization on after this many optimizer steps (0: from the start; e.g. the anneal's start)"
        )
        exclude: list[str] = option(
            ["output"], "linear layers kept in high precision (fnmatch patterns on module names)"
        )
        export: bool = option(
            True, "at the end, write the quantized model to <run.dir>/quantized/step-NNNNNNNN/ (load_quantized)"
        )

        def __post_init__(self) -> None:
            if self.scheme not in SCHEMES:
                raise UserError(f"plugins.qat.scheme={self.scheme!r} is not supported; choose {' or '.join(SCHEMES)}.")
            if self.group_size <= 0:
                raise UserError(
                    f"plugins.qat.group_size={self.group_size} must be a positive number of input features per "
                    "int4 weight scale (e.g. 32, 64, 128)."
                )
            if self.start_step < 0:
                raise UserError(
                    f"plugins.qat.start_step={self.start_step} must be 0 (fake quantization from the start) or the "
                    "optimizer step after which it switches on."
                )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.layers: dict[str, nn.Module] = {}  # name -> FakeQuantizedLinear
        self.model_config: ModelConfig | None = None
        self.active = False  # fake quantization on
        # as the checkpoint being validated on its own (lit-open eval) had it; None in training runs
        self.saved_active: bool | None = None

    # -- building --------------------------------------------------------------------------------------------
    def on_model_built(self, model: Transformer) -> None:
        from torchao.quantization import quantize_  # slow to import, as in scheme_config
        from torchao.quantization.qat import QATConfig

        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        for pattern in self.cfg.exclude:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in linears):
                raise UserError(
                    f"plugins.qat.exclude: {pattern!r} matches no linear layer of this model. Linear layers are "
                    f"named like {', '.join(list(linears)[:5])}, ..., output (patterns are fnmatch-style, e.g. "
                    "'layers.0.*' or '*.wo')."
                )
        names = quantized_layer_names(model, self.cfg.exclude)
        if not names:
            raise UserError("plugins.qat.exclude excludes every linear layer: nothing would be quantized.")
        if model.config.tie_embeddings and "output" in names:
            raise UserError(
                "plugins.qat: the output head is tied to the embeddings (model.tie_embeddings=true), which stay in "
                "high precision; keep 'output' in plugins.qat.exclude."
            )
        if self.cfg.scheme == "int8_dynamic_act_int4_weight":
            for name in names:
                if linears[name].in_features % self.cfg.group_size:
                    raise UserError(
                        f"plugins.qat.group_size={self.cfg.group_size} does not divide the in_features="
                        f"{linears[name].in_features} of layer {name}: each int4 scale covers a whole group of "
                        "input features. Choose a group size that divides every quantized layer's input width, "
                        "or exclude the layer (plugins.qat.exclude)."
                    )
        chosen = set(names)
        base = ptq_config(self.cfg.scheme, self.cfg.group_size)
        quantize_(model, QATConfig(base, step="prepare"), filter_fn=lambda module, name: name in chosen)
        self.layers = {name: model.get_submodule(name) for name in names}
        self.model_config = model.config
        self.switch(False)  # off until start_step: the forward is exactly the float one

    def switch(self, on: bool) -> None:
        """Fake quantization on or off in every swapped layer (off: exactly the float forward)."""
        for layer in self.layers.values():
            for quantizer in (layer.activation_fake_quantizer, layer.weight_fake_quantizer):
                if quantizer is not None:  # weight-only schemes have no activation quantizer
                    quantizer.enabled = on
        self.active = on

    def _follow_step(self, trainer, pl_module) -> None:
        """Fake quantization on exactly when the optimizer steps so far reach start_step (also after a resume)."""
        on = trainer.global_step >= self.cfg.start_step
        if on == self.active:
            return
        self.switch(on)
        self.log_event(
            trainer,
            pl_module,
            "qat",
            action="fake_quantize_on" if on else "fake_quantize_off",
            scheme=self.cfg.scheme,
            group_size=self._group_size(),
            start_step=self.cfg.start_step,
            layers=len(self.layers),
        )

    def _group_size(self) -> int | None:
        return self.cfg.group_size if self.cfg.scheme == "int8_dynamic_act_int4_weight" else None

    # -- Lightning hooks -------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        strategy = self.run.config.strategy
        tensor_parallel = self.run.tensor_parallel_size
        if tensor_parallel > 1:
            raise UserError(
                f"plugins.qat does not support tensor parallelism (strategy={strategy.name} with tensor-parallel size "
                f"{tensor_parallel}): torch's tensor-parallel plans do not apply to torchao's fake-quantized linear "
                "layers. Use strategy=fsdp (tensor_parallel_size 1), ddp or a single process."
            )
        if strategy.float8 != "none":
            raise UserError(
                f"plugins.qat and strategy.float8={strategy.float8} both replace the linear layers; use one of them "
                "(strategy.float8=none with qat)."
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._follow_step(trainer, pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.saved_active = None  # training, also resumed, derives the state from the step

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.saved_active is None:  # in a training run, also its validations before and after fit()
            self._follow_step(trainer, pl_module)
        else:  # a checkpoint validated on its own (lit-open eval) counts no steps: the model as it was trained
            self.switch(self.saved_active)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.cfg.export:
            self.export(trainer, pl_module)

    # -- export ----------------------------------------------------------------------------------------------
    def export(self, trainer, pl_module) -> Path:
        """Quantize the float weights and write the export directory on global rank 0 (every rank must call this)."""
        step = trainer.global_step
        state = full_state_dict(pl_module.model)
        out = self.run.run_dir / "quantized" / f"step-{step:08d}"
        if trainer.is_global_zero:
            started = time.perf_counter()
            model = quantize(self._float_model(state), self.cfg.scheme, self.cfg.group_size, list(self.layers))
            val_step, val_loss = (self.run.history["val/loss"] or [(None, None)])[-1]
            metadata = {
                "format": METADATA_FORMAT,
                "scheme": self.cfg.scheme,
                "group_size": self._group_size(),
                "layers": list(self.layers),
                "excluded": self.cfg.exclude,
                "step": step,
                "start_step": self.cfg.start_step,
                "tokens": self.run.tokens_seen,
                # the latest held-out loss so far; measured at a step >= start_step, with fake quantization on,
                # it is the quantized model's (whose numerics equal the fake quantization's)
                "val_loss": val_loss,
                "val_loss_step": val_step,
                "model": asdict(self.model_config),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_export(model, out, metadata)
            self.log_event(
                trainer,
                pl_module,
                "qat",
                action="exported",
                path=str(out),
                scheme=self.cfg.scheme,
                layers=len(self.layers),
                val_loss=val_loss,
                val_loss_step=val_step,
                seconds=round(time.perf_counter() - started, 2),
            )
        trainer.strategy.barrier("lit_open_qat_export")
        return out

    def _float_model(self, state: dict[str, torch.Tensor]) -> Transformer:
        with torch.device("meta"):
            model = Transformer(self.model_config)
        return model.assign_weights(state)

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved_active = bool(state["active"])


def write_export(model: nn.Module, out: Path, metadata: dict[str, Any]) -> None:
    """Write the weights and metadata under a temporary name beside `out`, then rename: complete or absent."""
    with atomic_directory(out) as tmp:
        torch.save(model.state_dict(), tmp / WEIGHTS_FILE)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
