"""How long a checkpoint holds training up: synchronous vs asynchronous saves (`checkpoint.asynchronous`) of one run.

The same run (by default a 114M-parameter model on the CPU, a checkpoint every 2 steps) is trained through
`lit_open.train.run` once with each kind of save, in one process, alternating over `--repeats`. For each periodic
checkpoint the writer records how long training waited for it: for a synchronous save the whole write; for an
asynchronous one the wait for the previous save if still in flight, plus the copy of the state to host memory. The
background write's own duration (start to published) is read from the run's `checkpoint` events. The figure to
quote is the ratio of the median blocked seconds, asynchronous over synchronous (the target: at most 1/5).

    python -m lit_open.bench checkpoint
    python -m lit_open.bench checkpoint --layers 2 --d-model 64 --d-ff 128 --heads 4 --steps 3   # a quick check
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

import lit_open.train.runner as train_module
from lit_open.bench.measure import run_settings
from lit_open.checkpoint.resumable import CheckpointWriter
from lit_open.compose import load_train_config
from lit_open.errors import UserError
from lit_open.model.config import ModelConfig
from lit_open.model.model import Transformer, num_parameters
from lit_open.train.events import read_events

MODES = {"sync": "false", "async": "true"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=16, help="model.n_layer (quickstart's family and vocabulary)")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per step (one micro-batch)")
    parser.add_argument("--steps", type=int, default=7, help="optimizer steps per run")
    parser.add_argument("--every", type=int, default=2, help="checkpoint.every_n_steps")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (sync, async), alternating")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the runs write their checkpoints (default: a temporary directory)"
    )
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of the runs")


class _RecordingWriter(CheckpointWriter):
    """The run's CheckpointWriter, kept where the benchmark can read its blocked seconds afterwards."""

    made: list[CheckpointWriter] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _RecordingWriter.made.append(self)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu.")
    if args.steps < args.every:
        raise UserError(f"--steps {args.steps} is less than --every {args.every}: no periodic checkpoint to time.")
    model = {
        "model": "quickstart",
        "model.n_layer": args.layers,
        "model.d_model": args.d_model,
        "model.n_head": args.heads,
        "model.n_kv_head": args.heads,
        "model.d_ff": args.d_ff,
    }
    settings = [
        *(f"{k}={v}" for k, v in model.items()),
        *run_settings(args.seq_len, args.micro_batch, args.steps, args.device, every_n_steps=args.every),
        "checkpoint.keep_last=1",
        "plugins=[]",
        *args.overrides,
    ]
    parameters = _parameter_count(load_train_config(settings).model)
    print(f"model: {parameters / 1e6:.1f}M parameters; {args.steps} steps, a checkpoint every {args.every}")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    real_writer = train_module.CheckpointWriter
    train_module.CheckpointWriter = _RecordingWriter
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            for repeat in range(args.repeats):
                for mode, asynchronous in MODES.items():
                    run_dir = Path(tmp) / f"{mode}-{repeat}"
                    _RecordingWriter.made.clear()
                    cfg = load_train_config(
                        [*settings, f"checkpoint.asynchronous={asynchronous}", f"run.dir={run_dir}"]
                    )
                    summary = train_module.run(cfg)
                    runs[mode].append(_measured(run_dir, _RecordingWriter.made[-1], args.every, summary))
                    print(f"  {mode}: blocked {_blocked_text(runs[mode][-1])}")
    finally:
        train_module.CheckpointWriter = real_writer
    results = {mode: _summary(measured) for mode, measured in runs.items()}
    results["parameters"] = parameters
    results["blocked_ratio_async_over_sync"] = (
        results["async"]["blocked_s_median"] / results["sync"]["blocked_s_median"]
    )
    _print_table(results)
    config = {k: v for k, v in vars(args).items() if k != "json"}
    return {"config": config, "results": results}


def _parameter_count(model_cfg: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return num_parameters(Transformer(model_cfg))


def _measured(run_dir: Path, writer: CheckpointWriter, every: int, summary: dict[str, Any]) -> dict[str, Any]:
    periodic = {step: s for step, s in writer.blocked_s.items() if step % every == 0}
    written = {e["step"]: e["seconds"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "checkpoint"}
    size = sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*") if f.is_file()) / (
        len(list((run_dir / "checkpoints").glob("step-*"))) or 1
    )
    return {
        "blocked_s": periodic,
        "write_s": {step: written[step] for step in periodic if step in written},
        "train_seconds": summary["train_seconds"],
        "checkpoint_bytes": int(size),
    }


def _summary(measured: list[dict[str, Any]]) -> dict[str, Any]:
    blocked = [s for m in measured for s in m["blocked_s"].values()]
    written = [s for m in measured for s in m["write_s"].values()]
    return {
        "blocked_s_median": statistics.median(blocked),
        "blocked_s_max": max(blocked),
        "blocked_s": blocked,
        "write_s_median": statistics.median(written) if written else None,
        "train_seconds": [m["train_seconds"] for m in measured],
        "checkpoint_bytes": measured[-1]["checkpoint_bytes"],
    }


def _blocked_text(measured: dict[str, Any]) -> str:
    return ", ".join(f"step {step}: {s:.3f} s" for step, s in measured["blocked_s"].items())


def _print_table(results: dict[str, Any]) -> None:
    print(f"\n{'save':<6} {'blocked (median)':>17} {'blocked (max)':>14} {'write (median)':>15} {'checkpoint':>11}")
    for mode in MODES:
        r = results[mode]
        write = f"{r['write_s_median']:.3f} s" if r["write_s_median"] is not None else "-"
        print(
            f"{mode:<6} {r['blocked_s_median']:>15.3f} s {r['blocked_s_max']:>12.3f} s {write:>15} "
            f"{r['checkpoint_bytes'] / 2**20:>8.0f} MiB"
        )
    print(f"asynchronous saves block training {results['blocked_ratio_async_over_sync']:.3f}x as long as synchronous")
