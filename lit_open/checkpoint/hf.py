"""Hugging Face import and export: Llama (and Mistral without sliding window), OLMo 2 and GPT-NeoX/Pythia.

A Hugging Face checkpoint is a directory with `config.json` (the architecture) and the weights, as one
`model.safetensors`, several `model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`, or the
PyTorch pickles `pytorch_model.bin` / `pytorch_model.bin.index.json`. `lit_open.checkpoint.hub.resolve_source` finds
that directory (`hf:ORG/NAME@REVISION` is downloaded through huggingface_hub, `hf:/local/dir` is used as is),
`lit_open.checkpoint.hf_config.read_config` turns `config.json` into a `ModelConfig`,
`lit_open.checkpoint.hf_weights` maps parameter names (the tables below), and this module reads and writes the files:
`read_state_dict` reads the weights under lit-open's names, `load_hf` builds the `Transformer`, and `save_hf` writes a
directory that `transformers` loads.

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
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lit_open.checkpoint.atomic import atomic_directory
from lit_open.checkpoint.hf_config import hf_config, read_config
from lit_open.checkpoint.hf_weights import GLOBAL_MODULES, from_hf_state_dict, listing, to_hf_state_dict
from lit_open.checkpoint.hub import (
    BIN_INDEX,
    BIN_WEIGHTS,
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    TOKENIZER_FILES,
    resolve_source,
)
from lit_open.data.tokenizer import TOKENIZER_FILE, export_tokenizer_configs
from lit_open.dtypes import torch_dtype
from lit_open.errors import UserError, first_line
from lit_open.model.config import ModelConfig
from lit_open.model.model import Transformer

METADATA_FILE = "lit_open.json"
MAX_SHARD_SIZE = 5 * 10**9  # bytes per safetensors file, as transformers used to shard by default ("5GB")


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
                    f"{path} lists shards that are not in {directory}: {listing(absent, 3)}. The download is "
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


def _read_file(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:  # one tensor at a time: cast as read
                return {name: cast(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # written in the legacy (pre-zip) format, which cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"Could not read the weights file {path}: {type(err).__name__}: {first_line(err)}. It may be "
            "truncated (an interrupted download) or not a safetensors / PyTorch state dict file."
        ) from err
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return {name: cast(tensor) for name, tensor in loaded.items()}


def read_state_dict(directory: Path, config: ModelConfig, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The weights in `directory` (safetensors or .bin, single or sharded) under lit-open's names.

    dtype None keeps the checkpoint's dtypes; otherwise floating-point tensors are cast, one at a time as read.
    """
    directory, dtype = Path(directory), torch_dtype(dtype)
    hf: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        hf.update(_read_file(path, dtype))
    try:
        return from_hf_state_dict(config, hf)
    except UserError as err:
        raise UserError(f"{directory}: {err}") from err


def load_hf(
    source: str | Path, revision: str | None = None, dtype: torch.dtype | None = None, max_seq_len: int | None = None
) -> Transformer:
    """A lit-open Transformer holding a Hugging Face checkpoint's weights (in eval mode, on the CPU).

    source: `hf:ORG/NAME@REVISION`, `hf:/local/dir` or a directory; revision overrides `@REVISION`; dtype None keeps
    the checkpoint's dtype (bfloat16 stays bfloat16), else the weights are cast to it; max_seq_len: the context to
    build for when config.json gives none (max_position_embeddings -1, as OLMo-core's exporter writes).
    """
    directory, _ = resolve_source(str(source), revision)
    config = read_config(directory, max_seq_len)
    state = read_state_dict(directory, config, dtype)
    with torch.device("meta"):
        model = Transformer(config)
    return model.assign_weights(state)


# ---------------------------------------------------------------------------------------------------------------
# writing


def _tokenizer_source(tokenizer_dir: str | Path | None) -> tuple[Path, Path | None] | None:
    """(the directory whose tokenizer files to copy, the tokenizer.json to ship or None); None: no tokenizer."""
    if tokenizer_dir is None:
        return None
    path = Path(tokenizer_dir).expanduser()
    if path.is_file():  # a tokenizer.json (under any name): it is shipped as tokenizer.json
        return path.parent, path
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
    return path, path / TOKENIZER_FILE if (path / TOKENIZER_FILE).is_file() else None


def _file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask (safetensors creates its files 0600)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # elsewhere: read it by setting it (briefly) and back
    os.umask(umask)
    return 0o666 & ~umask


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
        os.chmod(directory / filename, _file_mode())
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
    eos_token: str | None = None,
) -> Path:
    """Write a Hugging Face directory that `transformers.AutoModelForCausalLM.from_pretrained` loads; returns it.

    model_or_state: a Transformer (its config is used unless `config` is given) or a state dict with `config`.
    Writes config.json, model.safetensors (or shards of at most `max_shard_size` bytes with
    model.safetensors.index.json), the tokenizer files found in `tokenizer_dir` (a directory, or a tokenizer.json
    shipped as tokenizer.json) with generation_config.json (copied, or made from the tokenizer's bos/eos/pad tokens),
    and `metadata` as lit_open.json. The tokenizer ships with a tokenizer_config.json that transformers'
    AutoTokenizer and lm-eval read as is (`export_tokenizer_configs`): its eos_token is `eos_token`, else the one
    the manifest of data prepared beside the tokenizer records, else the tokenizer's own. dtype None keeps the
    weights' dtype; otherwise floating-point tensors are cast. The directory is written under a temporary name
    beside `out_dir` and renamed into place when complete; an existing `out_dir` is replaced only then. Its files
    get the mode of any new file (0644 under the usual umask 022).
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
    dtype = torch_dtype(dtype)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir={str(out)!r} is a file; give a directory path for the Hugging Face checkpoint.")
    tokenizer = _tokenizer_source(tokenizer_dir)
    hf_state = to_hf_state_dict(config, state)
    written_dtype = dtype or hf_state[f"{GLOBAL_MODULES[config.family]['tok_embeddings']}.weight"].dtype
    hf_cfg = hf_config(config)
    hf_cfg["torch_dtype"] = str(written_dtype).removeprefix("torch.")
    tokenizer_configs, token_ids = {}, {}
    if tokenizer is not None and tokenizer[1] is not None:
        tokenizer_configs, token_ids = export_tokenizer_configs(tokenizer[1], config.max_seq_len, eos_token)
    hf_cfg.update(token_ids)

    with atomic_directory(out) as tmp:
        _write_weights(tmp, hf_state, dtype, max_shard_size)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            directory, tokenizer_json = tokenizer
            siblings = tokenizer_json is None or tokenizer_json.name == TOKENIZER_FILE
            for name in (*TOKENIZER_FILES, GENERATION_CONFIG_FILE) if siblings else ():
                if (directory / name).is_file():
                    shutil.copyfile(directory / name, tmp / name)
            if tokenizer_json is not None:
                shutil.copyfile(tokenizer_json, tmp / TOKENIZER_FILE)
            for name, content in tokenizer_configs.items():
                (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        if not (tmp / GENERATION_CONFIG_FILE).exists() and token_ids:
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(token_ids, indent=2, sort_keys=True) + "\n")
        if metadata is not None:
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    return out
