"""`<run.dir>/events.jsonl`: one JSON object per notable event, for humans, reports and tooling."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class EventLog:
    """Appends `{"step", "event", "time", ...}` lines; only the process that owns it (global rank 0) writes."""

    def __init__(self, path: str | Path | None, enabled: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None

    def write(self, step: int, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def read_events(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
