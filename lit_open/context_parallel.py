"""Context parallelism: each of `cp` processes holds a share of every sequence; attention gathers keys and values.

Load balance: the sequence is cut into 2 x cp chunks and rank r holds chunks r and 2cp-1-r (the zig-zag split),
so every rank holds an early and a late chunk and does the same causal-attention work. Each rank embeds only its
tokens, with their own RoPE positions; in every attention layer the ranks all-gather their keys and values (and
the document ids) over the context-parallel group, which is exact with and without document masks: the queries
of the shard attend to the whole sequence through a mask computed from their positions (Llama 3's approach; the
backward pass sums each rank's key/value gradients back to their owners). The loss is reduced over the group so
that every rank holds the whole sequence's loss while its gradient is its own tokens' share.

`ContextParallel` is applied from outside the model (`install` replaces each `Attention.attend`) and is active
only inside `sharded(...)`: LitLM's training and validation steps. Anything else that runs the model (in-loop
evaluation, samples, plugins' measurements) gives it whole sequences and gets plain attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lit_open.errors import UserError
from lit_open.model.attention import causal_attention
from lit_open.model.config import POSITIONED_BACKENDS
from lit_open.train.loss import LossOutput

SHARDED_KEYS = ("input_ids", "targets", "doc_ids")  # the batch's (batch, seq) tensors that are split along seq


def check_context_parallel(seq_len: int, cp: int, attention: str) -> None:
    """Context parallelism needs a sequence of 2 x cp equal chunks and an attention backend that takes a shard."""
    if cp == 1:
        return
    if seq_len % (2 * cp):
        raise UserError(
            f"data.seq_len={seq_len} is not divisible by 2 x strategy.context_parallel_size={cp} = {2 * cp}: "
            "context parallelism gives each process two equal chunks of every sequence. Choose a seq_len that is a "
            f"multiple of {2 * cp}, or another context_parallel_size."
        )
    if attention not in POSITIONED_BACKENDS:
        raise UserError(
            f"model.attention={attention} cannot serve strategy.context_parallel_size={cp}: its kernel "
            "attends within one whole sequence, while a context-parallel process holds queries of a shard and the "
            f"gathered keys of the whole. Use one of {', '.join(POSITIONED_BACKENDS)} (auto: flex on CUDA, dense on "
            "CPU)."
        )


def zigzag_positions(local_len: int, rank: int, size: int, device: torch.device | None = None) -> torch.Tensor:
    """The (local_len,) positions held by `rank` of `size`: chunks rank and 2*size-1-rank of local_len/2 tokens."""
    chunk = local_len // 2
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_sequence(x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank's zig-zag share of a (batch, seq, ...) tensor whose seq is divisible by 2 x size."""
    chunks = x.chunk(2 * size, dim=1)
    return torch.cat([chunks[rank], chunks[2 * size - 1 - rank]], dim=1)


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim` in rank order; the backward pass sums every rank's gradient for each owner's part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == "nccl":
            parts = [part.contiguous() for part in grad.chunk(size, dim=ctx.dim)]
            own = torch.empty_like(parts[rank])
            dist.reduce_scatter(own, parts, group=ctx.group)
            return own, None, None
        # gloo has no reduce-scatter: sum everything (a copy: autograd's gradient is not ours to change), keep ours
        whole = grad.contiguous().clone()
        dist.all_reduce(whole, group=ctx.group)
        return whole.chunk(size, dim=ctx.dim)[rank].contiguous(), None, None


class ContextParallel:
    """The context-parallel group of this process, the sharding of batches and the attention that spans shards."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.active = False
        self._gathered_doc_ids: tuple[torch.Tensor, torch.Tensor] | None = None
        self._positions: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def install(self, model: nn.Module) -> None:
        """Route every attention layer of `model` through `attend`."""
        for module in model.modules():
            if hasattr(module, "attend"):
                module.attend = self.attend

    @contextmanager
    def sharded(self, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """This rank's share of `batch` (with `positions` for RoPE) and shard-spanning attention, for the forward
        and backward passes inside the block (activation checkpointing recomputes attention in the backward)."""
        local = dict(batch)
        for key in SHARDED_KEYS:
            if local.get(key) is not None:
                local[key] = shard_sequence(local[key], self.rank, self.size)
        local["positions"] = self._tables(local["input_ids"].size(1), local["input_ids"].device)[0]
        self.active = True
        try:
            yield local
        finally:
            self.active = False
            self._gathered_doc_ids = None

    @torch.compiler.disable  # collectives and Python state; a compiled block calls it eagerly (flex compiles itself)
    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        backend: str = "auto",
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`causal_attention` for this rank's queries over the keys and values of the whole sequence."""
        if not self.active:
            return causal_attention(q, k, v, backend, doc_ids)
        positions, order = self._tables(q.size(2), q.device)
        k = _GatherSequence.apply(k, self.group, 2).index_select(2, order)
        v = _GatherSequence.apply(v, self.group, 2).index_select(2, order)
        return causal_attention(q, k, v, backend, self._whole_doc_ids(doc_ids, order), q_positions=positions)

    def whole_sequence_loss(self, out: LossOutput) -> LossOutput:
        """Every rank's loss becomes the mean over the whole sequences' tokens; its gradient stays this rank's
        tokens' share, scaled by the group size because FSDP2 averages gradients over the group's ranks too."""
        totals = torch.stack([out.sum.detach(), out.tokens.to(out.sum.dtype)])
        dist.all_reduce(totals, group=self.group)
        total_sum, tokens = totals[0], totals[1]
        own = out.sum * self.size / tokens
        loss = own + (total_sum / tokens - own).detach()
        return LossOutput(loss=loss, logsumexp=out.logsumexp, tokens=tokens.long(), sum=loss * tokens)

    def _tables(self, local_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's positions, and the permutation that puts the gathered (rank-major) sequence in order; one
        pair of tensors per length, so that flex attention's mask cache sees the same tensor in every layer."""
        key = (local_len, device)
        if key not in self._positions:
            gathered = torch.cat([zigzag_positions(local_len, r, self.size, device) for r in range(self.size)])
            self._positions[key] = (zigzag_positions(local_len, self.rank, self.size, device), gathered.argsort())
        return self._positions[key]

    def _whole_doc_ids(self, doc_ids: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor | None:
        """The document ids of the whole sequence, gathered once per forward (every layer passes the same)."""
        if doc_ids is None:
            return None
        if self._gathered_doc_ids is None or self._gathered_doc_ids[0] is not doc_ids:
            parts = [torch.empty_like(doc_ids) for _ in range(self.size)]
            dist.all_gather(parts, doc_ids.contiguous(), group=self.group)
            self._gathered_doc_ids = (doc_ids, torch.cat(parts, dim=1).index_select(1, order))
        return self._gathered_doc_ids[1]
