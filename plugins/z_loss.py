"""z-loss: `coefficient * mean(logsumexp(logits)**2)` added to the loss of every micro-batch.

What: the squared log-partition `Z = logsumexp(logits)` of each token's output distribution, averaged over the
tokens of the micro-batch that have a target (the same tokens as the cross-entropy), times `coefficient`. It is
added to the training loss and logged on its own as `train/z_loss` (averaged over the micro-batches of the step,
like `train/loss`; `train/loss` stays the plain cross-entropy).

Why: the softmax is invariant to a shift of the logits, so nothing in the cross-entropy stops them drifting to
large magnitudes, where bfloat16 rounding and the softmax become unstable. The z-loss pulls `log Z` towards 0,
which keeps the logits centred and small (PaLM, Chowdhery et al. 2022, coefficient 1e-4; OLMo 2, "2 OLMo 2
Furious" 2024, 1e-5 as one of its stability changes).

Cost: none worth measuring. The per-token logsumexp is computed by the loss anyway (`lit_open.loss.lm_loss`
returns it with its gradient, chunk by chunk), so no logits are recomputed or kept.

Options (`plugins.z_loss.<option>`):
- coefficient (float, default 1e-4): the weight of the term; 0 logs the z-loss without training on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_open.errors import UserError
from lit_open.plugin import Plugin, StepOutputs

IGNORE_INDEX = -100  # targets that take no loss (lit_open.loss.lm_loss's default)


class ZLoss(Plugin):
    """Adds `coefficient * mean(logsumexp**2)` over the tokens with a target to the loss, logged as train/z_loss."""

    name = "z_loss"

    @dataclass
    class Config:
        coefficient: float = 1e-4

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
