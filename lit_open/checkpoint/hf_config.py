"""`config.json` <-> `ModelConfig`: which Hugging Face architectures lit-open builds, and how their keys map.

See `lit_open.checkpoint.hf` for the families and what is not supported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lit_open.checkpoint.hub import CONFIG_FILE
from lit_open.errors import UserError
from lit_open.model.config import ModelConfig

# architecture in config.json -> lit-open family
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Olmo2ForCausalLM": "olmo2",
    "GPTNeoXForCausalLM": "gpt_neox",
}
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "olmo2": "olmo2", "gpt_neox": "gpt_neox"}
# lit-open family -> (architecture, model_type) written on export
EXPORT_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "olmo2": ("Olmo2ForCausalLM", "olmo2"),
    "gpt_neox": ("GPTNeoXForCausalLM", "gpt_neox"),
}
DEFAULT_CONTEXT_LENGTH = 2048  # the context of a config.json that gives none, when the caller gives none either
SUPPORTED = "LlamaForCausalLM (and MistralForCausalLM without sliding window), Olmo2ForCausalLM and GPTNeoXForCausalLM"

# The ModelConfig switches each family fixes; anything else has no HF counterpart in that family.
FAMILY_REQUIRES: dict[str, dict[str, Any]] = {
    "llama": dict(norm="rmsnorm", norm_placement="pre", parallel_residual=False, qk_norm="none", mlp="swiglu"),
    "olmo2": dict(
        norm="rmsnorm", norm_placement="post", parallel_residual=False, qk_norm="full", mlp="swiglu", bias=False
    ),
    "gpt_neox": dict(norm="layernorm", norm_placement="pre", qk_norm="none", mlp="gelu", bias=True),
}


def read_config_json(directory: Path) -> dict[str, Any]:
    """The parsed config.json of the checkpoint in `directory`; UserError when it is missing or not JSON."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir())[:10] if directory.is_dir() else []
        raise UserError(
            f"{directory} has no {CONFIG_FILE} (it holds: {', '.join(present) or 'nothing'}). A Hugging Face "
            "checkpoint directory has config.json beside its weights; point at such a directory."
        )
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"Could not read {path}: {err}. It must be the JSON config of a Hugging Face model.") from err


def context_length(cfg: dict[str, Any]) -> int | None:
    """The context length a config.json gives, or None when it gives none: no max_position_embeddings, or -1 as
    OLMo-core's exporter writes (allenai/OLMo-core, src/olmo_core/nn/hf/config.py, get_hf_config)."""
    value = cfg.get("max_position_embeddings")
    return int(value) if value is not None and int(value) > 0 else None


def read_config(directory: Path, max_seq_len: int | None = None) -> ModelConfig:
    """The ModelConfig of the checkpoint in `directory`, from its config.json (see lit_open.checkpoint.hf).

    max_seq_len: the context length to build the model for when config.json gives none (`context_length`); without
    it, DEFAULT_CONTEXT_LENGTH. RoPE has no learned positions, so the weights do not depend on it.
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    cfg = read_config_json(directory)
    architectures = cfg.get("architectures") or []
    architecture = architectures[0] if architectures else None
    family = ARCHITECTURES.get(architecture) if architecture else MODEL_TYPES.get(cfg.get("model_type"))
    if family is None:
        raise UserError(
            f"{path}: architecture {architecture or '(none)'!r} (model_type {cfg.get('model_type')!r}) is not "
            f"supported; lit-open imports {SUPPORTED} checkpoints."
        )
    architecture = architecture or EXPORT_ARCHITECTURES[family][0]

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise UserError(f"{path} has no {key!r}, which a {architecture} config needs.")
        return cfg[key]

    def refuse(what: str) -> UserError:
        return UserError(
            f"{path}: {what}; lit-open cannot build this {architecture} exactly, so it does not import it."
        )

    hidden, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    theta, fraction = _rope(cfg, path, family)
    act = cfg.get("hidden_act", "gelu" if family == "gpt_neox" else "silu")
    fields: dict[str, Any] = dict(
        name=_model_name(directory, cfg),
        family=family,
        vocab_size=int(need("vocab_size")),
        pad_vocab_multiple=1,
        n_layer=int(need("num_hidden_layers")),
        d_model=hidden,
        n_head=n_head,
        d_ff=int(need("intermediate_size")),
        max_seq_len=context_length(cfg) or max_seq_len or DEFAULT_CONTEXT_LENGTH,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rotary_fraction=fraction,
        init_std=float(cfg.get("initializer_range", 0.02)),
    )
    if family == "gpt_neox":
        if act != "gelu":
            raise refuse(f"hidden_act={act!r}, but GPT-NeoX models are imported with the exact (erf) GELU 'gelu' only")
        if not cfg.get("attention_bias", True):
            raise refuse("attention_bias=false (with the always-biased GPT-NeoX MLP) has no lit-open counterpart")
        if hidden % n_head:
            raise refuse(f"hidden_size={hidden} is not a multiple of num_attention_heads={n_head}")
        fields.update(
            norm="layernorm",
            norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
            norm_placement="pre",
            parallel_residual=bool(cfg.get("use_parallel_residual", True)),
            mlp="gelu",
            bias=True,
        )
    else:
        if act not in ("silu", "swish"):
            raise refuse(f"hidden_act={act!r}, but {architecture} models are imported with SiLU ('silu') only")
        attention_bias = bool(cfg.get("attention_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False))
        if family == "olmo2" and attention_bias:
            raise refuse("attention_bias=true (OLMo 2's MLP has no biases) has no lit-open counterpart")
        if attention_bias != mlp_bias:
            raise refuse(
                f"attention_bias={attention_bias} with mlp_bias={mlp_bias}: lit-open has one switch (model.bias) "
                "for both"
            )
        window = cfg.get("sliding_window")
        if window is not None and cfg.get("use_sliding_window", True) and int(window) < fields["max_seq_len"]:
            raise refuse(f"sliding_window={window} (shorter than max_position_embeddings) is not implemented")
        fields.update(
            n_kv_head=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
            norm="rmsnorm",
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if family == "llama" else 1e-5)),
            norm_placement="post" if family == "olmo2" else "pre",
            qk_norm="full" if family == "olmo2" else "none",
            mlp="swiglu",
            bias=attention_bias,
        )
    try:
        return ModelConfig(**fields)
    except UserError as err:
        raise UserError(f"{path} describes a model lit-open cannot build: {err}") from err


def _rope(cfg: dict, path: Path, family: str) -> tuple[float, float]:
    """(rope_theta, rotary fraction) from either the transformers 4 keys or the transformers 5 `rope_parameters`."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise UserError(
            f"{path}: rope_parameters={params!r} (RoPE per layer type) is not supported; lit-open applies one plain "
            "RoPE (rope_type 'default') to every layer."
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UserError(
            f"{path}: RoPE scaling {rope_type!r} ({params}) is not implemented in lit-open, which applies plain RoPE "
            "(rope_type 'default', no rope_scaling); the model would compute different attention. Use a checkpoint "
            "without RoPE scaling."
        )
    if family == "gpt_neox":
        theta = params.get("rope_theta", cfg.get("rotary_emb_base", cfg.get("rope_theta", 10000.0)))
        fraction = params.get("partial_rotary_factor", cfg.get("rotary_pct", cfg.get("partial_rotary_factor", 0.25)))
    else:
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        fraction = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if float(fraction) != 1.0:
            raise UserError(
                f"{path}: partial_rotary_factor={fraction} is not supported for this architecture (transformers "
                "rotates whole heads in Llama and OLMo 2); only 1.0 is."
            )
    return float(theta), float(fraction)


def _model_name(directory: Path, cfg: dict) -> str:
    """The hub repo id for a huggingface_hub snapshot, else a repo-like `_name_or_path`, else the directory's name."""
    parts = directory.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/")
    given = cfg.get("_name_or_path") or ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", given) and not Path(given).exists():
        return given
    return directory.resolve().name


def hf_config(config: ModelConfig) -> dict:
    """The config.json that describes `config` to transformers (4.x and 5.x read the same keys).

    Token ids (bos/eos/pad) are None: `save_hf` fills them in from the tokenizer it copies.
    """
    check_family(config)
    c = config
    architecture, model_type = EXPORT_ARCHITECTURES[c.family]
    out: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": c.padded_vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "torch_dtype": "float32",
    }
    if c.family == "gpt_neox":
        out.update(
            hidden_act="gelu",
            layer_norm_eps=c.norm_eps,
            use_parallel_residual=c.parallel_residual,
            attention_bias=True,
            hidden_dropout=0.0,
            # transformers 4 reads these two; transformers 5 reads rope_parameters (and falls back to them)
            rotary_pct=c.rotary_fraction,
            rotary_emb_base=c.rope_theta,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": c.rope_theta,
                "partial_rotary_factor": c.rotary_fraction,
            },
        )
    else:
        out.update(
            num_key_value_heads=c.n_kv_head,
            hidden_act="silu",
            rms_norm_eps=c.norm_eps,
            attention_bias=c.bias,
            rope_theta=c.rope_theta,  # transformers 4; 5 reads rope_parameters
            rope_scaling=None,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        )
        if c.family == "llama":
            out.update(head_dim=c.head_dim, mlp_bias=c.bias, pretraining_tp=1)
        elif c.head_dim * c.n_head != c.d_model:
            out["head_dim"] = c.head_dim  # Olmo2Attention reads config.head_dim when it is there
    return out


def check_family(config: ModelConfig) -> None:
    """Refuse a config that its family's HF architecture cannot express, naming the offending keys."""
    wrong = [
        f"model.{key}={getattr(config, key)!r} (needs {value!r})"
        for key, value in FAMILY_REQUIRES[config.family].items()
        if getattr(config, key) != value
    ]
    if config.family in ("llama", "olmo2") and config.rotary_fraction != 1.0:
        wrong.append(f"model.rotary_fraction={config.rotary_fraction} (needs 1.0)")
    if config.family == "gpt_neox":
        if config.n_kv_head != config.n_head:
            wrong.append(f"model.n_kv_head={config.n_kv_head} (needs n_head={config.n_head}: no GQA in GPT-NeoX)")
        if config.head_dim * config.n_head != config.d_model:
            wrong.append(
                f"model.head_dim={config.head_dim} (needs d_model / n_head = {config.d_model / config.n_head})"
            )
    if wrong:
        architecture = EXPORT_ARCHITECTURES[config.family][0]
        raise UserError(
            f"model.family={config.family} maps to Hugging Face {architecture}, which cannot express "
            f"{', '.join(wrong)}. Change those settings, or pick the family whose layout the model has "
            "(llama: pre-norm RMSNorm SwiGLU; olmo2: post-norm RMSNorm with full QK-norm; gpt_neox: LayerNorm, GELU, "
            "biases)."
        )
