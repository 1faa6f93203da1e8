"""The console side of a run: the header printed when it starts and the summary printed when it ends."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console

from lit_open.checkpoint.resumable import POINTER
from lit_open.config import TrainConfig
from lit_open.model import Transformer, num_parameters
from lit_open.plugin import RunState

console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_header(cfg: TrainConfig, trainer: L.Trainer, n_micro: int, resume_path: Path | None, step: int) -> None:
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
    }


def print_summary(s: dict[str, Any]) -> None:
    def loss(a, b):
        return f"{a:.3f} -> {b:.3f}" if a is not None else "n/a"

    val = ""
    if s["val_loss_last"] is not None:
        val = f"; held-out loss {loss(s['val_loss_first'], s['val_loss_last'])} (perplexity {s['val_ppl_last']:.1f})"
    console.print(
        f"\n[bold green]Done:[/bold green] {s['steps']:,} steps, {s['tokens']:,} tokens "
        f"({s['steps_this_session']:,} steps in {s['train_seconds']:.0f} s this session, "
        f"{s['tokens_per_s']:,.0f} tokens/s)\n"
        f"  train loss {loss(s['train_loss_first'], s['train_loss_last'])}{val}\n"
        + "".join(f"  benchmark {name} {first:.4g} -> {last:.4g}\n" for name, (first, last) in s["evals"].items())
        + f"  run directory: {s['run_dir']}  (config.yaml, checkpoints/, logs/metrics.csv, events.jsonl, "
        "data_sequence/)\n"
        f"  continue training: lit-open train --config {s['config']} trainer.max_steps={2 * s['steps']}\n"
        + (f"  evaluate:          lit-open eval checkpoint={s['checkpoint']}" if s["checkpoint"] else "")
    )
