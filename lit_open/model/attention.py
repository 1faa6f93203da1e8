"""Causal self-attention kernels behind one function, so the model never cares which one runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_open.model.config import ATTENTION_BACKENDS


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Causal scaled dot-product attention with grouped-query support.

    q: (B, Hq, T, D); k, v: (B, Hkv, T, D) with Hq a multiple of Hkv. Query head h reads key/value head
    h // (Hq // Hkv), as in Hugging Face's `repeat_kv`. Returns (B, Hq, T, D) in the dtype of q.
    """
    if q.size(1) % k.size(1):
        raise ValueError(f"{q.size(1)} query heads cannot share {k.size(1)} key/value heads evenly.")
    if backend in ("auto", "sdpa"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))
    if backend == "math":
        return math_attention(q, k, v)
    raise ValueError(f"Unknown attention backend {backend!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}.")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference: explicit scores in float32, runs on any device and dtype."""
    groups = q.size(1) // k.size(1)
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.size(-1) ** -0.5
    T = q.size(-2)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)
