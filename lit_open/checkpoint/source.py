"""Where a new run's initial weights come from (`init_from`): a Hugging Face checkpoint or a lit-open checkpoint.

`init_from=hf:ORG/NAME@REVISION` (downloaded through huggingface_hub at that revision, e.g. an intermediate
checkpoint such as `hf:LLM360/Amber@ckpt_120`), `init_from=hf:/local/dir` (a Hugging Face layout on disk) or
`init_from=/path/to/step-NNNNNNNN.ckpt` (a lit-open checkpoint, single file or sharded directory). The source
defines the architecture: its config replaces `model.*`, except the keys that do not define the weights
(`NON_ARCHITECTURE_KEYS`); an explicit `model=` or `model.<key>=` that contradicts it is a user error. The tokenizer
of a Hugging Face source is the one `lit-open prepare` should use (`InitSource.tokenizer`). Composing a config does
not open the source: `lit_open.train.run` does (`apply_init_source`).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from lit_open.checkpoint.hf import read_state_dict
from lit_open.checkpoint.hf_config import context_length, read_config, read_config_json
from lit_open.checkpoint.hub import CONFIG_FILE, HF_PREFIX, resolve_source
from lit_open.checkpoint.resumable import CHECKPOINT_KEY, POINTER, SHARDED_METADATA, list_checkpoints, read_checkpoint
from lit_open.config import TrainConfig
from lit_open.data.tokenizer import TOKENIZER_FILE
from lit_open.errors import UserError
from lit_open.model.config import NON_ARCHITECTURE_KEYS, ModelConfig


@dataclass
class InitSource:
    spec: str  # as given in init_from
    kind: str  # hf | lit_open
    path: Path  # the local Hugging Face directory, or the lit-open checkpoint
    model: ModelConfig
    provenance: dict[str, Any] = field(default_factory=dict)  # repo, revision, commit, ... (recorded in events)
    tokenizer: Path | None = None  # tokenizer.json shipped with the source
    # False when the source's config.json gives no context length (OLMo-core's exports): the run's is used
    context_length_given: bool = True


@functools.cache
def open_source(spec: str) -> InitSource:
    """Resolve `init_from` (downloading a hub source) and read its architecture; weights are read later."""
    if spec.startswith(HF_PREFIX):
        directory, provenance = resolve_source(spec)
        tokenizer = directory / TOKENIZER_FILE
        return InitSource(
            spec=spec,
            kind="hf",
            path=directory,
            model=read_config(directory),
            provenance=provenance,
            tokenizer=tokenizer if tokenizer.is_file() else None,
            context_length_given=context_length(read_config_json(directory)) is not None,
        )
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"init_from={spec!r}: no such checkpoint. Give hf:ORG/NAME@REVISION (a Hugging Face hub repo at a "
            "revision), hf:/path/to/dir (a Hugging Face directory) or a lit-open checkpoint (step-NNNNNNNN.ckpt)."
        )
    if path.is_dir() and (path / CONFIG_FILE).is_file() and not (path / SHARDED_METADATA).is_file():
        return open_source(HF_PREFIX + str(path))  # a Hugging Face directory given without the hf: prefix
    saved = read_checkpoint(path)
    model = ModelConfig(**saved[CHECKPOINT_KEY]["config"]["model"])
    return InitSource(
        spec=spec, kind="lit_open", path=path, model=model, provenance={"source_step": saved["global_step"]}
    )


def model_for_source(current: ModelConfig, source: InitSource, explicit: set[str], seq_len: int) -> ModelConfig:
    """The source's architecture, with the run's own values for NON_ARCHITECTURE_KEYS; a conflicting explicit key
    fails. A source that gives no context length gets the run's: an explicit model.max_seq_len, else `seq_len`.

    explicit: the model keys the user set on the command line (`model` itself for `model=PRESET`).
    """
    conflicts = {}
    for f in dataclasses.fields(ModelConfig):
        if f.name in NON_ARCHITECTURE_KEYS or f.name == "pad_vocab_multiple":
            continue
        mine, theirs = getattr(current, f.name), getattr(source.model, f.name)
        if ("model" in explicit or f"model.{f.name}" in explicit) and mine != theirs:
            conflicts[f.name] = (mine, theirs)
    if conflicts:
        listing = ", ".join(f"model.{k}={a!r} (the source has {b!r})" for k, (a, b) in conflicts.items())
        raise UserError(
            f"init_from={source.spec} defines the architecture, and the model settings given contradict it: "
            f"{listing}. Drop model=/model.* from the command line (the source's config is used), or pick another "
            "source."
        )
    kept = {k: getattr(current, k) for k in NON_ARCHITECTURE_KEYS if "model" in explicit or f"model.{k}" in explicit}
    if "name" not in kept:
        kept["name"] = source.model.name
    if not source.context_length_given and "max_seq_len" not in kept:
        kept["max_seq_len"] = seq_len
    return dataclasses.replace(source.model, **kept)


def apply_init_source(cfg: TrainConfig, explicit: set[str] | frozenset[str]) -> TrainConfig:
    """The run config with the source's architecture, and its tokenizer for the data when none is given.

    explicit: the model keys the user set on the command line (`lit_open.compose.explicit_model_keys`).
    """
    source = open_source(cfg.init_from)
    model = model_for_source(cfg.model, source, set(explicit), cfg.data.seq_len)
    if cfg.data.seq_len > model.max_seq_len:
        raise UserError(
            f"data.seq_len={cfg.data.seq_len} exceeds the max_seq_len={model.max_seq_len} of init_from={cfg.init_from};"
            f" lower data.seq_len or set model.max_seq_len (RoPE models extrapolate poorly past what they saw)."
        )
    data = cfg.data
    if source.tokenizer is not None:
        if data.tokenizer is None:
            data = dataclasses.replace(data, tokenizer=str(source.tokenizer))
        if data.prepare is not None and data.prepare.tokenizer is None:
            data = dataclasses.replace(data, prepare=dataclasses.replace(data.prepare, tokenizer=str(source.tokenizer)))
    return dataclasses.replace(cfg, model=model, data=data)


def as_resumed_from(cfg: TrainConfig, saved: dict[str, Any], explicit: set[str] | frozenset[str]) -> TrainConfig:
    """The run config of an init_from run that resumes: the architecture (and, when none is given, the tokenizer) its
    checkpoint was trained with, as `apply_init_source` gave them, with the model keys given on the command line on
    top (an architecture key that differs is then refused by the resume check)."""
    given = {k: getattr(cfg.model, k) for k in (f.name for f in dataclasses.fields(ModelConfig))}
    chosen = {k: v for k, v in given.items() if "model" in explicit or f"model.{k}" in explicit}
    model = ModelConfig(**{**saved["model"], **chosen})
    data = cfg.data
    if data.tokenizer is None and saved.get("data", {}).get("tokenizer"):
        data = dataclasses.replace(data, tokenizer=saved["data"]["tokenizer"])
    return dataclasses.replace(cfg, model=model, data=data)


def read_weights(source: InitSource) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The source's model state (lit-open parameter names) and, for a single-file lit-open checkpoint, its
    optimizer state (None otherwise: the optimizer then starts fresh)."""
    if source.kind == "hf":
        return read_state_dict(source.path, source.model), None
    if source.path.is_dir():  # sharded: gather the shards into one state on this process
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(source.path), f"{tmp}/whole.pt")
            whole = torch.load(f"{tmp}/whole.pt", map_location="cpu", weights_only=False)
        return _strip(whole["state_dict"]), None
    checkpoint = torch.load(source.path, map_location="cpu", weights_only=False)
    optimizer = (checkpoint.get("optimizer_states") or [None])[0]
    return _strip(checkpoint["state_dict"]), optimizer


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LitLM's state_dict names (`model.` + the Transformer's) -> the Transformer's."""
    return {k.removeprefix("model."): v for k, v in state.items()}


def check_checkpoint_spec(spec: str, key: str) -> None:
    """Refuse a path that does not exist, and a directory that is neither a checkpoint nor a Hugging Face directory,
    such as <run.dir>/checkpoints or the run directory itself, naming the checkpoints in it (newest first) and the
    one to give."""
    path = Path(spec).expanduser()
    if spec.startswith(HF_PREFIX):
        return
    if not path.exists():
        raise UserError(
            f"{key}={spec!r}: no such file or directory. Give a run checkpoint, {key}=<run.dir>/checkpoints/"
            "step-NNNNNNNN.ckpt, or a Hugging Face checkpoint (hf:/path/to/dir, hf:ORG/NAME@REVISION)."
        )
    if not path.is_dir():
        return
    if any((path / name).exists() for name in (CONFIG_FILE, SHARDED_METADATA, ".metadata")) or any(
        path.glob("*.distcp")
    ):
        return  # a Hugging Face directory or a sharded checkpoint (complete or not: read_checkpoint says)
    directory = path
    if not list_checkpoints(path) and list_checkpoints(path / "checkpoints"):
        directory = path / "checkpoints"  # the run directory
    found = list_checkpoints(directory)[::-1]
    if not found:
        raise UserError(
            f"{key}={spec!r} is a directory, but neither a checkpoint nor a directory of checkpoints (it holds no "
            f"step-NNNNNNNN.ckpt). Give a checkpoint, {key}=<run.dir>/checkpoints/step-NNNNNNNN.ckpt, or a "
            f"Hugging Face directory (with {CONFIG_FILE})."
        )
    pointer = directory / POINTER
    named = directory / pointer.read_text().strip() if pointer.is_file() else None
    which = "the newest, which `latest` names" if named == found[0] else "the newest"
    raise UserError(
        f"{key}={spec!r} is a directory of checkpoints, not a checkpoint: give one of them, e.g. {key}={found[0]} "
        f"({which}). It holds, newest first: {', '.join(p.name for p in found)}."
    )
