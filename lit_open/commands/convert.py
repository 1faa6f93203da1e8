"""`lit-open convert source=... out=...`: lit-open checkpoints to Hugging Face directories, and back.

- `source` a lit-open checkpoint (`<run.dir>/checkpoints/step-NNNNNNNN.ckpt`, a single file or a sharded directory
  written by several processes) -> `out` a Hugging Face directory (config.json, safetensors, the tokenizer files of
  the run's data, and `lit_open.json` with the step and the run's config) that `transformers` loads.
- `source` a Hugging Face checkpoint (`hf:ORG/NAME@REVISION`, `hf:/local/dir` or a directory with config.json) ->
  `out` a lit-open weights file (`.ckpt`: the model's weights and architecture, no training state) for
  `init_from=`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from lit_open.checkpoint.atomic import atomic_file
from lit_open.checkpoint.hf import save_hf
from lit_open.checkpoint.resumable import (
    CHECKPOINT_KEY,
    read_checkpoint,
)
from lit_open.checkpoint.source import InitSource, check_checkpoint_spec, open_source, read_weights
from lit_open.compose import load_command_config
from lit_open.config import ConvertConfig
from lit_open.data.manifest import read_manifest
from lit_open.data.tokenizer import (
    check_tokenizer_matches,
    data_tokenizer_file,
    prepared_sources,
    prepared_tokenizer,
    tokenizer_file,
)
from lit_open.dtypes import torch_dtype
from lit_open.errors import UserError


def convert_command(args: list[str]) -> Path:
    return convert(load_command_config("convert", args))


def convert(cfg: ConvertConfig) -> Path:
    out = Path(cfg.out).expanduser()
    refuse_existing_out(out, cfg.overwrite)
    check_checkpoint_spec(cfg.source, "source")
    source = open_source(cfg.source)
    dtype = torch_dtype(cfg.dtype)
    if source.kind == "lit_open":
        return to_hugging_face(source, out, dtype, cfg.tokenizer)
    return to_lit_open(source, out, dtype)


def refuse_existing_out(out: Path, overwrite: bool) -> None:
    """convert never replaces earlier work unasked: an existing file or non-empty directory needs overwrite=true."""
    if overwrite or not (out.exists() or out.is_symlink()) or (out.is_dir() and not any(out.iterdir())):
        return
    raise UserError(
        f"out={out} already exists{'' if out.is_file() else ' and is not empty'}. Pass overwrite=true to replace it "
        "(the new export replaces it only once complete), or choose another out=."
    )


def to_hugging_face(source: InitSource, out: Path, dtype: torch.dtype | None, tokenizer: str | None) -> Path:
    """The HF directory of a run checkpoint, with the tokenizer its training data was prepared with (the one their
    manifests record): `tokenizer` if given, else the run's; one that is not the data's is refused."""
    saved = read_checkpoint(source.path)
    config = saved[CHECKPOINT_KEY]["config"]
    data = prepared_sources(config)
    data_tokenizer = next((t for t in map(prepared_tokenizer, data) if t is not None), None)
    fix = (
        "The model was trained on that data: convert it with the data's tokenizer, "
        f"tokenizer={data_tokenizer or 'PATH (the tokenizer.json the data was prepared with)'}."
    )
    if tokenizer:
        tokenizer_path = tokenizer_file(tokenizer)
        check_tokenizer_matches(tokenizer_path, data, "tokenizer", fix)
    else:
        tokenizer_path = data_tokenizer_file(config, fix)
    eos_token = read_manifest(data[0])["tokenizer"]["eos_token"] if data else None
    state, _ = read_weights(source)
    metadata = {"format": "lit-open-convert/1", "source": str(source.path), "step": saved["global_step"]}
    metadata["config"] = config
    save_hf(
        state,
        out,
        config=source.model,
        tokenizer_dir=tokenizer_path,
        metadata=metadata,
        dtype=dtype,
        eos_token=eos_token,
    )
    note = "" if tokenizer_path else " (no tokenizer found: give tokenizer=PATH to ship the data's along)"
    print(f"wrote {out}: the Hugging Face checkpoint of {source.path} (step {saved['global_step']}){note}")
    return out


def to_lit_open(source: InitSource, out: Path, dtype: torch.dtype | None) -> Path:
    """A lit-open weights file of a Hugging Face checkpoint, written under a temporary name and renamed."""
    if out.is_dir():
        raise UserError(f"out={out} is a directory; give the path of the weights file to write, e.g. out=weights.ckpt.")
    state, _ = read_weights(source)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    checkpoint: dict[str, Any] = {
        "global_step": 0,
        "state_dict": {f"model.{k}": v.contiguous() for k, v in state.items()},
        CHECKPOINT_KEY: {
            "config": {"model": dataclasses.asdict(source.model)},
            "converted_from": {"source": source.spec, **source.provenance},
        },
    }
    with atomic_file(out) as tmp:
        torch.save(checkpoint, tmp)
    print(f"wrote {out}: lit-open weights of {source.spec} ({json.dumps(source.provenance)}); use init_from={out}")
    return out
