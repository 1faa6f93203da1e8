"""`lit-open logs sync run.dir=RUN to=wandb|mlflow`: a run's metrics.csv and events.jsonl replayed into Weights &
Biases or MLflow afterwards, e.g. from a cluster without internet. Idempotent: `<run.dir>/logs/sync-<to>.json`
records the rows and events already sent (each by its content and its occurrence, so a rollback's repeated steps
count apart), and the destination run; a second sync sends only what the run logged since. The rows reach the
logger as training would have logged them (lit_open.train.loggers: monotonic logger steps, `trainer/global_step`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import Progress

from lit_open.checkpoint.atomic import atomic_file
from lit_open.commands.report import read_metric_rows
from lit_open.compose import load_command_config
from lit_open.config import WANDB_MODES, LogsConfig, MLflowConfig, WandbConfig
from lit_open.errors import UserError, check_choice
from lit_open.train.events import read_events
from lit_open.train.loggers import check_mlflow, check_wandb, mlflow_logger, wandb_logger

SYNC_TARGETS = ("wandb", "mlflow")
console = Console(stderr=True, highlight=False)


def logs_command(args: list[str]) -> None:
    if not args or args[0] != "sync":
        raise UserError(
            "lit-open logs needs an action: sync, e.g. `lit-open logs sync run.dir=RUN to=wandb` (see lit-open --help)."
        )
    cfg: LogsConfig = load_command_config("logs", args[1:])
    check_choice("to", cfg.to, SYNC_TARGETS)
    sync(cfg)


def sync(cfg: LogsConfig) -> dict[str, int]:
    """Send what the destination lacks; returns the counts of rows and events sent."""
    run_dir = Path(cfg.run.dir).expanduser()
    metrics = run_dir / "logs" / "metrics.csv"
    if not metrics.is_file():
        raise UserError(
            f"{metrics} does not exist: run.dir={run_dir} holds no logged run (lit-open train writes metrics.csv "
            "there with logger.csv=true, the default)."
        )
    record = _run_record(run_dir)
    rows = read_metric_rows(metrics)
    events = read_events(run_dir / "events.jsonl")
    state_path = run_dir / "logs" / f"sync-{cfg.to}.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    sent_rows, sent_events = set(state.get("rows", [])), set(state.get("events", []))
    new_rows = [(key, row) for key, row in zip(identities(rows), rows) if key not in sent_rows]
    new_events = [(key, event) for key, event in zip(identities(events), events) if key not in sent_events]
    if not new_rows and not new_events:
        console.print(f"{run_dir}: nothing new to sync to {cfg.to} ({len(rows)} rows, {len(events)} events synced).")
        return {"rows": 0, "events": 0}
    logger = _destination(cfg, run_dir, record, state.get("run_id"))
    done_rows: list[str] = []
    done_events: set[str] = set()
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"rows to {cfg.to}", total=len(new_rows))
            for key, row in new_rows:
                step = int(row.pop("step"))
                logger.log_metrics(row, step=step)
                done_rows.append(key)
                progress.advance(task)
        if new_events:
            logger.log_events([event for _, event in new_events], alert=False)
            done_events = {key for key, _ in new_events}
    finally:
        state = {
            "to": cfg.to,
            "run_id": logger.run_id,
            "rows": sorted(sent_rows | set(done_rows)),
            "events": sorted(sent_events | done_events),
        }
        with atomic_file(state_path) as tmp:
            tmp.write_text(json.dumps(state))
        logger.finish()
    console.print(
        f"{run_dir}: synced {len(done_rows)} rows and {len(new_events)} events to {cfg.to} (run {logger.run_id})."
    )
    return {"rows": len(done_rows), "events": len(new_events)}


def identities(items: list[dict[str, Any]]) -> list[str]:
    """A key per item: its content's digest and how many equal items came before it."""
    seen: Counter[str] = Counter()
    keys = []
    for item in items:
        digest = hashlib.sha256(json.dumps(item, sort_keys=True, default=str).encode()).hexdigest()[:16]
        keys.append(f"{digest}#{seen[digest]}")
        seen[digest] += 1
    return keys


def _run_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():  # a run logged by hand or an older layout: its name is the directory's
        return {"run": {"name": run_dir.name, "dir": str(run_dir)}, "logger": {}}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _destination(cfg: LogsConfig, run_dir: Path, record: dict[str, Any], run_id: str | None):
    logs, name = run_dir / "logs", record["run"]["name"]
    own = record.get("logger") or {}
    if cfg.to == "wandb":
        settings = {**asdict(WandbConfig()), **(own.get("wandb") or {})}
        settings.update({k: v for k, v in (("mode", cfg.mode), ("project", cfg.project), ("entity", cfg.entity)) if v})
        wandb_cfg = WandbConfig(**settings)
        check_choice("mode", wandb_cfg.mode, WANDB_MODES)
        check_wandb(wandb_cfg, "lit-open logs sync to=wandb")
        logger = wandb_logger(wandb_cfg, logs, name, record, run_id)
    else:
        settings = {**asdict(MLflowConfig()), **(own.get("mlflow") or {})}
        settings.update({k: v for k, v in (("tracking_uri", cfg.tracking_uri), ("experiment", cfg.experiment)) if v})
        mlflow_cfg = MLflowConfig(**settings)
        check_mlflow(mlflow_cfg, "lit-open logs sync to=mlflow")
        logger = mlflow_logger(mlflow_cfg, logs, name, record, run_id)
    _ = logger.experiment  # the destination run exists (and its id is known) before the first row
    return logger
