"""Atomic checkpoints: a crash while writing leaves the previous state; `resume=auto` finds the newest complete."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from lit_open.checkpoint.resumable import (
    CheckpointWriter,
    find_resume_checkpoint,
    list_checkpoints,
    read_checkpoint,
)
from lit_open.errors import UserError
from lit_open.train.events import EventLog, read_events


class FakeTrainer:
    """The parts of a Lightning Trainer that CheckpointWriter uses, with a save that can fail midway."""

    def __init__(self, fail_at: int | None = None):
        self.global_step = 0
        self.is_global_zero = True
        self.loggers = []
        self.strategy = SimpleNamespace(barrier=lambda name=None: None)
        self.callbacks = []
        self.fail_at = fail_at

    def save_checkpoint(self, path):
        payload = {"global_step": self.global_step, "lit_open": {}, "weights": torch.full((1000,), 1.0)}
        torch.save(payload, path)
        if self.global_step == self.fail_at:
            path.write_bytes(path.read_bytes()[:100])  # a torn write, then the process dies
            raise KeyboardInterrupt


def fake_module(events: EventLog) -> SimpleNamespace:
    """The parts of LitLM that CheckpointWriter uses: its run state's event log and `busy`."""
    return SimpleNamespace(run=SimpleNamespace(events=events, busy=lambda what: contextlib.nullcontext()))


def save_at(writer, trainer, module, step):
    trainer.global_step = step
    writer.on_step_end(trainer, module, step)


def test_checkpoints_are_step_numbered_pruned_and_pointed_at(tmp_path):
    directory = tmp_path / "checkpoints"
    writer = CheckpointWriter(directory, every_n_steps=2, keep_last=2)
    trainer = FakeTrainer()
    module = fake_module(EventLog(tmp_path / "events.jsonl"))
    for step in range(1, 8):
        save_at(writer, trainer, module, step)
    assert [p.name for p in list_checkpoints(directory)] == ["step-00000004.ckpt", "step-00000006.ckpt"]
    assert (directory / "latest").read_text().strip() == "step-00000006.ckpt"
    writer.on_train_end(trainer, module)  # the final step (7) is saved too
    assert find_resume_checkpoint("auto", tmp_path).name == "step-00000007.ckpt"
    assert [e["step"] for e in read_events(tmp_path / "events.jsonl")] == [2, 4, 6, 7]
    assert not list(directory.glob(".tmp-*"))


def test_a_crash_while_writing_leaves_the_previous_checkpoint_in_charge(tmp_path):
    directory = tmp_path / "checkpoints"
    writer = CheckpointWriter(directory, every_n_steps=2, keep_last=0)
    trainer = FakeTrainer(fail_at=4)
    module = fake_module(EventLog(None))
    save_at(writer, trainer, module, 2)
    with pytest.raises(KeyboardInterrupt):
        save_at(writer, trainer, module, 4)
    assert [p.name for p in list_checkpoints(directory)] == ["step-00000002.ckpt"]
    assert (directory / ".tmp-step-00000004.ckpt").exists()  # the torn file never got a real name
    resume = find_resume_checkpoint("auto", tmp_path)
    assert resume.name == "step-00000002.ckpt" and read_checkpoint(resume)["global_step"] == 2
    # the next attempt at that step replaces the torn temporary file
    trainer.fail_at = None
    save_at(writer, trainer, module, 4)
    assert find_resume_checkpoint("auto", tmp_path).name == "step-00000004.ckpt"
    assert not list(directory.glob(".tmp-*"))


def test_resume_lookup(tmp_path):
    assert find_resume_checkpoint("auto", tmp_path) is None  # nothing yet: start fresh
    assert find_resume_checkpoint("none", tmp_path) is None
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    for step in (3, 10):
        torch.save({"global_step": step, "lit_open": {}}, directory / f"step-{step:08d}.ckpt")
    (directory / ".tmp-step-00000020.ckpt").write_text("half")
    # without a pointer the newest complete checkpoint wins; a pointer is followed
    assert find_resume_checkpoint("auto", tmp_path).name == "step-00000010.ckpt"
    (directory / "latest").write_text("step-00000003.ckpt\n")
    assert find_resume_checkpoint("auto", tmp_path).name == "step-00000003.ckpt"
    explicit = directory / "step-00000010.ckpt"
    assert find_resume_checkpoint(str(explicit), tmp_path) == explicit
    with pytest.raises(UserError, match="no such checkpoint"):
        find_resume_checkpoint(str(tmp_path / "missing.ckpt"), tmp_path)


def test_unreadable_checkpoints_are_user_errors_that_offer_the_older_ones(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    torch.save({"global_step": 3, "lit_open": {}}, directory / "step-00000003.ckpt")
    torch.save({"global_step": 6, "lit_open": {}, "w": torch.zeros(5000)}, directory / "step-00000006.ckpt")
    newest = directory / "step-00000006.ckpt"
    newest.write_bytes(newest.read_bytes()[:-2000])
    with pytest.raises(UserError) as err:
        read_checkpoint(newest)
    assert "step-00000006.ckpt" in str(err.value) and f"resume={directory / 'step-00000003.ckpt'}" in str(err.value)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserError, match="not a lit-open training checkpoint"):
        read_checkpoint(foreign)


def test_a_sharded_checkpoint_with_a_truncated_or_missing_shard_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    directory = tmp_path / "checkpoints"
    older = directory / "step-00000002.ckpt"
    torch.save({"global_step": 2, "lit_open": {}}, _mkdir_parent(older))
    sharded = directory / "step-00000004.ckpt"
    dcp.save({"state_dict": {"w": torch.arange(10_000.0)}}, checkpoint_id=str(sharded))
    torch.save({"global_step": 4, "lit_open": {}}, sharded / "meta.pt")
    assert read_checkpoint(sharded)["global_step"] == 4
    shard = next(sharded.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match=f"shard {shard.name} is missing or truncated.*resume={older}"):
        read_checkpoint(sharded)
    shard.unlink()
    with pytest.raises(UserError, match="missing or truncated"):
        read_checkpoint(sharded)


def _mkdir_parent(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_the_host_copy_of_an_asynchronous_save_is_a_snapshot():
    from collections import namedtuple

    from lit_open.checkpoint.background import host_copy

    Moments = namedtuple("Moments", "mean var")
    weights = torch.ones(4)
    state = {"model": {"w": weights}, "optim": [Moments(weights * 2, weights * 3)], "step": 7, "name": "x"}
    copy = host_copy(state)
    weights.add_(1.0)  # the next optimizer step
    assert torch.equal(copy["model"]["w"], torch.ones(4)) and isinstance(copy["optim"][0], Moments)
    assert torch.equal(copy["optim"][0].var, torch.full((4,), 3.0)) and copy["step"] == 7
    assert copy["model"]["w"].data_ptr() != weights.data_ptr()
