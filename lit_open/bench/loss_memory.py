"""Peak memory and time of one loss step (forward + backward): the full float32 logits vs the chunked `lm_loss`.

On CPU each variant runs in a fresh Python process that reads its peak resident memory (ru_maxrss) just before and
just after the step; a process's peak never goes down, so a second variant in the same process would hide under the
first one's peak. On CUDA both variants run in this process, measured by the caching allocator's peak statistics.
The baseline of each measurement holds the output weight, the hidden states and their .grad buffers (as during
gradient accumulation), so the increase is what the loss itself costs. On CPU, keep a chunk's logits above glibc's
32 MiB mmap threshold (chunk_tokens * vocab * 4 bytes): smaller blocks stay cached in malloc's heap and pile up in
the resident memory, so the chunked variant then measures worse than it is.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from functools import partial

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lit_open.bench.measure import max_rss_bytes
from lit_open.errors import UserError
from lit_open.train.loss import lm_loss, naive_lm_loss

VARIANTS = ("naive", "chunked")
WARMUP_TOKENS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab-size", type=int, default=100352, help="rows of the output projection (padded vocab)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens in the micro-batch (batch x sequence)")
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="tokens per chunk of the chunked loss")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="of the hidden states and output weight"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def run(args: argparse.Namespace) -> dict:
    config = {
        "vocab_size": args.vocab_size,
        "tokens": args.tokens,
        "d_model": args.d_model,
        "chunk_tokens": args.chunk_tokens,
        "dtype": args.dtype,
        "device": args.device,
    }
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but torch sees no CUDA device; run with --device cpu.")
        results = {variant: measure_step(variant, **config) for variant in VARIANTS}
    else:
        results = {variant: _measure_in_fresh_process(variant, config) for variant in VARIANTS}
    chunked = results["chunked"]["peak_increase_mib"]
    # a chunked step that fits in memory the process already held raises the peak by nothing: no finite ratio
    ratio = results["naive"]["peak_increase_mib"] / chunked if chunked > 0 else math.inf
    _print_table(config, results, ratio)
    return {"config": config, **results, "memory_ratio": ratio}


def measure_step(
    variant: str, vocab_size: int, tokens: int, d_model: int, chunk_tokens: int, dtype: str, device: str
) -> dict:
    """One forward + backward of the `variant` loss: peak memory above the baseline (MiB), seconds, loss value."""
    torch.manual_seed(0)
    output = nn.Linear(d_model, vocab_size, bias=False, device=device, dtype=getattr(torch, dtype))
    hidden = torch.randn(1, tokens, d_model, device=device, dtype=output.weight.dtype, requires_grad=True)
    targets = torch.randint(vocab_size, (1, tokens), device=device)
    loss_fn = naive_lm_loss if variant == "naive" else partial(lm_loss, chunk_tokens=chunk_tokens)
    # A step on a few tokens puts thread pools, kernels and the .grad buffers into the baseline.
    loss_fn(hidden[:, :WARMUP_TOKENS], output, targets[:, :WARMUP_TOKENS]).loss.backward()
    hidden.grad.zero_()
    output.weight.grad.zero_()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peak_before = _peak_memory_bytes(device)
    start = time.perf_counter()
    result = loss_fn(hidden, output, targets)
    result.loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_increase = _peak_memory_bytes(device) - peak_before
    return {"peak_increase_mib": peak_increase / 2**20, "seconds": seconds, "loss": result.loss.item()}


def _peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return max_rss_bytes()


def _measure_in_fresh_process(variant: str, config: dict) -> dict:
    code = (
        "import json, sys; from lit_open.bench.loss_memory import measure_step; "
        "print(json.dumps(measure_step(**json.loads(sys.argv[1]))))"
    )
    worker = subprocess.run(
        [sys.executable, "-c", code, json.dumps({"variant": variant, **config})], capture_output=True, text=True
    )
    if worker.returncode != 0:
        raise RuntimeError(
            f"The {variant} loss step failed (exit code {worker.returncode}; -9 is usually out of memory):\n"
            f"{worker.stderr}"
        )
    return json.loads(worker.stdout.splitlines()[-1])


def _print_table(config: dict, results: dict, ratio: float) -> None:
    table = Table(
        title=f"One loss step: {config['tokens']} tokens, vocab {config['vocab_size']}, d_model {config['d_model']}, "
        f"{config['dtype']} on {config['device']}",
        caption=f"peak memory naive / chunked: {ratio:.1f}x",
    )
    for column in ("variant", "peak increase (MiB)", "step (s)", "loss"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    labels = {"naive": "naive (full float32 logits)", "chunked": f"chunked ({config['chunk_tokens']} tokens)"}
    for variant, numbers in results.items():
        table.add_row(
            labels[variant],
            f"{numbers['peak_increase_mib']:.0f}",
            f"{numbers['seconds']:.1f}",
            f"{numbers['loss']:.4f}",
        )
    Console().print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
