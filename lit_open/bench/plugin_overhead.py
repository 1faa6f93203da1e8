"""What a plugin costs: the share of training time spent inside its hooks, and an A/B of whole runs.

Each repeat trains the same run twice through `lit_open.train.run`, without and with the plugin, alternating so
that a change in the machine's load hits both alike. In the run with the plugin, every method its class defines
(Lightning hooks, plugin hooks, and its own helpers such as forward hooks) is timed, counting only the outermost
call. The in-hook share is the steadier figure on a shared machine; the A/B ratio of training seconds includes
what the hooks cannot see (e.g. kernels launched asynchronously on a GPU, synchronized later) and is the one to
quote from a GPU. Plugins' targets are stated against the in-hook share: monitor's is at most 2% at its default
interval.

    python -m lit_open.bench plugin-overhead --plugin monitor
    python -m lit_open.bench plugin-overhead --plugin monitor --device cuda --seq-len 4096 --model olmo2_1b
"""

from __future__ import annotations

import argparse
import functools
import inspect
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lit_open.train.runner as train_module
from lit_open.bench.measure import run_settings
from lit_open.compose import load_train_config
from lit_open.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", default="monitor", help="the plugin to measure, at its default options")
    parser.add_argument("--model", default="quickstart", help="model preset (default: quickstart)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per step (one micro-batch)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2, help="alternating pairs of runs; the best of each is kept")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier timings on a shared machine)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="extra key=value overrides (e.g. data.sources=... for other data; plugins.NAME.x=... only for the run "
        "with the plugin)",
    )


def timed_plugin(plugin: Any, clock: dict[str, float]) -> None:
    """Wrap every method the plugin's class defines: `clock` sums the time spent inside them (outermost calls)."""
    clock.update(seconds=0.0, calls=0, depth=0)

    def wrap(method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            clock["depth"] += 1
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                clock["depth"] -= 1
                if clock["depth"] == 0:
                    clock["seconds"] += time.perf_counter() - start
                    clock["calls"] += 1

        return wrapper

    for name, member in vars(type(plugin)).items():
        if inspect.isfunction(member) and not name.startswith("__") and name not in ("state_dict", "load_state_dict"):
            setattr(plugin, name, wrap(getattr(plugin, name)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu.")
    settings = [
        f"model={args.model}",
        *run_settings(args.seq_len, args.micro_batch, args.steps, args.device, every_n_steps=args.steps + 1),
        *(o for o in args.overrides if not o.startswith("plugins.")),
    ]
    plugin_options = [o for o in args.overrides if o.startswith("plugins.")]  # only for the run with the plugin
    real_build = train_module.build_plugins
    clock: dict[str, float] = {}

    def build_and_time(cfg):
        plugins = real_build(cfg)
        for plugin in plugins:
            if plugin.name == args.plugin:
                timed_plugin(plugin, clock)
        if cfg.get(args.plugin) and not clock:
            raise UserError(f"--plugin {args.plugin}: no such plugin (`lit-open list plugins`).")
        return plugins

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    train_module.build_plugins = build_and_time
    plain, with_plugin, shares, calls = [], [], [], 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                for selected, times in (
                    (["plugins=[]"], plain),
                    ([f"plugins=[{args.plugin}]", *plugin_options], with_plugin),
                ):
                    run_dir = Path(tmp) / f"{len(plain) + len(with_plugin)}"
                    clock.clear()
                    cfg = load_train_config([*settings, *selected, f"run.dir={run_dir}"])
                    summary = train_module.run(cfg)
                    times.append(summary["train_seconds"])
                    if clock:
                        shares.append(clock["seconds"] / summary["train_seconds"])
                        calls = int(clock["calls"])
    finally:
        train_module.build_plugins = real_build
        torch.set_num_threads(threads)
    results = {
        "in_hook_share": min(shares),
        "in_hook_shares": shares,
        "hook_calls": calls,
        "train_seconds_without": min(plain),
        "train_seconds_with": min(with_plugin),
        "ab_time_ratio": min(with_plugin) / min(plain),
    }
    print(
        f"{args.plugin}: {100 * results['in_hook_share']:.2f}% of the training time inside its hooks "
        f"({', '.join(f'{100 * s:.2f}%' for s in shares)}; {calls} calls per run); whole runs of {args.steps} "
        f"steps: {results['train_seconds_with']:.2f} s with it, {results['train_seconds_without']:.2f} s without "
        f"(ratio {results['ab_time_ratio']:.3f})"
    )
    config = {k: v for k, v in vars(args).items() if k != "json"}
    return {"config": config, "results": results}
