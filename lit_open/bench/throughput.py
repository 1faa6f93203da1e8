"""Training throughput of a model preset: tokens/s, achieved TFLOP/s, MFU and peak memory, per training loop.

The same model (built on the meta device, `lit_open.parallel.parallelize`d, `materialize`d with the same seed) is
trained on the same random token batches, one runner after the other in this process:

- `lightning`: the real `LitLM` through `lightning.Trainer` (manual optimization, gradient clipping, the LR
  schedule, its per-step metrics), with loggers, checkpointing and the progress bar off;
- `bare`: a plain PyTorch loop doing the same work (forward, `lit_open.loss.lm_loss`, backward, clip, AdamW, LR
  schedule): the reference that Lightning's overhead is measured against;
- `litgpt`: litgpt's `GPT` with the same sizes, optimizer and loss, when `import litgpt` works.

Model FLOPs per token = 6*N + 12*L*d*T (Kaplan et al. 2020 / PaLM appendix B): N = parameters without the input
embedding (the output head counted; a tied embedding counted once, as the head), L = layers, d = n_head * head_dim,
T = sequence length. The attention term counts the full T x T score matrix, causal masking ignored, as PaLM does.
Activation-checkpointing recomputation is not counted: MFU measures useful model work. Achieved FLOP/s = FLOPs per
token x tokens/s; MFU = achieved / the GPU's dense peak (`PEAK_TFLOPS`) for the compute dtype (bf16 for bf16
precisions, FSDP's bf16 param_dtype and float8 runs; TF32 or FP32 for 32-true). There is no peak for CPUs: MFU n/a.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from lit_open.compose import conf_dir, load_train_config
from lit_open.config import FLOAT8_RECIPES, OPTIMIZERS, PRECISIONS, TrainConfig
from lit_open.errors import UserError
from lit_open.loss import lm_loss
from lit_open.model import ModelConfig, Transformer, num_parameters
from lit_open.optim import build_optimizer, build_scheduler
from lit_open.parallel import DTYPES, after_optimizer_step, materialize, parallelize

RUNNERS = ("lightning", "bare", "litgpt")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' datasheets: (a substring of torch.cuda.get_device_name(),
# the GPU, bf16 tensor cores, TF32 tensor cores, FP32 without tensor cores). The first match wins, so more specific
# names come first ("H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L40" before "L4").
PEAK_TFLOPS: list[tuple[str, str, float, float | None, float | None]] = [
    ("H100 NVL", "H100 NVL", 835, 417.5, 60),
    ("H100 PCIe", "H100 PCIe", 756, 378, 51.2),
    ("H100", "H100 SXM", 989, 494.5, 66.9),
    ("H200 NVL", "H200 NVL", 835, 417.5, 60),
    ("GH200", "GH200", 989, 494.5, 66.9),
    ("H200", "H200 SXM", 989, 494.5, 66.9),
    ("B200", "B200", 2250, 1100, 75),
    ("A100", "A100", 312, 156, 19.5),
    ("L40S", "L40S", 362, 183, 91.6),
    ("L40", "L40", 181, 90.5, 90.5),
    ("L4", "L4", 121, 60, 30.3),
    ("A10G", "A10G (A10 datasheet)", 125, 62.5, 31.2),
    ("A10", "A10", 125, 62.5, 31.2),
    ("RTX 4090", "RTX 4090", 165, 82.6, 82.6),
    ("RTX 3090", "RTX 3090", 71, 35.6, 35.6),
    ("MI300X", "MI300X", 1307, 653.7, 163.4),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    presets = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
    parser.add_argument("--model", default="quickstart", choices=presets, help="model preset (conf/model)")
    parser.add_argument("--micro-batch", type=int, help="sequences per step (default: the preset's recipe's)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's recipe's)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3, at least 1)")
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="trainer.precision (default: bf16-mixed on CUDA, 32-true on CPU)"
    )
    parser.add_argument(
        "--strategy",
        choices=("auto", "fsdp"),
        default="auto",
        help="auto: one plain device; fsdp: FSDP2 on one device with bf16 param_dtype (strategy.param_dtype)",
    )
    parser.add_argument("--activation-checkpointing", choices=ACTIVATION_CHECKPOINTING, default="none")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (strategy.compile)")
    parser.add_argument("--float8", choices=FLOAT8_RECIPES, default="none", help="torchao float8 matmuls (Hopper)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="optim.name")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, help="model init and data seed (default: the config's run.seed)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override of the training config, applied last (repeatable), e.g. strategy.loss_chunk_tokens=0",
    )
    parser.add_argument(
        "--runners",
        default=",".join(RUNNERS),
        help=f"comma-separated, of {', '.join(RUNNERS)} (default: all; litgpt only where it imports)",
    )


# -- configuration ------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but torch sees no CUDA device; use --device cpu (or auto).")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def hydra_overrides(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The training-config overrides that the options stand for; `--override`s come last and win."""
    recipe = [f"recipe={args.model}"] if (conf_dir() / "recipe" / f"{args.model}.yaml").is_file() else []
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    overrides = [
        *recipe,
        f"model={args.model}",
        f"trainer.precision={precision}",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        "trainer.num_nodes=1",
        f"trainer.max_steps={args.warmup + args.steps}",
        f"optim.name={args.optimizer}",
        f"strategy={args.strategy}",
        f"strategy.activation_checkpointing={args.activation_checkpointing}",
        f"strategy.compile={str(args.compile).lower()}",
        f"strategy.float8={args.float8}",
        "data.num_workers=0",
        # one micro-batch per optimizer step, whatever the recipe's global batch
        "data.global_batch_size=${data.micro_batch_size}",
    ]
    if args.strategy == "fsdp":
        overrides.append("strategy.param_dtype=bfloat16")
    if args.seq_len is not None:
        overrides.append(f"data.seq_len={args.seq_len}")
    if args.micro_batch is not None:
        overrides.append(f"data.micro_batch_size={args.micro_batch}")
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    return overrides + list(args.override)


def load_config(args: argparse.Namespace, device: torch.device) -> tuple[TrainConfig, list[str]]:
    overrides = hydra_overrides(args, device)
    return load_train_config(overrides), overrides


# -- FLOPs, peaks, memory --------------------------------------------------------------------------------------


def non_embedding_parameters(config: ModelConfig) -> int:
    """N of the FLOP formula: all parameters but the input embedding; a tied embedding counts once, as the head."""
    with torch.device("meta"):
        model = Transformer(config)
    n = num_parameters(model)
    return n if config.tie_embeddings else n - model.tok_embeddings.weight.numel()


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, forward and backward: 6*N + 12*L*d*T (see the module docstring)."""
    d = config.n_head * config.head_dim
    return 6 * non_embedding_parameters(config) + 12 * config.n_layer * d * seq_len


def peak_flops(device_name: str | None, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s of a GPU named like torch.cuda.get_device_name() for dtype bf16 | tf32 | fp32; None when
    the device is not in the table (or is a CPU)."""
    if not device_name:
        return None
    for match, _gpu, bf16, tf32, fp32 in PEAK_TFLOPS:
        if match.lower() in device_name.lower():
            value = {"bf16": bf16, "tf32": tf32, "fp32": fp32}[dtype]
            return value * 1e12 if value is not None else None
    return None


def peak_entry(device_name: str | None) -> str | None:
    """The GPU of the peak table that `device_name` matched, if any."""
    for match, gpu, *_ in PEAK_TFLOPS:
        if device_name and match.lower() in device_name.lower():
            return gpu
    return None


def compute_dtype(cfg: TrainConfig) -> str:
    """Which peak applies: bf16 when the matmuls run in bf16 (or float8), else TF32 or FP32 by matmul precision."""
    if (
        cfg.trainer.precision.startswith("bf16")
        or cfg.strategy.param_dtype == "bfloat16"
        or cfg.strategy.float8 != "none"
    ):
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name() -> str:
    import os
    import platform

    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"CPU: {name} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


_start_memory: dict[int | None, int] = {}


def _reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        _start_memory[device.index] = torch.cuda.memory_allocated(device)


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "start_memory_gib": _start_memory.get(device.index, 0) / 2**30,  # left over from earlier runners
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "memory_kind": "torch.cuda.max_memory_allocated",
        }
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    # The process's resident-set high-water mark: it never goes down, so a later runner reports at least the
    # peak of the earlier ones.
    return {"peak_memory_gib": kib / 2**20, "memory_kind": "process max RSS (high-water, since process start)"}


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


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


# -- process group (FSDP2 on one device) ----------------------------------------------------------------------


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A world of one process, for FSDP2 on one device; Lightning's ModelParallelStrategy reuses it."""
    import torch.distributed as dist

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
    from torch.distributed.device_mesh import init_device_mesh

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


# -- runners ---------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    device: torch.device
    warmup: int
    steps: int


def run_lightning(cfg: TrainConfig, bench: Bench) -> dict[str, Any]:
    """The real LitLM through lightning.Trainer, as `lit-open train` runs it minus loggers, checkpoints, progress."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lit_open.module import LitLM
    from lit_open.train import build_strategy, parallel_sizes

    class StepTimer(Callback):
        """Wall time from the end of the last warmup step to the end of the last step (all of the loop inside)."""

        def __init__(self) -> None:
            self.start = self.end = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == bench.warmup - 1:
                self.start = _now(bench.device)
            if batch_idx == bench.warmup + bench.steps - 1:
                self.end = _now(bench.device)

    for name in ("lightning.pytorch", "lightning.fabric"):  # banners and tips; warnings stay
        logging.getLogger(name).setLevel(logging.WARNING)
    # torchao, imported by Lightning's fit, registers an Enum with torch's pytree, which warns that it is deprecated
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    total = bench.warmup + bench.steps
    timer = StepTimer()
    module = LitLM(cfg)
    with tempfile.TemporaryDirectory(prefix="lit-open-bench-") as root:
        trainer = L.Trainer(
            accelerator="gpu" if bench.device.type == "cuda" else "cpu",
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
            callbacks=[timer],
            default_root_dir=root,
            inference_mode=False,
        )
        trainer.fit(module, train_dataloaders=make_loader(cfg, total))
    if timer.start is None or timer.end is None:
        raise RuntimeError(f"Lightning stopped after {trainer.global_step} of {total} steps")
    loss = module.last_metrics["train/loss"]
    return {"seconds": timer.end - timer.start, "loss": loss, **_peak_memory(bench.device)}


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


def run_bare(cfg: TrainConfig, bench: Bench) -> dict[str, Any]:
    """The same model, loss, optimizer, clipping and schedule in a plain PyTorch loop."""
    model = build_bare_model(cfg, bench.device)

    def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
        hidden = model(batch["input_ids"], batch.get("doc_ids"), return_hidden=True)
        return lm_loss(hidden, model.output, batch["targets"], cfg.strategy.loss_chunk_tokens).loss

    return _train_loop(cfg, bench, model, loss_fn, lambda: after_optimizer_step(model, cfg.strategy))


def _train_loop(
    cfg: TrainConfig,
    bench: Bench,
    model: torch.nn.Module,
    loss_fn: Callable[[dict[str, Any]], torch.Tensor],
    after_step: Callable[[], None],
) -> dict[str, Any]:
    """Steps of forward + loss (under autocast for bf16-mixed), backward, clip, AdamW, LR schedule; the steps after
    the warmup are timed, fetching the batches included (as in Lightning's loop)."""
    from lit_open.module import clip_gradients  # LitLM's own; lit_open.module imports lightning, hence here

    total = bench.warmup + bench.steps
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total)
    start = None
    loss = None
    for i, batch in enumerate(make_loader(cfg, total)):
        batch = _to_device(batch, bench.device)
        with _autocast(cfg, bench.device):
            loss = loss_fn(batch)
        loss.backward()
        clip_gradients([p for p in model.parameters() if p.grad is not None], cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        after_step()
        optimizer.zero_grad(set_to_none=True)
        if i == bench.warmup - 1:
            start = _now(bench.device)
    seconds = _now(bench.device) - start
    result = {"seconds": seconds, "loss": loss.item(), **_peak_memory(bench.device)}
    del optimizer, scheduler, loss
    return result


def litgpt_unavailable() -> str | None:
    try:
        import litgpt  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name == "litgpt":
            return "litgpt is not installed (pip install litgpt)"
        return f"litgpt does not import ({err})"
    except Exception as err:  # broken against this torch
        return f"litgpt does not import ({type(err).__name__}: {err})"
    return None


def litgpt_config(config: ModelConfig):
    """A litgpt.Config with the sizes and layout of `config` (keys this litgpt version lacks are left out)."""
    from dataclasses import fields

    from litgpt import Config

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


def run_litgpt(cfg: TrainConfig, bench: Bench) -> dict[str, Any]:
    """litgpt's GPT with the same sizes, lit-open's optimizer and loss, and the same compile/AC/FSDP2 switches."""
    from litgpt.model import GPT
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(cfg.run.seed)
    true_bf16 = cfg.trainer.precision == "bf16-true"
    with torch.device(bench.device), _default_dtype(torch.bfloat16) if true_bf16 else contextlib.nullcontext():
        model = GPT(litgpt_config(cfg.model))
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
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
        s = cfg.strategy
        policy = MixedPrecisionPolicy(
            param_dtype=DTYPES[s.param_dtype] if s.param_dtype else None, reduce_dtype=DTYPES[s.reduce_dtype]
        )
        mesh = _single_device_mesh(bench.device)["data_parallel"]
        for i, block in enumerate(blocks):
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    model = model.to(bench.device)

    def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
        hidden = model(batch["input_ids"])
        return lm_loss(hidden, head, batch["targets"], cfg.strategy.loss_chunk_tokens).loss

    return _train_loop(cfg, bench, model, loss_fn, lambda: None)


RUNNER_FUNCTIONS = {"lightning": run_lightning, "bare": run_bare, "litgpt": run_litgpt}


# -- the benchmark ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    runners = list(dict.fromkeys(r.strip() for r in args.runners.split(",") if r.strip()))
    unknown = sorted(set(runners) - set(RUNNERS))
    if unknown or not runners:
        raise UserError(f"--runners {args.runners!r}: choose among {', '.join(RUNNERS)}.")
    if args.warmup < 1 or args.steps < 1:
        raise UserError("--warmup and --steps must be at least 1 (the first step includes one-time setup).")
    device = resolve_device(args.device)
    cfg, overrides = load_config(args, device)
    if cfg.trainer.matmul_precision:
        torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
    bench = Bench(device=device, warmup=args.warmup, steps=args.steps)
    name = device_name(device)
    dtype = compute_dtype(cfg)
    peak = peak_flops(name, dtype) if device.type == "cuda" else None
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = cfg.data.micro_batch_size * cfg.data.seq_len
    config = {
        "model": args.model,
        "micro_batch": cfg.data.micro_batch_size,
        "seq_len": cfg.data.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "precision": cfg.trainer.precision,
        "strategy": cfg.strategy.name,
        "param_dtype": cfg.strategy.param_dtype,
        "activation_checkpointing": cfg.strategy.activation_checkpointing,
        "compile": cfg.strategy.compile,
        "float8": cfg.strategy.float8,
        "optimizer": cfg.optim.name,
        "device": device.type,
        "seed": cfg.run.seed,
        "runners": runners,
        "hydra_overrides": overrides,
        "train_config": asdict(cfg),
    }
    results: dict[str, Any] = {
        "flops_per_token": per_token,
        "flops_formula": "6*N + 12*L*d*T",
        "non_embedding_parameters": non_embedding_parameters(cfg.model),
        "n_layer": cfg.model.n_layer,
        "d_attention": cfg.model.n_head * cfg.model.head_dim,
        "tokens_per_step": tokens_per_step,
        "compute_dtype": dtype,
        "peak_flops": peak,
        "peak_table_entry": peak_entry(name) if device.type == "cuda" else None,
        "runners": {},
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*have no `val_dataloader`.*")  # nothing to validate here
        with single_process_group(device) if cfg.strategy.name == "fsdp" else contextlib.nullcontext():
            for runner in runners:
                results["runners"][runner] = _run_one(runner, cfg, bench, per_token, tokens_per_step, peak)
    ok = results["runners"]
    if ok.get("lightning", {}).get("status") == "ok" and ok.get("bare", {}).get("status") == "ok":
        results["lightning_overhead_pct"] = 100 * (ok["lightning"]["seconds"] / ok["bare"]["seconds"] - 1)
    else:
        results["lightning_overhead_pct"] = None
    print_table(config, results, name)
    return {"config": config, "results": results}


def _run_one(
    runner: str, cfg: TrainConfig, bench: Bench, per_token: int, tokens_per_step: int, peak: float | None
) -> dict[str, Any]:
    if runner == "litgpt" and (why := litgpt_unavailable()):
        return {"status": "skipped", "note": why}
    _reset_peak_memory(bench.device)
    torch.manual_seed(cfg.run.seed)
    try:
        measured = RUNNER_FUNCTIONS[runner](cfg, bench)
    except UserError:
        raise
    except Exception as err:
        if runner != "litgpt":
            raise
        return {"status": "failed", "note": f"{type(err).__name__}: {err}"}
    finally:
        gc.collect()
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
        if cfg.strategy.compile:
            torch._dynamo.reset()
    tokens = tokens_per_step * bench.steps
    tokens_per_s = tokens / measured["seconds"]
    achieved = per_token * tokens_per_s
    return {
        "status": "ok",
        "steps": bench.steps,
        "tokens": tokens,
        **measured,
        "seconds_per_step": measured["seconds"] / bench.steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": per_token,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "loss_finite": math.isfinite(measured["loss"]),
    }


def print_table(config: dict[str, Any], results: dict[str, Any], name: str) -> None:
    overhead = results["lightning_overhead_pct"]
    peak = results["peak_flops"]
    table = Table(
        title=f"{config['model']}: micro-batch {config['micro_batch']} x {config['seq_len']} tokens, "
        f"{config['precision']}, strategy {config['strategy']}"
        + (f" (param_dtype {config['param_dtype']})" if config["param_dtype"] else "")
        + (f", AC {config['activation_checkpointing']}" if config["activation_checkpointing"] != "none" else "")
        + (", compiled" if config["compile"] else "")
        + (f", float8 {config['float8']}" if config["float8"] != "none" else "")
        + f"\n{name}; {config['steps']} timed steps after {config['warmup']} warmup",
        caption=f"FLOPs/token = 6*N + 12*L*d*T = {results['flops_per_token']:,} "
        f"(N = {results['non_embedding_parameters']:,} without the input embedding); "
        + (f"peak {peak / 1e12:,.0f} TFLOP/s {results['compute_dtype']}" if peak else "no peak known here: MFU n/a")
        + (f"; Lightning overhead over the bare loop: {overhead:+.1f}%" if overhead is not None else ""),
    )
    for column in ("runner", "tokens/s", "TFLOP/s", "MFU", "peak memory (GiB)", "s/step", "final loss", "note"):
        table.add_column(column, justify="left" if column in ("runner", "note") else "right")
    for runner, r in results["runners"].items():
        if r["status"] != "ok":
            table.add_row(runner, *["-"] * 6, f"{r['status']}: {r['note']}", style="dim")
            continue
        table.add_row(
            runner,
            f"{r['tokens_per_s']:,.0f}",
            f"{r['achieved_tflops']:,.3g}",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
            f"{r['peak_memory_gib']:,.2f}",
            f"{r['seconds_per_step']:.3f}",
            f"{r['loss']:.4f}",
            "",
        )
    Console(width=max(120, Console().width)).print(table)
