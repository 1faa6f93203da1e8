"""`python -m lit_open.bench [throughput | attention | loss-memory | plugin-overhead | data | checkpoint | memory |
gpu-suite] [options]`.

One benchmark, to JSON. With no subcommand (or options only) the throughput benchmark runs. Every run writes
`--json PATH` (default `bench-<subcommand>.json` in the working directory): the date, the device, the torch /
lightning / lit-open versions, the command line, the benchmark's config and its results.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from lit_open.errors import UserError
from lit_open.provenance import git_commit, lit_open_version

PROG = "python -m lit_open.bench"
DEFAULT = "throughput"
# subcommand -> (module with add_arguments(parser) and run(args) -> dict, help)
SUBCOMMANDS = {
    "throughput": ("lit_open.bench.throughput", "tokens/s, TFLOP/s, MFU and peak memory: Lightning vs a bare loop"),
    "loss-memory": ("lit_open.bench.loss_memory", "peak memory of the full-logits loss vs the chunked lm_loss"),
    "plugin-overhead": ("lit_open.bench.plugin_overhead", "share of training time inside a plugin's hooks, and an A/B"),
    "data": ("lit_open.bench.data_loading", "samples/s and tokens/s per DataLoader worker of each data format, memory"),
    "checkpoint": ("lit_open.bench.checkpointing", "seconds of training blocked per checkpoint: synchronous vs async"),
    "memory": ("lit_open.bench.memory", "per-GPU memory of training a preset, estimated; --measure checks it on CPU"),
    "attention": ("lit_open.bench.attention", "attention kernels with document masks: parity and speed"),
    "gpu-suite": ("lit_open.bench.gpu_suite", "every GPU path checked and timed in one command, within a budget"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only `command`'s options are added (importing a benchmark module can take seconds)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        subparser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(subparser)
            subparser.add_argument(
                "--json", type=Path, default=None, help=f"where to write the results (default: bench-{name}.json)"
            )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = [DEFAULT, *argv]
    command = argv[0] if argv[0] in SUBCOMMANDS else None
    args = build_parser(command).parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    try:
        result = importlib.import_module(SUBCOMMANDS[args.command][0]).run(args)
    except UserError as err:
        if os.environ.get("LIT_OPEN_DEBUG") == "1":
            raise
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    report = envelope(args.command, argv, result)
    path = args.json or Path(f"bench-{args.command}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return report


def envelope(command: str, argv: list[str], result: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: provenance (date, device, versions, command line) + the benchmark's config and results."""
    result = dict(result)
    config = result.pop("config", {})
    results = result.pop("results", result)
    return {
        "benchmark": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"{PROG} {shlex.join(argv)}",
        "device": describe_device(config.get("device", "cpu")),
        "versions": versions(),
        "host": platform.node(),
        "config": config,
        "results": results,
    }


def describe_device(device_type: str) -> dict[str, Any]:
    # torch and the benchmark modules are imported once a benchmark runs: `--help` and option errors are instant
    import torch

    if device_type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {
            "type": "cuda",
            "name": props.name,
            "memory_gib": props.total_memory / 2**30,
            "capability": list(torch.cuda.get_device_capability()),
            "count": torch.cuda.device_count(),
        }
    from lit_open.bench.measure import cpu_name

    return {"type": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def versions() -> dict[str, Any]:
    import torch  # as in describe_device

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lit_open": lit_open_version(),
        "git_commit": git_commit(),
    }
    for optional in ("lightning", "torchao", "litgpt"):  # installed metadata: importing them would cost seconds
        try:
            found[optional] = metadata.version(optional)
        except metadata.PackageNotFoundError:
            found[optional] = None
    return found


if __name__ == "__main__":
    main()
