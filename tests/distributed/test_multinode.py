"""Two 'nodes' on one machine: torchrun's static rendezvous, Lightning's TorchElasticEnvironment, DDP on gloo.

Each node is its own `python -m torch.distributed.run --nnodes=2 --nproc-per-node=1 --node-rank=I ...` launcher,
as on two real machines that share a filesystem (docs/multinode.md). The job must train exactly as one process
does (the global batch of every step is the same samples, only split over two data-parallel ranks), and its
checkpoint must continue on another process count.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, tiny_overrides, train_losses

from lit_open.train.events import read_events

STEPS, TOTAL = 5, 8  # the 2-node run stops at STEPS; it is continued on 1 process to TOTAL
TIMEOUT = 240  # seconds for the whole 2-node job; it takes about 20 s on 2 cores


def node_command(node_rank: int, port: int, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        f"--node-rank={node_rank}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "-m",
        "lit_open.cli",
        "train",
        *overrides,
    ]


def descendants(pid: int) -> list[int]:
    """Process ids below `pid` (Linux /proc): torchrun starts its workers in sessions of their own."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def kill_job(nodes: list[subprocess.Popen], hung: bool) -> None:
    """Kill both launchers and their workers; a hung job's workers first print their stacks (faulthandler)."""
    workers = [w for p in nodes for w in descendants(p.pid)]
    for sig in (signal.SIGABRT, signal.SIGKILL) if hung else (signal.SIGKILL,):
        for pid in workers + [p.pid for p in nodes if p.poll() is None]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGABRT:
            time.sleep(2)
    for p in nodes:
        p.wait()


def run_two_nodes(overrides: list[str], log_dir: Path) -> None:
    """Start both nodes together; fail (killing both) if either fails or the job outlives TIMEOUT."""
    port = free_port()
    logs = [(log_dir / f"node{i}.out").open("w+") for i in range(2)]
    nodes = [
        subprocess.Popen(
            node_command(i, port, overrides),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        for i, log in enumerate(logs)
    ]
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in nodes) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in nodes):
                break  # one node failed: the other would wait for it until a collective times out
            time.sleep(0.2)
    finally:
        codes = [p.poll() for p in nodes]
        if codes != [0, 0]:
            kill_job(nodes, hung=None in codes)
    outputs = []
    for i, log in enumerate(logs):
        log.seek(0)
        outputs.append(f"--- node {i} (exit {codes[i]}; None: killed) ---\n{log.read()[-8000:]}")
        log.close()
    if codes != [0, 0]:
        pytest.fail(f"2-node job failed or timed out after {TIMEOUT} s: exit codes {codes}\n" + "\n".join(outputs))


def run_one_process(overrides: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lit_open.cli", "train", *overrides], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_two_nodes_with_torchrun_train_like_one_process_and_resume_on_one(tiny_data, tmp_path):
    # one LR schedule for all three runs, so that a 5-step run is the start of the 8-step one
    common = {"schedule.total_steps": TOTAL, "trainer.val_check_interval": 0, "checkpoint.every_n_steps": STEPS}
    multi_dir, single_dir = tmp_path / "two-nodes", tmp_path / "one-process"
    multi = tiny_overrides(tiny_data, multi_dir, **common, **{"trainer.max_steps": STEPS}) + [
        "strategy=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
    ]
    run_two_nodes(multi, tmp_path)

    events = read_events(multi_dir / "events.jsonl")
    assert events[0]["event"] == "start" and events[0]["world_size"] == 2, events[0]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [STEPS]
    assert (multi_dir / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:08d}.ckpt"
    two_node_losses = train_losses(multi_dir)

    run_one_process(tiny_overrides(tiny_data, single_dir, **common, **{"trainer.max_steps": TOTAL}))
    expected = train_losses(single_dir)
    assert sorted(expected) == list(range(1, TOTAL + 1))
    assert sorted(two_node_losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert two_node_losses[step] == pytest.approx(expected[step], rel=1e-4), (step, two_node_losses, expected)

    # the 2-process checkpoint continues in 1 process (resume=auto) exactly as the 1-process run went on
    run_one_process(tiny_overrides(tiny_data, multi_dir, **common, **{"trainer.max_steps": TOTAL}))
    resumes = [e for e in read_events(multi_dir / "events.jsonl") if e["event"] == "resume"]
    assert [e["step"] for e in resumes] == [STEPS]
    got = train_losses(multi_dir)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in range(1, TOTAL + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)

    # the same samples in every global batch, however many processes split it
    sequence = sorted(p.name for p in (single_dir / "data_sequence").iterdir())
    assert sequence == sorted(p.name for p in (multi_dir / "data_sequence").iterdir())
    for name in sequence:
        assert (multi_dir / "data_sequence" / name).read_text() == (single_dir / "data_sequence" / name).read_text()
