"""`python -m lit_open.bench gpu-suite`: every GPU path checked and timed in one command, within a time budget.

Device time is scarce (a lent GPU for minutes), so the suite is one prepared command: its parts run in the order of
importance, each in its own process (a CUDA error or a hang in one part cannot take the others down) with a
deadline of what is left of the budget; a part that cannot finish in time is stopped and recorded as such, and the
parts after it that no longer fit are skipped. After each part the JSON (`gpu-suite.json`) and the markdown report
(`gpu-suite.md`) are rewritten, so whatever stops the suite, what it measured is on disk. `--dry-run` prints the
plan and checks, without a GPU, that every part's command parses and every training config it will compose does.

The parts (`PARTS`): the environment (what imports: flash-attn, torchao, bitsandbytes, litgpt, OLMo-core); the
`gpu`-marked tests; the throughput of olmo2_1b at 4096 tokens, bf16 and compiled, lit-open under Lightning against
the bare loop, litgpt's and OLMo-core's models (interleaved, `lit_open.bench.turns`); the same with float8; the
attention kernels with document masks; peak memory over micro-batch x activation checkpointing; Amber-7B full
fine-tuning with 8-bit AdamW; FSDP2 on the one GPU against no FSDP. The targets the report checks are
`lit_open.bench.gpu_report.GOALS`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_open.bench import olmo_core, runners, throughput
from lit_open.bench.__main__ import build_parser, envelope
from lit_open.bench.gpu_report import check_goals, markdown
from lit_open.config import TrainConfig
from lit_open.errors import UserError

INTERRUPT_GRACE_S = 10  # a part stopped at its deadline gets this long to write what it has
OLMO2_1B = ["--model", "olmo2_1b", "--seq-len", "4096", "--micro-batch", "4", "--precision", "bf16-mixed"]
MEMORY_GRID = [(mb, ac) for mb in (4, 8, 16) for ac in ("none", "selective", "full")]
OPTIONAL_PACKAGES = ("flash_attn", "torchao", "bitsandbytes", "litgpt", "olmo_core", "lm_eval", "transformers")


@dataclass
class Part:
    """One step of the suite: a benchmark subcommand (or the tests), its budget, and what it needs to run."""

    name: str
    title: str
    argv: list[str]  # after `python -m lit_open.bench` (or `pytest` for the tests)
    cap_s: int  # at most this long, budget permitting (set from the first H200 run: docs/benchmarks.md)
    min_s: int  # not started with less than this left
    needs: tuple[str, ...] = ()  # packages whose absence makes the part meaningless
    kind: str = "bench"


COMPILED_ROUNDS = "--compile --steps 4 --warmup 2 --round-steps 3".split()  # 2 rounds of 2 timed steps
MEMORY_RUNNERS = ",".join(
    f"lightning+data.micro_batch_size={mb}+strategy.activation_checkpointing={ac}" for mb, ac in MEMORY_GRID
)
PARTS = [
    Part("tests", "gpu-marked tests", ["-m", "gpu"], cap_s=120, min_s=30, kind="pytest"),
    Part(
        "throughput",
        "olmo2_1b, 4096 tokens, bf16-mixed, compiled: Lightning vs bare loop (also synchronised) vs litgpt, OLMo-core",
        ["throughput", *OLMO2_1B, *COMPILED_ROUNDS, "--runners", "lightning,bare,bare_sync,litgpt,olmo_core"],
        cap_s=120,
        min_s=90,
    ),
    Part(
        "float8",
        "olmo2_1b, compiled: float8 tensorwise and rowwise vs bf16 (Lightning)",
        [
            "throughput",
            *OLMO2_1B,
            *COMPILED_ROUNDS,
            "--reference",
            "lightning",
            "--runners",
            "lightning,lightning+strategy.float8=tensorwise,lightning+strategy.float8=rowwise",
        ],
        cap_s=140,
        min_s=90,
        needs=("torchao",),
    ),
    Part(
        "attention",
        "attention with document masks: flash-attn varlen, torch varlen, flex, SDPA",
        ["attention"],
        cap_s=40,
        min_s=20,
    ),
    Part(
        "memory",
        "olmo2_1b, 4096 tokens, chunked loss: peak memory at micro-batch 4/8/16 x AC none/selective/full",
        [
            "throughput",
            *OLMO2_1B,
            *"--schedule sequential --steps 1 --warmup 1 --round-steps 2".split(),
            "--runners",
            MEMORY_RUNNERS,
        ],
        cap_s=150,
        min_s=60,
    ),
    Part(
        "amber_7b",
        "amber_7b full fine-tune on one GPU: 8-bit AdamW, full activation checkpointing",
        [
            "throughput",
            *(
                "--model amber_7b --precision bf16-mixed --optimizer adamw8bit --activation-checkpointing full"
                " --runners lightning --schedule sequential --steps 2 --warmup 1 --round-steps 3"
            ).split(),
        ],
        cap_s=90,
        min_s=60,
        needs=("bitsandbytes",),
    ),
    Part(
        "fsdp",
        "olmo2_1b: FSDP2 (bf16 param_dtype) on the one GPU vs no FSDP (bf16-mixed), same batches and losses",
        [
            "throughput",
            *(
                "--model olmo2_1b --seq-len 4096 --micro-batch 2 --precision bf16-mixed --reference "
                "lightning --steps 4 --warmup 1 --round-steps 3"
            ).split(),
            "--runners",
            "lightning,lightning+strategy=fsdp+strategy.param_dtype=bfloat16",
        ],
        cap_s=60,
        min_s=35,
    ),
]
PART_NAMES = tuple(part.name for part in PARTS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget-s", type=float, default=480, help="stop cleanly after this long (default: 480)")
    parser.add_argument("--out", type=Path, default=Path("gpu-suite"), help="gpu-suite.json, .md, .log go here")
    parser.add_argument(
        "--parts", default=",".join(PART_NAMES), help=f"comma-separated, in order, of {', '.join(PART_NAMES)}"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check it; needs no GPU")


def selected_parts(text: str) -> list[Part]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PART_NAMES]
    if unknown or not names:
        raise UserError(f"--parts {text!r}: choose among {', '.join(PART_NAMES)}.")
    return [next(part for part in PARTS if part.name == name) for name in dict.fromkeys(names)]


def gpu_test_files(root: Path) -> list[Path]:
    """The test files that hold `gpu`-marked tests."""
    return sorted(p for p in (root / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def command(part: Part, json_path: Path) -> list[str]:
    if part.kind == "pytest":
        junit = json_path.with_suffix(".xml")
        files = [str(p) for p in gpu_test_files(repo_root())]
        return [
            sys.executable,
            "-m",
            "pytest",
            *part.argv,
            "-o",
            "addopts=",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            "--continue-on-collection-errors",
            f"--junitxml={junit}",
            *files,
        ]
    return [sys.executable, "-m", "lit_open.bench", *part.argv, "--json", str(json_path)]


# -- the plan, checked without a GPU -----------------------------------------------------------------------------


def check_part(part: Part) -> dict[str, Any]:
    """What a dry run checks of one part: its command parses, and every training config it composes does."""
    if part.kind == "pytest":
        files = gpu_test_files(repo_root())
        if not files:
            raise UserError("no test file holds a gpu-marked test")
        return {"test_files": [str(p.relative_to(repo_root())) for p in files]}
    args = build_parser(part.argv[0]).parse_args(part.argv)
    if part.argv[0] != "throughput":
        return {"options": sorted(k for k, v in vars(args).items() if v is not None)}
    specs = throughput.parse_runners(args.runners)
    # the configs for the GPU, composed on any machine: composing does no I/O and needs no device
    cfgs = throughput.load_configs(args, torch.device("cuda"), specs)
    throughput.timing(args)
    return {"runners": {label: describe(cfg) for label, cfg in cfgs.items()}}


def describe(cfg: TrainConfig) -> str:
    """A training config in one line: what a part's runner will train."""
    return (
        f"{cfg.model.name}, micro-batch {cfg.data.micro_batch_size} x {cfg.data.seq_len}, {cfg.trainer.precision}, "
        f"strategy {cfg.strategy.name}, AC {cfg.strategy.activation_checkpointing}, compile {cfg.strategy.compile}, "
        f"float8 {cfg.strategy.float8}, optimizer {cfg.optim.name}"
    )


# -- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Suite:
    out: Path  # gpu-suite.md and gpu-suite.log
    json_path: Path
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    parts: list[dict[str, Any]] = field(default_factory=list)
    packages: dict[str, Any] = field(default_factory=dict)  # optional package -> version, or why it does not import

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


def optional_packages() -> dict[str, Any]:
    """Which optional packages import here, and why not (the device and torch are in the report's envelope)."""
    found: dict[str, Any] = {}
    for name, why in (("litgpt", runners.litgpt_unavailable()), ("olmo_core", olmo_core.olmo_core_unavailable())):
        found[name] = {"ok": True, "version": _version_of(name)} if why is None else {"ok": False, "error": why}
    for name in OPTIONAL_PACKAGES:
        if name in found:
            continue
        try:
            module = importlib.import_module(name)
            found[name] = {"ok": True, "version": getattr(module, "__version__", None) or _version_of(name)}
        except Exception as err:  # missing, or broken against this torch: the parts that need it say so
            found[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
    return found


def _version_of(module_name: str) -> str:
    dists = importlib.metadata.packages_distributions().get(module_name, [])
    return importlib.metadata.version(dists[0]) if dists else "?"


def run_part(part: Part, suite: Suite, scratch: Path, log) -> dict[str, Any]:
    record: dict[str, Any] = {"name": part.name, "title": part.title}
    missing = [n for n in part.needs if not suite.packages.get(n, {}).get("ok")]
    if missing:
        why = "; ".join(f"{n}: {suite.packages[n]['error']}" for n in missing)
        return record | {"status": "skipped", "note": f"needs {', '.join(missing)} ({why})"}
    left = suite.left()
    if left < part.min_s:
        return record | {"status": "skipped", "note": f"budget: {left:.0f} s left, the part needs {part.min_s} s"}
    json_path = scratch / f"{part.name}.json"
    argv = command(part, json_path)
    record["command"] = " ".join(argv[1:])
    deadline = min(part.cap_s, left)
    print(f"\n=== {part.name}: {part.title} (at most {deadline:.0f} s)\n$ {record['command']}", flush=True)
    log.write(f"\n=== {part.name}: {record['command']}\n")
    started = time.monotonic()
    code = stream(argv, deadline, log)
    record["seconds"] = round(time.monotonic() - started, 1)
    record["exit_code"] = code
    if part.kind == "pytest":
        record["result"] = junit_summary(json_path.with_suffix(".xml"))
    elif json_path.is_file():
        record["result"] = json.loads(json_path.read_text())
    if code is None:
        record |= {"status": "stopped", "note": f"stopped at its deadline ({deadline:.0f} s)"}
    elif code != 0:
        record |= {"status": "failed", "note": f"exit code {code} (see gpu-suite.log)"}
    else:
        record["status"] = "ok"
    return record


def stream(argv: list[str], deadline: float, log) -> int | None:
    """Run `argv`, its output to this console and the log; its exit code, or None if it was stopped at `deadline`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )

    def copy() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        sys.stdout.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        return proc.wait(timeout=max(1.0, deadline))
    except subprocess.TimeoutExpired:
        # Ctrl-C first: pytest then writes its report of the tests so far; then the part and all it started
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return None
    finally:
        reader.join(timeout=10)


def junit_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"note": "pytest wrote no report"}
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, (child.get("message") or "")[:400]
        cases.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "message": message,
                "seconds": float(case.get("time") or 0),
            }
        )
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def run(args: argparse.Namespace) -> dict[str, Any]:
    parts = selected_parts(args.parts)
    if args.budget_s <= 0:
        raise UserError(f"--budget-s {args.budget_s}: give a positive number of seconds.")
    if args.json is None:
        args.json = args.out / "gpu-suite.json"
    config = {
        "budget_s": args.budget_s,
        "parts": [p.name for p in parts],
        "out": str(args.out),
        "dry_run": args.dry_run,
        "device": "cuda",
    }
    if args.dry_run:
        return {"config": config, "results": {"plan": dry_run(parts, args.budget_s)}}
    if not torch.cuda.is_available():
        raise UserError("gpu-suite needs a CUDA GPU (torch sees none); use --dry-run to check the plan here.")
    args.out.mkdir(parents=True, exist_ok=True)
    suite = Suite(out=args.out, json_path=args.json, budget_s=args.budget_s)
    suite.packages = optional_packages()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as scratch, (args.out / "gpu-suite.log").open("w") as log:
        for part in parts:
            suite.parts.append(run_part(part, suite, Path(scratch), log))
            write_reports(suite, config)
    return {"config": config, "results": results(suite)}


def dry_run(parts: list[Part], budget_s: float) -> list[dict[str, Any]]:
    """Check every part and print the plan: what runs, in which order, with which deadline."""
    plan, total = [], 0
    for part in parts:
        entry = {
            "name": part.name,
            "title": part.title,
            "cap_s": part.cap_s,
            "min_s": part.min_s,
            "needs": list(part.needs),
            "command": " ".join(command(part, Path(f"{part.name}.json"))[1:]),
        }
        entry["checked"] = check_part(part)
        entry["starts_by_s"] = total
        entry["fits_budget"] = total + part.min_s <= budget_s
        total += part.cap_s
        plan.append(entry)
        print(f"{part.name:<11} {part.cap_s:>4} s  {part.title}\n            $ {entry['command']}")
        for label, what in entry["checked"].get("runners", {}).items():
            print(f"            - {label}: {what}")
    print(f"at most {total} s in all; budget {budget_s:.0f} s: parts that no longer fit are skipped")
    return plan


def results(suite: Suite) -> dict[str, Any]:
    return {
        "packages": suite.packages,
        "parts": suite.parts,
        "goals": check_goals(suite.parts),
        "seconds": round(time.monotonic() - suite.started, 1),
    }


def write_reports(suite: Suite, config: dict[str, Any]) -> None:
    report = envelope("gpu-suite", sys.argv[1:], {"config": config, "results": results(suite)})
    suite.json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    (suite.out / "gpu-suite.md").write_text(markdown(report))
