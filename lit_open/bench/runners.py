"""The training loops that the throughput benchmark times, on the same model, seed and batches.

- `lightning`: the real `LitLM` through `lightning.Trainer` (manual optimization, gradient clipping, the LR
  schedule, its per-step metrics), with loggers, checkpointing and the progress bar off;
- `bare`: a plain PyTorch loop doing the same work (forward, `lit_open.train.loss.lm_loss`, backward, clip, AdamW, LR
  schedule): the reference that Lightning's overhead is measured against;
- `litgpt`: litgpt's `GPT` with the same sizes, initialised as litgpt's pretraining script does, with lit-open's
  optimizer and loss, when `import litgpt` works.

Each runner trains `clock.total_steps` steps on `clock.device` and tells its clock (`lit_open.bench.turns`) where
each step begins and ends, and its loss: the clock takes turns with the other runners, times them and keeps the
losses.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset

from lit_open.bench.turns import RunnerClock
from lit_open.config import TrainConfig
from lit_open.model import ModelConfig, Transformer
from lit_open.parallel import after_optimizer_step, apply_fsdp, materialize, parallelize
from lit_open.train.loss import lm_loss
from lit_open.train.module import LitLM
from lit_open.train.optim import build_optimizer, build_scheduler
from lit_open.train.runner import build_strategy, parallel_sizes

# -- data ------------------------------------------------------------------------------------------------------


class RandomTokens(Dataset):
    """`length` micro-batches of uniformly random tokens, each a batch dict in the format of `TokenSamples.collate`.

    Batch i is drawn from its own generator (seed, i), so every runner sees the same batches.
    """

    def __init__(self, vocab_size: int, micro_batch: int, seq_len: int, length: int, seed: int) -> None:
        self.vocab_size, self.micro_batch, self.seq_len, self.length, self.seed = (
            vocab_size,
            micro_batch,
            seq_len,
            length,
            seed,
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        tokens = torch.randint(self.vocab_size, (self.micro_batch, self.seq_len + 1), generator=generator)
        rows = torch.arange(i * self.micro_batch, (i + 1) * self.micro_batch)
        return {
            "input_ids": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "samples": torch.stack((torch.zeros_like(rows), rows), dim=1),  # (source, index) per row
            "data_step": i,
            "micro": 0,
            "n_micro": 1,
        }


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def make_loader(cfg: TrainConfig, total_steps: int) -> DataLoader:
    dataset = RandomTokens(cfg.model.vocab_size, cfg.data.micro_batch_size, cfg.data.seq_len, total_steps, cfg.run.seed)
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=0, collate_fn=_identity)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# -- process group and dtypes ----------------------------------------------------------------------------------


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A world of one process, for FSDP2 on one device; Lightning's ModelParallelStrategy reuses it."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="lit-open-bench-pg-") as tmp:
        store = dist.FileStore(str(Path(tmp) / "store"), 1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _single_device_mesh(device: torch.device):
    return init_device_mesh(device.type, (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.trainer.precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- lightning -------------------------------------------------------------------------------------------------


def run_lightning(cfg: TrainConfig, clock: RunnerClock) -> None:
    """The real LitLM through lightning.Trainer, as `lit-open train` runs it minus loggers, checkpoints, progress."""

    class StepClock(Callback):
        """Reports LitLM's steps to the bench clock (the loss: LitLM's metrics of the step just done)."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            clock.step_begins(batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clock.step_ends(batch_idx, pl_module.run.last_metrics["train/loss"])

    for name in ("lightning.pytorch", "lightning.fabric"):  # banners and tips; warnings stay
        logging.getLogger(name).setLevel(logging.WARNING)
    # torchao, imported by Lightning's fit, registers an Enum with torch's pytree, which warns that it is deprecated
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    total = clock.total_steps
    module = LitLM(cfg)
    with tempfile.TemporaryDirectory(prefix="lit-open-bench-") as root:
        trainer = L.Trainer(
            accelerator="gpu" if clock.device.type == "cuda" else "cpu",
            devices=1,
            strategy=build_strategy(cfg.strategy.name, *parallel_sizes(cfg)),
            precision=cfg.trainer.precision,
            max_steps=total,
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            callbacks=[StepClock()],
            default_root_dir=root,
            inference_mode=False,
        )
        trainer.fit(module, train_dataloaders=make_loader(cfg, total))
    if trainer.global_step != total:
        raise RuntimeError(f"Lightning stopped after {trainer.global_step} of {total} steps")


# -- bare ------------------------------------------------------------------------------------------------------


def build_bare_model(cfg: TrainConfig, device: torch.device) -> Transformer:
    """As LitLM.configure_model and Lightning build it: meta -> parallelize -> materialize (-> device, dtype)."""
    sharded = cfg.strategy.name == "fsdp"
    true_bf16 = cfg.trainer.precision == "bf16-true"
    with _default_dtype(torch.bfloat16) if true_bf16 else contextlib.nullcontext(), torch.device("meta"):
        model = Transformer(cfg.model)
    parallelize(model, cfg.strategy, _single_device_mesh(device) if sharded else None)
    model = materialize(model, device, cfg.run.seed)  # on the device, as LitLM does: the same initial values
    if true_bf16:
        model = model.to(torch.bfloat16)  # Lightning's bf16-true converts the buffers (RoPE tables) too
    return model.to(device)


def run_bare(cfg: TrainConfig, clock: RunnerClock, read_back: bool = False) -> None:
    """The same model, loss, optimizer, clipping and schedule in a plain PyTorch loop."""
    model = build_bare_model(cfg, clock.device)

    def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
        hidden = model(batch["input_ids"], batch.get("doc_ids"), return_hidden=True)
        return lm_loss(hidden, model.output, batch["targets"], cfg.strategy.loss_chunk_tokens).loss

    _train_loop(cfg, clock, model, loss_fn, lambda: after_optimizer_step(model, cfg.strategy), read_back)


def run_bare_sync(cfg: TrainConfig, clock: RunnerClock) -> None:
    """The bare loop reading the loss and the gradient norm back before each update, as LitLM does for its metrics
    and its plugins' skip and rollback decisions: `lightning` against it is Lightning's own overhead, it against
    `bare` that synchronisation's."""
    run_bare(cfg, clock, read_back=True)


def _train_loop(
    cfg: TrainConfig,
    clock: RunnerClock,
    model: torch.nn.Module,
    loss_fn: Callable[[dict[str, Any]], torch.Tensor],
    after_step: Callable[[], None],
    read_back: bool = False,
) -> None:
    """Steps of forward + loss (under autocast for bf16-mixed), backward, clip, AdamW, LR schedule, as the clock
    asks; fetching a batch belongs to the step (as in Lightning's loop). Nothing is read back to the host until the
    end (the losses stay on the device), unless `read_back`: then the loss and the gradient norm before each update."""
    from lit_open.train.module import clip_gradients  # LitLM's own; lit_open.train.module imports lightning, hence here

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, clock.total_steps)
    for i, batch in enumerate(make_loader(cfg, clock.total_steps)):
        clock.step_begins(i)
        batch = _to_device(batch, clock.device)
        with _autocast(cfg, clock.device):
            loss = loss_fn(batch)
        loss.backward()
        grad_norm = clip_gradients([p for p in model.parameters() if p.grad is not None], cfg.optim.grad_clip)
        if read_back:  # the host waits for the backward before it can queue the update
            loss.item(), grad_norm.item()
        optimizer.step()
        scheduler.step()
        after_step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_ends(i, loss)
    del optimizer, scheduler


# -- litgpt ----------------------------------------------------------------------------------------------------


def litgpt_unavailable() -> str | None:
    """Why the litgpt runner cannot run here, or None when `import litgpt` works."""
    try:
        import litgpt  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name == "litgpt":
            return "litgpt is not installed (pip install --no-deps litgpt: see docs/benchmarks.md)"
        return f"litgpt does not import ({err})"
    except Exception as err:  # broken against this torch
        return f"litgpt does not import ({type(err).__name__}: {err})"
    return None


def litgpt_config(config: ModelConfig):
    """A litgpt.Config with the sizes and layout of `config` (keys this litgpt version lacks are left out)."""
    from litgpt import Config  # litgpt is optional: the benchmark skips its runner when it does not import

    kwargs = {
        "name": f"lit-open-{config.name}",
        "block_size": config.max_seq_len,
        "vocab_size": config.vocab_size,
        "padded_vocab_size": config.padded_vocab_size,
        "n_layer": config.n_layer,
        "n_embd": config.d_model,
        "n_head": config.n_head,
        "head_size": config.head_dim,
        "n_query_groups": config.n_kv_head,
        "rotary_percentage": config.rotary_fraction,
        "rope_base": int(config.rope_theta),
        "parallel_residual": config.parallel_residual,
        "bias": config.bias,
        "norm_class_name": "RMSNorm" if config.norm == "rmsnorm" else "LayerNorm",
        "norm_eps": config.norm_eps,
        "mlp_class_name": "LLaMAMLP" if config.mlp == "swiglu" else "GptNeoxMLP",
        "intermediate_size": config.d_ff,
    }
    if config.norm_placement == "post":  # OLMo 2's layout in litgpt
        kwargs.update(post_attention_norm=True, post_mlp_norm=True, norm_1=False, norm_2=False)
    if config.qk_norm != "none":
        kwargs.update(norm_qk=True, norm_qk_type="olmo2" if config.qk_norm == "full" else "default")
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in kwargs.items() if k in known})


def init_litgpt_weights(model: torch.nn.Module) -> None:
    """litgpt's pretraining initialisation of a `GPT`, as `initialize_weights` in litgpt/pretrain.py (litgpt 0.5.13;
    GPT-NeoX's, via TinyLlama) does it without FSDP: every nn.Embedding and nn.Linear ~ N(0, sqrt(2 / (5 * n_embd))),
    biases zero; the output projections `proj` of `CausalSelfAttention` and `LLaMAMLP` (not of `GptNeoxMLP`, as in
    litgpt) ~ N(0, 1 / (sqrt(n_embd) * n_layer)); then `litgpt.utils.reset_parameters(model)` runs every module's
    `reset_parameters` in `model.modules()` order (norms to one, the RoPE cache), drawing from torch's generator in
    litgpt's order. Without it, GPT keeps PyTorch's default initialisation (embedding ~ N(0, 1)), whose first-step
    loss is far above ln(vocab)."""
    from litgpt.model import CausalSelfAttention, LLaMAMLP  # optional, as in litgpt_config
    from litgpt.utils import reset_parameters

    n_layer, n_embd = model.config.n_layer, model.config.n_embd

    def init_weights(module: torch.nn.Module, std: float) -> None:
        torch.nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            torch.nn.init.zeros_(module.bias)

    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.Linear)):
            module.reset_parameters = partial(init_weights, module, std=math.sqrt(2.0 / 5 / n_embd))
    for module in model.modules():  # a second loop, as in litgpt: `proj` is an nn.Linear too
        if isinstance(module, (LLaMAMLP, CausalSelfAttention)):
            module.proj.reset_parameters = partial(init_weights, module.proj, std=1 / math.sqrt(n_embd) / n_layer)
    reset_parameters(model)


def run_litgpt(cfg: TrainConfig, clock: RunnerClock) -> None:
    """litgpt's GPT with the same sizes, lit-open's optimizer and loss, and the same compile/AC/FSDP2 switches."""
    from litgpt.model import GPT  # optional, as in litgpt_config

    true_bf16 = cfg.trainer.precision == "bf16-true"
    with torch.device(clock.device), _default_dtype(torch.bfloat16) if true_bf16 else contextlib.nullcontext():
        model = GPT(litgpt_config(cfg.model))
        torch.manual_seed(cfg.run.seed)  # litgpt builds under empty_init: its draws start at the seed
        init_litgpt_weights(model)
    if cfg.model.tie_embeddings:  # after the initialisation, and this way round, as litgpt/pretrain.py ties them
        model.transformer.wte.weight = model.lm_head.weight
    # lit-open's chunked loss applies the head itself: the model returns the final-normed hidden states.
    head = model.lm_head
    model.lm_head = torch.nn.Identity()
    model.bench_head = head  # registered, so that the optimizer, FSDP and .to() see it
    if true_bf16:
        model = model.to(torch.bfloat16)
    if cfg.strategy.float8 != "none":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(
            model.transformer,
            config=Float8LinearConfig.from_recipe_name(cfg.strategy.float8),
            module_filter_fn=lambda m, _name: m.in_features % 16 == 0 and m.out_features % 16 == 0,
        )
    blocks = list(model.transformer.h)
    if cfg.strategy.activation_checkpointing != "none":  # full recomputation (no selective policy here)
        for block in blocks:
            forward = block.forward
            block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    if cfg.strategy.compile:
        for block in blocks:
            block.compile()
    if cfg.strategy.name == "fsdp":
        apply_fsdp(model, blocks, _single_device_mesh(clock.device)["data_parallel"], cfg.strategy)
    model = model.to(clock.device)

    def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
        hidden = model(batch["input_ids"])
        return lm_loss(hidden, head, batch["targets"], cfg.strategy.loss_chunk_tokens).loss

    _train_loop(cfg, clock, model, loss_fn, lambda: None)


RUNNER_FUNCTIONS: dict[str, Callable[[TrainConfig, RunnerClock], None]] = {
    "lightning": run_lightning,
    "bare": run_bare,
    "bare_sync": run_bare_sync,
    "litgpt": run_litgpt,
}
RUNNERS = tuple(RUNNER_FUNCTIONS)
