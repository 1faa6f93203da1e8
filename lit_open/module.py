"""LitLM: the LightningModule around the pure-PyTorch decoder.

It builds the model (with the plugins' say), computes the loss, accumulates gradients over the micro-batches of a
global batch, clips, asks the plugins whether to skip the update, steps the optimizer and the LR schedule, and
logs one row of metrics per optimizer step. Optimization is manual so that one optimizer step is one explicit
place in the code: plugins (skip, rollback, z-loss, ...) hook into it through `lit_open.plugin.Plugin`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric

from lit_open.config import TrainConfig
from lit_open.events import EventLog
from lit_open.loss import LossOutput, lm_loss
from lit_open.model import Transformer
from lit_open.optim import build_optimizer, build_scheduler
from lit_open.parallel import after_optimizer_step, check_tensor_parallel, materialize, parallelize
from lit_open.plugin import Plugin, StepOutputs

CHECKPOINT_KEY = "lit_open"


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global gradient norm (over all shards and ranks), clipping to `max_norm` when it is positive."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if isinstance(norm, DTensor):  # sharded gradients: a partial norm per rank until gathered
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def _numpy_state_to_plain(state: tuple) -> tuple:
    # plain Python types, so that checkpoints load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, cached = state
    return name, keys.tolist(), pos, has_gauss, cached


def _numpy_state_from_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


class LitLM(L.LightningModule):
    def __init__(self, config: TrainConfig, plugins: list[Plugin] = (), run_dir: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.plugins = list(plugins)
        self.automatic_optimization = False
        self.model: Transformer | None = None
        self.events = EventLog(Path(run_dir) / "events.jsonl" if run_dir is not None else None)
        self.consumed_batches = 0  # global batches consumed: the position in the data order
        self.skipped_updates = 0
        self._batches_since_row = 0
        self.tokens_per_batch = config.data.global_batch_size * config.data.seq_len
        self.val_loss = MeanMetric()
        self.last_metrics: dict[str, float] = {}
        self.history: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}
        self.train_seconds = 0.0
        self._step_sums: dict[str, torch.Tensor] = {}
        self._step_clock: float | None = None

    # -- model ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build on the meta device, parallelize (lit_open.parallel), then allocate and initialise each shard.

        Under fsdp/tp/fsdp_tp Lightning's ModelParallelStrategy provides the device mesh. Either way the model is
        materialised directly on this process's device (the initial values are drawn there), never whole on the CPU.
        """
        if self.model is not None:
            return
        model_config = self.config.model
        for plugin in self.plugins:
            model_config = plugin.configure_model(model_config)
        with torch.device("meta"):
            model = Transformer(model_config)
        for plugin in self.plugins:
            plugin.on_model_built(model)
        mesh = self.device_mesh
        if mesh is not None:
            check_tensor_parallel(model_config, mesh["tensor_parallel"].size(), self.config.data.seq_len)
        parallelize(model, self.config.strategy, mesh)
        self.model = materialize(model, self.trainer.strategy.root_device, self.config.run.seed)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, doc_ids)

    def compute_loss(self, batch: dict[str, Any]) -> LossOutput:
        hidden = self.model(batch["input_ids"], batch.get("doc_ids"), return_hidden=True)
        return lm_loss(hidden, self.model.output, batch["targets"], self.config.strategy.loss_chunk_tokens)

    # -- training ------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self._step_clock is None:  # the first step, or the first after a validation (not training time)
            self._step_clock = time.perf_counter()
        out = self.compute_loss(batch)
        loss = out.loss
        terms: dict[str, torch.Tensor] = {}
        for plugin in self.plugins:
            terms.update(plugin.loss_terms(StepOutputs(loss=loss, logsumexp=out.logsumexp, batch=batch)))
        total = loss + sum(terms.values()) if terms else loss
        self.manual_backward(total / batch["n_micro"])
        for name, value in {"loss": loss, **terms}.items():
            self._step_sums[name] = self._step_sums.get(name, 0.0) + value.detach() / batch["n_micro"]
        if batch["micro"] + 1 == batch["n_micro"]:
            self._optimizer_step(batch["data_step"])

    def _optimizer_step(self, data_step: int) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        params = [p for p in self.parameters() if p.grad is not None]
        grad_norm = clip_gradients(params, self.config.optim.grad_clip)
        means = {k: self.trainer.strategy.reduce(v, reduce_op="mean") for k, v in self._step_sums.items()}
        self._step_sums = {}
        lr = optimizer.param_groups[0]["lr"]
        metrics = {
            "step": self.global_step + 1,  # the update this would be; a skipped update is asked again next batch
            "data_step": data_step,  # the global batch it was computed on
            "loss": float(means["loss"]),
            "grad_norm": float(grad_norm),
            "lr": lr,
        }
        decisions = [plugin.skip_step(metrics) for plugin in self.plugins]  # ask all: each keeps its statistics
        skip = self.trainer.strategy.reduce_boolean_decision(any(decisions), all=False)  # all ranks skip if one does
        if not skip:
            optimizer.step()
            scheduler.step()
            after_optimizer_step(self.model, self.config.strategy)
        optimizer.zero_grad(set_to_none=True)
        self.consumed_batches = data_step + 1
        self._batches_since_row += 1
        if skip:  # no row: metrics.csv has one row per optimizer step; the plugin records why in events.jsonl
            self.skipped_updates += 1
            return

        now = time.perf_counter()
        seconds = now - self._step_clock
        self._step_clock = now
        self.train_seconds += seconds
        row = {
            "train/loss": metrics["loss"],
            "train/lr": lr,
            "train/grad_norm": metrics["grad_norm"],
            "train/tokens": float(self.consumed_batches * self.tokens_per_batch),
            "train/tokens_per_s": self._batches_since_row * self.tokens_per_batch / seconds,
            "train/skipped": float(self.skipped_updates),  # updates skipped so far in the run
        }
        self._batches_since_row = 0
        row.update({f"train/{k}": float(v) for k, v in means.items() if k != "loss"})
        for plugin in self.plugins:
            row.update(plugin.step_metrics(self.trainer, self))
        self._log_row(row)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.compute_loss(batch)
        self.val_loss.update(out.loss.detach(), weight=out.tokens)

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:
            return
        loss = float(self.val_loss.compute())
        self.val_loss.reset()
        self._log_row({"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))})

    def on_validation_end(self) -> None:
        self._step_clock = None  # validation time is not training time: restart the clock at the next step

    def _log_row(self, row: dict[str, float]) -> None:
        """One row per optimizer step to every logger, keyed by the optimizer step (not the micro-batch)."""
        self.last_metrics.update(row)
        for key in self.history:
            if key in row:
                self.history[key].append((self.global_step, row[key]))
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(row, step=self.global_step)

    # -- optimizer -----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        optimizer = build_optimizer(self.model, self.config.optim)
        scheduler = build_scheduler(optimizer, self.config.schedule, self.config.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "config": asdict(self.config),
            "consumed_batches": self.consumed_batches,
            "skipped_updates": self.skipped_updates,
            "rng": {
                "python": random.getstate(),
                "numpy": _numpy_state_to_plain(np.random.get_state()),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint[CHECKPOINT_KEY]
        self.consumed_batches = state["consumed_batches"]
        self.skipped_updates = state["skipped_updates"]
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(_numpy_state_from_plain(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
