"""Accelerator peak throughput: the dense peak FLOP/s of known GPUs, and which peak a training config's matmuls run at.

MFU (model FLOPs utilisation) = achieved FLOP/s / `peak_flops(torch.cuda.get_device_name(), compute_dtype(cfg))`;
the achieved FLOPs come from `lit_open.model.flops.flops_per_token`. There is no peak for CPUs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lit_open.config import TrainConfig

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' datasheets: (a substring of torch.cuda.get_device_name(),
# the GPU, bf16 tensor cores, TF32 tensor cores, FP32 without tensor cores). The first match wins, so more specific
# names come first ("H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L40" before "L4").
PEAK_TFLOPS: list[tuple[str, str, float, float | None, float | None]] = [
    ("H100 NVL", "H100 NVL", 835, 417.5, 60),
    ("H100 PCIe", "H100 PCIe", 756, 378, 51.2),
    ("H100", "H100 SXM", 989, 494.5, 66.9),
    ("H200 NVL", "H200 NVL", 835, 417.5, 60),
    ("GH200", "GH200", 989, 494.5, 66.9),
    ("H200", "H200 SXM", 989, 494.5, 66.9),
    ("B200", "B200", 2250, 1100, 75),
    ("A100", "A100", 312, 156, 19.5),
    ("L40S", "L40S", 362, 183, 91.6),
    ("L40", "L40", 181, 90.5, 90.5),
    ("L4", "L4", 121, 60, 30.3),
    ("A10G", "A10G (A10 datasheet)", 125, 62.5, 31.2),
    ("A10", "A10", 125, 62.5, 31.2),
    ("RTX 4090", "RTX 4090", 165, 82.6, 82.6),
    ("RTX 3090", "RTX 3090", 71, 35.6, 35.6),
    ("MI300X", "MI300X", 1307, 653.7, 163.4),
]


def peak_flops(device_name: str | None, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s of a GPU named like torch.cuda.get_device_name() for dtype bf16 | tf32 | fp32; None when
    the device is not in the table (or is a CPU)."""
    if not device_name:
        return None
    for match, _gpu, bf16, tf32, fp32 in PEAK_TFLOPS:
        if match.lower() in device_name.lower():
            value = {"bf16": bf16, "tf32": tf32, "fp32": fp32}[dtype]
            return value * 1e12 if value is not None else None
    return None


def peak_entry(device_name: str | None) -> str | None:
    """The GPU of the peak table that `device_name` matched, if any."""
    for match, gpu, *_ in PEAK_TFLOPS:
        if device_name and match.lower() in device_name.lower():
            return gpu
    return None


def compute_dtype(cfg: TrainConfig) -> str:
    """Which peak applies: bf16 when the matmuls run in bf16 (bf16 precisions, FSDP's bf16 param_dtype) or float8
    (reported against the bf16 peak, as is customary), else TF32 or FP32 by torch's float32 matmul precision."""
    if (
        cfg.trainer.precision.startswith("bf16")
        or cfg.strategy.param_dtype == "bfloat16"
        or cfg.strategy.float8 != "none"
    ):
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
