"""Loggers writing to `<run.dir>/logs/`: metrics.csv (Lightning's CSVLogger) and TensorBoard, resume-aware."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import Logger, TensorBoardLogger

from lit_open.config import LoggerConfig
from lit_open.glue import resuming_csv_logger


def build_loggers(cfg: LoggerConfig, run_dir: Path, resume_step: int | None) -> list[Logger]:
    """Loggers for a fresh run (resume_step None: earlier logs in run_dir are dropped) or a resumed one (the rows of
    the steps up to resume_step are kept, the later ones logged again as the run replays them)."""
    loggers: list[Logger] = []
    if cfg.csv:
        loggers.append(
            resuming_csv_logger(run_dir, keep_through=resume_step, name="logs", version="", flush_logs_every_n_steps=10)
        )
    if cfg.tensorboard:
        # purge_step: TensorBoard drops the events a crashed run wrote after the checkpoint it resumes from
        purge = resume_step + 1 if resume_step is not None else None
        loggers.append(TensorBoardLogger(run_dir, name="logs", version="", default_hp_metric=False, purge_step=purge))
    return loggers
