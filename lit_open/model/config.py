"""The architecture of a decoder, as one dataclass: Llama family, OLMo 2 and GPT-NeoX/Pythia layouts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lit_open.errors import UserError, check_choice

FAMILIES = ("llama", "olmo2", "gpt_neox")
NORMS = ("rmsnorm", "layernorm")
NORM_PLACEMENTS = ("pre", "post")
QK_NORMS = ("none", "full", "head")
MLPS = ("swiglu", "gelu")
ATTENTION_BACKENDS = ("auto", "flash_attn", "sdpa", "varlen", "flex", "dense", "math")
# Backends that attend from queries at given positions of a longer key sequence (context parallelism).
POSITIONED_BACKENDS = ("auto", "sdpa", "flex", "dense", "math")
# Keys that do not define the weights: a run may set them whatever its checkpoint or init_from source says.
# rope_theta and max_seq_len are what a long-context stage changes (RoPE's base frequency, the context length).
NON_ARCHITECTURE_KEYS = (
    "name",
    "attention",
    "max_seq_len",
    "rope_theta",
    "init_std",
    "init_cutoff",
    "init_scale_output",
)


@dataclass
class ModelConfig:
    """Every switch that tells the supported decoders apart.

    Field names are lit-open's own; `lit_open.checkpoint.hf` maps them to and from Hugging Face `config.json`.
    """

    name: str = "custom"
    family: str = "llama"  # which Hugging Face layout the weights map to: llama | olmo2 | gpt_neox
    vocab_size: int = 32000  # the tokenizer's vocabulary
    pad_vocab_multiple: int = 128  # embedding rows are rounded up to a multiple of this (1: no padding)
    n_layer: int = 32
    d_model: int = 4096
    n_head: int = 32
    n_kv_head: int | None = None  # None: same as n_head (multi-head); fewer: grouped-query attention
    head_dim: int | None = None  # None: d_model // n_head
    d_ff: int = 11008  # hidden width of the MLP
    max_seq_len: int = 2048
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # pre: x + f(norm(x)) (Llama, Pythia); post: x + norm(f(x)) (OLMo 2)
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX/Pythia)
    qk_norm: str = "none"  # none | full (OLMo 2: over all heads) | head (per head)
    mlp: str = "swiglu"  # swiglu | gelu
    bias: bool = False  # biases in the attention and MLP projections
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # share of each head's dimensions that is rotated (Pythia: 0.25)
    init_std: float = 0.02
    init_cutoff: float | None = 3.0  # truncate the normal init at +-init_cutoff * std; None: no truncation
    init_scale_output: bool = False  # divide the std of output projections by sqrt(2 * n_layer)
    attention: str = "auto"  # attention backend, one of ATTENTION_BACKENDS (lit_open/model/attention.py)

    def __post_init__(self) -> None:
        check_choice("model.family", self.family, FAMILIES)
        check_choice("model.norm", self.norm, NORMS)
        check_choice("model.norm_placement", self.norm_placement, NORM_PLACEMENTS)
        check_choice("model.qk_norm", self.qk_norm, QK_NORMS)
        check_choice("model.mlp", self.mlp, MLPS)
        check_choice("model.attention", self.attention, ATTENTION_BACKENDS)
        for key in ("vocab_size", "pad_vocab_multiple", "n_layer", "d_model", "n_head", "d_ff", "max_seq_len"):
            if getattr(self, key) < 1:
                raise UserError(f"model.{key}={getattr(self, key)} must be a positive integer.")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise UserError(
                    f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                    "change one of them or set model.head_dim explicitly."
                )
            self.head_dim = self.d_model // self.n_head
        if self.head_dim < 1:
            raise UserError(f"model.head_dim={self.head_dim} must be a positive integer.")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise UserError(
                f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.n_kv_head} "
                "(grouped-query attention shares each key/value head among an equal number of query heads)."
            )
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise UserError(f"model.rotary_fraction={self.rotary_fraction} must be in (0, 1].")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise UserError(
                f"model.rotary_fraction={self.rotary_fraction} rotates {self.rotary_dim} of the "
                f"{self.head_dim} dimensions of a head; that number must be even and at least 2."
            )
        if self.parallel_residual and self.norm_placement != "pre":
            raise UserError("model.parallel_residual=true needs model.norm_placement=pre.")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_multiple) * self.pad_vocab_multiple

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)
