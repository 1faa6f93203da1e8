"""Every strategy on several CPU processes (gloo) trains the quickstart model exactly like one process.

Each run is `lit-open train` as a user types it, trained once per session (tests/strategy_runs.py); Lightning
launches the processes. The data order is defined
globally and split by data-parallel rank, and every parameter is drawn from its own seeded generator before it is
sharded, so the per-step losses must agree with the single-process run to float rounding (1e-4 relative).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict

import pytest
from conftest import read_metrics, run_cli, train_losses
from strategy_runs import STEPS, local_tasks, strategy_overrides, train_strategy

pytestmark = pytest.mark.slow


def assert_same_losses(losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference)
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-4), (step, loss, reference[step])


@pytest.mark.parametrize("name", ["ddp2", "fsdp2", "fsdp1", "tp2", "fsdp_tp4"])
def test_strategy_matches_one_process(strategy_runs, name):
    reference = train_losses(strategy_runs["single"])
    assert len(reference) == STEPS and reference[STEPS] < reference[1] - 0.5  # it learns
    assert_same_losses(train_losses(strategy_runs[name]), reference)
    assert_same_losses(held_out_losses(strategy_runs[name]), held_out_losses(strategy_runs["single"]))


def held_out_losses(run_dir) -> dict[tuple[int, str], float]:
    """Every held-out loss logged (the aggregate and each source's), by step and key."""
    rows = read_metrics(run_dir)
    return {(int(r["step"]), k): float(v) for r in rows for k, v in r.items() if k.startswith("val/") and v}


def test_sharded_checkpoints_are_directories_of_shards(strategy_runs):
    step = strategy_runs["fsdp2"] / "checkpoints" / "step-00000005.ckpt"
    assert step.is_dir()
    assert sorted(p.name for p in step.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert (strategy_runs["fsdp2"] / "checkpoints" / "latest").read_text().strip() == step.name


@pytest.mark.parametrize(("saved_with", "resumed_with"), [("fsdp2", 1), ("fsdp1", 2)])
def test_checkpoint_resumes_with_another_process_count(strategy_runs, tiny_data, tmp_path, saved_with, resumed_with):
    """Resume from the step-3 checkpoint of one process count with the other; steps 4-5 repeat the original."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(strategy_runs[saved_with], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000005.ckpt")
    (run_dir / "checkpoints" / "latest").write_text("step-00000003.ckpt\n")
    tasks = local_tasks(tiny_data, tmp_path)
    train_strategy(tiny_data, run_dir, tasks, strategy="fsdp", **{"trainer.devices": resumed_with})
    losses = train_losses(run_dir)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" and e["step"] == 3 for e in events)
    assert_same_losses(losses, train_losses(strategy_runs["single"]))


def test_tensor_parallel_peers_share_batches_and_data_parallel_ranks_split_them(strategy_runs):
    rows = []
    for path in sorted(strategy_runs["fsdp_tp4"].glob("batches-rank*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["rank"] for r in rows} == {0, 1, 2, 3}
    by_position = defaultdict(dict)  # (data_step, micro, data-parallel rank) -> {tensor-parallel rank: samples}
    for r in rows:
        by_position[(r["data_step"], r["micro"], r["data_parallel_rank"])][r["tensor_parallel_rank"]] = r["samples"]
    for position, peers in by_position.items():
        assert sorted(peers) == [0, 1], position
        assert peers[0] == peers[1], f"tensor-parallel peers got different samples at {position}"
    for step in range(STEPS):
        shares = [{tuple(s) for micro in range(2) for s in by_position[(step, micro, dp)][0]} for dp in range(2)]
        assert not shares[0] & shares[1], f"data-parallel ranks overlap at step {step}"
        assert len(shares[0] | shares[1]) == 8  # the whole global batch
    # and the global batches are the ones the single-process run logged in its data sequence
    logged = [
        json.loads(line)
        for path in sorted((strategy_runs["single"] / "data_sequence").glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    for entry in logged:
        step = entry["data_step"]
        union = {tuple(s) for dp in range(2) for micro in range(2) for s in by_position[(step, micro, dp)][0]}
        assert union == {tuple(s) for s in entry["samples"]}


def test_sharded_checkpoint_evaluates_on_one_process_and_refuses_ddp(strategy_runs, tiny_data, tmp_path):
    step5 = strategy_runs["fsdp2"] / "checkpoints" / "step-00000005.ckpt"
    result = run_cli("eval", f"checkpoint={step5}")
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [float(r["val/loss"]) for r in read_metrics(strategy_runs["fsdp2"]) if r["val/loss"] and r["step"] == "5"]
    assert f"held-out loss {logged[0]:.4f}" in result.stdout + result.stderr

    run_dir = tmp_path / "ddp"
    shutil.copytree(strategy_runs["fsdp2"], run_dir)
    tasks = local_tasks(tiny_data, tmp_path)
    overrides = strategy_overrides(tiny_data, run_dir, tasks, strategy="ddp", **{"trainer.max_steps": 6})
    result = run_cli(*overrides)
    assert result.returncode == 2
    assert "is a sharded checkpoint" in result.stderr and "strategy=fsdp" in result.stderr
