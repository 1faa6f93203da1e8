"""Hugging Face import and export: Llama (and Mistral without sliding window), OLMo 2 and GPT-NeoX/Pythia.

A Hugging Face checkpoint is a directory with `config.json` (the architecture) and the weights, as one
`model.safetensors`, several `model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`, or the
PyTorch pickles `pytorch_model.bin` / `pytorch_model.bin.index.json`. `resolve_source` finds that directory
(`hf:ORG/NAME@REVISION` is downloaded through `huggingface_hub.snapshot_download`, `hf:/local/dir` is used as is),
`read_config` turns `config.json` into a `ModelConfig`, `read_state_dict` reads the weights under lit-open's
parameter names, `load_hf` builds the `Transformer`, and `save_hf` writes a directory that `transformers` loads.

Parameter names (lit-open `layers.{i}.` <-> HF `model.layers.{i}.` for Llama/OLMo 2, `gpt_neox.layers.{i}.` for
GPT-NeoX; `.weight` and, where the config has them, `.bias` follow each name):

    lit-open                 Llama / Mistral                 OLMo 2                           GPT-NeoX
    tok_embeddings           model.embed_tokens              model.embed_tokens               gpt_neox.embed_in
    attention_norm           input_layernorm (before attn)   post_attention_layernorm (after) input_layernorm
    attention.wq, wk, wv     self_attn.q_proj, k_proj, v_proj  same as Llama                  attention.query_key_value
    attention.wo             self_attn.o_proj                self_attn.o_proj                 attention.dense
    attention.q_norm, k_norm -                               self_attn.q_norm, k_norm         -
    ffn_norm                 post_attention_layernorm        post_feedforward_layernorm       post_attention_layernorm
    feed_forward.w1          mlp.gate_proj (silu'd)          mlp.gate_proj                    mlp.dense_h_to_4h
    feed_forward.w3          mlp.up_proj                     mlp.up_proj                      -
    feed_forward.w2          mlp.down_proj                   mlp.down_proj                    mlp.dense_4h_to_h
    norm                     model.norm                      model.norm                       gpt_neox.final_layer_norm
    output                   lm_head                         lm_head                          embed_out (or lm_head)

Note that the same HF name `post_attention_layernorm` is the pre-MLP norm in Llama and GPT-NeoX but the norm of the
attention output in OLMo 2 (post-norm blocks); the mapping is per family.

RoPE: lit-open rotates "rotate-half" style (the first half of the rotated dimensions of a head pairs with the second
half, `lit_open.model.model.apply_rope`), which is the convention of HF Llama, OLMo 2 and GPT-NeoX. HF q/k weights are
therefore copied as they are; no Meta-style permutation of the rows is needed. GPT-NeoX rotates only the first
`int(head_dim * rotary_pct)` dimensions of each head (`ModelConfig.rotary_fraction`), as lit-open does.

GPT-NeoX fuses q, k and v into one `query_key_value` projection whose output rows are grouped by head:
`[q_0 k_0 v_0 q_1 k_1 v_1 ...]` (each block head_dim rows), not `[Q K V]`. Import views the weight as
(n_head, 3, head_dim, d_model) and takes [:, 0], [:, 1], [:, 2]; export stacks q, k, v the same way. The bias is split
and joined alike. GPT-NeoX has no grouped-query attention, so n_kv_head must equal n_head.

Tied embeddings (`tie_word_embeddings`): HF stores no separate output matrix; lit-open's state dict has
`output.weight` as the same tensor as `tok_embeddings.weight`. A tied checkpoint that still holds an lm_head is
accepted and the extra copy dropped, as transformers does.

Vocabulary: an imported model has exactly HF's `vocab_size` embedding rows (`pad_vocab_multiple=1`). A lit-open
model whose embedding is padded (`pad_vocab_multiple` > 1, padded_vocab_size > vocab_size) is exported with all its
rows and `vocab_size = padded_vocab_size` in config.json (the layout of OLMo 2 and Pythia on the hub, whose
embeddings are also larger than their tokenizers): the padded rows took part in the training softmax, so dropping
them would change the probabilities of every token. Token ids never reach the padded rows.

Not supported (a clear `UserError` on import or export): RoPE scaling (`rope_scaling` / `rope_parameters` with a
rope_type other than "default"), Mistral sliding-window attention shorter than the context, activations other than
SiLU (Llama, OLMo 2) and exact-erf GELU "gelu" (GPT-NeoX), attention biases without MLP biases (or the reverse) in
Llama, attention biases in OLMo 2, GPT-NeoX without attention biases, per-head QK-norm, and lit-open configs that no
HF family describes (e.g. a Llama with QK-norm).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_open.checkpoint.atomic import atomic_directory
from lit_open.errors import UserError
from lit_open.model.config import ModelConfig
from lit_open.model.model import Transformer

HF_PREFIX = "hf:"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
METADATA_FILE = "lit_open.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
SAFE_PATTERNS = ["model*.safetensors", SAFE_INDEX]
BIN_PATTERNS = ["pytorch_model*.bin", BIN_INDEX]
HUB_PATTERNS = [CONFIG_FILE, GENERATION_CONFIG_FILE, *TOKENIZER_FILES]
MAX_SHARD_SIZE = 5 * 10**9  # bytes per safetensors file, as transformers used to shard by default ("5GB")

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
SUPPORTED = "LlamaForCausalLM (and MistralForCausalLM without sliding window), Olmo2ForCausalLM and GPTNeoXForCausalLM"

# The ModelConfig switches each family fixes; anything else has no HF counterpart in that family.
FAMILY_REQUIRES: dict[str, dict[str, Any]] = {
    "llama": dict(norm="rmsnorm", norm_placement="pre", parallel_residual=False, qk_norm="none", mlp="swiglu"),
    "olmo2": dict(
        norm="rmsnorm", norm_placement="post", parallel_residual=False, qk_norm="full", mlp="swiglu", bias=False
    ),
    "gpt_neox": dict(norm="layernorm", norm_placement="pre", qk_norm="none", mlp="gelu", bias=True),
}

_LAYER_PREFIX = {"llama": "model.layers.", "olmo2": "model.layers.", "gpt_neox": "gpt_neox.layers."}
_GLOBAL_MODULES = {
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
# prefixes that wrappers add to parameter names: LitLM (`model.`), torch.compile, checkpoint_wrapper, FSDP1
_WRAPPERS = re.compile(r"(^|\.)(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# sources


def resolve_source(source: str, revision: str | None = None) -> tuple[Path, dict]:
    """The local directory of a Hugging Face checkpoint and where it came from.

    `hf:ORG/NAME@REV` (or `hf:ORG/NAME`: the default branch) is downloaded with huggingface_hub at that revision
    (config, weights in one format, tokenizer and generation config only); an explicit `revision` overrides `@REV`.
    `hf:/local/dir` (also `hf:./dir`, `hf:~/dir`, or an existing relative path) and a plain existing directory are
    used as they are. Provenance: {"repo", "revision", "commit"} for a hub source (the commit of the snapshot), {}
    for a local directory. (The spec itself is the caller's: `init_from` events record it as `source`.)
    """
    spec = str(source)
    if spec.startswith(HF_PREFIX):
        rest = spec[len(HF_PREFIX) :]
        if not rest:
            raise UserError(
                f"{spec!r} names no checkpoint: give hf:ORG/NAME@REVISION (a hub repo at a branch, tag or commit) "
                "or hf:/path/to/dir (a Hugging Face directory on disk)."
            )
        if rest.startswith(("/", ".", "~")) or Path(rest).expanduser().exists():
            return _local_source(Path(rest).expanduser(), spec, revision), {}
        repo, _, at = rest.partition("@")
        return _download(spec, repo, revision or at or None)
    return _local_source(Path(spec).expanduser(), spec, revision), {}


def _local_source(path: Path, spec: str, revision: str | None) -> Path:
    if revision is not None:
        raise UserError(
            f"revision={revision!r} was given for {spec!r}, a local directory; revisions select a commit of a hub "
            "repo (hf:ORG/NAME@REVISION). Drop the revision, or name the hub repo."
        )
    if not path.exists():
        raise UserError(
            f"{spec!r}: no such directory {str(path)!r}. Point at a Hugging Face checkpoint directory (with "
            "config.json and the weights), as hf:/path/to/dir, or at a hub repo as hf:ORG/NAME@REVISION."
        )
    if not path.is_dir():
        hint = (
            f" (its directory {str(path.parent)!r}?)" if path.name in (CONFIG_FILE, SAFE_WEIGHTS, BIN_WEIGHTS) else ""
        )
        raise UserError(
            f"{spec!r} is a file, not a directory: a Hugging Face checkpoint is a directory with config.json and "
            f"the weights; give that directory{hint}."
        )
    return path


def _offline() -> bool:
    return any(
        os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on")
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _download(spec: str, repo: str, revision: str | None) -> tuple[Path, dict]:
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError as err:
        raise UserError(
            f"{spec} is a hub repo, and downloading it needs huggingface_hub ({err}): pip install huggingface_hub, "
            "or download the checkpoint elsewhere and point at it with hf:/path/to/dir."
        ) from err
    offline = _offline()
    patterns = HUB_PATTERNS + SAFE_PATTERNS + BIN_PATTERNS
    if not offline:
        try:  # one format only: repos that ship both safetensors and .bin would be downloaded twice
            files = HfApi().list_repo_files(repo, revision=revision)
            if any(re.fullmatch(r"model.*\.safetensors", f) for f in files):
                patterns = HUB_PATTERNS + SAFE_PATTERNS
            elif any(re.fullmatch(r"pytorch_model.*\.bin", f) for f in files):
                patterns = HUB_PATTERNS + BIN_PATTERNS
        except Exception:  # noqa: BLE001 - snapshot_download below reports the problem (or finds the cache)
            pass
    where = f"{repo} at revision {revision or 'main'}"
    local_hint = (
        "Download it where the hub can be reached (e.g. `hf download "
        f"{repo}{' --revision ' + revision if revision else ''} --local-dir DIR`) and point at the directory: "
        "init_from=hf:/path/to/dir (lit_open.load_hf('/path/to/dir') in Python)."
    )
    try:
        directory = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except hub_errors.GatedRepoError as err:
        raise UserError(
            f"{spec}: {repo} is gated; accept its terms on huggingface.co and log in (`hf auth login` or HF_TOKEN), "
            f"or point at a local copy. {local_hint}"
        ) from err
    except hub_errors.RepositoryNotFoundError as err:
        raise UserError(
            f"{spec}: the hub has no repo {repo!r} (or it is private: log in with `hf auth login` or set HF_TOKEN). "
            "Check the ORG/NAME in hf:ORG/NAME@REVISION."
        ) from err
    except hub_errors.RevisionNotFoundError as err:
        raise UserError(
            f"{spec}: {repo} has no revision {revision!r}. Give a branch, tag or commit of the repo (list them with "
            f"huggingface_hub.list_repo_refs({repo!r}))."
        ) from err
    except hub_errors.HFValidationError as err:
        raise UserError(
            f"{spec}: {repo!r} is not a valid hub repo id ({_first_line(err)}). Give hf:ORG/NAME@REVISION, or "
            "hf:/path/to/dir for a directory on disk."
        ) from err
    except Exception as err:  # offline, no network, hub errors: all mean "could not get it from the hub"
        reason = (
            "HF_HUB_OFFLINE is set, so only the local huggingface_hub cache was searched, and it does not hold "
            "this revision"
            if offline
            else f"the hub could not be reached or refused ({type(err).__name__}: {_first_line(err)})"
        )
        raise UserError(f"Could not download {spec} ({where}): {reason}. {local_hint}") from err
    commit = directory.name if re.fullmatch(r"[0-9a-f]{40}", directory.name) else None
    return directory, {"repo": repo, "revision": revision or "main", "commit": commit}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


# ---------------------------------------------------------------------------------------------------------------
# config.json


def read_config(directory: Path) -> ModelConfig:
    """The ModelConfig of the checkpoint in `directory`, from its config.json (see the module docstring)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir())[:10] if directory.is_dir() else []
        raise UserError(
            f"{directory} has no {CONFIG_FILE} (it holds: {', '.join(present) or 'nothing'}). A Hugging Face "
            "checkpoint directory has config.json beside its weights; point at such a directory."
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"Could not read {path}: {err}. It must be the JSON config of a Hugging Face model.") from err
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
        max_seq_len=int(cfg.get("max_position_embeddings") or 2048),
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
    _check_family(config)
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


def _check_family(config: ModelConfig) -> None:
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


# ---------------------------------------------------------------------------------------------------------------
# state dicts


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
            plan.append((f"{_GLOBAL_MODULES[family][module]}.{kind}", (name,)))
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


def _listing(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def to_hf_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lit-open names -> Hugging Face names (the same tensors; GPT-NeoX q/k/v fused into new ones).

    `state` is a Transformer's state dict; the prefixes of LitLM (`model.`), torch.compile, checkpoint wrappers and
    FSDP1 are stripped. A tied `output.weight` may be present or not; it is not written.
    """
    _check_family(config)
    state = {_WRAPPERS.sub(r"\1", k).removeprefix("model."): v for k, v in state.items()}
    shapes, plan = _shapes(config), _plan(config)
    needed = {name for _, names in plan for name in names}
    optional = {"output.weight"} if config.tie_embeddings else set()
    missing, unexpected = needed - state.keys(), state.keys() - needed - optional
    if missing or unexpected:
        raise UserError(
            f"The weights given for export do not fit model.family={config.family} with this config: "
            + (f"missing {_listing(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {_listing(unexpected)}" if unexpected else "")
            + ". Export the state dict of a lit-open Transformer built from the same config (parameters added by "
            "plugins, such as QAT observers, have no Hugging Face counterpart)."
        )
    wrong = [
        f"{n} {tuple(state[n].shape)} (expected {tuple(shapes[n])})" for n in needed if state[n].shape != shapes[n]
    ]
    if wrong:
        raise UserError(
            f"The weights given for export do not have the shapes this config implies: {_listing(wrong, 3)}. "
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
    _check_family(config)
    hf = {k: v for k, v in hf_state.items() if not _IGNORED.search(k)}
    output = f"{_GLOBAL_MODULES[config.family]['output']}.weight"
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
            + (f"missing {_listing(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {_listing(unexpected)}" if unexpected else "")
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
            f"The checkpoint's tensors do not have the shapes its config.json implies: {_listing(wrong, 3)}. "
            "Does config.json belong to these weights?"
        )
    if config.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return {name: out[name] for name in shapes}


# ---------------------------------------------------------------------------------------------------------------
# reading


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise UserError(f"dtype={dtype!r} is not supported; choose one of: {', '.join(_DTYPES)} (or a torch.dtype).")


def _weight_files(directory: Path) -> list[Path]:
    for index in (SAFE_INDEX, BIN_INDEX):
        path = directory / index
        if path.is_file():
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise UserError(f"Could not read the shard index {path}: {err!r}. It needs a 'weight_map'.") from err
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise UserError(
                    f"{path} lists shards that are not in {directory}: {_listing(absent, 3)}. The download is "
                    "incomplete; fetch the missing files (or the whole checkpoint) again."
                )
            return files
    for single in (SAFE_WEIGHTS, BIN_WEIGHTS):
        if (directory / single).is_file():
            return [directory / single]
    present = sorted(p.name for p in directory.iterdir())[:10]
    raise UserError(
        f"{directory} has no weights that lit-open reads: expected {SAFE_WEIGHTS}, {SAFE_INDEX} with its shards, "
        f"{BIN_WEIGHTS} or {BIN_INDEX} with its shards (it holds: {', '.join(present) or 'nothing'})."
    )


def _safetensors():
    try:
        import safetensors
        import safetensors.torch
    except ImportError as err:
        raise UserError(
            f"Reading and writing Hugging Face checkpoints needs the safetensors package ({err}): "
            "pip install safetensors."
        ) from err
    return safetensors


def _read_file(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    safe_open = _safetensors().safe_open if path.suffix == ".safetensors" else None
    try:
        if safe_open is not None:
            with safe_open(str(path), framework="pt", device="cpu") as f:  # one tensor at a time: cast as read
                return {name: cast(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # written in the legacy (pre-zip) format, which cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"Could not read the weights file {path}: {type(err).__name__}: {_first_line(err)}. It may be "
            "truncated (an interrupted download) or not a safetensors / PyTorch state dict file."
        ) from err
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return {name: cast(tensor) for name, tensor in loaded.items()}


def read_state_dict(directory: Path, config: ModelConfig, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The weights in `directory` (safetensors or .bin, single or sharded) under lit-open's names.

    dtype None keeps the checkpoint's dtypes; otherwise floating-point tensors are cast, one at a time as read.
    """
    directory, dtype = Path(directory), _as_dtype(dtype)
    hf: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        hf.update(_read_file(path, dtype))
    try:
        return from_hf_state_dict(config, hf)
    except UserError as err:
        raise UserError(f"{directory}: {err}") from err


def load_hf(source: str | Path, revision: str | None = None, dtype: torch.dtype | None = None) -> Transformer:
    """A lit-open Transformer holding a Hugging Face checkpoint's weights (in eval mode, on the CPU).

    source: `hf:ORG/NAME@REVISION`, `hf:/local/dir` or a directory; revision overrides `@REVISION`; dtype None keeps
    the checkpoint's dtype (bfloat16 stays bfloat16), else the weights are cast to it.
    """
    directory, _ = resolve_source(str(source), revision)
    config = read_config(directory)
    state = read_state_dict(directory, config, dtype)
    with torch.device("meta"):
        model = Transformer(config)
    return model.assign_weights(state)


# ---------------------------------------------------------------------------------------------------------------
# writing


def _special_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """bos/eos/pad token ids from tokenizer_config.json's token names (eos: else a usual end-of-text token)."""
    tokenizer_json = tokenizer_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        return {}
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_json))
    except Exception:  # noqa: BLE001 - ids are a convenience; the tokenizer files are still copied
        return {}
    names: dict[str, str] = {}
    config_path = tokenizer_dir / "tokenizer_config.json"
    if config_path.is_file():
        try:
            tokenizer_config = json.loads(config_path.read_text())
        except (OSError, ValueError):
            tokenizer_config = {}
        for key in ("bos", "eos", "pad"):
            value = tokenizer_config.get(f"{key}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[key] = value
    if "eos" not in names:
        from lit_open.data.prepare import EOS_CANDIDATES

        found = next((c for c in EOS_CANDIDATES if tokenizer.token_to_id(c) is not None), None)
        if found is not None:
            names["eos"] = found
    ids = {f"{key}_token_id": tokenizer.token_to_id(token) for key, token in names.items()}
    return {key: value for key, value in ids.items() if value is not None}


def _tokenizer_source(tokenizer_dir: str | Path | None) -> Path | None:
    if tokenizer_dir is None:
        return None
    path = Path(tokenizer_dir).expanduser()
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise UserError(
            f"tokenizer_dir={str(tokenizer_dir)!r} does not exist; give the directory that holds tokenizer.json "
            "(and tokenizer_config.json, if any), or leave it out to export the weights without a tokenizer."
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"tokenizer_dir={str(path)!r} holds none of the tokenizer files ({', '.join(TOKENIZER_FILES)}); give "
            "the directory of the run's tokenizer.json."
        )
    return path


def _shards(hf_state: dict[str, torch.Tensor], itemsize: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in hf_state.items():
        nbytes = tensor.numel() * itemsize[name]
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(
    directory: Path, hf_state: dict[str, torch.Tensor], dtype: torch.dtype | None, max_shard_size: int
) -> None:
    save_file = _safetensors().torch.save_file

    def target(tensor: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype

    itemsize = {name: torch.empty((), dtype=target(t)).element_size() for name, t in hf_state.items()}
    shards = _shards(hf_state, itemsize, max_shard_size)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        filename = SAFE_WEIGHTS if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors, storages = {}, set()
        for name in names:  # contiguous, on the CPU, in the target dtype, and sharing no storage (safetensors)
            tensor = hf_state[name].detach().to("cpu")
            tensor = tensor.to(target(tensor)).contiguous()
            storage = tensor.untyped_storage()
            if storage.data_ptr() in storages or storage.nbytes() != tensor.numel() * tensor.element_size():
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def save_hf(
    model_or_state: nn.Module | dict[str, torch.Tensor],
    out_dir: str | Path,
    config: ModelConfig | None = None,
    tokenizer_dir: str | Path | None = None,
    metadata: dict | None = None,
    dtype: torch.dtype | None = None,
    *,
    max_shard_size: int = MAX_SHARD_SIZE,
) -> Path:
    """Write a Hugging Face directory that `transformers.AutoModelForCausalLM.from_pretrained` loads; returns it.

    model_or_state: a Transformer (its config is used unless `config` is given) or a state dict with `config`.
    Writes config.json, model.safetensors (or shards of at most `max_shard_size` bytes with
    model.safetensors.index.json), the tokenizer files found in `tokenizer_dir` with generation_config.json (copied,
    or made from the tokenizer's bos/eos/pad tokens), and `metadata` as lit_open.json. dtype None keeps the weights'
    dtype; otherwise floating-point tensors are cast. The directory is written under a temporary name beside
    `out_dir` and renamed into place when complete; an existing `out_dir` is replaced only then.
    """
    if isinstance(model_or_state, nn.Module):
        config = config or getattr(model_or_state, "config", None)
        state = model_or_state.state_dict()
    elif isinstance(model_or_state, Mapping):
        state = dict(model_or_state)
    else:
        raise TypeError(f"save_hf takes a Transformer or a state dict, not {type(model_or_state).__name__}")
    if not isinstance(config, ModelConfig):
        raise UserError("save_hf needs the model's ModelConfig (config=...) to export a state dict.")
    dtype = _as_dtype(dtype)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir={str(out)!r} is a file; give a directory path for the Hugging Face checkpoint.")
    tokenizer = _tokenizer_source(tokenizer_dir)
    hf_state = to_hf_state_dict(config, state)
    written_dtype = dtype or hf_state[f"{_GLOBAL_MODULES[config.family]['tok_embeddings']}.weight"].dtype
    hf_cfg = hf_config(config)
    hf_cfg["torch_dtype"] = str(written_dtype).removeprefix("torch.")
    token_ids = _special_token_ids(tokenizer) if tokenizer else {}
    hf_cfg.update(token_ids)

    with atomic_directory(out) as tmp:
        _write_weights(tmp, hf_state, dtype, max_shard_size)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            for name in (*TOKENIZER_FILES, GENERATION_CONFIG_FILE):
                if (tokenizer / name).is_file():
                    shutil.copyfile(tokenizer / name, tmp / name)
        if not (tmp / GENERATION_CONFIG_FILE).exists() and token_ids:
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(token_ids, indent=2, sort_keys=True) + "\n")
        if metadata is not None:
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    return out
