"""Per-GPU memory of training a model preset, estimated term by term, and checked against a CPU measurement.

`estimate` adds up what one rank holds at its peak: parameters, gradients and optimizer state (divided by FSDP's
data-parallel x context-parallel ranks and, for the weight matrices, by tensor parallelism), the weight copies
that the matmuls read (FSDP's all-gathered blocks, autocast's bf16 copies), the tensors that the forward pass saves
for backward, and the larger of two moments that never coincide: the loss's backward (chunks of float32 logits) and
one block's backward (its recomputation under activation checkpointing, and the gradients in flight). The activation
terms count what lit_open/model/model.py's forward actually saves; `saved_bytes_per_layer` lists them, and the unit
tests compare them with `torch.autograd.graph.saved_tensors_hooks` on tiny models.

`measure_cpu` runs one training step (forward, chunked loss, backward, AdamW) of a small model on this machine's
CPU in a fresh Python process and reports its peak resident memory (VmHWM) above the resident memory before the
model existed.
glibc serves blocks under its mmap threshold from a heap that keeps freed memory, and raises that threshold up to
32 MiB as large blocks are freed: the child runs with MALLOC_MMAP_THRESHOLD_=65536 (a fixed threshold) and
MALLOC_TRIM_THRESHOLD_=131072, so that every tensor of 64 KiB or more gets its own mapping, returned to the system
when freed, the heap's free top is returned too, and the resident memory follows the live tensors. A warm-up step of a
one-block copy of the model at the same shapes, before the baseline, puts thread pools, per-thread malloc arenas and
lazily imported modules into the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from lit_open.compose import load_train_config
from lit_open.config import ACTIVATION_CHECKPOINTING, MIXED_PRECISION_DTYPES, OPTIMIZERS, PRECISIONS
from lit_open.context_parallel import check_context_parallel
from lit_open.errors import UserError, check_choice
from lit_open.model import ModelConfig, Transformer
from lit_open.model.config import ATTENTION_BACKENDS
from lit_open.parallel import apply_activation_checkpointing, check_tensor_parallel
from lit_open.train.loss import lm_loss

GIB, MIB = 2**30, 2**20
TERMS = ("parameters", "gradients", "optimizer", "weight_copies", "activations", "attention", "loss", "backward")
# the loss's backward holds at most this many float32 (tokens x vocab) tensors of one chunk at once: the logits,
# logits - logsumexp and its exp, their product with the incoming gradient, the gather's zero-filled gradient and
# the sum of the two gradients (5.0 measured with torch.profiler's memory timeline, float32 and bfloat16, on CPU)
LOSS_LOGIT_COPIES = 5
OVERRIDES = ("d_model", "n_layer", "n_head", "d_ff", "vocab_size")  # of the preset, for --measure's small models
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


@dataclasses.dataclass(frozen=True)
class Dtypes:
    """Bytes per element: stored parameters (and their gradients), matmul activations (c), the residual stream (r);
    autocast: Lightning's bf16-mixed without a bf16 param_dtype."""

    stored: int
    c: int
    r: int
    autocast: bool

    @staticmethod
    def of(precision: str, param_dtype: str | None) -> Dtypes:
        if precision == "bf16-true":
            return Dtypes(2, 2, 2, False)
        if param_dtype == "bfloat16":  # FSDP computes with bf16 copies: the embedding output, so the residual, is bf16
            return Dtypes(4, 2, 2, False)
        if precision == "bf16-mixed":  # autocast: matmuls in bf16; norms and the residual stream stay float32
            return Dtypes(4, 2, 4, True)
        return Dtypes(4, 4, 4, False)


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per rank. The total adds the persistent terms and the larger of `loss` and `backward`."""

    parameters: int
    gradients: int
    optimizer: int
    weight_copies: int  # FSDP's all-gathered blocks and unsharded gradients; autocast's bf16 weight copies
    activations: int  # tensors saved for backward by every block (as the AC mode keeps them) and the final norm
    attention: int  # each layer's keys and values as the attention kernel keeps them, and its masks or scores
    loss: int  # the loss's backward: logits of one chunk (or of all tokens) and the head's weight gradients
    backward: int  # one block's backward: its recomputation under AC and the gradients in flight

    @property
    def peak_phase(self) -> str:
        return "loss" if self.loss >= self.backward else "backward"

    @property
    def total(self) -> int:
        persistent = self.parameters + self.gradients + self.optimizer + self.weight_copies
        return persistent + self.activations + self.attention + max(self.loss, self.backward)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total, "peak_phase": self.peak_phase}


# -- parameters ------------------------------------------------------------------------------------------------


def parameter_counts(c: ModelConfig) -> dict[str, int]:
    """Parameters by kind: the blocks' matrices, biases (split by TP) and norms, the root's embedding and head (split
    by TP) and final norm. Their sum equals `num_parameters(Transformer(c))`."""
    d, qw, kw, ff = c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.d_ff
    norm = 2 * d if c.norm == "layernorm" else d
    matrices = d * qw + 2 * d * kw + qw * d + (3 if c.mlp == "swiglu" else 2) * d * ff
    biases = (qw + 2 * kw + d + (2 * ff if c.mlp == "swiglu" else ff) + d) if c.bias else 0
    qk = {"none": 0, "full": qw + kw, "head": 2 * c.head_dim}[c.qk_norm]
    embeddings = c.padded_vocab_size * d * (1 if c.tie_embeddings else 2)
    return {
        "block_matrices": c.n_layer * matrices,
        "block_biases": c.n_layer * biases,
        "block_norms": c.n_layer * (2 * norm + qk),
        "embeddings": embeddings,
        "final_norm": norm,
    }


def _optimizer_bytes(c: ModelConfig, optimizer: str, stored: int) -> int:
    """AdamW: two moments in the parameters' dtype. adamw8bit (bitsandbytes): one byte per moment for tensors of
    4096 elements or more (plus one float32 scale per block of values, under 2%, left out), float32 moments for
    smaller ones (norm weights)."""
    if optimizer == "adamw":
        return 2 * stored * sum(parameter_counts(c).values())
    with torch.device("meta"):  # the tensors' sizes only, no memory
        sizes = [p.numel() for p in Transformer(c).parameters()]
    return sum(2 * n if n >= 4096 else 8 * n for n in sizes)


# -- activations -----------------------------------------------------------------------------------------------


def _norm(c: ModelConfig, width: int, rows: int, input_bytes: int, dt: Dtypes) -> int:
    """One norm, per token. RMSNorm saves its input in float32 (the input itself, or x.float()'s copy of a bf16
    input), the reciprocal RMS of each row and the normalised float32 values; LayerNorm its input as it is (float32
    under autocast) and the mean and rstd of each row. The output is saved by whoever reads it."""
    if c.norm == "layernorm":
        return (4 if dt.autocast else input_bytes) * (width + 2 * rows)
    return 8 * width + 4 * rows


def _matmul_input(width: int, source_bytes: int, readers: int, dt: Dtypes) -> int:
    """A tensor read by `readers` projections, per token: saved once by them; under autocast each projection saves
    its own bf16 cast of a float32 input."""
    return readers * 2 * width if dt.autocast and source_bytes == 4 else source_bytes * width


def _attention_kind(c: ModelConfig, document_mask: bool, cp: int = 1) -> str:
    """fused (sdpa, flash, varlen, flex; auto, which is flex under CP on a GPU: O(T) state), dense (SDPA with a
    materialised mask) or math (scores)."""
    if c.attention == "sdpa" and (document_mask or cp > 1):
        return "dense"  # what lit_open.model.attention runs
    return c.attention if c.attention in ("dense", "math") else "fused"


def saved_bytes_per_layer(c: ModelConfig, dt: Dtypes, document_mask: bool = False, cp: int = 1) -> dict[str, int]:
    """What one block's forward saves for backward, in bytes per token, in four parts by how tensor parallelism
    splits them: `seq` (norm inputs and internals: sequence-parallel, split), `gathered` (the all-gathered input of
    the attention and MLP projections: whole), `heads` (q, the attention output and logsumexp, QK-norms, MLP hidden
    units: split), `kv` (keys and values as the attention kernel keeps them; whole sequence under CP).

    d = d_model, qw/kw = query/key-value widths, F = d_ff, c/r = bytes of a matmul activation / the residual:
    pre-norm: norm(x) + the norm output (3 readers) + q, out (qw*c each), logsumexp (4 per head) + k, v (kw*c each)
    + norm(h) + its output (2 readers with SwiGLU) + 4F*c (w1 and w3 outputs, silu(w1), their product; GELU: 2F*c).
    Post-norm (OLMo 2) saves x and h as projection inputs and norms the projections' outputs instead; a parallel
    residual (GPT-NeoX) normalises x twice (one saved input in float32). RoPE saves only its cos/sin tables."""
    d, qw, kw, ff, heads = c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.d_ff, c.n_head
    kind = _attention_kind(c, document_mask, cp)
    mlp_readers, hidden = (2, 4 * ff) if c.mlp == "swiglu" else (1, 2 * ff)
    part = {"seq": 0, "gathered": 0, "heads": hidden * dt.c, "kv": 0}
    if c.qk_norm != "none":  # over the projections' outputs: x.float() of them (or them, float32), never shared
        rows = (1, 1) if c.qk_norm == "full" else (heads, c.n_kv_head)
        part["heads"] += _norm(c, qw, rows[0], 4, dt) + _norm(c, kw, rows[1], 4, dt)
    if kind == "math":  # q, repeated k and v as float32 (autocast: bf16); the output copied when reshaped for wo
        part["heads"] += (2 if dt.autocast else 4) * qw + qw * dt.c
        part["kv"] += 2 * (2 if dt.autocast else 4) * qw
    else:  # q, k, v, the output (also wo's input) and the float32 logsumexp per head
        part["heads"] += 2 * qw * dt.c + 4 * heads
        part["kv"] += 2 * kw * dt.c
    # the projections read x or the norm outputs (residual dtype); post-norm normalises the projections' outputs
    part["gathered"] += _matmul_input(d, dt.r, 3, dt) + _matmul_input(d, dt.r, mlp_readers, dt)
    part["seq"] += 2 * _norm(c, d, 1, dt.c if c.norm_placement == "post" else dt.r, dt)
    if c.parallel_residual and (c.norm == "layernorm" or dt.r == 4):  # both norms save the same x
        part["seq"] -= (4 if dt.autocast else dt.r) * d
    return part


def _selective_bytes_per_layer(c: ModelConfig, dt: Dtypes) -> dict[str, int]:
    """Selective AC keeps the block input and the outputs of the matmuls and of the attention kernel."""
    d, qw, kw, ff = c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.d_ff
    hidden = 2 * ff if c.mlp == "swiglu" else ff
    math = 2 if dt.autocast else 4  # the math backend's matmuls: float32 unless autocast makes them bf16
    heads = (qw + 2 * kw + hidden) * dt.c + qw * (math if c.attention == "math" else dt.c) + 4 * c.n_head
    # wo's and w2's outputs: under TP, partial sums over the whole sequence before their reduce-scatter
    return {"seq": dt.r * d, "gathered": 2 * d * dt.c, "heads": heads, "kv": 0}


def _attention_extras(c: ModelConfig, dt: Dtypes, kind: str, b: int, t_local: int, t: int, tp: int, doc: bool):
    """Bytes per layer beyond O(T): dense SDPA keeps its mask as an additive float mask ((B,1,T,T) with documents,
    else (T,T)); math keeps the (B,H,T,T) float32 probabilities (under CUDA's autocast also their bf16 cast for
    the second matmul; CPU's autocast keeps only bf16 ones) and the boolean mask."""
    rows = b if doc else 1
    if kind == "dense":
        return rows * t_local * t * dt.c
    if kind == "math":
        return b * (c.n_head // tp) * t_local * t * (6 if dt.autocast else 4) + rows * t_local * t
    return 0


# -- the estimate ----------------------------------------------------------------------------------------------


def estimate(
    c: ModelConfig,
    *,
    seq_len: int,
    micro_batch: int,
    data_parallel: int = 1,
    context_parallel: int = 1,
    tensor_parallel: int = 1,
    activation_checkpointing: str = "none",
    loss_chunk_tokens: int = 1024,
    precision: str = "32-true",
    param_dtype: str | None = None,
    optimizer: str = "adamw",
    document_mask: bool = False,
) -> MemoryEstimate:
    """Per-rank memory of training `c` on micro-batches of `micro_batch` x `seq_len` tokens (see the module doc).

    FSDP2 shards parameters, gradients and optimizer state over data_parallel x context_parallel ranks; TP splits
    the weight matrices, embedding and head (norms stay whole) and the per-head/per-hidden activations, and
    sequence parallelism the between-block ones; CP splits the sequence, but each layer's attention all-gathers
    the whole keys and values. The peak is at the start of the backward pass, when every saved tensor still
    exists; parameters, gradients and optimizer state all exist then (gradient accumulation keeps the gradients
    between micro-batches; without it they are allocated during the backward pass, so the total is an upper bound).
    """
    _check(c, seq_len, micro_batch, data_parallel, context_parallel, tensor_parallel)
    check_choice("activation_checkpointing", activation_checkpointing, ACTIVATION_CHECKPOINTING)
    check_choice("precision", precision, PRECISIONS)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    dt = Dtypes.of(precision, param_dtype)
    shard, tp, b = data_parallel * context_parallel, tensor_parallel, micro_batch
    d, vocab, t_local = c.d_model, c.padded_vocab_size, seq_len // context_parallel
    tokens = b * t_local
    counts = parameter_counts(c)
    split = counts["block_matrices"] + counts["block_biases"] + counts["embeddings"]
    if c.qk_norm == "full":  # ShardedNorm shards the full-width QK-norm weights
        split += c.n_layer * (c.n_head + c.n_kv_head) * c.head_dim
    local = split / tp + (sum(counts.values()) - split)
    parameters = round(local * dt.stored / shard)
    optimizer_bytes = round(_optimizer_bytes(c, optimizer, dt.stored) * local / sum(counts.values()) / shard)

    block = sum(counts[k] for k in ("block_matrices", "block_biases", "block_norms")) / c.n_layer / tp
    root = counts["embeddings"] / tp + counts["final_norm"]
    head = vocab * d / tp
    fsdp_weights = 2 if param_dtype == "bfloat16" else dt.stored  # what FSDP all-gathers and computes with
    fsdp = shard > 1 or fsdp_weights != dt.stored  # FSDP keeps copies of the weights
    weight_copies = 0.0
    if fsdp:  # the root stays gathered; a block and the next one are gathered; one block's unsharded gradients
        weight_copies += (root + 3 * block) * fsdp_weights
    if dt.autocast:  # each matmul saves autocast's bf16 copy of its weight for the backward pass
        weight_copies += 2 * (counts["block_matrices"] / tp + head)

    kind = _attention_kind(c, document_mask, context_parallel)
    layer = saved_bytes_per_layer(c, dt, document_mask, context_parallel)
    extras = _attention_extras(c, dt, kind, b, t_local, seq_len, tp, document_mask)
    kv_layer = layer["kv"] / tp * b * seq_len  # CP all-gathers the whole sequence's keys and values

    def size(part: dict[str, int]) -> float:
        return tokens * ((part["seq"] + part["heads"]) / tp + part["gathered"])

    # once per model: the final norm, its output (kept by the loss's chunks, gathered under TP), the token ids
    final = tokens * (_norm(c, d, 1, dt.r, dt) / tp + dt.r * d + 8)
    hidden_grads = tokens * (max(2 * c.d_ff, (c.n_head + 2 * c.n_kv_head) * c.head_dim) / tp * dt.c + d * dt.r)
    rope = 8 * t_local * c.rotary_dim if dt.autocast else 0  # autocast's bf16 cos and sin for q and k, per layer
    recompute = size(layer) + rope + kv_layer + extras
    if activation_checkpointing == "none":
        activations = c.n_layer * (size(layer) + rope) + final
        attention, backward = c.n_layer * (kv_layer + extras), 0.0
    elif activation_checkpointing == "full":  # each block keeps its input; the backward recomputes one block
        activations, attention = c.n_layer * tokens * dt.r * d / tp + final, 0.0
        backward = recompute
    else:
        activations = c.n_layer * size(_selective_bytes_per_layer(c, dt)) + final
        scores = b * (c.n_head // tp) * t_local * seq_len * (2 if dt.autocast else 4)  # math: the first matmul's
        attention = c.n_layer * (scores if kind == "math" else 0)
        # the recomputation rebuilds what the none mode saves, less what selective kept: the first MLP
        # projections' outputs and, from fused kernels, v, the attention output and its logsumexp
        kept = (2 * c.d_ff if c.mlp == "swiglu" else c.d_ff) * dt.c
        if kind != "math":
            kept += (c.n_kv_head * c.head_dim + c.n_head * c.head_dim) * dt.c + 4 * c.n_head
        backward = recompute - tokens * kept / tp
    backward += hidden_grads
    if fsdp:  # the head's unsharded gradient waits for the root's reduce-scatter at the end of the backward pass
        backward += head * fsdp_weights

    n = tokens if loss_chunk_tokens <= 0 or loss_chunk_tokens >= tokens else loss_chunk_tokens
    # the chunks' running sum of the head's weight gradient and the current chunk's; the per-token logsumexp
    loss = LOSS_LOGIT_COPIES * n * vocab * 4 + 2 * head * fsdp_weights + 4 * tokens
    return MemoryEstimate(
        parameters=parameters,
        gradients=parameters,
        optimizer=optimizer_bytes,
        weight_copies=round(weight_copies),
        activations=round(activations),
        attention=round(attention),
        loss=round(loss),
        backward=round(backward),
    )


def _check(c: ModelConfig, seq_len: int, micro_batch: int, dp: int, cp: int, tp: int) -> None:
    sizes = {"--seq-len": seq_len, "--micro-batch": micro_batch, "--data-parallel": dp, "--context-parallel": cp}
    for flag, value in {**sizes, "--tensor-parallel": tp}.items():
        if value < 1:
            raise UserError(f"{flag} {value} must be a positive integer.")
    if seq_len > c.max_seq_len:
        raise UserError(f"--seq-len {seq_len} is longer than the model's context (max_seq_len {c.max_seq_len}).")
    try:
        check_context_parallel(seq_len, cp, c.attention)
    except UserError as err:
        raise UserError(f"--seq-len {seq_len} / --context-parallel {cp} / --attention: {err}") from None
    try:
        check_tensor_parallel(c, tp, seq_len, cp)
    except UserError as err:
        raise UserError(f"--tensor-parallel {tp}: {err}") from None


# -- the CPU measurement ---------------------------------------------------------------------------------------


def _train_step(model: Transformer, optimizer: torch.optim.Optimizer, ids: torch.Tensor, chunk_tokens: int) -> float:
    hidden = model(ids, return_hidden=True)
    loss = lm_loss(hidden, model.output, ids, chunk_tokens=chunk_tokens).loss  # the targets' values do not matter
    loss.backward()
    optimizer.step()
    return loss.item()


def _build(c: ModelConfig, activation_checkpointing: str) -> tuple[Transformer, torch.optim.Optimizer]:
    model = Transformer(c)
    if activation_checkpointing != "none":
        for block in model.layers:
            apply_activation_checkpointing(block, selective=activation_checkpointing == "selective")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak); not ru_maxrss, which Linux carries across exec: a child started
    by a larger process would report that process's resident size."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024  # kB


def measure_step(
    model: dict, seq_len: int, micro_batch: int, activation_checkpointing: str, loss_chunk_tokens: int
) -> dict:
    """In a fresh process (`measure_cpu`): the peak resident memory of one float32 training step of `model` (a
    ModelConfig as a dict) above the resident memory before the model was built, after a warm-up step of a
    one-block copy. A step on 16 tokens creates the gradients and AdamW's moments; the measured step keeps those
    gradients (as gradient accumulation does): parameters, gradients and optimizer state all exist during its
    forward and backward passes, as the estimate assumes."""
    torch.set_num_threads(1)  # memory barely depends on it; on a busy CPU, threads waiting on each other cost 10x
    torch.manual_seed(0)
    c = ModelConfig(**model)
    ids = torch.randint(c.vocab_size, (micro_batch, seq_len))
    warm_model, warm_optimizer = _build(dataclasses.replace(c, n_layer=1), activation_checkpointing)
    _train_step(warm_model, warm_optimizer, ids, loss_chunk_tokens)
    del warm_model, warm_optimizer
    gc.collect()
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS (Linux 4.0+); without it the warm-up's smaller peak stays below the step's
    baseline = _status_bytes("VmRSS")
    net, optimizer = _build(c, activation_checkpointing)
    _train_step(net, optimizer, ids[:1, :16], loss_chunk_tokens)
    start = time.perf_counter()
    loss = _train_step(net, optimizer, ids, loss_chunk_tokens)
    seconds = time.perf_counter() - start
    increase = _status_bytes("VmHWM") - baseline
    return {"peak_increase_bytes": increase, "baseline_bytes": baseline, "seconds": seconds, "loss": loss}


def measure_cpu(
    c: ModelConfig, *, seq_len: int, micro_batch: int, activation_checkpointing: str = "none", loss_chunk_tokens: int
) -> dict:
    """`measure_step` in a fresh Python process, glibc's mmap threshold lowered (see the module doc)."""
    if not sys.platform.startswith("linux"):
        raise UserError("--measure reads /proc/self/status and sets glibc's malloc options: it runs on Linux only.")
    settings = {"model": dataclasses.asdict(c), "seq_len": seq_len, "micro_batch": micro_batch}
    settings |= {"activation_checkpointing": activation_checkpointing, "loss_chunk_tokens": loss_chunk_tokens}
    code = (
        "import json, sys; from lit_open.bench.memory import measure_step; "
        "print(json.dumps(measure_step(**json.loads(sys.argv[1]))))"
    )
    worker = subprocess.run(
        [sys.executable, "-c", code, json.dumps(settings)],
        capture_output=True,
        text=True,
        env={**os.environ, **MALLOC_ENV},
    )
    if worker.returncode != 0:
        raise RuntimeError(
            f"The measured step failed (exit code {worker.returncode}; -9 is usually out of memory):\n{worker.stderr}"
        )
    return json.loads(worker.stdout.splitlines()[-1])


# -- the command -----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="quickstart", help="model preset (conf/model; default: quickstart)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's max_seq_len)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch and rank")
    parser.add_argument("--data-parallel", type=int, default=1, help="FSDP ranks (shard parameters and state)")
    parser.add_argument("--context-parallel", type=int, default=1, help="ranks splitting each sequence")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="ranks splitting heads and hidden units")
    parser.add_argument("--activation-checkpointing", choices=ACTIVATION_CHECKPOINTING, default="none")
    parser.add_argument("--precision", choices=PRECISIONS, help="default: bf16-mixed; 32-true with --measure")
    parser.add_argument("--param-dtype", choices=MIXED_PRECISION_DTYPES, help="strategy.param_dtype (FSDP)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--loss-chunk-tokens", type=int, default=1024, help="strategy.loss_chunk_tokens (0: off)")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, help="model.attention (default: the preset's)")
    parser.add_argument("--document-mask", action="store_true", help="packed documents masked in attention")
    parser.add_argument("--measure", action="store_true", help="also measure one step on this CPU (small models)")
    for key in OVERRIDES:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"override the preset's {key}")


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The preset with the command's overrides; --n-head or --d-model recompute head_dim, --n-head makes the
    attention multi-head (n_kv_head = n_head)."""
    preset = load_train_config([f"model={args.model}"]).model
    fields = {k: v for k in OVERRIDES if (v := getattr(args, k)) is not None}
    if "d_model" in fields or "n_head" in fields:
        fields["head_dim"] = None
    if "n_head" in fields:
        fields["n_kv_head"] = None
    if args.attention:
        fields["attention"] = args.attention
    if args.seq_len and args.seq_len > preset.max_seq_len and args.measure:
        fields["max_seq_len"] = args.seq_len  # a custom size for the CPU check may run past the preset's context
    return dataclasses.replace(preset, **fields) if fields else preset


# what --measure can run: one float32 process with AdamW on this CPU
MEASURABLE = {"data_parallel": 1, "context_parallel": 1, "tensor_parallel": 1, "precision": "32-true"}
MEASURABLE |= {"param_dtype": None, "optimizer": "adamw", "document_mask": False}


def run(args: argparse.Namespace) -> dict:
    c = model_config(args)
    keys = ("micro_batch", "data_parallel", "context_parallel", "tensor_parallel", "activation_checkpointing")
    keys += ("loss_chunk_tokens", "param_dtype", "optimizer", "document_mask")
    settings = {"seq_len": args.seq_len or c.max_seq_len, **{k: getattr(args, k) for k in keys}}
    settings["precision"] = args.precision or ("32-true" if args.measure else "bf16-mixed")
    found = estimate(c, **settings).to_dict()
    results = {"estimate": found, "estimate_gib": {k: v / GIB for k, v in found.items() if k != "peak_phase"}}
    if args.measure:
        for key, wanted in MEASURABLE.items():
            if settings[key] != wanted and not (key == "param_dtype" and settings[key] == "float32"):
                raise UserError(
                    f"--measure runs one float32 process with AdamW on this CPU, but --{key.replace('_', '-')} is "
                    f"{settings[key]}; drop --measure, or leave that option at its default."
                )
        keys = ("seq_len", "micro_batch", "activation_checkpointing", "loss_chunk_tokens")
        results["measured"] = measured = measure_cpu(c, **{k: settings[k] for k in keys})
        results["ratio"] = found["total"] / measured["peak_increase_bytes"]
    _print_table(args.model, settings, results)
    return {"config": {"model": args.model, **settings, "model_config": dataclasses.asdict(c)}, **results}


def _print_table(name: str, s: dict, results: dict) -> None:
    table = Table(
        title=f"{name}: {s['micro_batch']} x {s['seq_len']} tokens, dp/cp/tp {s['data_parallel']}/"
        f"{s['context_parallel']}/{s['tensor_parallel']}, AC {s['activation_checkpointing']}, {s['precision']}",
        caption=f"total: the other terms + the larger of loss and backward ({results['estimate']['peak_phase']})",
    )
    for column in ("term", "GiB", "MiB"):
        table.add_column(column, justify="left" if column == "term" else "right")
    for term in (*TERMS, "total"):
        value = results["estimate"][term]
        table.add_row(term, f"{value / GIB:.3f}", f"{value / MIB:,.1f}")
    if "measured" in results:
        measured = results["measured"]["peak_increase_bytes"]
        table.add_row("measured (CPU)", f"{measured / GIB:.3f}", f"{measured / MIB:,.1f}")
        table.add_row("estimate / measured", f"{results['ratio']:.3f}", "")
    Console().print(table)
