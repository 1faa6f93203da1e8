"""Shared fixtures: an isolated data cache, a small prepared dataset, and the overrides of a tiny run."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

if os.environ.get("PYTEST_XDIST_WORKER"):  # a test worker among two: one thread for torch here and in subprocesses
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402 - after the thread count is set

from lit_open.plugin import Plugin, RunState  # noqa: E402
from lit_open.train.events import EventLog  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Keep tests away from ~/.cache/lit-open: quickstart data is prepared once per test session."""
    cache = tmp_path_factory.mktemp("lit-open-cache")
    os.environ["LIT_OPEN_CACHE"] = str(cache)
    return cache


def made_once(tmp_path_factory, name: str, build) -> Path:
    """The directory `name` that `build(path)` fills once per test session: under xdist the first worker to need
    it builds it while holding a lock, and the others wait for it and read it (tests must not write into it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    path = root / name
    with FileLock(f"{path}.lock"):
        if not (path / ".complete").exists():
            shutil.rmtree(path, ignore_errors=True)  # what a failed attempt left
            path.mkdir(parents=True)
            build(path)
            (path / ".complete").touch()
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """60 standard-library files tokenized with a 512-token BPE: train/ and val/ splits, about 300k tokens."""
    return made_once(tmp_path_factory, "tiny-data", _prepare_tiny_data) / "prepared"


def _prepare_tiny_data(root: Path) -> None:
    from lit_open.config import PrepareConfig
    from lit_open.data.prepare import prepare
    from lit_open.data.readers import stdlib_files

    corpus = root / "corpus"
    corpus.mkdir()
    files = [p for p in stdlib_files()[1] if p.stat().st_size > 4000][:60]
    for i, path in enumerate(files):
        (corpus / f"{i:03d}.py").write_text(path.read_text(errors="replace"))
    prepare(
        PrepareConfig(
            inputs=[str(corpus)], output=str(root / "prepared"), vocab_size=512, val_fraction=0.1, num_workers=1
        )
    )


@pytest.fixture(scope="session")
def strategy_runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """Run directories of the quickstart model trained under each strategy of tests/strategy_runs.py, by name."""
    from strategy_runs import SETUPS, build_strategy_runs  # it imports this module's helpers

    root = made_once(tmp_path_factory, "strategy-runs", lambda path: build_strategy_runs(tiny_data, path))
    return {name: root / name for name in SETUPS}


TINY_MODEL = {
    "model.n_layer": 2,
    "model.d_model": 64,
    "model.n_head": 4,
    "model.n_kv_head": 2,
    "model.d_ff": 128,
    "model.vocab_size": 512,
    "model.max_seq_len": 64,
}


# transformers.LlamaConfig arguments of a Hugging Face checkpoint with TINY_MODEL's architecture
TINY_LLAMA = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def tiny_overrides(data: Path, run_dir: Path, model: str = "tiny", **extra: object) -> list[str]:
    """Overrides for a run on `tiny_data` that trains a step in well under a second.

    model="tiny": a 2-layer model; otherwise a preset name (e.g. "quickstart", trained on the CPU).
    """
    overrides = {
        "run.dir": str(run_dir),
        "plugins": "[]",  # none of the recipe's (quickstart's in-loop benchmark): a test selects what it tests
        **(TINY_MODEL if model == "tiny" else {"model": model, "trainer.accelerator": "cpu"}),
        "data.sources": f"[{{path:{data}/train}}]",
        "data.val_sources": f"[{{path:{data}/val}}]",
        "data.tokenizer": str(data / "tokenizer.json"),
        "data.prepare": "null",
        "data.seq_len": 32,
        "data.micro_batch_size": 4,
        "data.global_batch_size": 8,
        "data.num_workers": 0,
        "data.val_samples": 16,
        "trainer.max_steps": 6,
        "trainer.val_check_interval": 3,
        "checkpoint.every_n_steps": 3,
        "schedule.warmup_steps": 2,
        "optim.lr": 1e-2,
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now (for a test's process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bind_run(plugin: Plugin, run_dir: Path | None = None, config=None, **fields) -> RunState:
    """Give a plugin driven outside a Trainer the RunState LitLM would bind (events in run_dir/events.jsonl)."""
    events = EventLog(run_dir / "events.jsonl" if run_dir is not None else None)
    run = RunState(config=config, run_dir=run_dir, events=events, tokens_per_batch=fields.pop("tokens_per_batch", 0))
    for key, value in fields.items():
        setattr(run, key, value)
    plugin.bind(run)
    return run


class Crash(Exception):
    pass


class CrashAfterStep(Plugin):
    """Raises `Crash` once training has completed update `step`: a session that dies mid-run."""

    name = "crash"

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"injected after step {self.step}")


def run_gloo(fn, *args, nprocs: int = 2) -> None:
    """Run `fn(*args)` in `nprocs` spawned processes joined in one gloo group; a failure in any fails the test."""
    import torch.multiprocessing as mp

    args = (free_port(), nprocs, fn, args)
    mp.start_processes(_gloo_process, args=args, nprocs=nprocs, join=True, start_method="spawn")


def _gloo_process(rank: int, port: int, world_size: int, fn, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fn(*args)
    dist.destroy_process_group()
    # gloo's threads can abort a finished interpreter at exit ("terminate called without an active exception"),
    # which would fail a test whose work passed: leave at once instead
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's logs/metrics.csv."""
    with open(run_dir / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_losses(run_dir: Path) -> dict[int, float]:
    """train/loss by optimizer step."""
    return {int(r["step"]): float(r["train/loss"]) for r in read_metrics(run_dir) if r["train/loss"]}


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """`lit-open ARGS` as a user types it, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "lit_open.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def cli_here(*args: str) -> subprocess.CompletedProcess:
    """`lit-open ARGS` through the console script's own entry point (`lit_open.cli.main`), in this process: for
    commands that end before training starts (help, listing, user errors), without a new interpreter's imports."""
    from lit_open.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return subprocess.CompletedProcess(["lit-open", *args], code, out.getvalue(), err.getvalue())


# The files that take longest (about 30 s to 150 s each on 2 cores), started first so that the two test workers
# finish together instead of one of them starting the quickstart last. The files that read the session's
# strategy runs come after the one that builds them (second: the second worker's first file), so that the other
# worker reaches them once the runs exist instead of waiting for them.
LONGEST_FIRST = (
    "e2e/test_quickstart.py",
    "distributed/test_strategies.py",
    "e2e/test_cli.py",
    "e2e/test_async_checkpoints.py",
    "distributed/test_context_parallel.py",
    "plugins/test_spike_rollback.py",
    "e2e/test_finetune.py",
    "unit/test_prepare.py",
    "e2e/test_eval_tasks.py",
    "distributed/test_lm_eval_ranks.py",
    "plugins/test_monitor.py",
    "unit/test_plugin_api.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """The longest files first; `gpu` tests need CUDA: skip them on machines without it (CI has no GPU)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.fspath).relative_to(REPO / "tests").as_posix(), len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
