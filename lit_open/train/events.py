"""`<run.dir>/events.jsonl`: one JSON object per notable event, for humans, reports and tooling.

Strict JSON, which every reader accepts: a value JSON cannot encode is written as a string, non-finite floats
included (`"nan"`, `"inf"`, `"-inf"`, so that a NaN loss and an overflow stay apart).
"""

from __future__ import annotations

import json
import math
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any


class EventLog:
    """Appends `{"step", "event", "time", ...}` lines; only the process that owns it (global rank 0) writes."""

    def __init__(self, path: str | Path | None, enabled: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None
        self._lock = threading.Lock()  # an asynchronous checkpoint's writer thread writes its event too
        # called with each event written (the run's W&B / MLflow loggers); a failing one never stops training
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def write(self, step: int, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        line = json.dumps(_encodable(record), default=str, allow_nan=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(line)
            decoded = json.loads(line)  # what a reader of events.jsonl gets (non-finite floats as strings)
            for listener in self.listeners:
                try:
                    listener(decoded)
                except Exception as err:  # a logger's outage must not end a run: the event is in events.jsonl
                    warnings.warn(f"Could not pass the {event!r} event at step {step} to a logger: {err}", stacklevel=2)


def _encodable(value: Any) -> Any:
    """`value` with every non-finite float, however deeply nested, as its string (e.g. "nan")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(float(value))
    if isinstance(value, dict):
        return {_encodable(k) if isinstance(k, float) else k: _encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v) for v in value]
    return value


def read_events(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
