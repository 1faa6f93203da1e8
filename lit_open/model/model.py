"""A decoder-only transformer in plain PyTorch: the Llama, OLMo 2 and GPT-NeoX/Pythia layouts from one ModelConfig.

Module and parameter names are a contract: tensor-parallel plans and the Hugging Face weight conversion key on them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lit_open.model.attention import causal_attention
from lit_open.model.config import ModelConfig


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config, config.d_model)
        self.output = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Derived from the config, so not saved in checkpoints; init_weights fills them, which also gives them
        # values after a model built on the meta device is materialised with to_empty().
        table = (config.max_seq_len, config.rotary_dim)
        self.register_buffer("rope_cos", torch.empty(table, dtype=torch.float32), persistent=False)
        self.register_buffer("rope_sin", torch.empty(table, dtype=torch.float32), persistent=False)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, padded vocab); or, with return_hidden, the final-normed hidden states (batch, seq,
        d_model), for a loss that applies `self.output` chunk by chunk (lit_open.train.loss). doc_ids (batch, seq):
        tokens attend only to earlier tokens with the same id (packed documents); None: plain causal. positions:
        None for a whole sequence, or the (seq,) positions of the tokens given when they are a shard of a longer
        sequence (context parallelism, whose `Attention.attend` sees the rest)."""
        T = input_ids.size(1) if positions is None else int(positions.max()) + 1
        if T > self.config.max_seq_len:
            raise ValueError(
                f"Got a sequence of {T} tokens but the model's context is model.max_seq_len="
                f"{self.config.max_seq_len}; use shorter sequences or a larger max_seq_len."
            )
        if positions is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.tok_embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, doc_ids)
        x = self.norm(x)
        return x if return_hidden else self.output(x)

    def assign_weights(self, state: dict[str, torch.Tensor]) -> Transformer:
        """Take `state`'s tensors as the parameters of a model built on the meta device (nothing is allocated
        twice), tie the head again if configured, derive the RoPE tables (not saved); return it in eval mode.
        A state that does not fit the architecture raises RuntimeError (load_state_dict's, strict)."""
        self.load_state_dict(state, strict=True, assign=True)
        c = self.config
        if c.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(c.max_seq_len, c.rotary_dim, c.rope_theta)
        dtype = self.tok_embeddings.weight.dtype  # as model.to(dtype) would leave the buffers
        self.rope_cos, self.rope_sin = cos.to(dtype), sin.to(dtype)
        return self.eval()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, write: Callable[[torch.Tensor, torch.Tensor], None] | None = None):
        """Draw every parameter afresh and recompute the RoPE tables; a no-op on the meta device.

        Each parameter is drawn whole from its own generator, seeded by `seed` (default: torch's initial seed) and
        its name, so the values do not depend on how the model is sharded or on the order of construction: a
        model materialised shard by shard after parallelization equals one built whole. `write(param, value)`
        stores a full value into a parameter (default: copy_); lit_open.parallel passes one that keeps only
        the local shard of a distributed parameter.
        """
        if self.rope_cos.is_meta:
            return
        c = self.config
        seed = torch.initial_seed() if seed is None else seed
        write = write or (lambda param, value: param.copy_(value))
        if c.tie_embeddings:
            # to_empty() gives each module its own new tensor, which unties a model built on the meta device.
            self.output.weight = self.tok_embeddings.weight
        # Computed in float32 whatever the buffers' dtype (a bfloat16 model then holds the float32 tables rounded
        # once, the values HF applies), never recomputed in low precision.
        cos, sin = rope_tables(c.max_seq_len, c.rotary_dim, c.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        # Output projections add into the residual stream once per sublayer; scaling them keeps its
        # variance from growing with depth (GPT-2).
        out_std = c.init_std / math.sqrt(2 * c.n_layer) if c.init_scale_output else c.init_std
        seen: set[int] = set()  # a tied weight is drawn once, as tok_embeddings
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                name = f"{module_name}.{param_name}"
                value = torch.empty(param.shape, dtype=torch.float32, device=param.device)
                if param_name == "bias":
                    value.zero_()
                elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                    value.fill_(1.0)
                else:
                    generator = torch.Generator(param.device).manual_seed(
                        (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
                    )
                    std = out_std if module_name.endswith(("attention.wo", "feed_forward.w2")) else c.init_std
                    if c.init_cutoff is None:
                        nn.init.normal_(value, std=std, generator=generator)
                    else:
                        cut = c.init_cutoff * std
                        nn.init.trunc_normal_(value, std=std, a=-cut, b=cut, generator=generator)
                write(param, value.to(param.dtype))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = make_norm(config, config.d_model)
        self.attention = Attention(config)
        self.ffn_norm = make_norm(config, config.d_model)
        self.feed_forward = FeedForward(config)
        self.parallel_residual = config.parallel_residual
        self.post_norm = config.norm_placement == "post"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None = None):
        if self.parallel_residual:
            return x + self.attention(self.attention_norm(x), cos, sin, doc_ids) + self.feed_forward(self.ffn_norm(x))
        if self.post_norm:
            h = x + self.attention_norm(self.attention(x, cos, sin, doc_ids))
            return h + self.ffn_norm(self.feed_forward(h))
        h = x + self.attention(self.attention_norm(x), cos, sin, doc_ids)
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        q_width, kv_width = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.wq = nn.Linear(config.d_model, q_width, bias=config.bias)
        self.wk = nn.Linear(config.d_model, kv_width, bias=config.bias)
        self.wv = nn.Linear(config.d_model, kv_width, bias=config.bias)
        self.wo = nn.Linear(q_width, config.d_model, bias=config.bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "full":
            self.q_norm = RMSNorm(q_width, config.norm_eps)
            self.k_norm = RMSNorm(kv_width, config.norm_eps)
        elif config.qk_norm == "head":
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.head_dim = config.head_dim
        self.backend = config.attention
        # The kernel call, replaced from outside by parallelisms that shard the sequence (lit_open.context_parallel).
        self.attend = causal_attention

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        # -1 rather than n_head: under tensor parallelism each rank holds only a slice of the heads.
        q = q.view(B, T, -1, self.head_dim)
        k = k.view(B, T, -1, self.head_dim)
        v = v.view(B, T, -1, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.backend, doc_ids)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.w2 = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.w3 = nn.Linear(config.d_model, config.d_ff, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))  # exact erf GELU, Hugging Face's "gelu" (Pythia)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        # Scaled in float32 before the cast back, as HF OLMo 2 does; HF Llama casts first. They agree in float32.
        return (self.weight * y).to(x.dtype)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps)


def rope_tables(
    seq_len: int, rotary_dim: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, rotary_dim), in float32, as HF Llama / GPT-NeoX compute them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.size(-1) dimensions of each head of x (B, T, H, D), rotate-half style; the rest pass."""
    rotary_dim = cos.size(-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # broadcast over heads
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, rest), dim=-1)


def num_parameters(model: nn.Module) -> int:
    """Parameters counted once each (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())
