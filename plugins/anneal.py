"""anneal: from a step, a token count or the run's start, the LR decays linearly to zero over N updates (OLMo 2's
mid-training); optionally a new data mixture from then on (part of the data order) and the average of the anneal's
last K checkpoints exported to `<run.dir>/hf/soup-step-N/`. Design and options: docs/plugins/anneal.md;
`lit-open list plugins` shows the options and their defaults.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lit_open.checkpoint.hf import save_hf
from lit_open.checkpoint.resumable import checkpoint_step, list_checkpoints
from lit_open.checkpoint.source import open_source, read_weights
from lit_open.config import SourceConfig, TrainConfig
from lit_open.data.tokenizer import run_tokenizer_dir
from lit_open.dtypes import torch_dtype
from lit_open.errors import UserError
from lit_open.plugin import DataPhase, Plugin, option
from lit_open.train.optim import lr_factor


class Anneal(Plugin):
    """Linear LR decay to zero from a given step, an optional data mixture switch, and checkpoint souping."""

    name = "anneal"

    @dataclass
    class Config:
        start_step: int = option(
            0, "updates before the anneal (0: from the run's first update, e.g. right after init_from)"
        )
        start_tokens: int = option(
            0, "start once this many tokens were trained on, rounded up to whole steps (0: start_step decides)"
        )
        steps: int | None = option(None, "updates from the LR at the start down to 0 (null: until trainer.max_steps)")
        sources: list[SourceConfig] | None = option(
            None, "the mixture from the anneal on, like data.sources: [{path: DIR, weight: 1.0}] (null: unchanged)"
        )
        soup_last: int = option(0, "average the last K checkpoints of the anneal into one Hugging Face export (0: off)")
        soup_dtype: str | None = option("bfloat16", "float32 | bfloat16 | float16 | null (as trained)")

        def __post_init__(self) -> None:
            for key in ("start_step", "start_tokens", "soup_last"):
                if getattr(self, key) < 0:
                    raise UserError(f"plugins.anneal.{key}={getattr(self, key)} must be 0 or positive.")
            if self.start_step and self.start_tokens:
                raise UserError(
                    f"plugins.anneal.start_step={self.start_step} and start_tokens={self.start_tokens} are both "
                    "set: give one of them (start_tokens is rounded up to whole optimizer steps)."
                )
            if self.steps is not None and self.steps < 1:
                raise UserError(
                    f"plugins.anneal.steps={self.steps} must be a positive number of updates, or null to anneal "
                    "until trainer.max_steps."
                )
            if self.sources is not None and not self.sources:
                raise UserError(
                    "plugins.anneal.sources=[] holds no source: give [{path:DIR,weight:1.0},...] or null to keep "
                    "data.sources."
                )
            torch_dtype(self.soup_dtype, "plugins.anneal.soup_dtype", none="the dtype the model trains in")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.start = 0  # optimizer updates before the anneal (set from the run's config)
        self.steps = 0
        self._lr_schedule: tuple[float, Any, int] | None = None  # peak LR, schedule config, schedule length
        self.lr_start: float | None = None  # lr0, fixed at the anneal's first update (restored on resume)
        self.announced: list[str] = []  # events written ("anneal", "anneal_end"), so a resume does not repeat them

    def _plan(self, config: TrainConfig) -> None:
        """The anneal's first step and length in this run's terms."""
        tokens_per_step = config.data.global_batch_size * config.data.seq_len
        self.start = self.cfg.start_step or math.ceil(self.cfg.start_tokens / tokens_per_step)
        max_steps = config.trainer.max_steps
        self.steps = self.cfg.steps if self.cfg.steps is not None else max_steps - self.start
        if self.start >= max_steps or self.steps < 1:
            where = f"start_tokens={self.cfg.start_tokens} (step {self.start})" if self.cfg.start_tokens else ""
            where = where or f"start_step={self.start}"
            raise UserError(
                f"plugins.anneal would never start: {where} is not before trainer.max_steps={max_steps}. "
                "Start the anneal earlier or train longer."
            )
        self._lr_schedule = (config.optim.lr, config.schedule, config.schedule.total_steps or max_steps)

    def data_phases(self, config: TrainConfig) -> list[DataPhase]:
        self._plan(config)
        if self.cfg.sources is None:
            return []
        return [DataPhase(start=self.start, sources=list(self.cfg.sources), key="plugins.anneal.sources")]

    def on_train_start(self, trainer, pl_module) -> None:
        config = self.run.config
        self._plan(config)
        if self.cfg.soup_last:
            self._check_soup_possible(config)

    def _check_soup_possible(self, config: TrainConfig) -> None:
        every, keep = config.checkpoint.every_n_steps, config.checkpoint.keep_last
        max_steps = config.trainer.max_steps
        planned = {s for s in range(self.start + 1, max_steps + 1) if every and s % every == 0} | {max_steps}
        k = self.cfg.soup_last
        if len(planned) < k:
            raise UserError(
                f"plugins.anneal.soup_last={k}, but the anneal (steps {self.start + 1}-{max_steps}) writes only "
                f"{len(planned)} checkpoint(s) with checkpoint.every_n_steps={every}: lower every_n_steps or "
                "soup_last."
            )
        if 0 < keep < k:
            raise UserError(
                f"plugins.anneal.soup_last={k} needs the last {k} checkpoints, but checkpoint.keep_last={keep} "
                f"deletes older ones: set checkpoint.keep_last={k} (or 0 to keep all)."
            )

    def scheduled_lr(self, step: int) -> float:
        """The LR the configured schedule gives update `step` (before any plugin's multiplier)."""
        peak, schedule, total = self._lr_schedule
        return peak * lr_factor(step, schedule, total)

    def lr_at(self, step: int) -> float:
        """The LR of update `step` under the anneal (lr0 known)."""
        i = step - self.start
        return self.lr_start * max(0.0, (self.steps - i + 1) / self.steps)

    def lr_multiplier(self, step: int, data_step: int) -> float:
        if step <= self.start:
            return 1.0
        scheduled = self.scheduled_lr(step)
        if scheduled <= 0:
            raise UserError(
                f"plugins.anneal cannot scale the LR of step {step}: the schedule ({self._lr_schedule[1].name}) "
                "gives it 0. Use schedule=constant (or a schedule that has not decayed to 0) with the anneal."
            )
        if self.lr_start is None:
            self.lr_start = scheduled
        return self.lr_at(step) / scheduled

    def on_step_end(self, trainer, pl_module, step: int) -> None:
        if "anneal" not in self.announced and step > self.start and self.lr_start is not None:
            self.announced.append("anneal")
            sources = [asdict(s) for s in self.cfg.sources] if self.cfg.sources is not None else None
            self.log_event(
                trainer,
                pl_module,
                "anneal",
                lr_start=self.lr_start,
                steps=self.steps,
                first_step=self.start + 1,
                last_step=self.start + self.steps,
                data_step=self.start,
                sources=sources,
            )
        if "anneal_end" not in self.announced and step >= self.start + self.steps:
            self.announced.append("anneal_end")
            self.log_event(trainer, pl_module, "anneal_end", lr=0.0)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.cfg.soup_last:
            self.soup(trainer, pl_module)

    def soup(self, trainer, pl_module) -> Path | None:
        """Average the model weights of the anneal's last `soup_last` checkpoints and export them (rank 0 writes)."""
        run_dir = self.run.run_dir
        out = run_dir / "hf" / f"soup-step-{trainer.global_step:08d}"
        if trainer.is_global_zero:
            started = time.perf_counter()
            found = [p for p in list_checkpoints(self.run.checkpoint_dir) if checkpoint_step(p) > self.start]
            chosen = found[-self.cfg.soup_last :]
            average = average_checkpoints(chosen)
            config = self.run.config
            save_hf(
                average,
                out,
                config=pl_module.model.config,
                tokenizer_dir=run_tokenizer_dir(asdict(config)),
                metadata={
                    "format": "lit-open-soup/1",
                    "averaged_checkpoints": [p.name for p in chosen],
                    "steps": [checkpoint_step(p) for p in chosen],
                    "anneal": {"first_step": self.start + 1, "steps": self.steps, "lr_start": self.lr_start},
                    "init_from": config.init_from,
                    "config": asdict(config),
                },
                dtype=torch_dtype(self.cfg.soup_dtype),
            )
            self.log_event(
                trainer,
                pl_module,
                "soup",
                path=str(out),
                steps=[checkpoint_step(p) for p in chosen],
                seconds=round(time.perf_counter() - started, 2),
            )
        trainer.strategy.barrier("lit_open_anneal_soup")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"lr_start": self.lr_start, "announced": list(self.announced)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_start = state["lr_start"]
        self.announced = list(state["announced"])


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the model weights of lit-open checkpoints (single files or sharded directories).

    Accumulated in float32, returned in each tensor's own dtype; non-floating tensors (none in lit-open's
    models today) are taken from the last checkpoint.
    """
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        weights, _ = read_weights(open_source(str(path)))
        for name, tensor in weights.items():
            if not tensor.is_floating_point():
                total[name] = tensor
            elif name in total:
                total[name] += tensor.float()
            else:
                total[name] = tensor.float().clone()
        dtypes = {name: tensor.dtype for name, tensor in weights.items()}
    return {
        name: (tensor / len(paths)).to(dtypes[name]) if tensor.is_floating_point() else tensor
        for name, tensor in total.items()
    }
