"""Training-health monitor: norms, update sizes, optimizer state, activations and throughput every N steps.

What: every `every_n_steps` optimizer steps (the steps whose number, as logged, is a multiple of it) extra columns
go to the Lightning loggers (metrics.csv, TensorBoard) through the `step_metrics` hook, in the same row as the
core's `train/loss` of that optimizer step:

- `monitor/grad_norm`, `monitor/grad_norm/<group>`: L2 norm of the gradients of the step, before clipping (the
  global one equals the core's `train/grad_norm`), over all parameters and per group;
- `monitor/param_norm`, `monitor/param_norm/<group>`: L2 norm of the parameters after the update;
- `monitor/update_ratio`, `monitor/update_ratio/<group>`: ||theta_after - theta_before|| / ||theta_before|| of the
  step's update (healthy values are around 1e-3);
- `monitor/exp_avg_norm`, `monitor/exp_avg_sq_norm`: global L2 norms of AdamW's first and second moments after
  the update;
- `monitor/act_rms/layers.N`, `monitor/act_max/layers.N`: RMS and max |x| of each block's output over all tokens
  of the step (all micro-batches, all ranks);
- `monitor/lr` (of the first parameter group; `monitor/lr/group_I` for each group when the groups differ), the
  learning rate the update used; `monitor/tokens`, tokens consumed so far; `monitor/tokens_per_s`, training
  throughput since the previous monitored step (validation time excluded, as in the core's `train/tokens_per_s`);
  `monitor/mfu` (fraction of the GPUs' dense peak, `lit_open.bench.throughput`: 6*N + 12*L*d*T FLOPs per token)
  on a GPU of the peak table only: the column is absent on CPUs and unknown GPUs.

Groups are `layers.N` (one per block), `tok_embeddings`, `norm` and `output` (absent with tied embeddings: the
shared weight counts once, as `tok_embeddings`). They partition the parameters, so the squares of the group norms
sum to the square of the global norm.

Why: a spike, a vanishing layer or a drifting optimizer state shows in these numbers steps before it shows in the
loss (OLMo's per-parameter metrics, notes/techniques.md section 7); the update/param ratio says whether the
learning rate moves each block by a sensible amount.

How: gradients are read in `on_after_backward` of the step's last micro-batch (accumulated, not yet clipped; the
optimizer zeroes them before any later hook); parameter norms before the update and, with `update_ratio`, a copy
of this process's parameter shards are taken in `on_before_optimizer_step`, which Lightning calls only when the
update is not skipped; the rest in `on_train_batch_end`, after which the copy is freed. Nothing is copied on other
steps. The difference theta_before - theta_after is written over the copy in place, so the update norms need no
memory beyond the copy; `offload_snapshot: true` keeps the copy in CPU memory instead of the accelerator's and
brings it back one group (block) at a time. Forward
hooks on `model.layers[i]` (registered in `on_model_built`, excluded from torch.compile) return at once except
on the micro-batches of a monitored step. A monitored step whose update is skipped by a plugin logs nothing; the
next batch is monitored again under the same step number.

Sharding: under FSDP2 / tensor parallelism parameters, gradients and optimizer states are DTensors. Each process
takes the squared L2 norm of its local shard (`torch._foreach_norm` of the `to_local()` parts) divided by the number of
processes holding a copy of the same elements (the sizes of the mesh dimensions the tensor is `Replicate` on, times
the processes outside its mesh, which are data-parallel replicas; plain tensors under DDP are held by every
process), and one `all_reduce(SUM)` over the world adds them up, so every element counts exactly once (`Partial`
tensors are first reduced to `Replicate` by DTensor itself). Activation sums of squares and element counts are
summed over the world the same way (each data-parallel rank sees its own batch slice, each sequence-parallel rank
its own tokens; a replicated copy adds to both numerator and count, which leaves the RMS unchanged), and the
maxima are combined with one `all_reduce(MAX)`. That is two collectives per monitored step, none per parameter.
Only global rank 0 writes the row. The slow tests run ddp, fsdp, tp and fsdp + tp on 2-4 gloo processes, and fsdp with
compiled, activation-checkpointed blocks, and compare every column with a plain one-process run.

Cost: about 0.5% of step time at the default interval (the limit set for it is 2%). Measured on the quickstart model
with `data.seq_len=128` (micro-batch 16, float32, one CPU thread: OMP_NUM_THREADS=1, as a shared 2-core machine gave
no steady two-thread timings), 50 steps, interval 10: 0.44% of the training time is spent inside the monitor's
hooks; per step (median) a monitored step takes 16 ms more than the 0.50 s of the others and the step after it
8 ms more; three alternating runs of `lit-open train model=quickstart data.seq_len=128 trainer.max_steps=50` with
and without `plugins=[monitor]` took 25.0-26.1 s and 25.4-25.8 s (the difference is within their noise). The
per-step work is a few fused `torch._foreach_norm` kernels per kind of tensor, one copy of the parameter shards and
two collectives; `python -m lit_open.bench plugin-overhead --plugin monitor` repeats the in-hook measurement
and the A/B (add `--device cuda --model ... --seq-len ...` on a GPU).

Options (`plugins.monitor.<option>`):
- every_n_steps (int >= 1, default 10): optimizer steps between two monitored steps;
- update_ratio (bool, default true): log the update/param ratios (costs a copy of the parameter shards, on
  monitored steps only);
- offload_snapshot (bool, default false): keep that copy in CPU memory rather than on the accelerator;
- optimizer_state (bool, default true): log the norms of AdamW's exp_avg and exp_avg_sq;
- activations (bool, default true): log each block's output RMS and max |x|.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from lit_open.errors import UserError
from lit_open.plugin import Plugin

PREFIX = "monitor"
OPTIMIZER_STATES = ("exp_avg", "exp_avg_sq")  # AdamW's moments, logged as monitor/<key>_norm
# Prefixes that module wrappers add to parameter names (torch.compile of a whole module, checkpoint_wrapper, FSDP1);
# the group of a parameter is read from the model's own names.
_WRAPPER_PREFIX = re.compile(r"(?:^|(?<=\.))(?:_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


def parameter_group(name: str) -> str:
    """`layers.N` for a parameter of block N, else the model's top-level module (tok_embeddings, norm, output)."""
    parts = _WRAPPER_PREFIX.sub("", name).split(".")
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
        every_n_steps: int = 10
        update_ratio: bool = True
        offload_snapshot: bool = False
        optimizer_state: bool = True
        activations: bool = True

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
        self._clock: tuple[float, int] | None = None  # (pl_module.train_seconds, consumed_batches) at the last row
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
        self._clock = (pl_module.train_seconds, pl_module.consumed_batches)
        peak = self._peak_flops(pl_module)
        if peak:
            from lit_open.bench.throughput import flops_per_token

            per_token = flops_per_token(pl_module.model.config, pl_module.config.data.seq_len)
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
        """Dense peak FLOP/s of one device of this run (lit_open.bench.throughput's table); None off CUDA."""
        device = pl_module.device
        if device.type != "cuda":
            return None
        from lit_open.bench.throughput import compute_dtype, peak_flops

        return peak_flops(torch.cuda.get_device_name(device), compute_dtype(pl_module.config))

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
        seconds, batches = pl_module.train_seconds, pl_module.consumed_batches
        row[f"{PREFIX}/tokens"] = float(batches * pl_module.tokens_per_batch)
        if self._clock is not None and seconds > self._clock[0]:
            tokens_per_s = (batches - self._clock[1]) * pl_module.tokens_per_batch / (seconds - self._clock[0])
            row[f"{PREFIX}/tokens_per_s"] = tokens_per_s
            if self._mfu is not None:
                per_token, peak = self._mfu
                row[f"{PREFIX}/mfu"] = per_token * tokens_per_s / peak
        self._clock = (seconds, batches)
        return row


def _ratio(numerator_sq: float, denominator_sq: float) -> float:
    return math.sqrt(numerator_sq / denominator_sq) if denominator_sq > 0 else math.nan
