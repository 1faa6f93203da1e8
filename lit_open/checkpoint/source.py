"""Where a run's initial weights come from (`init_from`): a Hugging Face checkpoint or a lit-open checkpoint.

`init_from=hf:ORG/NAME@REVISION` (downloaded through huggingface_hub at that revision, e.g. an intermediate
checkpoint such as `hf:LLM360/Amber@ckpt_120`), `init_from=hf:/local/dir` (a Hugging Face layout on disk) or
`init_from=/path/to/step-NNNNNNNN.ckpt` (a lit-open checkpoint, single file or sharded directory). The source
defines the architecture: its config replaces `model.*`, except the keys that do not change the weights
(`USER_MODEL_KEYS`); an explicit `model=` or `model.<key>=` that contradicts it is a user error. The tokenizer of a
Hugging Face source is the one `lit-open prepare` should use (`InitSource.tokenizer`).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_open.checkpoint.resumable import SHARDED_METADATA
from lit_open.config import TrainConfig
from lit_open.errors import UserError
from lit_open.model import ModelConfig

# model keys that do not describe the weights: a run may set them whatever the source says
USER_MODEL_KEYS = {"name", "attention", "max_seq_len", "init_std", "init_cutoff", "init_scale_output"}
HF_PREFIX = "hf:"


@dataclass
class InitSource:
    spec: str  # as given in init_from
    kind: str  # hf | lit_open
    path: Path  # the local Hugging Face directory, or the lit-open checkpoint
    model: ModelConfig
    provenance: dict[str, Any] = field(default_factory=dict)  # repo, revision, commit, ... (recorded in events)
    tokenizer: Path | None = None  # tokenizer.json shipped with the source


@functools.cache
def open_source(spec: str) -> InitSource:
    """Resolve `init_from` (downloading a hub source) and read its architecture; weights are read later."""
    if spec.startswith(HF_PREFIX):
        from lit_open.checkpoint.hf import read_config, resolve_source

        directory, provenance = resolve_source(spec)
        tokenizer = directory / "tokenizer.json"
        return InitSource(
            spec=spec,
            kind="hf",
            path=directory,
            model=read_config(directory),
            provenance=provenance,
            tokenizer=tokenizer if tokenizer.is_file() else None,
        )
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"init_from={spec!r}: no such checkpoint. Give hf:ORG/NAME@REVISION (a Hugging Face hub repo at a "
            "revision), hf:/path/to/dir (a Hugging Face directory) or a lit-open checkpoint (step-NNNNNNNN.ckpt)."
        )
    if path.is_dir() and (path / "config.json").is_file() and not (path / SHARDED_METADATA).is_file():
        return open_source(HF_PREFIX + str(path))  # a Hugging Face directory given without the hf: prefix
    from lit_open.checkpoint.resumable import read_checkpoint
    from lit_open.module import CHECKPOINT_KEY

    saved = read_checkpoint(path)
    model = ModelConfig(**saved[CHECKPOINT_KEY]["config"]["model"])
    return InitSource(
        spec=spec, kind="lit_open", path=path, model=model, provenance={"source_step": saved["global_step"]}
    )


def model_for_source(current: ModelConfig, source: InitSource, explicit: set[str]) -> ModelConfig:
    """The source's architecture, with the run's own values for USER_MODEL_KEYS; a conflicting explicit key fails.

    explicit: the model keys the user set on the command line (`model` itself for `model=PRESET`).
    """
    conflicts = {}
    for f in dataclasses.fields(ModelConfig):
        if f.name in USER_MODEL_KEYS or f.name == "pad_vocab_multiple":
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
    kept = {k: getattr(current, k) for k in USER_MODEL_KEYS if "model" in explicit or f"model.{k}" in explicit}
    if "name" not in kept:
        kept["name"] = source.model.name
    return dataclasses.replace(source.model, **kept)


def apply_init_source(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The run config with the source's architecture, and its tokenizer for the data when none is given."""
    source = open_source(cfg.init_from)
    model = model_for_source(cfg.model, source, explicit)
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


def read_weights(source: InitSource) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The source's model state (lit-open parameter names) and, for a single-file lit-open checkpoint, its
    optimizer state (None otherwise: the optimizer then starts fresh)."""
    if source.kind == "hf":
        from lit_open.checkpoint.hf import read_state_dict

        return read_state_dict(source.path, source.model), None
    if source.path.is_dir():  # sharded: gather the shards into one state on this process
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

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
