"""Asynchronous checkpoints (checkpoint.asynchronous=true) through the CLI: training goes on while a checkpoint is
written; a checkpoint becomes visible to resume=auto only once complete on every rank; a run killed at any moment,
in the middle of a background write included, continues from the newest complete checkpoint and repeats the
uninterrupted run's losses exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import cli_here, run_cli, tiny_overrides, train_losses

from lit_open.checkpoint.resumable import find_resume_checkpoint, list_checkpoints
from lit_open.errors import EXIT_STOPPED
from lit_open.train.events import read_events

STEPS = 6


def overrides(data, run_dir, **extra):
    settings = {
        "trainer.max_steps": STEPS,
        "trainer.val_check_interval": 0,
        "checkpoint.every_n_steps": 1,
        "checkpoint.keep_last": 2,
        "checkpoint.asynchronous": "true",
    }
    return tiny_overrides(data, run_dir, **{**settings, **extra})


def events(run_dir, name):
    return [e for e in read_events(run_dir / "events.jsonl") if e["event"] == name]


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The uninterrupted run's losses, with synchronous checkpoints."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = cli_here("train", *overrides(tiny_data, run_dir, **{"checkpoint.asynchronous": "false"}))
    assert result.returncode == 0, result.stderr[-3000:]
    return train_losses(run_dir)


def test_background_checkpoints_are_published_in_order_and_a_crash_resumes_exactly(tiny_data, tmp_path, reference):
    run_dir = tmp_path / "run"
    crashed = run_cli("train", *overrides(tiny_data, run_dir), "plugins=[chaos]", "plugins.chaos.crash_steps=[3]")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    # the write of step 3 was started just before the crash: published (complete) or invisible, never half there
    newest = find_resume_checkpoint("auto", run_dir)
    assert newest.name in ("step-00000002.ckpt", "step-00000003.ckpt")
    resumed = cli_here("train", *overrides(tiny_data, run_dir), "plugins=[chaos]", "plugins.chaos.crash_steps=[3]")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(run_dir) == pytest.approx(reference, rel=1e-6, abs=0)
    saved = events(run_dir, "checkpoint")
    assert all(e["asynchronous"] is True and e["seconds"] >= 0 for e in saved)
    assert [e["step"] for e in saved][-3:] == [4, 5, 6]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-00000005.ckpt", "step-00000006.ckpt"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the crash's leftover was removed at the restart


@pytest.mark.parametrize("asynchronous", ["false", "true"])
def test_a_kill_in_the_middle_of_a_checkpoint_write_is_never_visible(tiny_data, tmp_path, reference, asynchronous):
    run_dir = tmp_path / "run"
    args = [*overrides(tiny_data, run_dir, **{"checkpoint.asynchronous": asynchronous, "checkpoint.keep_last": 0})]
    chaos = ["plugins=[chaos]", "plugins.chaos.checkpoint_kill_steps=[4]"]
    killed = run_cli("train", *args, *chaos)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (kill,) = [e for e in events(run_dir, "chaos") if e["kind"] == "checkpoint_kill"]
    assert kill["step"] == 4 and kill["path"].endswith(".tmp-step-00000004.ckpt")
    directory = run_dir / "checkpoints"
    assert (directory / ".tmp-step-00000004.ckpt").exists()  # written, never renamed
    assert [p.name for p in list_checkpoints(directory)][-1] == "step-00000003.ckpt"
    assert (directory / "latest").read_text().strip() == "step-00000003.ckpt"
    resumed = cli_here("train", *args, *chaos)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(run_dir) == pytest.approx(reference, rel=1e-6, abs=0)
    assert len(list_checkpoints(directory)) == STEPS and not list(directory.glob(".tmp-*"))


@pytest.mark.slow
def test_two_processes_killed_at_random_moments_continue_exactly(tiny_data, tmp_path):
    """10 SIGKILLs of a 2-process sharded run with background checkpoints every step, one per launch of the same
    command: at a random moment after a checkpoint was published (even seeds), or inside the write of a random
    step (odd seeds, chaos). Each launch resumes from what the previous one left; the losses of every step, also
    the steps trained twice, equal those of the uninterrupted run."""
    steps = 40
    settings = {"strategy": "fsdp", "trainer.devices": 2, "trainer.max_steps": steps, "checkpoint.keep_last": 3}
    reference = tmp_path / "reference"
    result = run_cli("train", *overrides(tiny_data, reference, **settings), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = train_losses(reference)

    run_dir = tmp_path / "killed"
    kills_in_writes = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        start = max((e["step"] for e in events(run_dir, "checkpoint")), default=0) if run_dir.exists() else 0
        args = overrides(tiny_data, run_dir, **settings)
        if seed % 2:
            step = int(rng.integers(start + 1, min(start + 4, steps)))
            args += ["plugins=[chaos]", f"plugins.chaos.checkpoint_kill_steps=[{step}]"]
            killed = run_cli("train", *args, timeout=300)
            assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
            kills_in_writes += 1
        else:
            process = subprocess.Popen(
                [sys.executable, "-m", "lit_open.cli", "train", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # the launcher and its worker process: killed together, as a node dies
            )
            deadline = time.monotonic() + 120
            while not [e for e in events(run_dir, "checkpoint") if e["step"] > start]:
                assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
                time.sleep(0.05)
            time.sleep(float(rng.uniform(0.0, 0.5)))
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        logged = train_losses(run_dir)  # up to the newest checkpoint the killed launch began
        assert logged == pytest.approx({s: expected[s] for s in logged}, rel=1e-6, abs=0)
        newest = find_resume_checkpoint("auto", run_dir)
        assert newest is not None and (newest / ".metadata").is_file()  # complete: the index is written last
    finished = run_cli("train", *overrides(tiny_data, run_dir, **settings), timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert train_losses(run_dir) == pytest.approx(expected, rel=1e-6, abs=0)
    assert kills_in_writes == 5


def test_a_stop_signal_waits_for_the_background_write_of_its_checkpoint(tiny_data, tmp_path, reference):
    run_dir = tmp_path / "run"
    args = overrides(tiny_data, run_dir, **{"checkpoint.every_n_steps": 100})
    stopped = cli_here("train", *args, "plugins=[chaos]", "plugins.chaos.signal_steps=[3]")
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    (stop,) = events(run_dir, "stop")
    (saved,) = events(run_dir, "checkpoint")  # published before the stop event, which names it
    assert stop["checkpoint"] == saved["path"] and saved["asynchronous"] is True and saved["step"] == 3
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000003.ckpt"
    resumed = cli_here("train", *args, "plugins=[chaos]", "plugins.chaos.signal_steps=[3]")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(run_dir) == pytest.approx(reference, rel=1e-6, abs=0)
