"""The console side of a run: the header printed when it starts and the summary printed when it ends."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console

from lit_open.checkpoint.resumable import POINTER
from lit_open.config import TrainConfig
from lit_open.model import Transformer, num_parameters
from lit_open.plugin import RunState
from lit_open.train.optim import final_factor, lr_factor

console = Console(stderr=True, highlight=False, soft_wrap=True)


def shell_command(*args: object) -> str:
    """A `lit-open ...` command line to copy into a shell: each argument quoted as that needs."""
    return shlex.join(["lit-open", *map(str, args)])


def describe_lr(cfg: TrainConfig, step: int, planned_before: int | None) -> str:
    """What the LR does from update `step` + 1 to trainer.max_steps under the run's fixed schedule length."""
    schedule, lr = cfg.schedule, cfg.optim.lr
    offset = cfg.data.start_step or 0  # a replayed released run continues the released schedule
    total, end = schedule.total_steps, offset + cfg.trainer.max_steps
    warmup = f"{schedule.warmup_steps} warmup steps, then " if schedule.warmup_steps else ""
    final = lr * final_factor(schedule)
    text = f"LR: {schedule.name} over {total:,} steps ({warmup}peak {lr:.3g}, final {final:.3g})"
    if offset:
        text += (
            f", continued from released step {offset:,}: step {step + 1:,} takes the LR of schedule step "
            f"{offset + step + 1:,}, {lr * lr_factor(offset + step + 1, schedule, total):.3g}"
        )
    if planned_before is not None:
        old = lr * lr_factor(offset + step + 1, schedule, planned_before)
        text += (
            f"; re-planned from {planned_before:,} steps by schedule.total_steps: the LR of step {step + 1:,} is "
            f"{lr * lr_factor(offset + step + 1, schedule, total):.3g} instead of {old:.3g}"
        )
    if end > total:
        text += (
            f"; schedule steps {max(total, offset + step) + 1:,}-{end:,} hold the final LR {final:.3g} "
            f"(schedule.total_steps={end} would re-plan the schedule over all of them)"
        )
    return text


def print_header(
    cfg: TrainConfig, trainer: L.Trainer, n_micro: int, resume_path: Path | None, step: int, planned_before: int | None
) -> None:
    with torch.device("meta"):
        params = num_parameters(Transformer(cfg.model))
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    micro = f"{n_micro} micro-batch{'es' if n_micro > 1 else ''} of {cfg.data.micro_batch_size} per process"
    console.print(
        f"[bold]lit-open[/bold] run [cyan]{cfg.run.name}[/cyan] ({cfg.run.recipe or 'no recipe'}) -> {cfg.run.dir}\n"
        f"  model {cfg.model.name}: {params / 1e6:,.2f}M parameters; {cfg.trainer.precision} on "
        f"{trainer.world_size} x {trainer.strategy.root_device.type}\n"
        f"  {cfg.data.global_batch_size} x {cfg.data.seq_len} = {tokens:,} tokens per step "
        f"({micro}); {cfg.trainer.max_steps:,} steps\n"
        + (
            f"  data: the released {cfg.data.order} order (docs/data.md) from released step {cfg.data.start_step:,}\n"
            if cfg.data.order != "mixture"
            else ""
        )
        + f"  {describe_lr(cfg, step, planned_before)}\n"
        + (
            f"  resuming from {resume_path} (step {step})"
            if resume_path
            else f"  starting from the weights of {cfg.init_from}"
            if cfg.init_from
            else "  starting from scratch"
        )
    )


def summarize(run: RunState, trainer: L.Trainer, start_step: int) -> dict[str, Any]:
    train = run.history["train/loss"]
    val = run.history["val/loss"]
    steps = trainer.global_step - start_step
    tokens = steps * run.tokens_per_batch
    run_dir = run.run_dir
    checkpoints = run_dir / "checkpoints"
    config = run.config
    schedule = config.schedule
    latest = (checkpoints / POINTER).read_text().strip() if (checkpoints / POINTER).exists() else None
    return {
        "run_dir": str(run_dir),
        "steps": trainer.global_step,
        "steps_this_session": steps,
        "tokens": trainer.global_step * run.tokens_per_batch,
        "tokens_per_s": tokens / run.train_seconds if run.train_seconds else math.nan,
        "train_seconds": run.train_seconds,
        "train_loss_first": train[0][1] if train else None,
        "train_loss_last": train[-1][1] if train else None,
        "val_loss_first": val[0][1] if val else None,
        "val_loss_last": val[-1][1] if val else None,
        "val_ppl_last": math.exp(val[-1][1]) if val else None,
        # benchmark scores, first and last of this session (the lm_eval plugin)
        "evals": {
            key.removeprefix("eval/"): (values[0][1], values[-1][1])
            for key, values in run.history.items()
            if values and key.startswith("eval/")
        },
        "checkpoint": str(checkpoints / latest) if latest else None,
        "config": str(run_dir / "config.yaml"),
        "schedule_steps": schedule.total_steps,
        "final_lr": config.optim.lr * final_factor(schedule),
    }


def print_summary(s: dict[str, Any]) -> None:
    def loss(a, b):
        return f"{a:.3f} -> {b:.3f}" if a is not None else "n/a"

    more = 2 * s["steps"]
    lr_course = f"the LR stays at {s['final_lr']:.3g}"
    if s["steps"] < s["schedule_steps"]:
        lr_course = f"the LR schedule goes on to step {s['schedule_steps']:,}, then holds {s['final_lr']:.3g}"
    evaluate = shell_command("eval", f"checkpoint={s['checkpoint']}")
    val = ""
    if s["val_loss_last"] is not None:
        val = f"; held-out loss {loss(s['val_loss_first'], s['val_loss_last'])} (perplexity {s['val_ppl_last']:.1f})"
    console.print(
        f"\n[bold green]Done:[/bold green] {s['steps']:,} steps, {s['tokens']:,} tokens "
        f"({s['steps_this_session']:,} step{'' if s['steps_this_session'] == 1 else 's'} in {s['train_seconds']:.0f} s "
        "this session, "
        f"{s['tokens_per_s']:,.0f} tokens/s)\n"
        f"  train loss {loss(s['train_loss_first'], s['train_loss_last'])}{val}\n"
        + "".join(f"  benchmark {name} {first:.4g} -> {last:.4g}\n" for name, (first, last) in s["evals"].items())
        + f"  run directory: {s['run_dir']}  (config.yaml, checkpoints/, logs/metrics.csv, events.jsonl, "
        "data_sequence/)\n"
        f"  continue training: {shell_command('train', '--config', s['config'], f'trainer.max_steps={more}')}"
        f"  ({lr_course}; schedule.total_steps={more} would re-plan it)\n"
        + (f"  evaluate:          {evaluate}" if s["checkpoint"] else "")
    )
