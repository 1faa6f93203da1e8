"""embedding_grad_shrink: the token embeddings' output keeps its value while the gradient flowing back into the table is
scaled by alpha (GLM-130B's embedding gradient shrink, a remedy for early loss spikes). Design and options:
docs/plugins/embedding_grad_shrink.md; `lit-open list plugins` shows the options and their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_open.errors import UserError
from lit_open.plugin import Plugin, option


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by `alpha` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.alpha, None


def shrink_gradient(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """`x` with its gradient scaled by `alpha`: the value of `alpha * x + (1 - alpha) * x.detach()`, exactly `x`."""
    return _ScaleGradient.apply(x, alpha)


class EmbeddingGradShrink(Plugin):
    """Scales the gradient that flows into the token embeddings from their output by `alpha` (GLM-130B EGS)."""

    name = "embedding_grad_shrink"

    @dataclass
    class Config:
        alpha: float = option(
            0.1, "factor on the gradient flowing into the embeddings from their output, in (0, 1]; GLM-130B: 0.1"
        )

        def __post_init__(self) -> None:
            if not 0.0 < self.alpha <= 1.0:  # also refuses nan
                raise UserError(
                    f"plugins.embedding_grad_shrink.alpha={self.alpha} must be in (0, 1] (GLM-130B uses 0.1; "
                    "1 leaves the gradient as it is)."
                )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def on_model_built(self, model: nn.Module) -> None:
        alpha = self.cfg.alpha

        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return None  # evaluation: nothing to shrink
            return shrink_gradient(output, alpha)

        self.handle = model.tok_embeddings.register_forward_hook(hook)

    def on_train_start(self, trainer, pl_module) -> None:
        tied = self.run.config.model.tie_embeddings
        self.log_event(
            trainer,
            pl_module,
            "embedding_grad_shrink",
            alpha=self.cfg.alpha,
            tied_embeddings=tied,  # tied: only the input-side part of the table's gradient is scaled
        )
