"""The training core: `run` (lit_open.train.run(cfg), a whole run from a validated config), LitLM, rollbacks and
in-memory snapshots, the loss, the optimizer and LR schedules, loggers, progress and the event log."""

from __future__ import annotations

from typing import Any

__all__ = ["run"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: importing one part of the core (e.g. its event log) must not load Lightning and the rest.
    if name == "run":
        from lit_open.train.runner import run

        return run
    raise AttributeError(f"module 'lit_open.train' has no attribute {name!r}")
