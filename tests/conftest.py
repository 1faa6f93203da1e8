"""Shared fixtures: an isolated data cache, a small prepared dataset, and the overrides of a tiny run."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lit_open.plugin import Plugin, RunState
from lit_open.train.events import EventLog

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Keep tests away from ~/.cache/lit-open: quickstart data is prepared once per test session."""
    cache = tmp_path_factory.mktemp("lit-open-cache")
    os.environ["LIT_OPEN_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """60 standard-library files tokenized with a 512-token BPE: train/ and val/ splits, about 300k tokens."""
    from lit_open.config import PrepareConfig
    from lit_open.data.prepare import prepare
    from lit_open.data.readers import stdlib_files

    root = tmp_path_factory.mktemp("tiny-data")
    corpus = root / "corpus"
    corpus.mkdir()
    files = [p for p in stdlib_files()[1] if p.stat().st_size > 4000][:60]
    for i, path in enumerate(files):
        (corpus / f"{i:03d}.py").write_text(path.read_text(errors="replace"))
    out = root / "prepared"
    prepare(PrepareConfig(inputs=[str(corpus)], output=str(out), vocab_size=512, val_fraction=0.1, num_workers=1))
    return out


TINY_MODEL = {
    "model.n_layer": 2,
    "model.d_model": 64,
    "model.n_head": 4,
    "model.n_kv_head": 2,
    "model.d_ff": 128,
    "model.vocab_size": 512,
    "model.max_seq_len": 64,
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


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu` tests need CUDA: skip them on machines without it (CI has no GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
