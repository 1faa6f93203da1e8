"""Where a result comes from: lit-open's version and the git commit of its source checkout (if it is one)."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any


def git_commit() -> str | None:
    """The commit of the checkout lit-open runs from; None for an installed wheel or without git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def lit_open_version() -> str:
    """The installed lit-open's version ("unknown" for a source tree that is not installed)."""
    try:
        return importlib.metadata.version("lit-open")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def lit_open_provenance() -> dict[str, Any]:
    return {"version": lit_open_version(), "git_commit": git_commit()}
