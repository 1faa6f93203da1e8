"""The byte-offset index of a JSON-lines file (LLM360's token chunks): line i of a file of billions of bytes in O(1).

Built once by a scan (a progress bar on a terminal) and kept as `.<file name>.lit-open-index.npy` next to the file,
or, when its directory is not writable, under `$LIT_OPEN_CACHE/released-index/<hash of the directory>/`. Contents:
int64 `[version, size, mtime_ns, lines, offsets..., end]`; rebuilt when the file's size or mtime changes, written
atomically.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from lit_open.checkpoint.atomic import atomic_file

_INDEX_VERSION = 1  # int64 [version, file size, file mtime_ns, lines, line offsets..., end]
_INDEX_SUFFIX = ".lit-open-index.npy"
_SCAN_BYTES = 16 << 20


def index_paths(file: Path) -> tuple[Path, Path]:
    """(sidecar next to the file, its stand-in in the cache for a read-only data directory)."""
    name = f".{file.name}{_INDEX_SUFFIX}"
    digest = hashlib.sha256(str(file.parent.resolve()).encode()).hexdigest()[:32]
    cache = Path(os.environ.get("LIT_OPEN_CACHE") or Path.home() / ".cache" / "lit-open")
    return file.parent / name, cache / "released-index" / digest / name


def line_offsets(file: Path) -> np.ndarray:
    """Byte offset of every line of `file`, then the file size: from a sidecar index, built on first use."""
    stat = file.stat()
    header = [_INDEX_VERSION, stat.st_size, stat.st_mtime_ns]
    local, cached = index_paths(file)
    for candidate in (local, cached):
        try:
            index = np.load(candidate, mmap_mode="r")
        except (OSError, ValueError, EOFError):  # missing or damaged: built again
            continue
        if index.ndim == 1 and len(index) >= 5 and index[:3].tolist() == header and len(index) == index[3] + 5:
            return index[4:]
    offsets = scan_lines(file, stat.st_size)
    index = np.concatenate([np.asarray(header + [len(offsets) - 1], dtype=np.int64), offsets])
    for target in (local, cached) if os.access(file.parent, os.W_OK) else (cached,):
        try:
            _write_atomic(target, index)
            break
        except OSError:
            continue
    return offsets


def scan_lines(file: Path, size: int) -> np.ndarray:
    """Start offset of every line of `file`, then `size` (int64); a progress bar (bytes) on a terminal."""
    parts = [np.zeros(1, dtype=np.int64)]
    console = Console(stderr=True)
    columns = (TextColumn("indexing {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(
        *columns, TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal
    ) as bar:
        task = bar.add_task(file.name, total=size)
        with open(file, "rb") as fh:
            position = 0
            while chunk := fh.read(_SCAN_BYTES):
                newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
                parts.append(newlines.astype(np.int64) + position + 1)
                position += len(chunk)
                bar.update(task, completed=position)
    offsets = np.concatenate(parts)
    if offsets[-1] != size:  # a last line without a newline ends at the end of the file
        offsets = np.append(offsets, size)
    return offsets


def _write_atomic(target: Path, array: np.ndarray) -> None:
    with atomic_file(target) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)
