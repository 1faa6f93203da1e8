"""A spike rollback on 2 FSDP processes (gloo) happens on both ranks, exactly as on one process.

Each rank holds half of every parameter and of the optimizer state, so the per-step losses after the rollback can only
equal the single-process run's if both ranks restored their shards, reset the step counter and jumped ahead in the
data order together.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, tiny_overrides, train_losses

from lit_open.train.events import read_events

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent

SETTINGS = {
    # 4 x 256 wide (the quickstart model of earlier versions): at this LR its training is not chaotic, so the
    # float rounding of two processes' reductions stays at rounding level for all 36 steps
    "model.d_model": 256,
    "model.d_ff": 704,
    "trainer.max_steps": 36,
    "trainer.val_check_interval": 0,
    "checkpoint.every_n_steps": 100,
    "optim.lr": 3e-3,
    "plugins": "[chaos,spike_rollback]",
    "plugins.chaos.spike_steps": "[24,25]",
    "plugins.chaos.spike_lr_multiplier": 30,
    "plugins.spike_rollback.window": 8,
    "plugins.spike_rollback.patience": 4,
    "plugins.spike_rollback.rewind": 1,
    "plugins.spike_rollback.skip_after": 3,
    "plugins.spike_rollback.snapshot_every": 5,
    "+plugins.batch_log._target_": "batch_log.BatchLog",
}


def train(data: Path, run_dir: Path, **extra: object) -> None:
    args = tiny_overrides(data, run_dir, model="quickstart", **SETTINGS, **extra)
    result = run_cli("train", *args, env={"PYTHONPATH": str(HERE)}, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_processes_roll_back_together_like_one(tiny_data, tmp_path):
    single, fsdp = tmp_path / "single", tmp_path / "fsdp2"
    train(tiny_data, single)
    train(tiny_data, fsdp, strategy="fsdp", **{"trainer.devices": 2})

    def rollbacks(run_dir):
        fields = ("from_step", "to_step", "undone_data_steps", "skipped_data_steps")
        return [{k: e[k] for k in fields} for e in read_events(run_dir / "events.jsonl") if e["event"] == "rollback"]

    expected = [{"from_step": 28, "to_step": 20, "undone_data_steps": [20, 29], "skipped_data_steps": [29, 32]}]
    assert rollbacks(single) == expected and rollbacks(fsdp) == expected

    reference, losses = train_losses(single), train_losses(fsdp)
    assert sorted(losses) == sorted(reference) == list(range(1, 37))
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-4), (step, loss, reference[step])

    # both ranks were handed the same micro-batches, in the same order: the jump happened on each of them
    logs = [[json.loads(line) for line in (fsdp / f"batches-rank{r}.jsonl").open()] for r in (0, 1)]
    assert [(b["data_step"], b["micro"]) for b in logs[0]] == [(b["data_step"], b["micro"]) for b in logs[1]]
    trained = {b["data_step"] for b in logs[0]}
    assert not trained & {30, 31} and {28, 32, 47} <= trained  # updates 21-36, after the rollback: data steps 32-47
