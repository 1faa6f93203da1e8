"""Parallelism and speed switches, applied to a built Transformer from outside (the model knows nothing of them).

`parallelize` runs, in this order: float8 matmuls (torchao), tensor + sequence parallelism (torch's TP plans on
the mesh's "tensor_parallel" dimension), context parallelism (lit_open.context_parallel: attention that spans the
sequence shards of the "context_parallel" dimension), activation checkpointing, per-block `torch.compile`, and
FSDP2 `fully_shard` per block and at the root over the "data_parallel" x "context_parallel" ranks. The model is
built on the meta device and `materialize` allocates only each process's shard and draws the initial values, so a
model larger than one device's memory never exists whole anywhere. FSDP2 is applied whenever there is a mesh, also
at data-parallel size 1, so that every sharded checkpoint can be loaded with another number of processes.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lit_open.config import StrategyConfig
from lit_open.context_parallel import ContextParallel
from lit_open.dtypes import DTYPES
from lit_open.errors import UserError
from lit_open.glue import flattened_mesh
from lit_open.model import ModelConfig, Transformer

# Prefixes that wrappers add to parameter names: torch.compile of a whole module, checkpoint_wrapper, FSDP1.
_WRAPPER_PREFIX = re.compile(r"(?:^|(?<=\.))(?:_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")

# Under TP the root returns the gathered final-norm output, a view; nothing here modifies it in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
# The gradient norm over a 2-D mesh takes two all-reduces, once per step: not worth a warning per step.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


SHARDING_MESH = "data_context_parallel"  # the flattened data x context-parallel dimensions FSDP2 shards over


def parallelize(
    model: Transformer, cfg: StrategyConfig, mesh: DeviceMesh | None, context_parallel: ContextParallel | None = None
) -> Transformer:
    """Apply float8, TP/SP, context parallelism, activation checkpointing, compile and FSDP2 to `model` (on meta or
    a device). `mesh`: None, or a 3-D mesh named lit_open.glue.MESH_DIMS."""
    tensor_parallel = mesh is not None and mesh["tensor_parallel"].size() > 1
    if cfg.float8 != "none":
        if tensor_parallel:
            raise UserError(
                f"strategy.float8={cfg.float8} together with tensor parallelism is not supported; use "
                "strategy=fsdp (float8 with FSDP2) or strategy.float8=none."
            )
        convert_to_float8(model, cfg.float8, fsdp=mesh is not None and mesh["data_parallel"].size() > 1)
    if tensor_parallel:
        apply_tensor_parallel(model, mesh["tensor_parallel"])
    if context_parallel is not None:
        context_parallel.install(model)
    if cfg.activation_checkpointing != "none":
        for block in model.layers:
            apply_activation_checkpointing(block, selective=cfg.activation_checkpointing == "selective")
    if cfg.compile:
        for block in model.layers:
            block.compile()
    if mesh is not None:
        apply_fsdp(model, model.layers, sharding_mesh(mesh), cfg)
    return model


def mesh_size(mesh: DeviceMesh | None, dim: str) -> int:
    """The size of a named dimension of the mesh; 1 without a mesh or without that dimension."""
    return mesh[dim].size() if mesh is not None and dim in (mesh.mesh_dim_names or ()) else 1


def sharding_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh FSDP2 shards over: data parallel, flattened with context parallel when there is any."""
    if mesh_size(mesh, "context_parallel") == 1:
        return mesh["data_parallel"]
    return flattened_mesh(mesh, ("data_parallel", "context_parallel"), SHARDING_MESH)


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int) -> Transformer:
    """Allocate a meta-device (possibly sharded) model on `device` and draw its initial values.

    Each parameter's full value is drawn from its own seeded generator and each process keeps its shard, so the
    result equals the model built whole on one process, whatever the sharding (on the same device type).
    """

    def write(param: torch.Tensor, value: torch.Tensor) -> None:
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank drew the same full value; each keeps its slice, no communication
            value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(value)

    model.to_empty(device=device)
    model.init_weights(seed=seed, write=write)
    return model


# -- tensor and sequence parallelism --------------------------------------------------------------------------


def check_tensor_parallel(config: ModelConfig, tp: int, seq_len: int, cp: int = 1) -> None:
    """Raise a UserError naming the first model size that the tensor-parallel degree does not divide (the sequence
    that sequence parallelism splits is each context-parallel rank's share of it)."""
    shard = "data.seq_len" if cp == 1 else f"the context-parallel share of data.seq_len={seq_len} (/ {cp})"
    sizes = {
        "model.n_head": config.n_head,
        "model.n_kv_head": config.n_kv_head,
        "model.d_ff": config.d_ff,
        "padded vocabulary (model.vocab_size rounded up to model.pad_vocab_multiple)": config.padded_vocab_size,
        f"{shard} (sequence parallelism splits the sequence)": seq_len // cp,
    }
    for what, size in sizes.items():
        if size % tp:
            raise UserError(
                f"strategy.tensor_parallel_size={tp} does not divide {what}={size}: every tensor-parallel rank "
                "must hold an equal share. Choose a tensor_parallel_size that divides it."
            )


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallelism: column/row-parallel projections, sequence-sharded norms.

    Between blocks the activations are split along the sequence (Shard(1)); attention and MLP gather them,
    work on their share of heads / hidden units, and reduce-scatter back. The final norm's output is gathered
    so that the loss (lit_open.train.loss) sees whole sequences; logits come out replicated.
    """
    c = model.config
    gather_input = PrepareModuleInput(
        input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
    )
    for block in model.layers:
        plan = {
            "attention_norm": SequenceParallel(use_local_output=True),
            "attention": gather_input,
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(use_local_output=True),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        }
        if c.mlp == "swiglu":
            plan["feed_forward.w3"] = ColwiseParallel()
        if c.qk_norm == "full":  # normalises over all heads: a reduction across the ranks' shares of them
            plan["attention.q_norm"] = ShardedNorm(input_dim=-1, weight_placement=Shard(0))
            plan["attention.k_norm"] = ShardedNorm(input_dim=-1, weight_placement=Shard(0))
        elif c.qk_norm == "head":  # per head: local, but the weight's gradient sums over the ranks' heads
            plan["attention.q_norm"] = ShardedNorm(input_dim=2, weight_placement=Replicate())
            plan["attention.k_norm"] = ShardedNorm(input_dim=2, weight_placement=Replicate())
        parallelize_module(block, tp_mesh, plan)
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(use_local_output=True),
            "output": ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        },
    )
    parallelize_module(
        model.norm, tp_mesh, PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate())
    )
    if c.tie_embeddings:
        # Both styles shard the shared weight by vocabulary rows (Shard(0)) but each wraps it in a new
        # Parameter; point the head back at the embedding's so that they stay one parameter.
        model.output.weight = model.tok_embeddings.weight


class ShardedNorm(ParallelStyle):
    """A norm whose input is split across tensor-parallel ranks along `input_dim`.

    The input is taken as a DTensor sharded on that dimension, so the norm's reductions and its weight gradient
    are computed over the whole tensor (DTensor inserts the collectives); the output is a local tensor again.
    """

    def __init__(self, input_dim: int, weight_placement: Placement) -> None:
        super().__init__()
        self.input_dim, self.weight_placement = input_dim, weight_placement

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, param in list(module.named_parameters(recurse=False)):
            placed = distribute_tensor(param, device_mesh, [self.weight_placement])
            module.register_parameter(name, nn.Parameter(placed, requires_grad=param.requires_grad))

        def to_dtensor(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (DTensor.from_local(x, device_mesh, [Shard(self.input_dim % x.dim())], run_check=False),)

        module.register_forward_pre_hook(to_dtensor)
        module.register_forward_hook(lambda _module, _args, out: out.to_local())
        return module


# -- activation checkpointing, FSDP2, float8 ------------------------------------------------------------------

# Outputs kept by selective checkpointing: the matmuls and attention, whose recomputation costs the most;
# norms, activations and RoPE are recomputed in the backward pass.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(block: nn.Module, selective: bool) -> None:
    """Recompute the block's activations in the backward pass instead of storing them.

    The block's own forward is wrapped (not the module), so parameter names, and with them checkpoints and
    weight conversion, stay the same.
    """
    forward = block.forward
    context_fn = partial(create_selective_checkpoint_contexts, _selective_policy) if selective else None
    kwargs = {"context_fn": context_fn} if context_fn else {}
    block.forward = lambda *args: checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_fsdp(model: nn.Module, blocks: Sequence[nn.Module], dp_mesh: DeviceMesh, cfg: StrategyConfig) -> None:
    """FSDP2 `fully_shard` on each block, then on the root, with the strategy's mixed-precision policy; `dp_mesh` is
    1-D: the ranks that hold different data or different shares of the sequence (they average their gradients)."""
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[cfg.param_dtype] if cfg.param_dtype else None, reduce_dtype=DTYPES[cfg.reduce_dtype]
    )
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again right away by the backward pass: keep them gathered
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=i < last)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def convert_to_float8(model: Transformer, recipe: str, fsdp: bool) -> None:
    """Swap the block projections for torchao Float8Linear; the output head and embeddings stay as they are."""
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        found = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
        raise UserError(
            f"strategy.float8={recipe} needs an NVIDIA GPU with float8 tensor cores (Hopper H100/H200 or Ada, "
            f"compute capability 8.9+); found {found}. Use strategy.float8=none here."
        )
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # only float8 runs need it
    except ImportError as err:
        raise UserError(
            f"strategy.float8={recipe} needs torchao ({err}); install it with `pip install torchao`."
        ) from None
    config = Float8LinearConfig.from_recipe_name(recipe)
    if fsdp and recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)  # all-gather weights in float8
    convert_to_float8_training(model, config=config, module_filter_fn=float8_filter(model))


def float8_filter(model: Transformer):
    """Which linear layers get float8: the projections inside blocks whose sizes the kernels accept."""

    def keep(module: nn.Module, name: str) -> bool:
        if module is model.output or not isinstance(module, nn.Linear):
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    return keep


def after_optimizer_step(model: Transformer, cfg: StrategyConfig) -> None:
    """Work due after each optimizer step: the float8 scales of FSDP2's float8 all-gather."""
    if cfg.float8 == "tensorwise" and isinstance(model, FSDPModule):
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp  # only float8 runs need it

        precompute_float8_dynamic_scale_for_fsdp(model)


def unwrapped_name(name: str) -> str:
    """A parameter's name as the bare model names it, without the segments that wrappers add."""
    return _WRAPPER_PREFIX.sub("", name)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU (gathered from every rank when sharded; complete on rank 0)."""
    state = model.state_dict()
    if any(isinstance(t, DTensor) for t in state.values()):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
