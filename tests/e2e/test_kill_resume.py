"""A run killed with SIGKILL mid-training resumes with resume=auto and repeats the uninterrupted run exactly."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_overrides, train_losses

from lit_open.train.events import read_events

STEPS, EVERY = 40, 10


def command(data, run_dir):
    overrides = tiny_overrides(
        data,
        run_dir,
        **{
            "trainer.max_steps": STEPS,
            "checkpoint.every_n_steps": EVERY,
            "trainer.val_check_interval": EVERY,
            "model.d_model": 128,
            "data.seq_len": 64,
            "data.global_batch_size": 16,  # slow enough to kill mid-run
        },
    )
    return [sys.executable, "-m", "lit_open.cli", "train", *overrides]


@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_the_uninterrupted_run(tiny_data, tmp_path):
    reference = subprocess.run(command(tiny_data, tmp_path / "reference"), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "killed"
    process = subprocess.Popen(command(tiny_data, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (pointer.exists() and pointer.read_text().strip() == "step-00000010.ckpt"):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "step-00000040.ckpt" not in checkpoints  # it really died mid-run
    killed_at = next(e["step"] for e in reversed(read_events(run_dir / "events.jsonl")) if e["event"] == "checkpoint")

    resumed = subprocess.run(command(tiny_data, run_dir), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{killed_at:08d}.ckpt'}" in resumed.stderr
    expected, got = train_losses(tmp_path / "reference"), train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(killed_at + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    resume_events = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert [e["step"] for e in resume_events] == [killed_at]
