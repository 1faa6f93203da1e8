"""Loggers writing to `<run.dir>/logs/`: metrics.csv (Lightning's CSVLogger) and TensorBoard, resume-aware."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from lit_open.config import LoggerConfig


class _ResumingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_through: int | None) -> None:
        self.keep_through = keep_through
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here. A resumed run keeps the rows of the steps before its
        # checkpoint instead, and logs the later ones again as it replays them.
        if not self._fs.isfile(self.metrics_file_path):
            return
        if self.keep_through is None:
            self._fs.rm_file(self.metrics_file_path)
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            kept = [row for row in reader if row.get("step") and int(row["step"]) <= self.keep_through]
        with self._fs.open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        self.metrics_keys = header


class ResumingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that resuming from step N keeps the history of steps <= N."""

    def __init__(self, save_dir: str | Path, keep_through: int | None, **kwargs) -> None:
        super().__init__(save_dir=str(save_dir), **kwargs)
        self.keep_through = keep_through

    @property
    @rank_zero_experiment  # as Lightning's own: other ranks get a no-op, never touch (or truncate) the file
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self.keep_through)
        return self._experiment


def build_loggers(cfg: LoggerConfig, run_dir: Path, resume_step: int | None) -> list[Logger]:
    """Loggers for a fresh run (resume_step None: earlier logs in run_dir are dropped) or a resumed one."""
    loggers: list[Logger] = []
    if cfg.csv:
        loggers.append(
            ResumingCSVLogger(run_dir, keep_through=resume_step, name="logs", version="", flush_logs_every_n_steps=10)
        )
    if cfg.tensorboard:
        # purge_step: TensorBoard drops the events a crashed run wrote after the checkpoint it resumes from
        purge = resume_step + 1 if resume_step is not None else None
        loggers.append(TensorBoardLogger(run_dir, name="logs", version="", default_hp_metric=False, purge_step=purge))
    return loggers
