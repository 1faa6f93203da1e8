"""Training throughput of a model preset: tokens/s, achieved TFLOP/s, MFU and peak memory, per training loop.

The same model (built on the meta device, `lit_open.parallel.parallelize`d, `materialize`d with the same seed) is
trained on the same random token batches by each runner of `lit_open.bench.runners`, in this process: `lightning`
(the real `LitLM` through `lightning.Trainer`), `bare` (a plain PyTorch loop doing the same work, the reference for
Lightning's overhead), `litgpt` (litgpt's `GPT`, when `import litgpt` works) and `olmo_core` (OLMo-core's
`Transformer`, when it imports). A runner may be a variant of the config: `lightning+strategy.float8=tensorwise`.
The runners take turns of a few steps each, round after round (`lit_open.bench.turns`), and each runner's speed is
reported against a reference runner round by round: the median ratio and its spread.

Model FLOPs per token = 6*N + 12*L*d*T (`lit_open.model.flops`). Achieved FLOP/s = FLOPs per token x tokens/s;
MFU = achieved / the GPU's dense peak for the compute dtype (`lit_open.hardware`: bf16 for bf16 precisions, FSDP's
bf16 param_dtype and float8 runs; TF32 or FP32 for 32-true). There is no peak for CPUs: MFU n/a.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import statistics
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lit_open.bench import olmo_core, runners
from lit_open.bench.measure import device_name, resolve_device
from lit_open.bench.turns import SCHEDULES, RunnerClock, TurnLog, Turns, ratio_stats
from lit_open.compose import conf_dir, load_train_config
from lit_open.config import FLOAT8_RECIPES, OPTIMIZERS, PRECISIONS, TrainConfig
from lit_open.errors import UserError
from lit_open.hardware import compute_dtype, peak_entry, peak_flops
from lit_open.model import ModelConfig
from lit_open.model.flops import flops_per_token, non_embedding_parameters

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
# runner -> its training loop, and (for the other projects' models) why it cannot run here, or None
RUNNER_FUNCTIONS: dict[str, Callable[[TrainConfig, RunnerClock], None]] = {
    **runners.RUNNER_FUNCTIONS,
    "olmo_core": olmo_core.run_olmo_core,
}
RUNNERS = tuple(RUNNER_FUNCTIONS)
UNAVAILABLE: dict[str, Callable[[ModelConfig], str | None]] = {
    "litgpt": lambda _model: runners.litgpt_unavailable(),
    "olmo_core": olmo_core.olmo_core_unavailable,  # also: a layout OLMo-core cannot build (Pythia's)
}
DEFAULT_RUNNERS = "lightning,bare,litgpt,olmo_core"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    presets = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
    parser.add_argument("--model", default="quickstart", choices=presets, help="model preset (conf/model)")
    parser.add_argument("--micro-batch", type=int, help="sequences per step (default: the preset's recipe's)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's recipe's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per runner, at least (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3, at least 1)")
    parser.add_argument(
        "--round-steps",
        type=int,
        default=3,
        help="steps per turn; a turn's first step is not timed (default: 3, at least 2)",
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="interleaved",
        help="interleaved: the runners take turns, every model held at once; sequential: one runner after the other",
    )
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
        default=DEFAULT_RUNNERS,
        help=f"comma-separated, of {', '.join(RUNNERS)}, each optionally a variant NAME+KEY=VALUE[+KEY=VALUE] "
        "(default: all; litgpt and olmo_core only where they import)",
    )
    parser.add_argument(
        "--reference", help="the runner the others' speed is divided by (default: bare if it runs, else the first)"
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
        f"optim.name={args.optimizer}",
        f"strategy={args.strategy}",
        f"strategy.activation_checkpointing={args.activation_checkpointing}",
        f"strategy.compile={str(args.compile).lower()}",
        f"strategy.float8={args.float8}",
        "data.num_workers=0",
        # one micro-batch per optimizer step, whatever the recipe's global batch
        "data.global_batch_size=${data.micro_batch_size}",
    ]
    # FSDP2 computes in bf16 over float32 master weights; one plain device has no param_dtype (a recipe's is dropped)
    overrides.append(f"strategy.param_dtype={'bfloat16' if args.strategy == 'fsdp' else 'null'}")
    if args.seq_len is not None:
        overrides.append(f"data.seq_len={args.seq_len}")
    if args.micro_batch is not None:
        overrides.append(f"data.micro_batch_size={args.micro_batch}")
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    return overrides + list(args.override)


def with_overrides(base: list[str], extra: list[str]) -> list[str]:
    """`base` with `extra` applied last; an extra key replaces the base's override of the same key (a config group
    such as `strategy=fsdp` may be chosen once only)."""
    keys = {item.split("=", 1)[0] for item in extra}
    return [item for item in base if item.split("=", 1)[0] not in keys] + extra


@dataclass
class RunnerSpec:
    """One column of the comparison: a training loop, and the overrides of its variant of the config."""

    label: str  # as given: `lightning`, `lightning+strategy.float8=tensorwise`
    runner: str
    overrides: list[str]


def parse_runners(text: str) -> list[RunnerSpec]:
    specs = []
    for label in dict.fromkeys(item.strip() for item in text.split(",") if item.strip()):
        runner, *overrides = label.split("+")
        bad = [o for o in overrides if "=" not in o]
        if runner not in RUNNER_FUNCTIONS or bad:
            raise UserError(
                f"--runners {label!r}: a runner is one of {', '.join(RUNNERS)}, optionally followed by "
                "+KEY=VALUE config overrides (e.g. lightning+strategy.float8=tensorwise)."
            )
        specs.append(RunnerSpec(label, runner, overrides))
    if not specs:
        raise UserError(f"--runners {text!r}: name at least one of {', '.join(RUNNERS)}.")
    return specs


def load_configs(args: argparse.Namespace, device: torch.device, specs: list[RunnerSpec]) -> dict[str, TrainConfig]:
    """Each runner's training config (all composed before anything is built: a bad override fails at once)."""
    base = hydra_overrides(args, device)
    return {spec.label: load_train_config(with_overrides(base, spec.overrides)) for spec in specs}


def timing(args: argparse.Namespace) -> tuple[int, int]:
    """(rounds, timed steps per runner): enough rounds of round_steps - 1 timed steps to time at least --steps."""
    if args.warmup < 1 or args.steps < 1:
        raise UserError("--warmup and --steps must be at least 1 (the first step includes one-time setup).")
    if args.round_steps < 2:
        raise UserError("--round-steps must be at least 2: the first step of each turn is not timed.")
    rounds = math.ceil(args.steps / (args.round_steps - 1))
    return rounds, rounds * (args.round_steps - 1)


# -- the benchmark ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    specs = parse_runners(args.runners)
    labels = [spec.label for spec in specs]
    if args.reference is not None and args.reference not in labels:
        raise UserError(f"--reference {args.reference!r} is not among --runners ({', '.join(labels)}).")
    rounds, timed_steps = timing(args)
    device = resolve_device(args.device)
    cfgs = load_configs(args, device, specs)
    overrides = hydra_overrides(args, device)
    base_cfg = load_train_config(overrides)
    if base_cfg.trainer.matmul_precision:
        torch.set_float32_matmul_precision(base_cfg.trainer.matmul_precision)
    turns = Turns(device, args.warmup, rounds, args.round_steps, args.schedule)
    name = device_name(device)
    config = {
        "model": args.model,
        "micro_batch": base_cfg.data.micro_batch_size,
        "seq_len": base_cfg.data.seq_len,
        "steps": timed_steps,
        "warmup": args.warmup,
        "rounds": rounds,
        "round_steps": args.round_steps,
        "schedule": args.schedule,
        "precision": base_cfg.trainer.precision,
        "strategy": base_cfg.strategy.name,
        "param_dtype": base_cfg.strategy.param_dtype,
        "activation_checkpointing": base_cfg.strategy.activation_checkpointing,
        "compile": base_cfg.strategy.compile,
        "float8": base_cfg.strategy.float8,
        "optimizer": base_cfg.optim.name,
        "device": device.type,
        "seed": base_cfg.run.seed,
        "runners": labels,
        "runner_overrides": {spec.label: spec.overrides for spec in specs if spec.overrides},
        "hydra_overrides": overrides,
        "train_config": asdict(base_cfg),
    }
    dtype = compute_dtype(base_cfg)
    peak = peak_flops(name, dtype) if device.type == "cuda" else None
    results: dict[str, Any] = {
        "flops_per_token": flops_per_token(base_cfg.model, base_cfg.data.seq_len),
        "flops_formula": "6*N + 12*L*d*T",
        "non_embedding_parameters": non_embedding_parameters(base_cfg.model),
        "n_layer": base_cfg.model.n_layer,
        "d_attention": base_cfg.model.n_head * base_cfg.model.head_dim,
        "tokens_per_step": base_cfg.data.micro_batch_size * base_cfg.data.seq_len,
        "compute_dtype": dtype,
        "peak_flops": peak,
        "peak_table_entry": peak_entry(name) if device.type == "cuda" else None,
        "runners": {},
    }
    skipped = {
        spec.label: why
        for spec in specs
        if spec.runner in UNAVAILABLE and (why := UNAVAILABLE[spec.runner](cfgs[spec.label].model))
    }
    loops = {s.label: _loop(s, cfgs[s.label], args.schedule) for s in specs if s.label not in skipped}
    sharded = any(cfg.strategy.name == "fsdp" for cfg in cfgs.values())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*have no `val_dataloader`.*")  # nothing to validate here
        with runners.single_process_group(device) if sharded else contextlib.nullcontext():
            turns.run(loops)
    for spec in specs:
        if spec.label in skipped:
            results["runners"][spec.label] = {"status": "skipped", "note": skipped[spec.label]}
        else:
            results["runners"][spec.label] = _summary(turns.logs[spec.label], turns, cfgs[spec.label], peak)
    _compare(results, args.reference, labels)
    print_table(config, results, name)
    return {"config": config, "results": results}


def _loop(spec: RunnerSpec, cfg: TrainConfig, schedule: str) -> Callable[[RunnerClock], None]:
    def loop(clock: RunnerClock) -> None:
        torch.manual_seed(cfg.run.seed)
        try:
            RUNNER_FUNCTIONS[spec.runner](cfg, clock)
        finally:
            if schedule == "sequential" and cfg.strategy.compile:  # the next runner compiles afresh, as alone
                torch._dynamo.reset()
            gc.collect()

    return loop


def _summary(log: TurnLog, turns: Turns, cfg: TrainConfig, peak: float | None) -> dict[str, Any]:
    if log.error is not None:
        return {"status": "failed", "note": log.error.strip().splitlines()[-1], "traceback": log.error}
    tokens_per_turn = cfg.data.micro_batch_size * cfg.data.seq_len * (turns.round_steps - 1)
    per_round = [tokens_per_turn / s for s in log.seconds]
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_s = statistics.median(per_round)
    seconds = sum(log.seconds)
    return {
        "status": "ok",
        "steps": len(log.seconds) * (turns.round_steps - 1),
        "tokens": tokens_per_turn * len(log.seconds),
        "seconds": seconds,
        "seconds_per_step": seconds / (len(log.seconds) * (turns.round_steps - 1)),
        "round_seconds": log.seconds,
        "round_tokens_per_s": per_round,
        "tokens_per_s": tokens_per_s,  # the median round's
        "mean_tokens_per_s": tokens_per_turn * len(log.seconds) / seconds,
        "flops_per_token": per_token,
        "achieved_tflops": per_token * tokens_per_s / 1e12,
        "mfu": per_token * tokens_per_s / peak if peak else None,
        "first_loss": log.losses[0],
        "loss": log.losses[-1],
        "losses": log.losses,
        "loss_finite": all(math.isfinite(x) for x in log.losses),
        **log.peak,
    }


def _compare(results: dict[str, Any], reference: str | None, labels: list[str]) -> None:
    """Each runner's speed over the reference's, round by round; Lightning's overhead over the bare loop."""
    ok = {label: r for label, r in results["runners"].items() if r["status"] == "ok"}
    if reference is None:
        reference = "bare" if "bare" in ok else next(iter(ok), labels[0])
    results["reference"] = reference
    if reference in ok:
        for r in ok.values():
            r["vs_reference"] = ratio_stats(ok[reference]["round_tokens_per_s"], r["round_tokens_per_s"])
    if "lightning" in ok and "bare" in ok:
        stats = ratio_stats(ok["lightning"]["round_tokens_per_s"], ok["bare"]["round_tokens_per_s"])
        # bare / lightning speed - 1 per round: the share of Lightning's step time the bare loop does not need
        results["lightning_overhead_pct"] = 100 * (stats["median"] - 1)
        results["lightning_overhead_pct_range"] = [100 * (stats["min"] - 1), 100 * (stats["max"] - 1)]
    else:
        results["lightning_overhead_pct"] = results["lightning_overhead_pct_range"] = None


def print_table(config: dict[str, Any], results: dict[str, Any], name: str) -> None:
    overhead = results["lightning_overhead_pct"]
    peak = results["peak_flops"]
    reference = results["reference"]
    table = Table(
        title=f"{config['model']}: micro-batch {config['micro_batch']} x {config['seq_len']} tokens, "
        f"{config['precision']}, strategy {config['strategy']}"
        + (f" (param_dtype {config['param_dtype']})" if config["param_dtype"] else "")
        + (f", AC {config['activation_checkpointing']}" if config["activation_checkpointing"] != "none" else "")
        + (", compiled" if config["compile"] else "")
        + (f", float8 {config['float8']}" if config["float8"] != "none" else "")
        + f"\n{name}; {config['schedule']}: {config['rounds']} rounds of {config['round_steps']} steps per runner "
        f"({config['round_steps'] - 1} timed), after {config['warmup']} warmup",
        caption=f"FLOPs/token = 6*N + 12*L*d*T = {results['flops_per_token']:,} "
        f"(N = {results['non_embedding_parameters']:,} without the input embedding); "
        + (f"peak {peak / 1e12:,.0f} TFLOP/s {results['compute_dtype']}" if peak else "no peak known here: MFU n/a")
        + (
            f"; Lightning overhead over the bare loop: {overhead:+.1f}% (rounds: "
            f"{results['lightning_overhead_pct_range'][0]:+.1f}% to {results['lightning_overhead_pct_range'][1]:+.1f}%)"
            if overhead is not None
            else ""
        ),
    )
    columns = (
        "runner",
        "tokens/s",
        f"vs {reference}",
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
    for label, r in results["runners"].items():
        if r["status"] != "ok":
            table.add_row(label, *["-"] * (len(columns) - 2), f"{r['status']}: {r['note']}", style="dim")
            continue
        ratio = r.get("vs_reference")
        table.add_row(
            label,
            f"{r['tokens_per_s']:,.0f}",
            f"{ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}]" if ratio else "-",
            f"{r['achieved_tflops']:,.3g}",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
            f"{r['peak_memory_gib']:,.2f}",
            f"{r['seconds_per_step']:.3f}",
            f"{r['first_loss']:.4f}",
            f"{r['loss']:.4f}",
            "",
        )
    Console(width=max(120, Console().width)).print(table)
