"""Attention kernels on packed documents: parity with a float32 reference, and speed.

Every backend of `lit_open.model.attention.causal_attention` runs forward + backward on the same q, k, v, upstream
gradient and document layout (random boundaries from a seeded generator, lengths geometric around
--mean-doc-len, so a row holds several documents). Parity: the output and dq, dk, dv against the `math` backend
run in float32 on the same device (one batch row at a time: its (heads, T, T) scores bound the memory). Speed: the
median milliseconds of a forward (with autograd recording, as in training) and of a forward + backward over
--repeats calls after --warmup (FlexAttention compiles there), and the peak memory of those calls.
Per-call costs count as in one layer of the model: varlen's offsets are computed in every call (so timed), flex's
block mask once per batch of documents, cached and shared by the layers (so not timed).

Which kernel runs where: a backend that cannot run here (device, dtype, missing package) is skipped with the
reason `_why_unavailable` gives; one with a forward but no backward here (flex on CPU) is timed forward only.
`sdpa` takes no documents (`causal_attention` would run it as `dense`), so it runs causal only, checked against
the causal reference: its time is that of a fused causal kernel, a reference for what document masking costs.
A backend that raises (CUDA out-of-memory included) is recorded as failed and the others still run.

TFLOP/s counts only the score entries a query may see (same document, not in the future): a document of L tokens
has L(L+1)/2, and each entry costs 2 matmuls (QK^T and PV) of 2*D FLOPs per query head, so a forward is
4 * D * heads * sum over rows and documents of L(L+1)/2. The backward counts 2.5 times that (its 5 matmuls, the
recomputed QK^T included, against the forward's 2; flash-attn's benchmark convention), so forward + backward is
3.5 times the forward.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lit_open.bench.measure import device_name, peak_memory, reset_peak_memory, resolve_device, synchronized_clock
from lit_open.errors import UserError, first_line
from lit_open.model.attention import _why_unavailable, causal_attention
from lit_open.model.config import ATTENTION_BACKENDS

BACKENDS = tuple(name for name in ATTENTION_BACKENDS if name != "auto")  # auto is one of them, chosen per device
DEFAULT_BACKENDS = tuple(name for name in BACKENDS if name != "math")  # math is the reference
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Parity bound on the max abs error of each tensor, times max(1, its reference's max abs) since gradients can exceed
# unit scale. Low precision: the kernels round P and the output to the dtype, whose spacing at 1.0 is 2^-7 = 7.8e-3
# (bf16) and 2^-10 = 9.8e-4 (fp16): 2e-2 and 5e-3 allow a few such steps. float32: kernels differ from the reference
# only in summation order and the online softmax, ~1e-6; 1e-4 leaves room and still catches a leaking mask.
TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}
BACKWARD_FLOP_RATIO = 2.5  # backward FLOPs / forward FLOPs: 5 matmuls against 2
TENSORS = ("out", "dq", "dk", "dv")
# option -> (default on CUDA, default on CPU): the CPU sizes finish in seconds with the float32 reference
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "seq_len": (4096, 256),
    "head_dim": (128, 64),
    "mean_doc_len": (1024, 64),
    "dtype": ("bfloat16", "float32"),
    "repeats": (20, 3),
    "warmup": (3, 1),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def default(name: str) -> str:
        cuda, cpu = DEFAULTS[name]
        return f"(default: {cuda} on CUDA, {cpu} on CPU)"

    parser.add_argument("--batch", type=int, default=4, help="rows of packed documents (default: 4)")
    parser.add_argument("--seq-len", type=int, help=f"tokens per row {default('seq_len')}")
    parser.add_argument("--heads", type=int, default=16, help="query heads (default: 16)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads, dividing --heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, help=default("head_dim"))
    parser.add_argument("--mean-doc-len", type=int, help=f"mean document length in tokens {default('mean_doc_len')}")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help=f"of q, k, v {default('dtype')}")
    parser.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"comma-separated, of {', '.join(BACKENDS)} (default: all but math, the reference)",
    )
    parser.add_argument("--repeats", type=int, help=f"timed calls of each kind {default('repeats')}")
    parser.add_argument("--warmup", type=int, help=f"untimed forward + backward calls first {default('warmup')}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="of the document layout and q, k, v (default: 0)")


@dataclass
class Problem:
    """One attention call's inputs, shared by every backend, and its float32 references (per masking)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    doc_ids: torch.Tensor
    references: dict[bool, dict[str, torch.Tensor]]  # documents? -> the math backend's out, dq, dk, dv in float32
    repeats: int
    warmup: int
    tolerance: float


def run(args: argparse.Namespace) -> dict[str, Any]:
    backends = _parse_backends(args.backends)
    device = resolve_device(args.device)
    settings = _settings(args, device)
    dtype = DTYPES[settings["dtype"]]
    B, T, D, kv_heads = args.batch, settings["seq_len"], settings["head_dim"], settings["kv_heads"]
    doc_ids = document_ids(B, T, settings["mean_doc_len"], args.seed).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v, dout = (
        torch.randn(B, heads, T, D, generator=generator, device=device, dtype=dtype)
        for heads in (args.heads, kv_heads, kv_heads, args.heads)
    )
    runnable = [name for name in backends if not _why_unavailable(name, device, dtype, False)]
    references = {
        documents: reference(q, k, v, dout, doc_ids if documents else None)
        for documents in {name != "sdpa" for name in runnable}
    }
    problem = Problem(
        q, k, v, dout, doc_ids, references, settings["repeats"], settings["warmup"], TOLERANCE[settings["dtype"]]
    )
    lengths = document_lengths(doc_ids)
    flops = {True: attention_flops(lengths, args.heads, D), False: attention_flops([[T]] * B, args.heads, D)}
    results = {}
    for name in backends:
        try:
            results[name] = bench_backend(name, problem, flops)
        except Exception as error:  # one broken kernel (CUDA out-of-memory included) must not stop the others
            results[name] = {"status": "failed", "note": f"{type(error).__name__}: {first_line(error)}"}
        gc.collect()  # a failed call's tensors, held by its traceback until the except block ended
        if device.type == "cuda":
            torch.cuda.empty_cache()
    config = {
        "device": device.type,
        "device_name": device_name(device),
        "batch": B,
        "seq_len": T,
        "heads": args.heads,
        "kv_heads": kv_heads,
        "head_dim": D,
        "mean_doc_len": settings["mean_doc_len"],
        "dtype": settings["dtype"],
        "backends": backends,
        "repeats": settings["repeats"],
        "warmup": settings["warmup"],
        "seed": args.seed,
        "tolerance": problem.tolerance,
        "tolerance_rule": "max abs error <= tolerance * max(1, max abs of the float32 reference), per tensor",
        "flop_convention": "forward 4*D*heads*sum of L(L+1)/2 over documents; forward+backward 3.5x forward",
    }
    layout = {
        "documents_per_row": [len(row) for row in lengths],
        "mean_document_length": B * T / sum(len(row) for row in lengths),
        "forward_flops": flops[True],
        "forward_flops_causal": flops[False],
    }
    print_table(config, layout, results)
    return {"config": config, "results": {"layout": layout, "backends": results}}


def _settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The options left unset at their defaults for the device (and --kv-heads at --heads), checked."""
    settings = {name: getattr(args, name) for name in DEFAULTS}
    settings = {name: DEFAULTS[name][device.type != "cuda"] if v is None else v for name, v in settings.items()}
    settings["kv_heads"] = args.heads if args.kv_heads is None else args.kv_heads
    positive = {"batch": args.batch, "heads": args.heads} | {
        name: settings[name] for name in ("seq_len", "kv_heads", "head_dim", "mean_doc_len", "repeats")
    }
    if bad := [f"--{name.replace('_', '-')} {value}" for name, value in positive.items() if value < 1]:
        raise UserError(f"{', '.join(bad)}: must be at least 1.")
    if settings["warmup"] < 0:
        raise UserError(f"--warmup {settings['warmup']}: must be at least 0.")
    if args.heads % settings["kv_heads"]:
        raise UserError(f"--heads {args.heads} is not a multiple of --kv-heads {settings['kv_heads']}.")
    return settings


def _parse_backends(text: str) -> list[str]:
    backends = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown or not backends:
        what = f"unknown {', '.join(unknown)}" if unknown else "names none"
        raise UserError(f"--backends {text!r} {what}; choose among {', '.join(BACKENDS)}.")
    return backends


def document_ids(batch: int, seq_len: int, mean_doc_len: int, seed: int) -> torch.Tensor:
    """(batch, seq_len) int32 ids of packed documents, from 0 in each row; lengths are geometric with mean
    `mean_doc_len` (at least 1 token), the last document of a row cut at its end."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        # seq_len draws of at least one token each always fill the row
        lengths = torch.empty(seq_len).geometric_(1 / mean_doc_len, generator=generator).long()
        count = int((lengths.cumsum(0) < seq_len).sum()) + 1
        rows.append(torch.repeat_interleave(torch.arange(count), lengths[:count])[:seq_len])
    return torch.stack(rows).to(torch.int32)


def document_lengths(doc_ids: torch.Tensor) -> list[list[int]]:
    """The lengths of each row's runs of equal ids, the documents."""
    return [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in doc_ids.cpu()]


def attention_flops(lengths: list[list[int]], heads: int, head_dim: int) -> int:
    """Forward FLOPs of the visible score entries: 4 * head_dim * heads * sum of L(L+1)/2 over every document."""
    return 4 * head_dim * heads * sum(n * (n + 1) // 2 for row in lengths for n in row)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, doc_ids: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """out, dq, dk, dv of the `math` backend in float32, one batch row at a time (bounds its (H, T, T) scores)."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in TENSORS}
    for b in range(q.size(0)):
        row = [x[b : b + 1].detach().float().requires_grad_() for x in (q, k, v)]
        out = causal_attention(*row, backend="math", doc_ids=None if doc_ids is None else doc_ids[b : b + 1])
        out.backward(dout[b : b + 1].float())
        for name, tensor in zip(TENSORS, (out.detach(), *(x.grad for x in row))):
            parts[name].append(tensor)
    return {name: torch.cat(tensors) for name, tensors in parts.items()}


def bench_backend(name: str, problem: Problem, flops: dict[bool, int]) -> dict[str, Any]:
    """Parity, median times, TFLOP/s and peak memory of one backend; skipped with the reason where it cannot run."""
    device, dtype = problem.q.device, problem.q.dtype
    if reason := _why_unavailable(name, device, dtype, False):
        return {"status": "skipped", "note": reason}
    no_backward = _why_unavailable(name, device, dtype, True)
    documents = name != "sdpa"
    doc_ids = problem.doc_ids if documents else None
    q, k, v = (x.detach().requires_grad_(not no_backward) for x in (problem.q, problem.k, problem.v))

    def forward() -> torch.Tensor:
        return causal_attention(q, k, v, backend=name, doc_ids=doc_ids)

    def forward_backward() -> None:
        q.grad = k.grad = v.grad = None
        forward().backward(problem.dout)

    step = forward if no_backward else forward_backward
    out = forward()  # the parity call, which also compiles flex
    if not no_backward:
        out.backward(problem.dout)
    values = (out, *(() if no_backward else (q.grad, k.grad, v.grad)))
    errors = {t: _error(x, problem.references[documents][t], problem.tolerance) for t, x in zip(TENSORS, values)}
    del out, values
    for _ in range(problem.warmup):
        step()
    reset_peak_memory(device)
    forward_ms = _median_ms(forward, problem.repeats, device)
    both_ms = None if no_backward else _median_ms(forward_backward, problem.repeats, device)
    notes = [] if documents else ["causal only: sdpa takes no documents"]
    notes += [f"forward only: {no_backward}"] if no_backward else []
    return {
        "status": "ok",
        "masking": "documents" if documents else "causal",
        "backward": not no_backward,
        "parity": "ok" if all(e["max_abs"] <= e["bound"] for e in errors.values()) else "MISMATCH",
        "errors": errors,
        "forward_ms": forward_ms,
        "forward_backward_ms": both_ms,
        "forward_tflops": flops[documents] / forward_ms / 1e9,
        "forward_backward_tflops": None
        if both_ms is None
        else (1 + BACKWARD_FLOP_RATIO) * flops[documents] / both_ms / 1e9,
        **peak_memory(device),
        "note": "; ".join(notes),
    }


def _error(value: torch.Tensor, reference: torch.Tensor, tolerance: float) -> dict[str, float]:
    """Max abs error, relative error (norm of the difference / norm of the reference), and the max abs bound."""
    diff = value.detach().float() - reference
    return {
        "max_abs": diff.abs().max().item(),
        "rel": (diff.norm() / reference.norm()).item(),
        "bound": tolerance * max(1.0, reference.abs().max().item()),
    }


def _median_ms(call: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        start = synchronized_clock(device)
        call()
        times.append(synchronized_clock(device) - start)
    return 1e3 * statistics.median(times)


def print_table(config: dict[str, Any], layout: dict[str, Any], results: dict[str, Any]) -> None:
    docs = layout["documents_per_row"]
    table = Table(
        title=f"Attention on packed documents: {config['batch']} x {config['seq_len']} tokens, {config['heads']} "
        f"heads ({config['kv_heads']} kv) x {config['head_dim']}, {config['dtype']} on {config['device_name']}\n"
        f"{min(docs)}-{max(docs)} documents per row (mean length {layout['mean_document_length']:.0f}); "
        f"median of {config['repeats']} calls after {config['warmup']} warmup",
        caption=f"TFLOP/s of visible score entries only: {config['flop_convention']}. Parity: max abs error of out and "
        f"of dq/dk/dv (the largest) vs math in float32; ok within {config['tolerance']:g} x max(1, max |reference|). "
        "Peak GiB: on CUDA allocated above the inputs and references, on CPU the process's max RSS",
    )
    columns = ("backend", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "peak GiB", "out err", "grad err")
    for column in (*columns, "parity", "note"):
        table.add_column(column, justify="left" if column in ("backend", "parity", "note") else "right")
    for name, r in results.items():
        if r["status"] != "ok":
            table.add_row(name, *["-"] * (len(columns) - 1), r["status"], r["note"], style="dim")
            continue
        grads = [r["errors"][t]["max_abs"] for t in TENSORS[1:] if t in r["errors"]]
        table.add_row(
            name,
            f"{r['forward_ms']:.3f}",
            "-" if r["forward_backward_ms"] is None else f"{r['forward_backward_ms']:.3f}",
            f"{r['forward_tflops']:.3g}",
            "-" if r["forward_backward_tflops"] is None else f"{r['forward_backward_tflops']:.3g}",
            f"{r['peak_memory_gib'] - r.get('start_memory_gib', 0.0):.2f}",
            f"{r['errors']['out']['max_abs']:.1e}",
            f"{max(grads):.1e}" if grads else "-",
            r["parity"],
            r["note"],
            style=None if r["parity"] == "ok" else "bold red",
        )
    Console(width=max(140, Console().width)).print(table)
