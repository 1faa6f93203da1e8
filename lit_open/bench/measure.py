"""What the benchmarks measure with: the device (resolved and described), a synchronised clock, peak memory."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lit_open.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`--device auto | cpu | cuda` as a torch.device (auto: CUDA when torch sees one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but torch sees no CUDA device; use --device cpu (or auto).")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """torch.cuda.get_device_name() for a GPU (what the peak table matches), else a description of the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"CPU: {name} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def synchronized_clock(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# CUDA memory allocated when the peak statistics were last reset, per device index: left over from earlier runners
_start_memory: dict[int | None, int] = {}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: collect garbage and, on CUDA, empty the cache and reset the allocator's peak statistics."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        _start_memory[device.index] = torch.cuda.memory_allocated(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The peak since `reset_peak_memory` on CUDA; on a CPU the process's resident-set high-water mark."""
    if device.type == "cuda":
        return {
            "start_memory_gib": _start_memory.get(device.index, 0) / 2**30,  # left over from earlier runners
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "memory_kind": "torch.cuda.max_memory_allocated",
        }
    # The process's resident-set high-water mark: it never goes down, so a later runner reports at least the
    # peak of the earlier ones.
    return {
        "peak_memory_gib": max_rss_bytes() / 2**30,
        "memory_kind": "process max RSS (high-water, since process start)",
    }


def max_rss_bytes() -> int:
    """The process's resident-set high-water mark (getrusage ru_maxrss: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_settings(seq_len: int, micro_batch: int, steps: int, device: str, every_n_steps: int) -> list[str]:
    """Overrides of the benchmarks that train whole runs through `lit_open.train.run`: one micro-batch per step, no
    validation, a CSV logger, a checkpoint every `every_n_steps`."""
    return [
        f"data.seq_len={seq_len}",
        f"data.micro_batch_size={micro_batch}",
        f"data.global_batch_size={micro_batch}",
        f"trainer.max_steps={steps}",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        "trainer.val_check_interval=0",
        "trainer.validate_at_start=false",
        f"checkpoint.every_n_steps={every_n_steps}",
        "logger=csv",
    ]
