"""Embedding gradient shrink (EGS): the token embeddings' output keeps its value, its gradient is scaled by alpha.

What: the output `e` of `model.tok_embeddings` is replaced by a tensor equal to it whose gradient is
`alpha * grad`, i.e. GLM-130B's `e * alpha + e.detach() * (1 - alpha)` (Zeng et al. 2022, §3, alpha = 0.1).
It is applied as an identity with a scaled backward (one autograd node) rather than that sum: the forward value
is then bit-for-bit unchanged in any precision (in bfloat16 `0.1 * e + 0.9 * e` is not always `e`), and no
extra activation of the embeddings' size is kept for the backward pass.

Why: GLM-130B observed that the embedding layer's gradient norm is far larger than the other layers' and that
its spikes come with training collapses; shrinking it with alpha = 0.1 removed most spikes in their ablation
(at 40B scale). With an untied embedding the whole gradient of the table is scaled; with
tied embeddings (`model.tie_embeddings=true`) only the input-side part is, the output head's part is not
(THUDM's CodeGeeX fork shrinks the output-logit use instead; for an untied model the input side is the one
that exists). Note that AdamW largely normalises a constant scale away (m / sqrt(v)); what changes is the
embedding's share of the global gradient norm that clipping sees, the weight of the epsilon, and, with tied
embeddings, the mix of the input and output contributions.

How: `on_model_built` registers a forward hook on `model.tok_embeddings` before the model is parallelised.
Forward hooks run in registration order, so under tensor parallelism (`RowwiseParallel` on the embeddings,
which adds its own output hook in `parallelize_module`) this hook sees the embedding's DTensor output before it
is redistributed to the sequence-parallel layout, and its backward sees that DTensor's gradient: scaling by a
constant commutes with every placement. FSDP2, activation checkpointing and float8 do not touch the embeddings'
forward.

Options (`plugins.embedding_grad_shrink.<option>`):
- alpha (float, default 0.1): the factor on the embeddings' gradient, in (0, 1]; 1 changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_open.errors import UserError
from lit_open.plugin import Plugin


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
        alpha: float = 0.1

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
        tied = bool(getattr(pl_module.config.model, "tie_embeddings", False))
        self.log_event(
            trainer,
            pl_module,
            "embedding_grad_shrink",
            alpha=self.cfg.alpha,
            tied_embeddings=tied,  # tied: only the input-side part of the table's gradient is scaled
        )
