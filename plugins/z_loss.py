"""z_loss: coefficient x mean(logsumexp(logits)^2) over the tokens with a target added to every micro-batch's loss and
logged as `train/z_loss` (PaLM; OLMo 2), from the per-token logsumexp the chunked loss computes anyway. Design and
options: docs/plugins/z_loss.md; `lit-open list plugins` shows the options and their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_open.errors import UserError
from lit_open.plugin import Plugin, StepOutputs, option
from lit_open.train.loss import IGNORE_INDEX


class ZLoss(Plugin):
    """Adds `coefficient * mean(logsumexp**2)` over the tokens with a target to the loss, logged as train/z_loss."""

    name = "z_loss"

    @dataclass
    class Config:
        coefficient: float = option(
            1e-4, "weight of the term (PaLM 1e-4, OLMo 2 1e-5); 0 logs it without training on it"
        )

        def __post_init__(self) -> None:
            if not self.coefficient >= 0:  # also refuses nan
                raise UserError(
                    f"plugins.z_loss.coefficient={self.coefficient} must be zero or positive "
                    "(PaLM uses 1e-4, OLMo 2 1e-5)."
                )

    def loss_terms(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        squared = outputs.logsumexp.float().pow(2)
        targets = outputs.batch.get("targets") if isinstance(outputs.batch, dict) else None
        if targets is None:
            mean = squared.mean()
        else:
            valid = (targets.reshape(-1) != IGNORE_INDEX).to(squared.dtype)
            mean = (squared * valid).sum() / valid.sum().clamp(min=1.0)
        return {"z_loss": self.cfg.coefficient * mean}

    def on_train_start(self, trainer, pl_module) -> None:
        self.log_event(trainer, pl_module, "z_loss", coefficient=self.cfg.coefficient)
