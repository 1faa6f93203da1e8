"""In-memory snapshots of the training state, for rolling back without reading a checkpoint from disk.

A snapshot holds this process's share of the state after an optimizer step: every tensor of the model and of the
optimizer (for sharded runs only the local shards, so each rank keeps a 1/N share), the optimizer's hyper-parameters,
the LR schedule, the RNGs and the step counter. Restoring copies the values back in place into the same tensors,
so the model's parallel layout, the optimizer's parameter references and any compiled code stay valid. The data
position is not part of a snapshot: after a rollback training goes on with data it has not seen (see
`LitLM.rollback`).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds (the local shard of a DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _copy_out(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return _local(value).detach().to(device, copy=True)
    return copy.deepcopy(value)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as plain Python values and tensors (loadable weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Snapshot:
    step: int  # optimizer steps applied when it was taken
    consumed_batches: int  # the data position then (global batches consumed)
    model: dict[str, torch.Tensor]
    optimizer_state: list[dict[str, Any] | None]  # per parameter, in param_groups order; None: no state yet
    optimizer_groups: list[dict[str, Any]]  # hyper-parameters of each group (lr, betas, ...), without params
    scheduler: dict[str, Any]
    rng: dict[str, Any]

    def nbytes(self) -> int:
        tensors = list(self.model.values())
        tensors += [v for s in self.optimizer_state if s for v in s.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def take_snapshot(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    consumed_batches: int,
    device: torch.device | str = "cpu",
) -> Snapshot:
    return Snapshot(
        step=step,
        consumed_batches=consumed_batches,
        model={name: _copy_out(t, device) for name, t in model.state_dict().items()},
        optimizer_state=[
            {k: _copy_out(v, device) for k, v in optimizer.state[p].items()} if p in optimizer.state else None
            for p in _parameters(optimizer)
        ],
        optimizer_groups=[{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        scheduler=copy.deepcopy(scheduler.state_dict()),
        rng=rng_state(),
    )


def restore_snapshot(
    snapshot: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> None:
    """Put the snapshot's values back into the live tensors, in place."""
    with torch.no_grad():
        live = model.state_dict()
        for name, saved in snapshot.model.items():
            _local(live[name]).copy_(saved)
        for param, saved in zip(_parameters(optimizer), snapshot.optimizer_state):
            if saved is None:  # no update had touched it yet then
                optimizer.state.pop(param, None)
                continue
            state = optimizer.state[param]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and isinstance(state.get(key), torch.Tensor):
                    _local(state[key]).copy_(value)
                else:
                    state[key] = copy.deepcopy(value)
    for group, saved in zip(optimizer.param_groups, snapshot.optimizer_groups):
        group.update(copy.deepcopy(saved))
    scheduler.load_state_dict(copy.deepcopy(snapshot.scheduler))
    set_rng_state(snapshot.rng)


def snapshot_from_checkpoint(checkpoint: dict[str, Any], consumed_batches: int, rng: dict[str, Any]) -> Snapshot:
    """A Snapshot holding a single-file checkpoint's state (as Lightning saved it: `model.`-prefixed weights, the
    optimizer's state_dict, whose parameter indices follow its param_groups' order)."""
    optimizer = checkpoint["optimizer_states"][0]
    n_params = sum(len(group["params"]) for group in optimizer["param_groups"])
    return Snapshot(
        step=checkpoint["global_step"],
        consumed_batches=consumed_batches,
        model={name.removeprefix("model."): t for name, t in checkpoint["state_dict"].items()},
        optimizer_state=[optimizer["state"].get(i) for i in range(n_params)],
        optimizer_groups=[{k: v for k, v in g.items() if k != "params"} for g in optimizer["param_groups"]],
        scheduler=checkpoint["lr_schedulers"][0],
        rng=rng,
    )


class SnapshotRing:
    """Snapshots every `every` optimizer steps, keeping just enough to go back `horizon` steps from the newest.

    Kept: every snapshot newer than (current step - horizon), plus the newest one at or before it, so that a
    rollback to any step within the horizon finds a snapshot at or before it.
    """

    def __init__(self, every: int, horizon: int, device: torch.device | str = "cpu") -> None:
        self.every, self.horizon, self.device = every, horizon, device
        self.snapshots: list[Snapshot] = []

    def due(self, step: int) -> bool:
        return not self.snapshots or step % self.every == 0

    def add(self, snapshot: Snapshot) -> None:
        self.snapshots = [s for s in self.snapshots if s.step < snapshot.step] + [snapshot]
        oldest_needed = snapshot.step - self.horizon
        while len(self.snapshots) > 1 and self.snapshots[1].step <= oldest_needed:
            self.snapshots.pop(0)

    def newest_at_or_before(self, step: int) -> Snapshot | None:
        """The newest snapshot taken at or before `step`; the oldest kept one if none is that old."""
        candidates = [s for s in self.snapshots if s.step <= step]
        return candidates[-1] if candidates else (self.snapshots[0] if self.snapshots else None)

    def drop_after(self, step: int) -> None:
        self.snapshots = [s for s in self.snapshots if s.step <= step]
