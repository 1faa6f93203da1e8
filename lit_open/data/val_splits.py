"""The held-out splits of `lit-open prepare`: one pooled `val/`, or with val_by_input one `val-<name>/` per input
(names: `lit_open.data.readers.input_names`), and the `data.val_sources` override that scores those by name."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from pathlib import Path

POOLED = "val"
PER_INPUT = "val-"  # + the input's name


def val_splits(names: list[str], by_input: bool, held_sources: Iterable[int]) -> dict[str, list[int]]:
    """The held-out splits and the inputs each holds: `val` for all, or `val-<name>` for each input (index) in
    `held_sources`, the inputs that have held-out documents."""
    if not by_input:
        return {POOLED: list(range(len(names)))}
    return {f"{PER_INPUT}{names[s]}": [s] for s in sorted(set(held_sources))}


def val_sources_override(output: Path, splits: Iterable[str]) -> str:
    """`data.val_sources=[{path:...,name:...},...]` for the per-input splits, quoted for a shell."""
    entries = [
        f"{{path:{_hydra_str(str(output / split))},name:{split.removeprefix(PER_INPUT)}}}"
        for split in splits
        if split.startswith(PER_INPUT)
    ]
    return shlex.quote(f"data.val_sources=[{','.join(entries)}]")


def _hydra_str(value: str) -> str:
    """`value` as a Hydra override value: bare when Hydra reads it so, else quoted."""
    if re.fullmatch(r"[\w/.+~-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
