"""The manifest of a prepared split (`<output>/<split>/manifest.json`): counts per source, tokenizer, dtype."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_open.errors import UserError
from lit_open.provenance import lit_open_version

if TYPE_CHECKING:  # readers (and the hub code it imports) are for prepare, not for training's manifest reads
    from lit_open.data.readers import InputFile

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


def source_entries(
    inputs: list[str],
    names: list[str],
    sources: list[list[InputFile]],
    per_file: Mapping[int, Any],
    undecodable: list[int],
    which: list[int],
) -> list[dict[str, Any]]:
    """The manifest's `sources`: the counts of the split's documents from each input in `which` (its index in
    `inputs`); `per_file`: per index in the files of `sources`, their documents, tokens and bytes (attributes)."""
    files = [f for source in sources for f in source]
    entries = {
        s: {
            "input": inputs[s],
            "name": names[s],
            "revision": sources[s][0].revision,  # a dataset's hub commit or save_to_disk fingerprint
            "files": len(sources[s]),
            "documents": 0,
            "tokens": 0,
            "bytes": 0,
            "undecodable_bytes": undecodable[s],
        }
        for s in which
    }
    for i, stat in per_file.items():
        entry = entries[files[i].source]
        entry["documents"] += stat.documents
        entry["tokens"] += stat.tokens
        entry["bytes"] += stat.bytes
    return list(entries.values())


def split_manifest(
    split: str, sources: list[dict[str, Any]], dtype: str, tokenizer: dict[str, Any], settings: dict[str, Any]
) -> dict[str, Any]:
    """The manifest of a split: the totals of its per-input counts (`sources`: each with documents, tokens, bytes),
    the token dtype, the tokenizer's identity and the prepare settings."""
    return {
        "format": FORMAT,
        "split": split,
        "documents": sum(s["documents"] for s in sources),
        "tokens": sum(s["tokens"] for s in sources),
        "bytes": sum(s["bytes"] for s in sources),  # UTF-8 bytes of the documents' text, for bits per byte
        "dtype": dtype,
        "tokenizer": tokenizer,
        "sources": sources,
        **settings,
        "lit_open_version": lit_open_version(),
    }
