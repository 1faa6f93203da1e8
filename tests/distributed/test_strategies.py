"""Every strategy on several CPU processes (gloo) trains the quickstart model exactly like one process.

Each run is `lit-open train` as a user types it; Lightning launches the processes. The data order is defined
globally and split by data-parallel rank, and every parameter is drawn from its own seeded generator before it is
sharded, so the per-step losses must agree with the single-process run to float rounding (1e-4 relative).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import read_metrics, run_cli, tiny_overrides, train_losses

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
STEPS = 5


def quickstart_overrides(data: Path, run_dir: Path, **extra: object) -> list[str]:
    """The quickstart model on the small test corpus: 5 steps of 8 x 32 tokens, checkpoints at steps 3 and 5."""
    settings = {"trainer.max_steps": STEPS, "trainer.val_check_interval": 0, "checkpoint.keep_last": 0, **extra}
    return ["train", *tiny_overrides(data, run_dir, model="quickstart", **settings)]


def train(data: Path, run_dir: Path, **extra: object) -> dict[int, float]:
    env = {"PYTHONPATH": str(HERE)}  # for the batch_log test plugin
    result = run_cli(*quickstart_overrides(data, run_dir, **extra), env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return train_losses(run_dir)


def assert_same_losses(losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference)
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-4), (step, loss, reference[step])


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """Run directories of the single-process reference and of each multi-process strategy, trained once."""
    root = tmp_path_factory.mktemp("strategies")
    setups = {
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
    }
    for name, extra in setups.items():
        train(tiny_data, root / name, **extra)
    return {name: root / name for name in setups}


@pytest.mark.parametrize("name", ["ddp2", "fsdp2", "fsdp1", "tp2", "fsdp_tp4"])
def test_strategy_matches_one_process(runs, name):
    reference = train_losses(runs["single"])
    assert len(reference) == STEPS and reference[STEPS] < reference[1] - 0.5  # it learns
    assert_same_losses(train_losses(runs[name]), reference)


def test_sharded_checkpoints_are_directories_of_shards(runs):
    step = runs["fsdp2"] / "checkpoints" / "step-00000005.ckpt"
    assert step.is_dir()
    assert sorted(p.name for p in step.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert (runs["fsdp2"] / "checkpoints" / "latest").read_text().strip() == step.name


@pytest.mark.parametrize(("saved_with", "resumed_with"), [("fsdp2", 1), ("fsdp1", 2)])
def test_checkpoint_resumes_with_another_process_count(runs, tiny_data, tmp_path, saved_with, resumed_with):
    """Resume from the step-3 checkpoint of one process count with the other; steps 4-5 repeat the original."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs[saved_with], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000005.ckpt")
    (run_dir / "checkpoints" / "latest").write_text("step-00000003.ckpt\n")
    losses = train(tiny_data, run_dir, strategy="fsdp", **{"trainer.devices": resumed_with})
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" and e["step"] == 3 for e in events)
    assert_same_losses(losses, train_losses(runs["single"]))


def test_tensor_parallel_peers_share_batches_and_data_parallel_ranks_split_them(runs):
    rows = []
    for path in sorted(runs["fsdp_tp4"].glob("batches-rank*.jsonl")):
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
        for path in sorted((runs["single"] / "data_sequence").glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    for entry in logged:
        step = entry["data_step"]
        union = {tuple(s) for dp in range(2) for micro in range(2) for s in by_position[(step, micro, dp)][0]}
        assert union == {tuple(s) for s in entry["samples"]}


def test_sharded_checkpoint_evaluates_on_one_process_and_refuses_ddp(runs, tiny_data, tmp_path):
    step5 = runs["fsdp2"] / "checkpoints" / "step-00000005.ckpt"
    result = run_cli("eval", f"checkpoint={step5}")
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [float(r["val/loss"]) for r in read_metrics(runs["fsdp2"]) if r["val/loss"] and r["step"] == "5"]
    assert f"held-out loss {logged[0]:.4f}" in result.stdout + result.stderr

    run_dir = tmp_path / "ddp"
    shutil.copytree(runs["fsdp2"], run_dir)
    result = run_cli(*quickstart_overrides(tiny_data, run_dir, strategy="ddp", **{"trainer.max_steps": 6}))
    assert result.returncode == 2
    assert "is a sharded checkpoint" in result.stderr and "strategy=fsdp" in result.stderr
