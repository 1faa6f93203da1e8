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
import os
from pathlib import Path
from typing import Any

import torch

from lit_open.checkpoint.hf import save_hf
from lit_open.checkpoint.resumable import CHECKPOINT_KEY, read_checkpoint
from lit_open.checkpoint.source import InitSource, open_source, read_weights
from lit_open.compose import load_command_config
from lit_open.config import ConvertConfig
from lit_open.data.tokenizer import run_tokenizer_dir
from lit_open.dtypes import torch_dtype


def convert_command(args: list[str]) -> Path:
    return convert(load_command_config("convert", args))


def convert(cfg: ConvertConfig) -> Path:
    source = open_source(cfg.source)
    dtype = torch_dtype(cfg.dtype)
    out = Path(cfg.out).expanduser()
    if source.kind == "lit_open":
        return to_hugging_face(source, out, dtype, cfg.tokenizer)
    return to_lit_open(source, out, dtype)


def to_hugging_face(source: InitSource, out: Path, dtype: torch.dtype | None, tokenizer: str | None) -> Path:
    saved = read_checkpoint(source.path)
    config = saved[CHECKPOINT_KEY]["config"]
    state, _ = read_weights(source)
    tokenizer_dir = Path(tokenizer).expanduser() if tokenizer else run_tokenizer_dir(config)
    if tokenizer_dir is not None and tokenizer_dir.is_file():
        tokenizer_dir = tokenizer_dir.parent
    metadata = {"format": "lit-open-convert/1", "source": str(source.path), "step": saved["global_step"]}
    metadata["config"] = config
    save_hf(state, out, config=source.model, tokenizer_dir=tokenizer_dir, metadata=metadata, dtype=dtype)
    note = "" if tokenizer_dir else " (no tokenizer found: give tokenizer=DIR to copy one along)"
    print(f"wrote {out}: the Hugging Face checkpoint of {source.path} (step {saved['global_step']}){note}")
    return out


def to_lit_open(source: InitSource, out: Path, dtype: torch.dtype | None) -> Path:

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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    torch.save(checkpoint, tmp)
    os.replace(tmp, out)
    print(f"wrote {out}: lit-open weights of {source.spec} ({json.dumps(source.provenance)}); use init_from={out}")
    return out
