"""The run's loggers: metrics.csv (Lightning's CSVLogger, resume-aware) and TensorBoard in `<run.dir>/logs/`, and
Weights & Biases and MLflow through Lightning's loggers, which also receive the run's config and its events.

Every logger gets the rows `LitLM.log_row` writes, keyed by the optimizer step. A rollback, or a resume that replays
the steps after its checkpoint, logs some optimizer steps again: W&B and MLflow keep their own step monotonic and
carry the optimizer step as the metric `trainer/global_step`, so that a published curve shows the undone branch apart
(as `lit-open report` draws it). Design notes: docs/architecture.md ("Loggers").
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from lit_open.checkpoint.atomic import atomic_file
from lit_open.config import LoggerConfig, MLflowConfig, WandbConfig
from lit_open.errors import UserError
from lit_open.glue import resuming_csv_logger

# the metric that carries the optimizer step in W&B and MLflow: Lightning's name, the default x-axis of its W&B runs
OPTIMIZER_STEP = "trainer/global_step"
# events that also raise a W&B alert (e-mail / Slack as the W&B project is set up)
ALERT_EVENTS = ("spike", "rollback", "non_finite", "hang", "straggler", "stop", "release_push_failed")
EVENT_COLUMNS = ("step", "event", "time", "details")  # the W&B events table
WANDB_RUN_ID = "wandb-run-id"  # in <run.dir>/logs/: a resumed run goes on logging to the same W&B run
MLFLOW_RUN_ID = "mlflow-run-id"


def check_loggers(cfg: LoggerConfig) -> None:
    """At start-up, before any data or model work: the packages the chosen loggers need, and W&B credentials."""
    if cfg.wandb is not None:
        check_wandb(cfg.wandb, "logger=wandb")
    if cfg.mlflow is not None:
        check_mlflow(cfg.mlflow, "logger=mlflow")


def check_wandb(cfg: WandbConfig, what: str) -> None:
    require("wandb", "wandb", what)
    if cfg.mode == "online" and not _wandb_credentials():
        raise UserError(
            f"{what} logs online (mode=online) but no W&B API key is configured (WANDB_API_KEY, or `wandb login`). "
            "Set one, or log offline (logger.wandb.mode=offline, or mode=offline for `lit-open logs sync`) and "
            "publish later with `wandb sync`."
        )


def check_mlflow(cfg: MLflowConfig, what: str) -> None:
    require("mlflow", "mlflow", what)
    if cfg.tracking_uri is None or cfg.tracking_uri.startswith("sqlite:"):  # MLflow's SQL store needs SQLAlchemy
        require("sqlalchemy", "mlflow", f"{what} with a local SQLite store")


def require(module: str, extra: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs the {module} package, which is not installed: pip install 'lit-open[{extra}]'.")


def _wandb_credentials() -> bool:
    import wandb  # only when logger=wandb is chosen: it takes a second to import

    return bool(wandb.login(prompt=False, verify=False))


def build_loggers(
    cfg: LoggerConfig, run_dir: Path, resume_step: int | None, record: dict[str, Any], rank_zero: bool
) -> list[Logger]:
    """Loggers for a fresh run (resume_step None: earlier logs in run_dir are dropped, W&B and MLflow start new
    runs) or a resumed one (the CSV rows up to resume_step are kept and the later ones logged again as the run
    replays them; W&B and MLflow go on with the run they logged before). `record`: the run's config as saved.
    W&B and MLflow exist on global rank 0 only, the process that logs (other ranks never open their stores)."""
    logs = run_dir / "logs"
    loggers: list[Logger] = []
    if cfg.csv:
        loggers.append(
            resuming_csv_logger(run_dir, keep_through=resume_step, name="logs", version="", flush_logs_every_n_steps=10)
        )
    if cfg.tensorboard:
        # purge_step: TensorBoard drops the events a crashed run wrote after the checkpoint it resumes from
        purge = resume_step + 1 if resume_step is not None else None
        loggers.append(TensorBoardLogger(run_dir, name="logs", version="", default_hp_metric=False, purge_step=purge))
    if not rank_zero:
        return loggers
    name, resuming = record["run"]["name"], resume_step is not None
    if cfg.wandb is not None:
        id_file = logs / WANDB_RUN_ID
        loggers.append(wandb_logger(cfg.wandb, logs, name, record, _kept_run_id(id_file, resuming), id_file))
    if cfg.mlflow is not None:
        id_file = logs / MLFLOW_RUN_ID
        loggers.append(mlflow_logger(cfg.mlflow, logs, name, record, _kept_run_id(id_file, resuming), id_file))
    return loggers


def event_listeners(loggers: list[Logger]) -> list[Callable[[dict[str, Any]], None]]:
    """What `EventLog` calls with each event it writes: the loggers that show events."""
    return [logger.log_event for logger in loggers if isinstance(logger, (RunWandbLogger, RunMLflowLogger))]


def finish_loggers(loggers: list[Logger], failed: bool = False) -> None:
    """End the W&B and MLflow runs once the last validation is logged (Lightning ends MLflow's after fit, and leaves
    W&B's to the interpreter's exit); `failed`: the run ended with an error, and they say so."""
    for logger in loggers:
        if isinstance(logger, (RunWandbLogger, RunMLflowLogger)):
            logger.finish(failed)


def wandb_logger(
    cfg: WandbConfig, logs: Path, name: str, record: dict[str, Any], run_id: str | None, id_file: Path | None = None
) -> RunWandbLogger:
    """W&B run `run_id` (None: a new one) of the run `name`; its id goes to `id_file` (if given) once it exists."""
    return RunWandbLogger(
        id_file,
        name=name,
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group,
        tags=list(cfg.tags) or None,
        offline=cfg.mode == "offline",
        save_dir=str(logs),
        id=run_id,
        resume="allow" if run_id else None,
        config=record,
    )


def mlflow_logger(
    cfg: MLflowConfig, logs: Path, name: str, record: dict[str, Any], run_id: str | None, id_file: Path | None = None
) -> RunMLflowLogger:
    """MLflow run `run_id` (None: a new one) of the run `name`; its id goes to `id_file` (if given) once it exists."""
    logs.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking_uri or f"sqlite:///{(logs / 'mlflow.db').resolve()}"
    return RunMLflowLogger(
        record,
        id_file,
        experiment_name=cfg.experiment,
        run_name=name,
        tracking_uri=uri,
        run_id=run_id,
        # where a local store keeps artifacts (config.json, events.jsonl); a server decides for itself
        artifact_location=None if cfg.tracking_uri else (logs / "mlartifacts").resolve().as_uri(),
    )


class RunWandbLogger(WandbLogger):
    """Lightning's WandbLogger (it logs the optimizer step as `trainer/global_step`; W&B's own step counts every
    row, so it stays monotonic through rollbacks), with the run's events as a table and, for serious ones, alerts."""

    def __init__(self, id_file: Path | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._id_file = id_file  # written once the W&B run exists
        self._events: Any = None  # the incremental wandb.Table, made at the first event

    @property
    def experiment(self):
        run = super().experiment
        if self._id_file is not None:
            _write_run_id(self._id_file, run.id)
            self._id_file = None
        return run

    @property
    def run_id(self) -> str:
        return self.experiment.id

    @rank_zero_only
    def log_event(self, record: dict[str, Any]) -> None:
        self.log_events([record])

    @rank_zero_only
    def log_events(self, records: list[dict[str, Any]], alert: bool = True) -> None:
        """The run's events as the table `events` (incremental: each log uploads only the new rows), an alert for
        each serious new one."""
        import wandb  # loaded by the experiment already; Table and AlertLevel are W&B's own types

        if self._events is None:
            self._events = wandb.Table(columns=list(EVENT_COLUMNS), log_mode="INCREMENTAL")
        for record in records:
            self._events.add_data(*event_row(record))
        self.experiment.log({"events": self._events})
        for record in records:
            if alert and record["event"] in ALERT_EVENTS:
                title, text = f"{record['event']} at step {record['step']}", event_row(record)[3]
                self.experiment.alert(title=title, text=text, level=wandb.AlertLevel.WARN)

    @rank_zero_only
    def finish(self, failed: bool = False) -> None:
        if self._experiment is not None:
            self._experiment.finish(exit_code=1 if failed else 0)


class RunMLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with a monotonic MLflow step (an optimizer step logged again after a rollback or a
    replay gets the next MLflow step; the metric `trainer/global_step` says which it was), the run's config as
    `config.json` and its events as `events.jsonl` artifacts."""

    def __init__(self, record: dict[str, Any], id_file: Path | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.record = record  # the run's config, logged when the MLflow run is first used
        self._id_file = id_file
        self.steps: MonotonicSteps | None = None
        self._started = False
        self._events: list[dict[str, Any]] = []

    @property
    def experiment(self):
        client = super().experiment
        if not self._started:  # first use: the run exists now (run_id re-enters this property)
            self._started = True
            self.steps = MonotonicSteps.continuing(client, self.run_id)
            if self._id_file is not None:
                _write_run_id(self._id_file, self.run_id)
            client.log_dict(self.run_id, self.record, "config.json")
            self.log_hyperparams(self.record)  # flattened: run/name, optim/lr, ... as MLflow params
        return client

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        _ = self.experiment
        if step is None:
            return super().log_metrics(metrics)
        super().log_metrics({**metrics, OPTIMIZER_STEP: float(step)}, step=self.steps(step))

    @rank_zero_only
    def log_event(self, record: dict[str, Any]) -> None:
        self.log_events([record])

    @rank_zero_only
    def log_events(self, records: list[dict[str, Any]], alert: bool = True) -> None:
        """Kept for the artifact events.jsonl, uploaded whole at the end, and at once for a serious event (`alert`):
        MLflow artifacts are files that cannot be appended to, so uploading at every event would cost the square
        of their number (MLflow has no alerts)."""
        self._events.extend(records)
        if alert and any(record["event"] in ALERT_EVENTS for record in records):
            self._upload_events()

    def _upload_events(self) -> None:
        text = "".join(json.dumps(e, default=str) + "\n" for e in self._events)
        self.experiment.log_text(self.run_id, text, "events.jsonl")

    @rank_zero_only
    def finish(self, failed: bool = False) -> None:
        if self._events:
            self._upload_events()
        if self._started:
            self.experiment.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class MonotonicSteps:
    """Maps optimizer steps to a monotonic logger step: rows of one optimizer step share a logger step; a step at or
    below one already logged (a rollback, a replay after a resume) continues after the newest logger step."""

    def __init__(self, last_step: int = -1, offset: int = 0) -> None:
        self.last_step = last_step  # the optimizer step of the newest row
        self.offset = offset  # logger step - optimizer step

    @classmethod
    def continuing(cls, client: Any, run_id: str) -> MonotonicSteps:
        """Continue an MLflow run's steps (a resumed run): from its newest `trainer/global_step` row."""
        history = client.get_metric_history(run_id, OPTIMIZER_STEP)
        if not history:
            return cls()
        newest = max(history, key=lambda m: m.step)
        return cls(int(newest.value), newest.step - int(newest.value))

    def __call__(self, step: int) -> int:
        if step < self.last_step:
            self.offset += self.last_step - step + 1
        self.last_step = step
        return step + self.offset


def event_row(record: dict[str, Any]) -> list[Any]:
    details = {k: v for k, v in record.items() if k not in ("step", "event", "time")}
    return [int(record["step"]), record["event"], record.get("time", ""), json.dumps(details, default=str)]


def _kept_run_id(path: Path, resuming: bool) -> str | None:
    """The W&B / MLflow run a resumed run logged to; None for a fresh run (a new one is made)."""
    if resuming and path.is_file():
        return path.read_text().strip() or None
    return None


def _write_run_id(path: Path, run_id: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(run_id + "\n")
