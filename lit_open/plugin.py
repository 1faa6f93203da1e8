"""The plugin API: a Lightning Callback with a few extra hooks that LitLM calls at the right moments.

A plugin is one module in `plugins/` (shipped as `lit_open.plugins`), one YAML in `conf/plugins/` and one test
file. Its options are a dataclass `Config` nested in the class: `plugins.<name>.<option>=value` is checked
against it at start-up, so a typo fails before the first step. Third-party plugins register a class under the
entry-point group `lit_open.plugins` and are then selectable as `plugins=[name]` like the built-in ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_open.compose import plugin_entry_points
from lit_open.config import to_typed
from lit_open.errors import UserError

if TYPE_CHECKING:
    from lit_open.model import ModelConfig, Transformer


@dataclass
class StepOutputs:
    """What `loss_terms` sees for one micro-batch."""

    loss: torch.Tensor  # the cross-entropy of this micro-batch (a scalar with grad)
    logsumexp: torch.Tensor  # (batch * seq,) float32 log-partition of each token's logits, with grad (z-loss)
    batch: dict[str, Any]  # input_ids, targets, data_step, micro, ...


class Plugin(Callback):
    """Base class of lit-open plugins. Override only the hooks you need; all of them default to no-ops."""

    name = "plugin"  # the plugin's name in configs and in events.jsonl

    @dataclass
    class Config:
        pass

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.cfg = to_typed(type(self).Config, options, f"plugins.{self.name}")

    def configure_model(self, model_config: ModelConfig) -> ModelConfig:
        """Called before the model is built; return the (possibly changed) architecture."""
        return model_config

    def on_model_built(self, model: Transformer) -> None:
        """Called after the model is built, before it is parallelized or handed to the optimizer."""

    def loss_terms(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        """Extra scalar terms added to the loss of a micro-batch; each is logged as `train/<name>`."""
        return {}

    def skip_step(self, metrics: dict[str, float]) -> bool:
        """Asked before each optimizer step; True on any rank skips the update on all ranks.

        metrics: step (the update this would be; after a skip the next batch asks for the same step again),
        data_step (the global batch the gradients come from), loss, grad_norm (before clipping), lr.
        """
        return False

    def step_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Extra columns for the metrics row of the optimizer step just applied (not called for skipped ones).

        Called on every rank right after the update and the LR schedule's step, so it may run collectives; the
        values of global rank 0 are logged, in the same row as train/loss.
        """
        return {}

    def log_event(self, trainer: Trainer, pl_module: LightningModule, event: str, **fields: Any) -> None:
        """Record what the plugin did in events.jsonl (written by global rank 0)."""
        pl_module.events.write(trainer.global_step, event, plugin=self.name, **fields)


def build_plugins(plugins_cfg: dict[str, Any]) -> list[Plugin]:
    """Instantiate the selected plugins from `plugins.<name>` blocks, in config order."""
    from hydra.utils import get_class

    plugins = []
    for key, spec in (plugins_cfg or {}).items():
        # a recipe may configure a plugin the user deselected with plugins=[...]: its block has no _target_
        if not isinstance(spec, dict) or "_target_" not in spec:
            continue
        options = {k: v for k, v in spec.items() if k != "_target_"}
        try:
            cls = get_class(spec["_target_"])
        except Exception as err:
            raise UserError(
                f"plugins.{key}._target_={spec['_target_']!r} cannot be imported ({err}). Installed plugins: "
                f"{', '.join(sorted(plugin_entry_points())) or 'none'}."
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise UserError(f"plugins.{key}._target_={spec['_target_']!r} is not a lit_open.plugin.Plugin subclass.")
        plugins.append(cls(**options))
    return plugins
