"""monitor: training health every N steps, in the step's metrics row: global and per-block gradient, parameter and
update norms, AdamW state norms, per-block activation RMS and max, throughput and (on GPUs) MFU, exact under
FSDP2/TP sharding, at about 0.5% of step time. Design, the columns, the sharding arithmetic and the measured cost:
docs/plugins/monitor.md; `lit-open list plugins` shows the options and their defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from lit_open.errors import UserError
from lit_open.hardware import compute_dtype, peak_flops
from lit_open.model.flops import flops_per_token
from lit_open.parallel import unwrapped_name
from lit_open.plugin import Plugin, option

PREFIX = "monitor"
OPTIMIZER_STATES = ("exp_avg", "exp_avg_sq")  # AdamW's moments, logged as monitor/<key>_norm


def parameter_group(name: str) -> str:
    """`layers.N` for a parameter of block N, else the model's top-level module (tok_embeddings, norm, output)."""
    parts = unwrapped_name(name).split(".")
    if parts[0] == "layers" and len(parts) > 2:
        return f"layers.{parts[1]}"
    return parts[0]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_part(tensor: torch.Tensor, world: int) -> tuple[torch.Tensor, int]:
    """This process's part of `tensor` and the number of processes in the world that hold the same elements.

    Summing `||part||^2 / copies` over all processes gives `||tensor||^2` whatever the sharding: Shard placements
    split the elements, Replicate ones copy them, and processes outside the tensor's mesh are taken to be
    data-parallel replicas. A Partial tensor (a pending sum) is reduced first, by DTensor (a collective on its mesh).
    """
    if not isinstance(tensor, DTensor):
        return tensor, world  # a plain tensor: the same on every process (DDP) or a one-process run
    placements = tensor.placements
    if any(p.is_partial() for p in placements):
        tensor = tensor.redistribute(tensor.device_mesh, [Replicate() if p.is_partial() else p for p in placements])
    mesh = tensor.device_mesh
    copies = world // mesh.size()
    for size, placement in zip(mesh.shape, tensor.placements):
        if placement.is_replicate():
            copies *= size
    return tensor.to_local(), max(copies, 1)


def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of squares as a float32 0-d tensor on the tensor's device (no host synchronisation)."""
    return torch.linalg.vector_norm(tensor, dtype=torch.float32).square()


class Local:
    """This process's parts of a list of tensors (one per parameter, None where absent), their replication counts
    and parameter groups: what `group_sums` needs."""

    def __init__(self, tensors: list[torch.Tensor | None], groups: list[int], world: int) -> None:
        self.parts: list[torch.Tensor] = []
        self.copies: list[int] = []
        self.groups: list[int] = []
        for tensor, group in zip(tensors, groups):
            if tensor is None:
                continue
            part, copies = local_part(tensor.detach(), world)
            self.parts.append(part)
            self.copies.append(copies)
            self.groups.append(group)

    def group_sums(self, n_groups: int, device: torch.device, parts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Sum of ||part||^2 / copies per group, a float32 vector on `device` (no host synchronisation); `parts`
        replaces the tensors (same shapes and sharding, e.g. differences) when given."""
        parts = self.parts if parts is None else parts
        sums = torch.zeros(n_groups, device=device)
        if not parts:
            return sums
        # one fused kernel per device and dtype (torch's own gradient clipping uses it too)
        squares = torch.stack(torch._foreach_norm(parts, 2, dtype=torch.float32)).to(device).square()
        weights = torch.tensor([1.0 / c for c in self.copies], device=device)
        return sums.index_add_(0, torch.tensor(self.groups, device=device), squares * weights)


def _block_output(output: Any) -> torch.Tensor | None:
    if isinstance(output, (tuple, list)):
        output = output[0] if output else None
    if isinstance(output, DTensor):  # this process's elements; replicated copies cancel out of the RMS
        output = local_part(output, 1)[0]
    return output if isinstance(output, torch.Tensor) else None


class Monitor(Plugin):
    """Logs gradient, parameter, update, optimizer-state and activation statistics every `every_n_steps` steps."""

    name = "monitor"

    @dataclass
    class Config:
        every_n_steps: int = option(
            10, "optimizer steps between two monitored steps (>= 1); the monitored steps are its multiples"
        )
        update_ratio: bool = option(
            True, "log ||delta theta|| / ||theta|| per block (copies the parameter shards on monitored steps)"
        )
        offload_snapshot: bool = option(
            False, "keep the copy update_ratio takes in CPU memory instead of on the accelerator"
        )
        optimizer_state: bool = option(True, "log the global norms of AdamW's exp_avg and exp_avg_sq")
        activations: bool = option(
            True, "log the RMS and max |x| of each block's output (forward hooks, active on monitored steps)"
        )

        def __post_init__(self) -> None:
            if self.every_n_steps < 1:
                raise UserError(
                    f"plugins.monitor.every_n_steps={self.every_n_steps} must be at least 1 (optimizer steps "
                    "between two monitored steps; default 10)."
                )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._hooked: list[nn.Module] = []  # blocks with an activation hook
        self._step: int | None = None  # the optimizer step being monitored, while its batches run
        self._armed = False  # forward hooks record (training micro-batches of a monitored step)
        self._last_micro = False
        self._activations: dict[int, list] = {}  # block -> [sum of squares, element count, max |x|]
        self._groups: list[str] = []  # parameter groups, in model order
        self._param_groups: list[int] = []  # each parameter's group (index into _groups), in named_parameters order
        self._sums: dict[str, torch.Tensor] = {}  # of the step under way: squared norms by group ("grad", "before")
        self._snapshot: list[torch.Tensor] | None = None  # copies of the local parameter shards before the update
        self._lrs: list[float] = []
        self._clock: tuple[float, int] | None = None  # (run.train_seconds, run.consumed_batches) at the last row
        self._mfu: tuple[int, float] | None = None  # (FLOPs per token, peak FLOP/s of all devices) on known GPUs

    # -- hooks registered on the model -----------------------------------------------------------------------
    def on_model_built(self, model: nn.Module) -> None:
        if self.cfg.activations:
            self._hook_blocks(model)

    def _hook_blocks(self, model: nn.Module) -> None:
        for i, block in enumerate(model.layers):
            if any(block is hooked for hooked in self._hooked):
                continue

            def hook(_module: nn.Module, _args: Any, output: Any, i: int = i) -> None:
                if self._armed:
                    self._record_activation(i, output)

            # excluded from a compiled block's graph: it reads Python state and runs eagerly after the block
            block.register_forward_hook(torch.compiler.disable(hook))
            self._hooked.append(block)

    @torch.no_grad()
    def _record_activation(self, block: int, output: Any) -> None:
        x = _block_output(output)
        if x is None:
            return
        sq = squared_norm(x)
        peak = torch.linalg.vector_norm(x, ord=math.inf, dtype=torch.float32)
        stats = self._activations.get(block)
        if stats is None:
            self._activations[block] = [sq, x.numel(), peak]
        else:
            stats[0] = stats[0] + sq
            stats[1] += x.numel()
            stats[2] = torch.maximum(stats[2], peak)

    # -- the training loop -----------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.cfg.activations and not self._hooked:  # a model built without LitLM's on_model_built call
            self._hook_blocks(pl_module.model)
        names = [name for name, _ in pl_module.model.named_parameters()]
        self._groups = list(dict.fromkeys(parameter_group(name) for name in names))
        self._param_groups = [self._groups.index(parameter_group(name)) for name in names]
        self._clock = (self.run.train_seconds, self.run.consumed_batches)
        peak = self._peak_flops(pl_module)
        if peak:
            per_token = flops_per_token(pl_module.model.config, self.run.config.data.seq_len)
            self._mfu = (per_token, peak * trainer.world_size)
        self.log_event(
            trainer,
            pl_module,
            "monitor",
            every_n_steps=self.cfg.every_n_steps,
            update_ratio=self.cfg.update_ratio,
            optimizer_state=self.cfg.optimizer_state,
            activations=self.cfg.activations,
            mfu=self._mfu is not None,
        )

    def _peak_flops(self, pl_module: LightningModule) -> float | None:
        """Dense peak FLOP/s of one device of this run (lit_open.hardware's table); None off CUDA."""
        device = pl_module.device
        if device.type != "cuda":
            return None
        return peak_flops(torch.cuda.get_device_name(device), compute_dtype(self.run.config))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step + 1  # the update these gradients go into, as the core logs it
        micro, n_micro = (batch.get("micro", 0), batch.get("n_micro", 1)) if isinstance(batch, dict) else (0, 1)
        if step % self.cfg.every_n_steps:
            self._armed = False
            self._step = None
            return
        if micro == 0 or self._step != step:  # a new global batch (also the retry after a skipped update)
            self._reset()
            self._step = step
        self._armed = self.cfg.activations
        self._last_micro = micro + 1 == n_micro

    def _parameters(self, pl_module: LightningModule) -> list[torch.nn.Parameter]:
        params = [param for _, param in pl_module.model.named_parameters()]
        if len(params) != len(self._param_groups):
            raise RuntimeError(f"The model has {len(params)} parameters, {len(self._param_groups)} at train start.")
        return params

    @torch.no_grad()
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._step is None or not self._last_micro:
            return
        self._armed = False
        grads = [param.grad for param in self._parameters(pl_module)]
        local = Local(grads, self._param_groups, world_size())
        self._sums["grad"] = local.group_sums(len(self._groups), pl_module.device)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Lightning calls this from inside optimizer.step(): after the core's clipping and skip decision, so only
        # for updates that happen, before the parameters change.
        if self._step is None or "grad" not in self._sums or trainer.global_step + 1 != self._step:
            return
        self._lrs = [float(group["lr"]) for group in optimizer.param_groups]
        if not self.cfg.update_ratio:
            return
        local = Local(self._parameters(pl_module), self._param_groups, world_size())
        self._sums["before"] = local.group_sums(len(self._groups), pl_module.device)
        if self.cfg.offload_snapshot:
            self._snapshot = [part.to("cpu", copy=True) for part in local.parts]
        else:
            self._snapshot = [part.clone() for part in local.parts]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._armed = False
        if self._step is None or not self._last_micro:
            return
        self._step = None  # reported by step_metrics if the update was applied; dropped if it was skipped
        self._reset()

    def step_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        if self._step is None or trainer.global_step != self._step or "grad" not in self._sums:
            return {}
        return self._row(trainer, pl_module)

    def _reset(self) -> None:
        self._activations = {}
        self._sums = {}
        self._snapshot = None
        self._lrs = []

    # -- the row ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _row(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        device, world, n_groups = pl_module.device, world_size(), len(self._groups)
        sums = self._sums  # name -> float32 vector, summed over the world: by parameter group unless said otherwise
        params = self._parameters(pl_module)
        local = Local(params, self._param_groups, world)
        sums["param"] = local.group_sums(n_groups, device)
        if self._snapshot is not None:
            sums["update"] = self._update_sums(local, n_groups, device)
        if self.cfg.optimizer_state:
            for key in OPTIMIZER_STATES:
                states = [self._optimizer_state(trainer, param, key) for param in params]
                if any(state is not None for state in states):
                    total = Local(states, self._param_groups, world).group_sums(n_groups, device).sum()
                    sums[key] = total.reshape(1)
        blocks = sorted(self._activations)
        if blocks:
            sums["act_sq"] = torch.stack([self._activations[b][0] for b in blocks])
            sums["act_count"] = torch.tensor([float(self._activations[b][1]) for b in blocks], device=device)
        # one all_reduce(SUM) of everything above, one all_reduce(MAX) of the activation maxima
        packed = torch.cat([v.to(device, torch.float64) for v in sums.values()])
        peaks = torch.stack([self._activations[b][2] for b in blocks]).double() if blocks else None
        if world > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            if peaks is not None:
                dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        values, summed = packed.tolist(), {}
        for name, vector in sums.items():
            summed[name], values = values[: len(vector)], values[len(vector) :]
        maxima = peaks.tolist() if peaks is not None else []
        return self._format(pl_module, summed, blocks, maxima)

    def _update_sums(self, local: Local, n_groups: int, device: torch.device) -> torch.Tensor:
        """||theta_after - theta_before||^2 per group, written over the snapshot in place: no memory beyond it."""
        snapshot, self._snapshot = self._snapshot, None
        if not self.cfg.offload_snapshot:
            torch._foreach_sub_(snapshot, local.parts)  # before - after, in place: the snapshot is done with
            return local.group_sums(n_groups, device, parts=snapshot)
        sums = torch.zeros(n_groups, device=device)
        for group in range(n_groups):  # moved back to the device one group (block) at a time
            index = [i for i, g in enumerate(local.groups) if g == group]
            if not index:
                continue
            diffs = [snapshot[i].to(local.parts[i].device, non_blocking=True) for i in index]
            torch._foreach_sub_(diffs, [local.parts[i] for i in index])
            squares = torch.stack(torch._foreach_norm(diffs, 2, dtype=torch.float32)).to(device).square()
            weights = torch.tensor([1.0 / local.copies[i] for i in index], device=device)
            sums[group] = (squares * weights).sum()
        return sums

    @staticmethod
    def _optimizer_state(trainer: Trainer, param: torch.Tensor, key: str) -> torch.Tensor | None:
        for optimizer in trainer.optimizers:
            value = optimizer.state.get(param, {}).get(key)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
        return None

    def _format(
        self, pl_module: LightningModule, summed: dict[str, list[float]], blocks: list[int], maxima: list[float]
    ) -> dict[str, float]:
        row: dict[str, float] = {}
        for kind, column in (("grad", "grad_norm"), ("param", "param_norm")):
            row[f"{PREFIX}/{column}"] = math.sqrt(sum(summed[kind]))
            row.update({f"{PREFIX}/{column}/{g}": math.sqrt(v) for g, v in zip(self._groups, summed[kind])})
        if "update" in summed:
            update, before = summed["update"], summed["before"]
            row[f"{PREFIX}/update_ratio"] = _ratio(sum(update), sum(before))
            row.update({f"{PREFIX}/update_ratio/{g}": _ratio(u, b) for g, u, b in zip(self._groups, update, before)})
        for key in OPTIMIZER_STATES:
            if key in summed:
                row[f"{PREFIX}/{key}_norm"] = math.sqrt(summed[key][0])
        for block, sq, count, peak in zip(blocks, summed.get("act_sq", []), summed.get("act_count", []), maxima):
            row[f"{PREFIX}/act_rms/layers.{block}"] = math.sqrt(sq / count) if count else math.nan
            row[f"{PREFIX}/act_max/layers.{block}"] = peak
        if self._lrs:
            row[f"{PREFIX}/lr"] = self._lrs[0]
            if len(set(self._lrs)) > 1:
                row.update({f"{PREFIX}/lr/group_{i}": lr for i, lr in enumerate(self._lrs)})
        seconds, batches, per_batch = self.run.train_seconds, self.run.consumed_batches, self.run.tokens_per_batch
        row[f"{PREFIX}/tokens"] = float(batches * per_batch)
        if self._clock is not None and seconds > self._clock[0]:
            tokens_per_s = (batches - self._clock[1]) * per_batch / (seconds - self._clock[0])
            row[f"{PREFIX}/tokens_per_s"] = tokens_per_s
            if self._mfu is not None:
                per_token, peak = self._mfu
                row[f"{PREFIX}/mfu"] = per_token * tokens_per_s / peak
        self._clock = (seconds, batches)
        return row


def _ratio(numerator_sq: float, denominator_sq: float) -> float:
    return math.sqrt(numerator_sq / denominator_sq) if denominator_sq > 0 else math.nan
