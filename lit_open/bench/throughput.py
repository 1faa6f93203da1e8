"""Training throughput of a model preset: tokens/s, achieved TFLOP/s, MFU and peak memory, per training loop.

The same model (built on the meta device, `lit_open.parallel.parallelize`d, `materialize`d with the same seed) is
trained on the same random token batches by each runner of `lit_open.bench.runners` in turn, in this process:
`lightning` (the real `LitLM` through `lightning.Trainer`), `bare` (a plain PyTorch loop doing the same work, the
reference for Lightning's overhead) and `litgpt` (litgpt's `GPT`, when `import litgpt` works). This module turns
the options into a training config, runs the runners and prints and returns the table.

Model FLOPs per token = 6*N + 12*L*d*T (`lit_open.model.flops`). Achieved FLOP/s = FLOPs per token x tokens/s;
MFU = achieved / the GPU's dense peak for the compute dtype (`lit_open.hardware`: bf16 for bf16 precisions, FSDP's
bf16 param_dtype and float8 runs; TF32 or FP32 for 32-true). There is no peak for CPUs: MFU n/a.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import warnings
from dataclasses import asdict
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lit_open.bench.measure import device_name, reset_peak_memory, resolve_device
from lit_open.bench.runners import RUNNER_FUNCTIONS, RUNNERS, Bench, litgpt_unavailable, single_process_group
from lit_open.compose import conf_dir, load_train_config
from lit_open.config import FLOAT8_RECIPES, OPTIMIZERS, PRECISIONS, TrainConfig
from lit_open.errors import UserError
from lit_open.hardware import compute_dtype, peak_entry, peak_flops
from lit_open.model.flops import flops_per_token, non_embedding_parameters

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    presets = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
    parser.add_argument("--model", default="quickstart", choices=presets, help="model preset (conf/model)")
    parser.add_argument("--micro-batch", type=int, help="sequences per step (default: the preset's recipe's)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's recipe's)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3, at least 1)")
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="trainer.precision (default: bf16-mixed on CUDA, 32-true on CPU)"
    )
    parser.add_argument(
        "--strategy",
        choices=("auto", "fsdp"),
        default="auto",
        help="auto: one plain device; fsdp: FSDP2 on one device with bf16 param_dtype (strategy.param_dtype)",
    )
    parser.add_argument("--activation-checkpointing", choices=ACTIVATION_CHECKPOINTING, default="none")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (strategy.compile)")
    parser.add_argument("--float8", choices=FLOAT8_RECIPES, default="none", help="torchao float8 matmuls (Hopper)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="optim.name")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, help="model init and data seed (default: the config's run.seed)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override of the training config, applied last (repeatable), e.g. strategy.loss_chunk_tokens=0",
    )
    parser.add_argument(
        "--runners",
        default=",".join(RUNNERS),
        help=f"comma-separated, of {', '.join(RUNNERS)} (default: all; litgpt only where it imports)",
    )


# -- configuration ------------------------------------------------------------------------------------------


def hydra_overrides(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The training-config overrides that the options stand for; `--override`s come last and win."""
    recipe = [f"recipe={args.model}"] if (conf_dir() / "recipe" / f"{args.model}.yaml").is_file() else []
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    overrides = [
        *recipe,
        f"model={args.model}",
        f"trainer.precision={precision}",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        "trainer.num_nodes=1",
        f"trainer.max_steps={args.warmup + args.steps}",
        f"optim.name={args.optimizer}",
        f"strategy={args.strategy}",
        f"strategy.activation_checkpointing={args.activation_checkpointing}",
        f"strategy.compile={str(args.compile).lower()}",
        f"strategy.float8={args.float8}",
        "data.num_workers=0",
        # one micro-batch per optimizer step, whatever the recipe's global batch
        "data.global_batch_size=${data.micro_batch_size}",
    ]
    if args.strategy == "fsdp":
        overrides.append("strategy.param_dtype=bfloat16")
    if args.seq_len is not None:
        overrides.append(f"data.seq_len={args.seq_len}")
    if args.micro_batch is not None:
        overrides.append(f"data.micro_batch_size={args.micro_batch}")
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    return overrides + list(args.override)


def load_config(args: argparse.Namespace, device: torch.device) -> tuple[TrainConfig, list[str]]:
    overrides = hydra_overrides(args, device)
    return load_train_config(overrides), overrides


# -- the benchmark ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    runners = list(dict.fromkeys(r.strip() for r in args.runners.split(",") if r.strip()))
    unknown = sorted(set(runners) - set(RUNNERS))
    if unknown or not runners:
        raise UserError(f"--runners {args.runners!r}: choose among {', '.join(RUNNERS)}.")
    if args.warmup < 1 or args.steps < 1:
        raise UserError("--warmup and --steps must be at least 1 (the first step includes one-time setup).")
    device = resolve_device(args.device)
    cfg, overrides = load_config(args, device)
    if cfg.trainer.matmul_precision:
        torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
    bench = Bench(device=device, warmup=args.warmup, steps=args.steps)
    name = device_name(device)
    dtype = compute_dtype(cfg)
    peak = peak_flops(name, dtype) if device.type == "cuda" else None
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = cfg.data.micro_batch_size * cfg.data.seq_len
    config = {
        "model": args.model,
        "micro_batch": cfg.data.micro_batch_size,
        "seq_len": cfg.data.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "precision": cfg.trainer.precision,
        "strategy": cfg.strategy.name,
        "param_dtype": cfg.strategy.param_dtype,
        "activation_checkpointing": cfg.strategy.activation_checkpointing,
        "compile": cfg.strategy.compile,
        "float8": cfg.strategy.float8,
        "optimizer": cfg.optim.name,
        "device": device.type,
        "seed": cfg.run.seed,
        "runners": runners,
        "hydra_overrides": overrides,
        "train_config": asdict(cfg),
    }
    results: dict[str, Any] = {
        "flops_per_token": per_token,
        "flops_formula": "6*N + 12*L*d*T",
        "non_embedding_parameters": non_embedding_parameters(cfg.model),
        "n_layer": cfg.model.n_layer,
        "d_attention": cfg.model.n_head * cfg.model.head_dim,
        "tokens_per_step": tokens_per_step,
        "compute_dtype": dtype,
        "peak_flops": peak,
        "peak_table_entry": peak_entry(name) if device.type == "cuda" else None,
        "runners": {},
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*have no `val_dataloader`.*")  # nothing to validate here
        with single_process_group(device) if cfg.strategy.name == "fsdp" else contextlib.nullcontext():
            for runner in runners:
                results["runners"][runner] = _run_one(runner, cfg, bench, per_token, tokens_per_step, peak)
    ok = results["runners"]
    if ok.get("lightning", {}).get("status") == "ok" and ok.get("bare", {}).get("status") == "ok":
        results["lightning_overhead_pct"] = 100 * (ok["lightning"]["seconds"] / ok["bare"]["seconds"] - 1)
    else:
        results["lightning_overhead_pct"] = None
    print_table(config, results, name)
    return {"config": config, "results": results}


def _run_one(
    runner: str, cfg: TrainConfig, bench: Bench, per_token: int, tokens_per_step: int, peak: float | None
) -> dict[str, Any]:
    if runner == "litgpt" and (why := litgpt_unavailable()):
        return {"status": "skipped", "note": why}
    reset_peak_memory(bench.device)
    torch.manual_seed(cfg.run.seed)
    try:
        measured = RUNNER_FUNCTIONS[runner](cfg, bench)
    except UserError:
        raise
    except Exception as err:
        if runner != "litgpt":
            raise
        return {"status": "failed", "note": f"{type(err).__name__}: {err}"}
    finally:
        gc.collect()
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
        if cfg.strategy.compile:
            torch._dynamo.reset()
    tokens = tokens_per_step * bench.steps
    tokens_per_s = tokens / measured["seconds"]
    achieved = per_token * tokens_per_s
    return {
        "status": "ok",
        "steps": bench.steps,
        "tokens": tokens,
        **measured,
        "seconds_per_step": measured["seconds"] / bench.steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": per_token,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "loss_finite": math.isfinite(measured["first_loss"]) and math.isfinite(measured["loss"]),
    }


def print_table(config: dict[str, Any], results: dict[str, Any], name: str) -> None:
    overhead = results["lightning_overhead_pct"]
    peak = results["peak_flops"]
    table = Table(
        title=f"{config['model']}: micro-batch {config['micro_batch']} x {config['seq_len']} tokens, "
        f"{config['precision']}, strategy {config['strategy']}"
        + (f" (param_dtype {config['param_dtype']})" if config["param_dtype"] else "")
        + (f", AC {config['activation_checkpointing']}" if config["activation_checkpointing"] != "none" else "")
        + (", compiled" if config["compile"] else "")
        + (f", float8 {config['float8']}" if config["float8"] != "none" else "")
        + f"\n{name}; {config['steps']} timed steps after {config['warmup']} warmup",
        caption=f"FLOPs/token = 6*N + 12*L*d*T = {results['flops_per_token']:,} "
        f"(N = {results['non_embedding_parameters']:,} without the input embedding); "
        + (f"peak {peak / 1e12:,.0f} TFLOP/s {results['compute_dtype']}" if peak else "no peak known here: MFU n/a")
        + (f"; Lightning overhead over the bare loop: {overhead:+.1f}%" if overhead is not None else ""),
    )
    columns = (
        "runner",
        "tokens/s",
        "TFLOP/s",
        "MFU",
        "peak memory (GiB)",
        "s/step",
        "first loss",
        "final loss",
        "note",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("runner", "note") else "right")
    for runner, r in results["runners"].items():
        if r["status"] != "ok":
            table.add_row(runner, *["-"] * (len(columns) - 2), f"{r['status']}: {r['note']}", style="dim")
            continue
        table.add_row(
            runner,
            f"{r['tokens_per_s']:,.0f}",
            f"{r['achieved_tflops']:,.3g}",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
            f"{r['peak_memory_gib']:,.2f}",
            f"{r['seconds_per_step']:.3f}",
            f"{r['first_loss']:.4f}",
            f"{r['loss']:.4f}",
            "",
        )
    Console(width=max(120, Console().width)).print(table)
