"""LitLM: the LightningModule around the pure-PyTorch decoder.

It builds the model (with the plugins' say), computes the loss, accumulates gradients over the micro-batches of a
global batch, clips, asks the plugins whether to skip the update or roll back, steps the optimizer and the LR
schedule, logs one row of metrics per optimizer step, and calls every callback's `on_step_end` once per applied
update. Optimization is manual so that one optimizer step is one explicit place in the code: plugins hook into it
through `lit_open.plugin.Plugin`, and read the run through its `RunState` (`LitLM.run`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric

from lit_open.checkpoint.resumable import CHECKPOINT_KEY
from lit_open.checkpoint.source import open_source, read_weights
from lit_open.config import TrainConfig, run_record, val_source_names
from lit_open.context_parallel import ContextParallel
from lit_open.errors import UserError
from lit_open.glue import validate_after_this_batch
from lit_open.model import Transformer
from lit_open.parallel import after_optimizer_step, check_tensor_parallel, materialize, mesh_size, parallelize
from lit_open.plugin import Plugin, RunState, StepOutputs
from lit_open.train.events import EventLog
from lit_open.train.loss import LossOutput, lm_loss
from lit_open.train.optim import build_optimizer, build_scheduler, param_groups, scheduled_lrs
from lit_open.train.progress import trainer_console
from lit_open.train.rollback import Rollbacks, agreed_rollback, no_snapshots
from lit_open.train.snapshots import rng_state, set_rng_state


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global gradient norm (over all shards and ranks), clipping to `max_norm` when it is positive."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if isinstance(norm, DTensor):  # sharded gradients: a partial norm per rank until gathered
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


class LitLM(L.LightningModule):
    def __init__(
        self,
        config: TrainConfig,
        plugins: list[Plugin] = (),
        run_dir: str | Path | None = None,
        init_from: str | None = None,
        data_parallel_size: int = 1,
        context_parallel_size: int = 1,
        tensor_parallel_size: int = 1,
    ) -> None:
        super().__init__()
        self.config = config
        self.init_from = init_from  # load these weights after building (a new run; a resumed one has its own)
        self._init_optimizer_state: dict | None = None
        self.plugins = list(plugins)
        self.automatic_optimization = False
        self.model: Transformer | None = None
        self.context_parallel: ContextParallel | None = None  # set in configure_model when the mesh has cp > 1
        run_dir = Path(run_dir) if run_dir is not None else None
        self.run = RunState(
            config=config,
            run_dir=run_dir,
            events=EventLog(run_dir / "events.jsonl" if run_dir is not None else None),
            tokens_per_batch=config.data.global_batch_size * config.data.seq_len,
            data_parallel_size=data_parallel_size,
            context_parallel_size=context_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
        )
        for plugin in self.plugins:
            plugin.bind(self.run)
        self.rollbacks: Rollbacks | None = None  # kept when a plugin may ask for rollbacks
        self.val_loss = MeanMetric()  # over every val source, token-weighted
        self.val_names = val_source_names(config.data)
        # one per val source, by index (names may hold dots, which ModuleDict keys may not); registered as modules,
        # so that Lightning moves them to the device
        self.val_source_loss = torch.nn.ModuleList(MeanMetric() for _ in self.val_names)
        self._bytes_per_token: list[float | None] | None = None  # per val source, read at the first validation
        self._batches_since_row = 0
        self._step_sums: dict[str, torch.Tensor] = {}
        self._step_clock: float | None = None
        self._validate_now = False
        self._step_applied: int | None = None  # the update applied in the current batch: its on_step_end is due

    # -- model ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build on the meta device, parallelize (lit_open.parallel), then allocate and initialise each shard.

        Under fsdp/tp/fsdp_tp Lightning's ModelParallelStrategy provides the device mesh. Either way the model is
        materialised directly on this process's device (the initial values are drawn there), never whole on the CPU.
        """
        if self.model is not None:
            return
        mesh = self.device_mesh
        self.run.data_parallel_rank = mesh["data_parallel"].get_local_rank() if mesh is not None else self.global_rank
        model_config = self.config.model
        for plugin in self.plugins:
            model_config = plugin.configure_model(model_config)
        with torch.device("meta"):
            model = Transformer(model_config)
        for plugin in self.plugins:
            plugin.on_model_built(model)
        if mesh is not None:
            cp = mesh_size(mesh, "context_parallel")
            check_tensor_parallel(model_config, mesh["tensor_parallel"].size(), self.config.data.seq_len, cp)
            if cp > 1:
                self.context_parallel = ContextParallel(mesh["context_parallel"].get_group())
        parallelize(model, self.config.strategy, mesh, self.context_parallel)
        self.model = materialize(model, self.trainer.strategy.root_device, self.config.run.seed)
        if self.init_from:
            self._load_initial_weights()

    def _load_initial_weights(self) -> None:
        """The weights of `init_from` (every rank reads them whole; each keeps its shard), and, for a single-file
        lit-open checkpoint on an unsharded model, its optimizer state (loaded when the optimizer exists)."""
        source = open_source(self.init_from)
        state, optimizer_state = read_weights(source)
        new = {name for plugin in self.plugins for name in plugin.new_parameters()}
        own = self.model.state_dict()
        missing = sorted(set(own) - set(state) - new)
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise UserError(
                f"init_from={self.init_from}: its weights do not fit the model (missing: {missing[:5]}, unexpected: "
                f"{unexpected[:5]}). Was the checkpoint written for another architecture?"
            )
        sharded = any(isinstance(t, DTensor) for t in own.values())
        if sharded:
            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            self.model.load_state_dict(state, strict=False)
        self._init_optimizer_state = optimizer_state if not sharded else None
        context = {} if source.context_length_given else {"max_seq_len_from_run": self.config.model.max_seq_len}
        self.run.events.write(
            0,
            "init_from",
            source=self.init_from,
            kind=source.kind,
            path=str(source.path),
            **source.provenance,
            fresh_parameters=sorted(set(own) - set(state)),
            optimizer_state="loaded" if self._init_optimizer_state is not None else "fresh",
            **context,  # the source's config.json gives no context length (OLMo-core's exports): the run's was used
        )

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, doc_ids)

    @contextmanager
    def sequence_shard(self, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """This process's share of the batch's sequences under context parallelism (else the batch), for one
        forward and backward pass inside the block."""
        if self.context_parallel is None:
            yield batch
            return
        with self.context_parallel.sharded(batch) as local:
            yield local

    def compute_loss(self, batch: dict[str, Any]) -> LossOutput:
        """The loss of a batch, or of a `sequence_shard` of one: then the whole sequences' loss on every rank."""
        hidden = self.model(
            batch["input_ids"], batch.get("doc_ids"), return_hidden=True, positions=batch.get("positions")
        )
        out = lm_loss(hidden, self.model.output, batch["targets"], self.config.strategy.loss_chunk_tokens)
        if self.context_parallel is not None and self.context_parallel.active:
            out = self.context_parallel.whole_sequence_loss(out)
        return out

    # -- training ------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self._init_optimizer_state is not None:
            optimizer = self.optimizers().optimizer
            settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            try:
                optimizer.load_state_dict(self._init_optimizer_state)
                for group, own in zip(optimizer.param_groups, settings):  # the moments carry over, not the LR etc.
                    group.update(own)
            except ValueError as err:
                raise UserError(
                    f"init_from={self.init_from}: its optimizer state does not fit this run's parameter groups ({err})."
                    " Use the same optim.decay_* settings and plugins as the source run."
                ) from None
            self._init_optimizer_state = None
        # The next update's LR as the schedule in effect gives it: a resumed checkpoint restored the LR its own plan
        # set, which a re-planned schedule (schedule.total_steps) changes from this very update on.
        scheduler = self.lr_schedulers()
        for group, lr in zip(self.optimizers().optimizer.param_groups, scheduled_lrs(scheduler)):
            group["lr"] = lr
        policies = [p for p in (plugin.snapshot_policy() for plugin in self.plugins) if p is not None]
        if policies:
            self.rollbacks = Rollbacks(self, policies)
            self.rollbacks.take()  # the state training starts (or resumes) from
            ring = self.rollbacks.ring
            self.run.events.write(
                self.global_step,
                "snapshots",
                every=ring.every,
                horizon=ring.horizon,
                bytes_per_snapshot=ring.snapshots[0].nbytes(),  # this process's share, in CPU memory
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch["data_step"] < self.run.consumed_batches:
            return  # read ahead before a rollback moved the data position past it: skipped, not trained
        if self._step_clock is None:  # the first step, or the first after a validation (not training time)
            self._step_clock = time.perf_counter()
        with self.sequence_shard(batch) as batch:
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
        run = self.run
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        params = [p for p in self.parameters() if p.grad is not None]
        grad_norm = clip_gradients(params, self.config.optim.grad_clip)
        means = {k: self.trainer.strategy.reduce(v, reduce_op="mean") for k, v in self._step_sums.items()}
        self._step_sums = {}
        step = self.global_step + 1  # the update this would be; a skipped update is asked again next batch
        scheduled_lrs = [group["lr"] for group in optimizer.param_groups]
        multiplier = math.prod(plugin.lr_multiplier(step, data_step) for plugin in self.plugins)
        for group, lr in zip(optimizer.param_groups, scheduled_lrs):
            group["lr"] = lr * multiplier
        lr = optimizer.param_groups[0]["lr"]
        metrics = {
            "step": step,
            "data_step": data_step,  # the global batch it was computed on
            "loss": float(means["loss"]),
            "grad_norm": float(grad_norm),
            "lr": lr,
        }
        decisions = [plugin.skip_step(metrics) for plugin in self.plugins]  # ask all: each keeps its statistics
        requests = [plugin.rollback(metrics) for plugin in self.plugins]
        rollback = agreed_rollback(self.trainer.strategy, next((r for r in requests if r is not None), None))
        skip = self.trainer.strategy.reduce_boolean_decision(any(decisions), all=False)  # all ranks skip if one does
        if rollback is not None:
            if self.rollbacks is None:
                raise no_snapshots(rollback)
            optimizer.zero_grad(set_to_none=True)
            self._batches_since_row += 1
            rolled_back = self.rollbacks.roll_back(rollback, data_step)
            for callback in self.trainer.callbacks:  # the checkpoint writer, the data-sequence log and the plugins
                if callable(getattr(callback, "on_rollback", None)):
                    callback.on_rollback(self.trainer, self, rolled_back)
            return
        if skip:
            for group, scheduled in zip(optimizer.param_groups, scheduled_lrs):
                group["lr"] = scheduled
        else:
            optimizer.step()
            scheduler.step()  # sets the next update's scheduled LR (undoing any multiplier)
            after_optimizer_step(self.model, self.config.strategy)
        optimizer.zero_grad(set_to_none=True)
        run.consumed_batches = data_step + 1
        self._batches_since_row += 1
        if skip:  # no row: metrics.csv has one row per optimizer step; the plugin records why in events.jsonl
            run.skipped_updates += 1
            run.skipped_by = tuple(plugin.name for plugin, asked in zip(self.plugins, decisions) if asked)
            return
        if self.rollbacks is not None and self.rollbacks.due(self.global_step):
            self.rollbacks.take()
        every = self.config.trainer.val_check_interval
        self._validate_now = bool(every) and self.global_step % every == 0
        self._step_applied = self.global_step

        now = time.perf_counter()
        seconds = now - self._step_clock
        self._step_clock = now
        run.train_seconds += seconds
        row = {
            "train/loss": metrics["loss"],
            "train/lr": lr,
            "train/grad_norm": metrics["grad_norm"],
            "train/tokens": float(run.tokens_seen),
            "train/tokens_per_s": self._batches_since_row * run.tokens_per_batch / seconds,
            "train/skipped": float(run.skipped_updates),  # updates skipped so far in the run
        }
        self._batches_since_row = 0
        row.update({f"train/{k}": float(v) for k, v in means.items() if k != "loss"})
        for plugin in self.plugins:
            row.update(plugin.step_metrics(self.trainer, self))
        self.log_row(row)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The end of an applied update: every callback's `on_step_end`, then validation when it is due.

        Runs after the callbacks' own `on_train_batch_end`. Callbacks are called in the Trainer's order: the core's
        (progress, checkpoint writer) first, then the plugins in config order.
        """
        step, self._step_applied = self._step_applied, None
        if step is not None:
            for callback in self.trainer.callbacks:
                if callable(getattr(callback, "on_step_end", None)):
                    callback.on_step_end(self.trainer, self, step)
        due, self._validate_now = self._validate_now, False
        validate_after_this_batch(self.trainer, due)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with self.sequence_shard(batch) as local:
            out = self.compute_loss(local)
        # a repeat that only keeps sharded ranks in step weighs nothing, but marks the source's metric as updated on
        # this rank (each compute is a collective of every rank)
        tokens = out.tokens if batch["scored"] else 0
        self.val_loss.update(out.loss.detach(), weight=tokens)
        self.val_source_loss[batch["source"]].update(out.loss.detach(), weight=tokens)

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:  # the same on every rank: all run the same batches
            return
        loss = float(self.val_loss.compute())
        self.val_loss.reset()
        row = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
        for name, metric, bytes_per_token in zip(self.val_names, self.val_source_loss, self._bytes_per_token):
            row[f"val/{name}/loss"] = source_loss = float(metric.compute())
            metric.reset()
            if bytes_per_token is not None:  # nats per token -> bits per byte of the source's text
                row[f"val/{name}/bits_per_byte"] = source_loss / (math.log(2) * bytes_per_token)
        self.log_row(row)

    def on_validation_start(self) -> None:
        self.run.activity = ("validation", time.monotonic())
        # sums in float64, whatever dtype the precision plugin gave the module (bf16-true would round val/loss to
        # bfloat16); MPS has no float64
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        for metric in (self.val_loss, *self.val_source_loss):
            metric.set_dtype(dtype)
        if self._bytes_per_token is None:
            self._bytes_per_token = self.trainer.datamodule.val_bytes_per_token()
            missing = [name for name, ratio in zip(self.val_names, self._bytes_per_token) if ratio is None]
            if missing and self.trainer.is_global_zero:
                trainer_console(self.trainer).print(
                    f"Note: no val/<name>/bits_per_byte for held-out {', '.join(missing)}: no byte count in the data "
                    "(a released format, or prepared before lit-open counted bytes: prepare it again to get one)."
                )

    def on_validation_end(self) -> None:
        self.run.activity = None
        self._step_clock = None  # validation time is not training time: restart the clock at the next step

    def log_row(self, row: dict[str, float]) -> None:
        """One row to every logger, keyed by the optimizer step (not the micro-batch): the step's metrics, a
        validation's, or a plugin's measurement outside an update (e.g. a benchmark before the first step).
        Train and held-out loss and benchmark scores (`eval/...`) are also kept in `run.history`."""
        self.run.last_metrics.update(row)
        for key, value in row.items():
            if key in self.run.history or key.startswith("eval/"):
                self.run.history.setdefault(key, []).append((self.global_step, value))
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(row, step=self.global_step)

    # -- optimizer -----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        optimizer = build_optimizer(self.model, self.config.optim)
        cfg = self.config
        scheduler = build_scheduler(optimizer, cfg.schedule, cfg.trainer.max_steps, cfg.data.start_step or 0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "config": run_record(self.config),
            "consumed_batches": self.run.consumed_batches,
            "skipped_updates": self.run.skipped_updates,
            "rollbacks": self.run.rollbacks,
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._admit_new_parameters(checkpoint)
        state = checkpoint[CHECKPOINT_KEY]
        self.run.consumed_batches = state["consumed_batches"]
        self.run.skipped_updates = state["skipped_updates"]
        self.run.rollbacks = state.get("rollbacks", 0)  # checkpoints from before rollbacks existed have none
        set_rng_state(state["rng"])

    def _admit_new_parameters(self, checkpoint: dict[str, Any]) -> None:
        """Let a checkpoint from before a plugin added parameters (e.g. qk_norm's gains) load into this model.

        The new parameters keep their fresh values; the saved optimizer state, indexed by position within the
        parameter groups, is re-indexed around them (they start with no state, as new parameters do).
        """
        new = {name for plugin in self.plugins for name in plugin.new_parameters()}
        saved = checkpoint.get("state_dict")
        missing = {name for name in new if saved is not None and f"model.{name}" not in saved}
        if not missing:
            return
        if not checkpoint.get("optimizer_states"):
            raise UserError("The checkpoint lacks optimizer state: it cannot be resumed.")
        live = self.model.state_dict()
        for name in sorted(missing):
            saved[f"model.{name}"] = live[name].detach().clone()
        names = {id(p): name for name, p in self.model.named_parameters()}
        groups = [[names[id(p)] for p in group["params"]] for group in param_groups(self.model, self.config.optim)]
        old_index = {name: i for i, name in enumerate(n for group in groups for n in group if n not in missing)}
        new_index = {name: i for i, name in enumerate(n for group in groups for n in group)}
        old_to_new = {old_index[name]: new_index[name] for name in old_index}
        for optimizer_state in checkpoint["optimizer_states"]:
            optimizer_state["state"] = {old_to_new[i]: v for i, v in optimizer_state["state"].items()}
            for saved_group, group in zip(optimizer_state["param_groups"], groups):
                saved_group["params"] = [new_index[name] for name in group]
        self.run.events.write(checkpoint.get("global_step", 0), "new_parameters", names=sorted(missing))
