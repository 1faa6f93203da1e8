"""Progress of a run in optimizer steps (not micro-batches), drawn with rich; plain lines when not on a terminal."""

from __future__ import annotations

import sys

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def trainer_console(trainer: Trainer) -> Console:
    """The progress display's console when there is one, so that a line printed during a live bar lands above it."""
    for callback in trainer.callbacks:
        console = getattr(callback, "console", None)
        if isinstance(console, Console):
            return console
    return Console(file=sys.stderr)


def format_metrics(metrics: dict[str, float]) -> str:
    parts = []
    for key, label, fmt in (
        ("train/loss", "loss", "{:.3f}"),
        ("val/loss", "val", "{:.3f}"),
        ("train/lr", "lr", "{:.2e}"),
        ("train/tokens_per_s", "tok/s", "{:,.0f}"),
    ):
        if key in metrics:
            parts.append(f"{label} " + fmt.format(metrics[key]))
    return "  ".join(parts)


class StepProgress(ProgressBar):
    """One bar over trainer.max_steps, with loss, held-out loss, LR and throughput."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__()
        self.console = console or Console(file=sys.stderr)
        self._enabled = True
        self._progress: Progress | None = None
        self._task = None
        self._line_every = 1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def _live(self) -> bool:
        return self.console.is_terminal

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        self._line_every = max(1, (trainer.max_steps - trainer.global_step) // 20)
        if self._live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=trainer.max_steps, completed=trainer.global_step, metrics=""
            )

    def on_step_end(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        text = format_metrics(pl_module.run.last_metrics)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, metrics=text)
        elif step % self._line_every == 0 or step == trainer.max_steps:
            self.console.print(f"step {step}/{trainer.max_steps}  {text}", highlight=False)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._progress is not None and not trainer.sanity_checking:
            self._progress.update(self._task, description="validate")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description="train", metrics=format_metrics(pl_module.run.last_metrics))
        elif self._enabled and trainer.is_global_zero and "val/loss" in pl_module.run.last_metrics:
            metrics = pl_module.run.last_metrics
            self.console.print(
                f"validation at step {trainer.global_step}: held-out loss {metrics['val/loss']:.4f}"
                f" (perplexity {metrics['val/ppl']:.2f})",
                highlight=False,
            )

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop()
