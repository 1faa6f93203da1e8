"""The language-model loss, computed a chunk of tokens at a time so that the float32 logits never exist for the batch.

Why: the logits are tokens x vocab. With a 100k vocabulary and 8k tokens per micro-batch they take
100352 * 8192 * 4 bytes = 3.3 GB in float32, and the backward pass needs their gradient (another 3.3 GB) plus the
temporaries of logsumexp, often more than the whole model's activations. `lm_loss` projects `chunk_tokens` hidden
states at a time, reduces them to a cross-entropy sum and a per-token logsumexp, and drops the chunk's logits; the
backward pass recomputes them (activation checkpointing), again one chunk at a time. The price is one more output
projection in the backward pass.

`output` is called as a module, never unpacked into its weight, because tensor-parallel, FSDP and float8 hook into
the module's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # a target that takes no loss (the value PyTorch's cross_entropy ignores by default)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar float32: mean cross-entropy over the non-ignored tokens (with grad)
    logsumexp: torch.Tensor  # (N,) float32 log-partition of every token, ignored ones included (with grad); z-loss
    tokens: torch.Tensor  # 0-dim int64: non-ignored tokens, the denominator of `loss`
    sum: torch.Tensor  # scalar float32: the cross-entropy summed over the non-ignored tokens (with grad)


def lm_loss(
    hidden: torch.Tensor,
    output: nn.Module,
    targets: torch.Tensor,
    chunk_tokens: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> LossOutput:
    """Mean cross-entropy of `output(hidden)` against `targets`, holding at most one chunk of logits at a time.

    hidden: (B, T, d) final-normed hidden states, any dtype; output: the output projection (d -> padded vocab);
    targets: (B, T) int64, `ignore_index` where no loss is wanted. Same value and gradients as
    `F.cross_entropy(output(hidden).float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)` up to
    float rounding; like it, the loss is NaN when every target is ignored. `chunk_tokens <= 0` or at least B * T
    computes everything in one piece, without recomputation.
    """
    flat_hidden, flat_targets = _flatten(hidden, targets)
    n_tokens = flat_targets.numel()
    if chunk_tokens <= 0 or chunk_tokens >= n_tokens:
        return naive_lm_loss(hidden, output, targets, ignore_index)
    ce_sums, logsumexps = [], []
    for hidden_chunk, target_chunk in zip(flat_hidden.split(chunk_tokens), flat_targets.split(chunk_tokens)):
        # Only the chunk's inputs are kept for backward; its logits are recomputed there and freed chunk by chunk.
        ce_sum, lse = checkpoint(
            _chunk_cross_entropy,
            hidden_chunk,
            output,
            target_chunk,
            ignore_index,
            use_reentrant=False,
            preserve_rng_state=False,  # the projection draws no random numbers
        )
        ce_sums.append(ce_sum)
        logsumexps.append(lse)
    return _mean_over_valid(torch.stack(ce_sums).sum(), torch.cat(logsumexps), flat_targets, ignore_index)


def naive_lm_loss(
    hidden: torch.Tensor, output: nn.Module, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> LossOutput:
    """The same loss from the float32 logits of the whole batch at once: the reference, and the baseline to beat."""
    flat_hidden, flat_targets = _flatten(hidden, targets)
    ce_sum, lse = _chunk_cross_entropy(flat_hidden, output, flat_targets, ignore_index)
    return _mean_over_valid(ce_sum, lse, flat_targets, ignore_index)


def _chunk_cross_entropy(
    hidden: torch.Tensor, output: nn.Module, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross-entropy over the non-ignored tokens, (n,) logsumexp) of n flattened tokens."""
    logits = output(hidden).float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != ignore_index
    # ignored targets (IGNORE_INDEX) are no valid index: gather at 0 and mask the result out
    target_logits = logits.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    ce_sum = torch.where(valid, lse - target_logits, 0.0).sum()
    return ce_sum, lse


def _flatten(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: expected hidden (B, T, d) "
            "and targets (B, T)."
        )
    return hidden.flatten(0, -2), targets.flatten()


def _mean_over_valid(
    ce_sum: torch.Tensor, logsumexp: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> LossOutput:
    tokens = (targets != ignore_index).sum()  # a tensor: reading it as a number would stall the GPU every step
    return LossOutput(loss=ce_sum / tokens, logsumexp=logsumexp, tokens=tokens, sum=ce_sum)
