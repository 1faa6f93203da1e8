"""State-dict adapters: lit-open parameter names <-> Hugging Face names, per family, as data tables.

`to_hf_state_dict` and `from_hf_state_dict` are exact inverses; GPT-NeoX's fused query_key_value is split and joined
here (see `lit_open.checkpoint.hf` for the layout).
"""

from __future__ import annotations

import re

import torch

from lit_open.checkpoint.hf_config import EXPORT_ARCHITECTURES, check_family
from lit_open.errors import UserError
from lit_open.model.config import ModelConfig
from lit_open.model.model import Transformer
from lit_open.parallel import unwrapped_name

_LAYER_PREFIX = {"llama": "model.layers.", "olmo2": "model.layers.", "gpt_neox": "gpt_neox.layers."}
GLOBAL_MODULES = {
    "llama": {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"},
    "olmo2": {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"},
    "gpt_neox": {"tok_embeddings": "gpt_neox.embed_in", "norm": "gpt_neox.final_layer_norm", "output": "embed_out"},
}
_LLAMA_PROJECTIONS = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}
_LAYER_MODULES = {
    "llama": {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_LLAMA_PROJECTIONS},
    "olmo2": {
        "attention_norm": "post_attention_layernorm",
        "ffn_norm": "post_feedforward_layernorm",
        "attention.q_norm": "self_attn.q_norm",
        "attention.k_norm": "self_attn.k_norm",
        **_LLAMA_PROJECTIONS,
    },
    "gpt_neox": {
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attention.wo": "attention.dense",
        "feed_forward.w1": "mlp.dense_h_to_4h",
        "feed_forward.w2": "mlp.dense_4h_to_h",
    },
}
_LAYER_PARAM = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")
_NEOX_QKV = re.compile(r"layers\.(\d+)\.attention\.w([qkv])\.(weight|bias)")
# buffers that old checkpoints saved and transformers ignores
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|\.attention\.(bias|masked_bias)$")


def _shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """lit-open's parameter names and shapes for `config`, in the model's order (a meta model: no memory)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _plan(config: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(HF name, the lit-open names it holds): one name, or three (q, k, v) for a fused GPT-NeoX query_key_value."""
    family = config.family
    prefix = _LAYER_PREFIX[family]
    plan = []
    for name in _shapes(config):
        if name == "output.weight" and config.tie_embeddings:
            continue
        qkv = _NEOX_QKV.fullmatch(name) if family == "gpt_neox" else None
        if qkv:
            layer, which, kind = qkv.groups()
            if which == "q":
                names = tuple(f"layers.{layer}.attention.w{x}.{kind}" for x in "qkv")
                plan.append((f"{prefix}{layer}.attention.query_key_value.{kind}", names))
            continue
        layer_param = _LAYER_PARAM.fullmatch(name)
        if layer_param:
            layer, module, kind = layer_param.groups()
            plan.append((f"{prefix}{layer}.{_LAYER_MODULES[family][module]}.{kind}", (name,)))
        else:
            module, _, kind = name.partition(".")
            plan.append((f"{GLOBAL_MODULES[family][module]}.{kind}", (name,)))
    return plan


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int, head_dim: int) -> torch.Tensor:
    """GPT-NeoX's query_key_value rows: per head, its q rows, then its k rows, then its v rows."""
    rest = q.shape[1:]
    stacked = torch.stack([t.reshape(n_head, head_dim, *rest) for t in (q, k, v)], dim=1)
    return stacked.reshape(3 * n_head * head_dim, *rest)


def _split_qkv(fused: torch.Tensor, n_head: int, head_dim: int) -> list[torch.Tensor]:
    rest = fused.shape[1:]
    per_head = fused.reshape(n_head, 3, head_dim, *rest)
    return [per_head[:, i].reshape(n_head * head_dim, *rest).clone() for i in range(3)]


def listing(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def to_hf_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lit-open names -> Hugging Face names (the same tensors; GPT-NeoX q/k/v fused into new ones).

    `state` is a Transformer's state dict; the prefixes of LitLM (`model.`), torch.compile, checkpoint wrappers and
    FSDP1 are stripped. A tied `output.weight` may be present or not; it is not written.
    """
    check_family(config)
    state = {unwrapped_name(k).removeprefix("model."): v for k, v in state.items()}
    shapes, plan = _shapes(config), _plan(config)
    needed = {name for _, names in plan for name in names}
    optional = {"output.weight"} if config.tie_embeddings else set()
    missing, unexpected = needed - state.keys(), state.keys() - needed - optional
    if missing or unexpected:
        raise UserError(
            f"The weights given for export do not fit model.family={config.family} with this config: "
            + (f"missing {listing(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {listing(unexpected)}" if unexpected else "")
            + ". Export the state dict of a lit-open Transformer built from the same config (parameters added by "
            "plugins, such as QAT observers, have no Hugging Face counterpart)."
        )
    wrong = [
        f"{n} {tuple(state[n].shape)} (expected {tuple(shapes[n])})" for n in needed if state[n].shape != shapes[n]
    ]
    if wrong:
        raise UserError(
            f"The weights given for export do not have the shapes this config implies: {listing(wrong, 3)}. "
            "Pass the config the model was built with."
        )
    out = {}
    for hf_name, names in plan:
        tensors = [state[n] for n in names]
        out[hf_name] = tensors[0] if len(tensors) == 1 else _fuse_qkv(*tensors, config.n_head, config.head_dim)
    return out


def from_hf_state_dict(config: ModelConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face names -> lit-open names: the exact inverse of `to_hf_state_dict`.

    Buffers that old checkpoints carry (rotary inv_freq, GPT-NeoX attention masks) are dropped, and so is the output
    matrix of a tied checkpoint. With tied embeddings `output.weight` is the `tok_embeddings.weight` tensor, as in
    the model's own state dict.
    """
    check_family(config)
    hf = {k: v for k, v in hf_state.items() if not _IGNORED.search(k)}
    output = f"{GLOBAL_MODULES[config.family]['output']}.weight"
    if output not in hf and "lm_head.weight" in hf:  # transformers 5 names GPT-NeoX's embed_out lm_head in memory
        hf[output] = hf.pop("lm_head.weight")
    if config.tie_embeddings:
        hf.pop(output, None)
    shapes, plan = _shapes(config), _plan(config)
    wanted = {hf_name for hf_name, _ in plan}
    missing, unexpected = wanted - hf.keys(), hf.keys() - wanted
    if missing or unexpected:
        raise UserError(
            f"The checkpoint's tensors do not match its config ({EXPORT_ARCHITECTURES[config.family][0]}, "
            f"{config.n_layer} layers): "
            + (f"missing {listing(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {listing(unexpected)}" if unexpected else "")
            + ". Is the checkpoint complete (every shard downloaded), and does config.json belong to these weights?"
        )
    out: dict[str, torch.Tensor] = {}
    wrong = []
    for hf_name, names in plan:
        tensor = hf[hf_name]
        expected = shapes[names[0]]
        if len(names) == 3:
            expected = torch.Size((3 * expected[0], *expected[1:]))
        if tensor.shape != expected:
            wrong.append(f"{hf_name} {tuple(tensor.shape)} (config.json implies {tuple(expected)})")
            continue
        parts = [tensor] if len(names) == 1 else _split_qkv(tensor, config.n_head, config.head_dim)
        out.update(zip(names, parts))
    if wrong:
        raise UserError(
            f"The checkpoint's tensors do not have the shapes its config.json implies: {listing(wrong, 3)}. "
            "Does config.json belong to these weights?"
        )
    if config.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return {name: out[name] for name in shapes}
