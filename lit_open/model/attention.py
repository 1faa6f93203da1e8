"""Causal self-attention kernels behind one function, so the model never cares which one runs.

Every backend computes the same thing: causal attention with grouped-query support and, optionally, document
masking for packed sequences (a token sees only earlier tokens of its own document). They differ in where they
run and how fast; `available_backends` says which can run for a device and dtype, and `auto` picks the fastest.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from lit_open.errors import UserError
from lit_open.model.config import ATTENTION_BACKENDS, POSITIONED_BACKENDS

try:  # a real import: a source-only install passes find_spec but has no CUDA extension to load
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    _FLASH_ATTN_ERROR = None
except (ImportError, OSError, RuntimeError) as error:  # not installed, or built against another torch/CUDA
    flash_attn_func = flash_attn_varlen_func = None
    _FLASH_ATTN_ERROR = f"{type(error).__name__}: {error}"

try:  # torch's own flash-attention varlen kernel (torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

# torch 2.13 lets varlen_attn share key/value heads itself; before that the heads are repeated.
_VARLEN_GQA = varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters
_HALF = (torch.float16, torch.bfloat16)
_REMEDY = {
    "flash_attn": "install lit-open[flash] on a machine with a CUDA GPU (Ampere or newer) and train in bf16 "
    "(trainer.precision=bf16-mixed)",
    "varlen": "use torch 2.10 or newer on a CUDA GPU (Ampere or newer) and train in bf16 "
    "(trainer.precision=bf16-mixed)",
    "flex": "train on a CUDA GPU",
}


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    doc_ids: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal scaled dot-product attention with grouped-query support and optional document masking.

    q: (B, Hq, Tq, D); k, v: (B, Hkv, T, D) with Hq a multiple of Hkv. Query head h reads key/value head
    h // (Hq // Hkv), as in Hugging Face's `repeat_kv`. doc_ids: None, or integer (B, T) document ids of the keys
    on q's device that do not decrease along T; then token t attends to key s only if s <= t and
    doc_ids[b, s] == doc_ids[b, t]. q_positions: None when the queries are the whole sequence (Tq == T), or the
    (Tq,) int64 positions in it of the queries (a context-parallel shard), for the POSITIONED_BACKENDS.
    Returns (B, Hq, Tq, D) in the dtype of q.

    `sdpa` with doc_ids or q_positions runs as `dense`: SDPA's fused causal kernels take neither, and refusing
    would break a config that worked before documents were packed. `auto` picks a varlen or flex kernel instead.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}.")
    if q.size(1) % k.size(1):
        raise ValueError(f"{q.size(1)} query heads cannot share {k.size(1)} key/value heads evenly.")
    if q_positions is None and q.size(2) != k.size(2):
        raise ValueError(f"{q.size(2)} queries and {k.size(2)} keys: give q_positions when q is part of the sequence.")
    if doc_ids is not None and doc_ids.shape != (k.size(0), k.size(2)):
        raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}; expected (batch, time) {(k.size(0), k.size(2))}.")
    backward = any(t.requires_grad for t in (q, k, v))
    if q_positions is not None and backend not in POSITIONED_BACKENDS:
        raise UserError(
            f"model.attention={backend} cannot attend from a shard of the sequence (context parallelism); use one of "
            f"{', '.join(POSITIONED_BACKENDS)}."
        )
    if backend == "auto":
        backend = _fastest(q, doc_ids is not None, backward, positioned=q_positions is not None)
    elif backend == "sdpa" and (doc_ids is not None or q_positions is not None):
        backend = "dense"
    elif reason := _why_unavailable(backend, q.device, q.dtype, backward):
        raise UserError(
            f"model.attention={backend} cannot run here: {reason}. To use it, {_REMEDY[backend]}; or set "
            "model.attention=auto (the fastest kernel available here) or model.attention=dense (runs anywhere)."
        )
    if q_positions is None:
        return _BACKENDS[backend](q, k, v, doc_ids)
    return _POSITIONED[backend](q, k, v, doc_ids, q_positions)


def available_backends(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, backward: bool = False
) -> list[str]:
    """The backends that can run attention on `device` in `dtype` (and its backward pass, if `backward`)."""
    device = torch.device(device)
    return [name for name in ATTENTION_BACKENDS if not _why_unavailable(name, device, dtype, backward)]


def doc_ids_from_tokens(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) int32 document ids for packed rows: a new document starts after each EOS, which ends its own.

    Ids count from 0 in every row, so a row that starts mid-document gives that tail its own document.
    """
    ends = input_ids == eos_id
    doc_ids = torch.zeros(input_ids.shape, dtype=torch.int32, device=input_ids.device)
    doc_ids[:, 1:] = ends[:, :-1].cumsum(dim=1)
    return doc_ids


def _why_unavailable(backend: str, device: torch.device, dtype: torch.dtype, backward: bool) -> str | None:
    """Why `backend` cannot run on this device and dtype, or None when it can."""
    if backend == "flash_attn" and flash_attn_func is None:
        return f"the flash-attn package does not import ({_FLASH_ATTN_ERROR})"
    if backend == "varlen" and varlen_attn is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (it needs torch 2.10 or newer)"
    if backend in ("flash_attn", "varlen"):
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"it runs only on a CUDA GPU, not on {device.type}"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "its flash-attention kernels need an Ampere or newer GPU (compute capability 8.0)"
        if dtype not in _HALF:
            return f"it needs bfloat16 or float16 tensors, not {dtype}"
    if backend == "flex" and backward and device.type != "cuda":
        return f"FlexAttention has no backward pass on {device.type}, only on CUDA"
    return None


def _fastest(q: torch.Tensor, has_docs: bool, backward: bool, positioned: bool = False) -> str:
    """`auto`: the fused kernels first; flex only on CUDA, where it is compiled (eager flex is a slow reference).

    Without document masking SDPA comes first: on Hopper it dispatches to cuDNN attention, measured about twice
    as fast as flash-attention 2 (notes/libraries.md, section 6). Queries at positions (a context-parallel shard)
    take flex on CUDA, whose block mask skips the masked blocks, else an explicit mask.
    """
    if positioned:
        order = ("flex", "dense")
    else:
        order = ("flash_attn", "varlen", "flex", "dense") if has_docs else ("sdpa",)
    return next(
        name
        for name in order
        if not _why_unavailable(name, q.device, q.dtype, backward) and (name != "flex" or q.is_cuda)
    )


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """The flash-attn package: (B, T, H, D) layout, GQA built in; varlen over the flattened batch for documents."""
    if doc_ids is None:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    cu_seqlens, max_seqlen = _cu_seqlens(doc_ids)
    out = flash_attn_varlen_func(
        _packed(q), _packed(k), _packed(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True
    )
    return _unpacked(out, q)


def _torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """torch's varlen_attn: each (row, document) run is one sequence; without doc_ids each row is one."""
    if doc_ids is None:
        doc_ids = torch.zeros(q.size(0), q.size(2), dtype=torch.int32, device=q.device)
    cu_seqlens, max_seqlen = _cu_seqlens(doc_ids)
    groups = q.size(1) // k.size(1)
    if _VARLEN_GQA:
        gqa = {"enable_gqa": groups > 1}
    else:
        k, v, gqa = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), {}
    out = varlen_attn(
        _packed(q), _packed(k), _packed(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=(-1, 0), **gqa
    )
    return _unpacked(out, q)


def _cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """int32 offsets of every (row, document) run in the flattened batch, and the longest run, as varlen wants.

    A run starts at each row's first token and wherever the id changes. This syncs with the GPU once (nonzero).
    """
    starts = torch.ones(doc_ids.shape, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    cu_seqlens = F.pad(starts.flatten().nonzero().flatten(), (0, 1), value=doc_ids.numel()).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def _packed(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B * T, H, D), the varlen kernels' layout."""
    return x.transpose(1, 2).reshape(-1, x.size(1), x.size(3))


def _unpacked(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(B * T, H, D) -> (B, H, T, D)."""
    return out.view(q.size(0), q.size(2), q.size(1), q.size(3)).transpose(1, 2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: None) -> torch.Tensor:
    """torch's fused kernels (cuDNN or flash on GPU); causal only, documents go through `_dense`."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """SDPA with an explicit boolean mask: runs anywhere, but holds a (B, 1, T, T) mask."""
    mask = _allowed(doc_ids, q.size(2), q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.size(1) != k.size(1))


def _math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference: explicit scores in float32, runs on any device and dtype (`allowed`: the mask, if not causal)."""
    groups = q.size(1) // k.size(1)
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.size(-1) ** -0.5
    allowed = _allowed(doc_ids, q.size(2), q.device) if allowed is None else allowed
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def _allowed(doc_ids: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
    """Which keys each query may see: (T, T) causal, or (B, 1, T, T) causal and same document."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if doc_ids is None:
        return causal
    return causal & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])


def _allowed_at(doc_ids: torch.Tensor | None, q_positions: torch.Tensor, T: int) -> torch.Tensor:
    """Which of T keys the queries at `q_positions` may see: (Tq, T) causal, or (B, 1, Tq, T) with documents."""
    causal = torch.arange(T, device=q_positions.device)[None, :] <= q_positions[:, None]
    if doc_ids is None:
        return causal
    return causal & (doc_ids[:, None, q_positions, None] == doc_ids[:, None, None, :])


def _dense_at(q, k, v, doc_ids: torch.Tensor | None, q_positions: torch.Tensor) -> torch.Tensor:
    mask = _allowed_at(doc_ids, q_positions, k.size(2))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.size(1) != k.size(1))


def _math_at(q, k, v, doc_ids: torch.Tensor | None, q_positions: torch.Tensor) -> torch.Tensor:
    return _math(q, k, v, doc_ids, _allowed_at(doc_ids, q_positions, k.size(2)))


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """FlexAttention with a block-sparse mask: compiled on CUDA (fused, skips masked blocks), eager elsewhere."""
    block_mask = _block_mask(doc_ids, q.size(2), q.device)
    attend = _compiled_flex_attention() if q.is_cuda else _eager_flex_attention
    return attend(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))


@functools.cache
def _compiled_flex_attention():
    """Compiled once per process, on first use: compiling at import would slow every CLI start by a second."""
    return torch.compile(flex_attention)


def _eager_flex_attention(*args, **kwargs) -> torch.Tensor:
    """Unfused flex (materializes the scores) without the warning that says so; only tests and CPU runs use it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


_last_block_mask: tuple[torch.Tensor, int, BlockMask] | None = None


@torch.compiler.disable
def _block_mask(doc_ids: torch.Tensor | None, T: int, device: torch.device) -> BlockMask:
    """The causal (and same-document) block mask, built once per doc_ids tensor rather than once per layer.

    Building one takes ~100 ms at 16k tokens and every layer of a forward passes the same doc_ids, so the last
    mask is kept with the tensor it came from (held, so its identity stays unique) and its in-place version.
    """
    global _last_block_mask
    if doc_ids is None:
        return _causal_block_mask(T, device)
    version = -1 if doc_ids.is_inference() else doc_ids._version
    if _last_block_mask is None or _last_block_mask[0] is not doc_ids or _last_block_mask[1] != version:

        def same_document(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        _last_block_mask = (doc_ids, version, create_block_mask(same_document, doc_ids.size(0), None, T, T, device))
    return _last_block_mask[2]


def _flex_at(q, k, v, doc_ids: torch.Tensor | None, q_positions: torch.Tensor) -> torch.Tensor:
    """FlexAttention for queries at positions of the key sequence: the mask looks each query's position up."""
    block_mask = _block_mask_at(doc_ids, q_positions, k.size(2))
    attend = _compiled_flex_attention() if q.is_cuda else _eager_flex_attention
    return attend(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))


_last_block_mask_at: tuple[torch.Tensor | None, torch.Tensor, BlockMask] | None = None


@torch.compiler.disable
def _block_mask_at(doc_ids: torch.Tensor | None, q_positions: torch.Tensor, T: int) -> BlockMask:
    """The block mask of queries at `q_positions`, kept for the (doc_ids, q_positions) tensors it came from, which
    every layer of a forward passes again (as `_block_mask`)."""
    global _last_block_mask_at
    last = _last_block_mask_at
    if last is not None and last[0] is doc_ids and last[1] is q_positions:
        return last[2]
    if doc_ids is None:

        def allowed(b, h, q_idx, kv_idx):
            return kv_idx <= q_positions[q_idx]
    else:

        def allowed(b, h, q_idx, kv_idx):
            position = q_positions[q_idx]
            return (kv_idx <= position) & (doc_ids[b, kv_idx] == doc_ids[b, position])

    batch = None if doc_ids is None else doc_ids.size(0)
    mask = create_block_mask(allowed, batch, None, q_positions.numel(), T, q_positions.device)
    _last_block_mask_at = (doc_ids, q_positions, mask)
    return mask


@functools.lru_cache(maxsize=8)
def _causal_block_mask(T: int, device: torch.device) -> BlockMask:
    """The plain causal block mask for a length, shared by the whole batch and every head."""
    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T, device)


_BACKENDS = {
    "flash_attn": _flash_attn,
    "varlen": _torch_varlen,
    "flex": _flex,
    "sdpa": _sdpa,
    "dense": _dense,
    "math": _math,
}
_POSITIONED = {"flex": _flex_at, "dense": _dense_at, "math": _math_at}
