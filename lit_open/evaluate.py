"""`lit-open eval`: score a training checkpoint on held-out data (loss and perplexity)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import OmegaConf

from lit_open.checkpoint.resumable import read_checkpoint
from lit_open.compose import load_train_config
from lit_open.data.datamodule import DataModule
from lit_open.errors import UserError
from lit_open.module import CHECKPOINT_KEY, LitLM
from lit_open.plugin import build_plugins
from lit_open.train import build_strategy, console, ensure_data, release_process_group


def evaluate(checkpoint: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Held-out loss of `checkpoint` on the validation sources of its run (or those given in overrides)."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint={str(checkpoint)!r}: no such file. Give a checkpoint from <run.dir>/checkpoints/.")
    saved = read_checkpoint(path)
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(saved[CHECKPOINT_KEY]["config"])))
        cfg = load_train_config(overrides, config_file=config_file)
    step = saved["global_step"]
    del saved
    if not cfg.data.val_sources:
        raise UserError(
            "This run has no held-out data (data.val_sources is empty): give some, e.g. "
            "data.val_sources=[{path:/data/mine/val}] (written by `lit-open prepare` with val_fraction>0)."
        )
    ensure_data(cfg, rank_zero=True, need_train=False)
    module = LitLM(cfg, build_plugins(cfg.plugins))
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        # a sharded checkpoint loads into a sharded model, here of one shard
        strategy=build_strategy("fsdp" if path.is_dir() else "auto", 1, 1),
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        callbacks=module.plugins,  # their saved state may be part of the computation (qk_norm's blend factor)
    )
    try:
        trainer.validate(module, datamodule=DataModule(cfg.data, cfg.run.seed), ckpt_path=path, verbose=False)
    finally:
        release_process_group()
    loss = module.last_metrics["val/loss"]
    result = {
        "checkpoint": str(path),
        "step": step,
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_samples": cfg.data.val_samples,
        "seq_len": cfg.data.seq_len,
    }
    console.print(
        f"{path} (step {step}): held-out loss {loss:.4f}, perplexity {result['val_ppl']:.2f} "
        f"over up to {cfg.data.val_samples} sequences of {cfg.data.seq_len} tokens"
    )
    return result
