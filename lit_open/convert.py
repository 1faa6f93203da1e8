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

from lit_open.checkpoint.source import InitSource, open_source, read_weights
from lit_open.errors import UserError

OPTIONS = ("source", "out", "dtype", "tokenizer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_options(args: list[str]) -> dict[str, str]:
    options = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise UserError(
                f"lit-open convert: {arg!r} is not an option. Give source=CHECKPOINT_OR_HF out=PATH "
                "[dtype=float32|bfloat16|float16] [tokenizer=DIR_OR_TOKENIZER_JSON]."
            )
        options[key] = value
    for key in ("source", "out"):
        if not options.get(key):
            raise UserError(
                f"lit-open convert needs {key}=...: e.g. `lit-open convert source=runs/x/checkpoints/"
                "step-00001000.ckpt out=exports/x-1000` (to Hugging Face) or `lit-open convert "
                "source=hf:EleutherAI/pythia-160m@step3000 out=pythia-3000.ckpt` (to lit-open)."
            )
    if options.get("dtype") not in (None, *DTYPES):
        raise UserError(f"dtype={options['dtype']!r} is not supported; choose {', '.join(DTYPES)}.")
    return options


def convert(args: list[str]) -> Path:
    options = parse_options(args)
    source = open_source(options["source"])
    dtype = DTYPES.get(options.get("dtype", ""))
    out = Path(options["out"]).expanduser()
    if source.kind == "lit_open":
        return to_hugging_face(source, out, dtype, options.get("tokenizer"))
    return to_lit_open(source, out, dtype)


def to_hugging_face(source: InitSource, out: Path, dtype: torch.dtype | None, tokenizer: str | None) -> Path:
    from lit_open.checkpoint.hf import save_hf
    from lit_open.checkpoint.resumable import read_checkpoint
    from lit_open.module import CHECKPOINT_KEY

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
    from lit_open.module import CHECKPOINT_KEY

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


def run_tokenizer_dir(config: dict[str, Any]) -> Path | None:
    """The directory of the tokenizer a run's data was prepared with, from its config (as a dict); None if gone."""
    data = config.get("data", {})
    candidates = [Path(data["tokenizer"]).expanduser()] if data.get("tokenizer") else []
    candidates += [Path(s["path"]).expanduser().parent / "tokenizer.json" for s in data.get("sources", [])]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.parent
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None
