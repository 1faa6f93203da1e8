"""The manifest of a prepared split (`<output>/<split>/manifest.json`): counts per source, tokenizer, dtype."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from lit_open.errors import UserError

FORMAT = "lit-open-tokens/1"
MANIFEST = "manifest.json"


def read_manifest(split_dir: str | Path) -> dict[str, Any]:
    """The manifest of one prepared split (e.g. `<output>/train`). UserError if it is absent or invalid."""
    split_dir = Path(split_dir).expanduser()
    path = split_dir / MANIFEST
    if not path.is_file():
        hint = ""
        if (split_dir / "train" / MANIFEST).is_file():
            hint = f" It holds a prepared dataset: point at one of its splits, e.g. {split_dir / 'train'}."
        elif (split_dir / "index.json").is_file():
            hint = " It holds litdata chunks, but not ones written by `lit-open prepare`."
        raise UserError(
            f"{split_dir} is not a split prepared by `lit-open prepare` (no {MANIFEST} in it).{hint} Run "
            "`lit-open prepare` to build one, or fix the data path."
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"Could not read {path}: {err}. Re-run `lit-open prepare` to rebuild it.") from err
    if not isinstance(manifest, dict):
        manifest = {}
    missing = [k for k in ("format", "split", "documents", "tokens", "dtype", "tokenizer") if k not in manifest]
    if missing or manifest["format"] != FORMAT:
        found = manifest.get("format")
        raise UserError(
            f"{path} is not a valid lit-open manifest (format {found!r}, expected {FORMAT!r}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + "). Re-run `lit-open prepare` with this version of lit-open to rebuild the data."
        )
    return manifest


def lit_open_version() -> str:
    try:
        return importlib.metadata.version("lit-open")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
