"""The core of rollbacks: in-memory snapshots restore the training state bit for bit; the data order jumps ahead."""

from __future__ import annotations

import random

import numpy as np
import torch

from lit_open.config import ScheduleConfig
from lit_open.data.datamodule import StepBatchSampler
from lit_open.data.order import DataOrder
from lit_open.model import ModelConfig, Transformer
from lit_open.train.optim import build_scheduler
from lit_open.train.snapshots import SnapshotRing, restore_snapshot, take_snapshot


def tiny_training(seed: int = 0):
    config = ModelConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=64, max_seq_len=16)
    model = Transformer(config)
    model.init_weights(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, ScheduleConfig(warmup_steps=2), max_steps=20)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, step: int) -> float:
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(step))
    logits = model(tokens[:, :-1])
    noise = torch.rand(())  # draws from the global RNG, which a snapshot restores
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + 0 * noise
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def state_of(model, optimizer, scheduler):
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "moments": [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()],
        "lr": [g["lr"] for g in optimizer.param_groups],
        "scheduler": scheduler.state_dict(),
        "rng": (torch.get_rng_state(), random.random(), np.random.rand()),
    }


def test_a_restored_snapshot_is_the_state_it_was_taken_from_bit_for_bit():
    model, optimizer, scheduler = tiny_training()
    for step in range(3):
        train_step(model, optimizer, scheduler, step)
    snapshot = take_snapshot(model, optimizer, scheduler, step=3, consumed_batches=3)
    expected = state_of(model, optimizer, scheduler)  # also advances the Python and NumPy RNGs, as training would
    next_losses = [train_step(model, optimizer, scheduler, step) for step in range(3, 6)]

    restore_snapshot(snapshot, model, optimizer, scheduler)
    restored = state_of(model, optimizer, scheduler)
    for name, value in expected["model"].items():
        assert torch.equal(restored["model"][name], value), name
    for got, want in zip(restored["moments"], expected["moments"]):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert restored["lr"] == expected["lr"] and restored["scheduler"] == expected["scheduler"]
    assert torch.equal(restored["rng"][0], expected["rng"][0]) and restored["rng"][1:] == expected["rng"][1:]
    # and training from it repeats the steps taken after the snapshot exactly
    assert [train_step(model, optimizer, scheduler, step) for step in range(3, 6)] == next_losses


def test_a_snapshot_from_before_the_first_update_clears_the_optimizer_state():
    model, optimizer, scheduler = tiny_training()
    snapshot = take_snapshot(model, optimizer, scheduler, step=0, consumed_batches=0)
    first = train_step(model, optimizer, scheduler, 0)
    restore_snapshot(snapshot, model, optimizer, scheduler)
    assert not optimizer.state
    assert train_step(model, optimizer, scheduler, 0) == first


def test_the_ring_keeps_just_enough_snapshots_to_reach_back_the_horizon():
    model, optimizer, scheduler = tiny_training()
    ring = SnapshotRing(every=5, horizon=6)
    for step in range(0, 31):
        if ring.due(step):
            ring.add(take_snapshot(model, optimizer, scheduler, step=step, consumed_batches=step))
    # at step 30 a rollback may target step 24: the newest snapshot at or before it (20) and all newer are kept
    assert [s.step for s in ring.snapshots] == [20, 25, 30]
    assert ring.newest_at_or_before(24).step == 20 and ring.newest_at_or_before(27).step == 25
    assert ring.newest_at_or_before(3).step == 20  # too old to reach: the oldest kept one
    ring.drop_after(22)
    assert [s.step for s in ring.snapshots] == [20]


def test_the_sampler_jumps_forward_and_ignores_jumps_back():
    order = DataOrder([1000], [1.0], global_batch_size=4, seed=0)
    sampler = StepBatchSampler(order, start=0, rank=0, world_size=1, micro_batch_size=2)
    batches = iter(sampler)
    steps = [next(batches)[0][2:4] for _ in range(3)]  # (data step, micro) of the first three micro-batches
    assert steps == [(0, 0), (0, 1), (1, 0)]
    sampler.jump_to(7)  # mid-way through data step 1: its second micro-batch is abandoned
    jumped = [next(batches) for _ in range(3)]
    assert [b[0][2:4] for b in jumped] == [(7, 0), (7, 1), (8, 0)]
    assert [(s, i) for s, i, *_ in jumped[0] + jumped[1]] == [tuple(x) for x in order.rank_slice(7, 0, 1).tolist()]
    sampler.jump_to(3)  # behind the sampler already: nothing changes
    assert next(batches)[0][2:4] == (8, 1)
