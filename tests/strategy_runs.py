"""The quickstart model trained by `lit-open train` under every strategy, once per test session.

Three test files compare these runs with the single-process one: the losses and checkpoints
(tests/distributed/test_strategies.py), the monitor plugin's statistics (tests/plugins/test_monitor.py) and the
in-loop lm-eval scores (tests/distributed/test_lm_eval_ranks.py). Training each setup once for all three, with both
plugins on, saves about ten multi-process runs; the `strategy_runs` fixture in conftest.py builds them under a
lock shared by the test workers.
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import run_cli, tiny_overrides
from lm_eval_tasks import write_local_tasks

STEPS = 5
MONITOR_EVERY = 2
DISTRIBUTED_TESTS = Path(__file__).resolve().parent / "distributed"  # batch_log.py, a test plugin

SETUPS: dict[str, dict[str, object]] = {
    "single": {},
    "ddp2": {"strategy": "ddp", "trainer.devices": 2},
    "fsdp2": {"strategy": "fsdp", "trainer.devices": 2},
    "fsdp1": {"strategy": "fsdp", "trainer.devices": 1},
    "tp2": {"strategy": "tp", "trainer.devices": 2},
    "fsdp_tp4": {
        "strategy": "fsdp_tp",
        "strategy.tensor_parallel_size": 2,
        "trainer.devices": 4,
        "data.micro_batch_size": 2,
        "+plugins.batch_log._target_": "batch_log.BatchLog",
    },
    # forward hooks on compiled blocks, which activation checkpointing recomputes in the backward pass; lm-eval's
    # variable-length requests would recompile the blocks for every shape, so this one runs the monitor only
    "fsdp1_compiled_checkpointed": {
        "strategy": "fsdp",
        "strategy.compile": "true",
        "strategy.activation_checkpointing": "full",
        "plugins": "[monitor]",
    },
}


def strategy_overrides(data: Path, run_dir: Path, tasks: Path, **extra: object) -> list[str]:
    """5 steps of 8 x 32 tokens with checkpoints at steps 3 and 5, monitored at steps 2 and 4, lm-eval at the end."""
    settings = {
        "trainer.max_steps": STEPS,
        "trainer.val_check_interval": 0,
        # odd: with 2 data-parallel ranks one holds fewer held-out micro-batches and runs an unscored repeat, so
        # that sharded forward passes stay in step; the held-out losses must still equal one process's
        "data.val_samples": 9,
        "checkpoint.keep_last": 0,
        "plugins": "[monitor,lm_eval]",
        "plugins.monitor.every_n_steps": MONITOR_EVERY,
        "plugins.lm_eval.tasks": f"[{tasks}]",
        "plugins.lm_eval.every_n_steps": 0,
        "plugins.lm_eval.at_start": "false",
        **extra,
    }
    if "lm_eval" not in str(settings["plugins"]):
        settings = {k: v for k, v in settings.items() if not k.startswith("plugins.lm_eval.")}
    return ["train", *tiny_overrides(data, run_dir, model="quickstart", **settings)]


def train_strategy(data: Path, run_dir: Path, tasks: Path, **extra: object) -> None:
    """One `lit-open train` as a user types it (Lightning starts the processes); fails with the run's stderr."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(DISTRIBUTED_TESTS), os.environ.get("PYTHONPATH")]))}
    result = run_cli(*strategy_overrides(data, run_dir, tasks, **extra), env=env, timeout=300)
    assert result.returncode == 0, f"{run_dir.name}: {result.stderr[-4000:]}"


def local_tasks(data: Path, root: Path) -> Path:
    """The lm-eval tasks of the runs: 9 documents each (odd, so ranks get unequal work), one generation task."""
    return write_local_tasks(data.parent / "corpus", root / "tasks", docs=9, generation=True)


def build_strategy_runs(data: Path, root: Path) -> None:
    tasks = local_tasks(data, root)
    for name, extra in SETUPS.items():
        train_strategy(data, root / name, tasks, **extra)
