"""`lit_open.train.run(cfg)`: one training run, from a validated config to a summary."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, Strategy

from lit_open.checkpoint.atomic import atomic_file
from lit_open.checkpoint.hub import hub_revision
from lit_open.checkpoint.resumable import CHECKPOINT_KEY, CheckpointWriter, find_resume_checkpoint, read_checkpoint
from lit_open.checkpoint.source import apply_init_source, as_resumed_from
from lit_open.compose import to_yaml
from lit_open.config import MODEL_PARALLEL_STRATEGIES, ORDER_KEYS, TrainConfig, TrainerConfig, run_record
from lit_open.data.datamodule import DataModule, Source, micro_batches_per_step, open_sources, released_order_of
from lit_open.data.prepare import prepare
from lit_open.data.released_order import revision_position, start_from_revision
from lit_open.data.sequence import DataSequenceLog
from lit_open.data.tokenizer import check_tokenizer_matches, data_tokenizer_file
from lit_open.errors import RunInterrupted, RunStopped, UserError
from lit_open.glue import NEVER, model_parallel_strategy
from lit_open.model.config import NON_ARCHITECTURE_KEYS
from lit_open.parallel import check_tensor_parallel
from lit_open.plugin import Plugin, build_plugins
from lit_open.provenance import lit_open_provenance
from lit_open.train.loggers import build_loggers, check_loggers, event_listeners, finish_loggers
from lit_open.train.module import LitLM
from lit_open.train.progress import StepProgress
from lit_open.train.rundir import choose_start
from lit_open.train.stopping import StopGuard, interrupted_message, stopped_message
from lit_open.train.summary import console, print_header, print_summary, shell_command, summarize

BATCH_SHAPE_KEYS = ("global_batch_size", "seq_len")  # data keys a resumed run cannot change


def run(cfg: TrainConfig, *, explicit_model_keys: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """Train as `cfg` says; returns the summary that is also printed (steps, tokens, losses, paths).

    explicit_model_keys: the model keys the user set on the command line (`lit_open.compose.explicit_model_keys`):
    with `init_from`, one that contradicts the source's architecture is refused instead of replaced.
    """
    started = time.monotonic()  # trainer.time_limit counts from here
    run_dir = Path(cfg.run.dir)
    rank_zero = rank_zero_only.rank == 0  # read from the launcher's environment; valid before the Trainer exists
    plugins = build_plugins(cfg.plugins)  # their options are checked here, before any data is prepared
    cfg = with_plugin_options(cfg, plugins)
    if rank_zero:
        check_loggers(cfg.logger)  # a missing package or W&B key fails now, not after the data is prepared
        ensure_writable(run_dir)
    resume_path = find_resume_checkpoint(cfg.resume, run_dir)
    if resume_path is not None:
        check_checkpoint_kind(resume_path, cfg.strategy.name)
    resumed = read_checkpoint(resume_path) if resume_path is not None else None
    start = choose_start(cfg, run_dir, resume_path)
    resume_path = start.resume_path
    resume_step = resumed["global_step"] if resumed is not None else 0
    if resume_step >= cfg.trainer.max_steps > 0:
        return nothing_to_do(cfg, resume_path, resume_step, rank_zero)
    saved = resumed[CHECKPOINT_KEY]["config"] if resumed is not None else None
    if cfg.init_from:  # the source's architecture and tokenizer (a hub source is downloaded once per cache)...
        if saved is None:
            cfg = apply_init_source(cfg, explicit_model_keys)
        else:  # ... which a resumed run has in its checkpoint: no download, also on a cluster without the hub
            cfg = as_resumed_from(cfg, saved, explicit_model_keys)
    train_sources = ensure_data(cfg, rank_zero)
    cfg = with_data_start(cfg, saved, train_sources)
    cfg, planned_before = with_schedule_length(cfg, saved)
    data_parallel, context_parallel, tensor_parallel = parallel_sizes(cfg)
    check_tensor_parallel(cfg.model, tensor_parallel, cfg.data.seq_len, context_parallel)
    n_micro = micro_batches_per_step(cfg.data, data_parallel)
    changed = check_resumable(cfg, saved) if saved is not None else {}
    del resumed, saved  # only its metadata was needed; Lightning loads the checkpoint itself
    if rank_zero:
        start.move_aside(run_dir)
        with atomic_file(run_dir / "config.yaml") as tmp:
            tmp.write_text(to_yaml(cfg))

    if cfg.trainer.matmul_precision:
        torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    phases = [phase for p in plugins for phase in p.data_phases(cfg)]
    datamodule = DataModule(cfg.data, cfg.run.seed, phases, cfg.trainer.stop_signals)
    module = LitLM(
        cfg,
        plugins,
        run_dir,
        init_from=cfg.init_from if resume_path is None else None,
        data_parallel_size=data_parallel,
        context_parallel_size=context_parallel,
        tensor_parallel_size=tensor_parallel,
    )
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=build_strategy(cfg.strategy.name, data_parallel, context_parallel, tensor_parallel),
        precision=cfg.trainer.precision,
        max_steps=cfg.trainer.max_steps,
        max_epochs=-1,
        check_val_every_n_epoch=None,
        # Lightning counts validation intervals in batches; ours are optimizer steps: LitLM decides batch by batch
        val_check_interval=NEVER,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the DataModule gives every rank its slice of the global order
        enable_checkpointing=False,  # CheckpointWriter writes atomic, step-numbered checkpoints instead
        enable_model_summary=False,
        logger=build_loggers(
            cfg.logger,
            run_dir,
            resume_step if resume_path is not None else None,
            {**run_record(cfg), "lit_open": lit_open_provenance()},
            rank_zero,
        ),
        callbacks=[
            StepProgress(),
            CheckpointWriter(
                run_dir / "checkpoints",
                cfg.checkpoint.every_n_steps,
                cfg.checkpoint.keep_last,
                cfg.checkpoint.keep_every,
                cfg.checkpoint.asynchronous,
            ),
            DataSequenceLog(run_dir / "data_sequence"),
            *plugins,
            StopGuard(cfg.trainer.stop_signals, cfg.trainer.time_limit, started),  # last: after every on_step_end
        ],
        default_root_dir=run_dir,
        # Under SLURM, Lightning's own requeue would write an hpc_ckpt that it then loads behind lit-open's back;
        # resume=auto with CheckpointWriter's checkpoints is the way runs continue after a preemption.
        plugins=[SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None,
        inference_mode=False,  # metric state made by a standalone validate() must stay updatable in fit()
    )
    events = module.run.events
    events.enabled = events.enabled and trainer.is_global_zero
    events.listeners = event_listeners(trainer.loggers)
    processes = data_parallel * context_parallel * tensor_parallel
    if processes != trainer.world_size:
        raise UserError(
            f"The run is configured for {processes} processes (trainer.devices="
            f"{cfg.trainer.devices} x trainer.num_nodes={cfg.trainer.num_nodes}) but the launcher started "
            f"{trainer.world_size}. Make trainer.devices equal the processes per node (torchrun --nproc-per-node, "
            "srun --ntasks-per-node) and trainer.num_nodes the number of nodes."
        )
    if trainer.is_global_zero:
        print_header(cfg, trainer, n_micro, resume_path, resume_step, planned_before)
        if start.moves:
            console.print(
                f"  moved aside intact: {', '.join(p.name for p in start.moves)} -> {start.moved_to} (not part of "
                "this run's lineage)"
            )
    if start.moves:
        events.write(resume_step, "moved_aside", to=str(start.moved_to), paths=[p.name for p in start.moves])
    if resume_path is not None:
        events.write(resume_step, "resume", checkpoint=str(resume_path), changed=changed)
    else:
        events.write(
            0,
            "start",
            recipe=cfg.run.recipe,
            world_size=trainer.world_size,
            strategy=cfg.strategy.name,
            data_parallel_size=data_parallel,
            context_parallel_size=context_parallel,
            tensor_parallel_size=tensor_parallel,
        )

    has_val = bool(cfg.data.val_sources)
    try:
        if has_val and resume_path is None and cfg.trainer.validate_at_start:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
        val_history = module.run.history["val/loss"]
        stopped = module.run.stopped is not None
        if has_val and not stopped and (not val_history or val_history[-1][0] != trainer.global_step):
            trainer.validate(module, datamodule=datamodule, verbose=False)
    except RunInterrupted:
        events.write(trainer.global_step, "interrupted", signal="SIGINT")
        raise RunInterrupted(interrupted_message(run_dir)) from None
    finally:
        finish_loggers(trainer.loggers, failed=sys.exc_info()[1] is not None)
        release_process_group()
    summary = summarize(module.run, trainer, resume_step)
    if trainer.is_global_zero:
        print_summary(summary)
    if module.run.stopped is not None:
        raise RunStopped(stopped_message(module.run.stopped, trainer.global_step))
    return summary


def nothing_to_do(cfg: TrainConfig, checkpoint: Path, step: int, rank_zero: bool) -> dict[str, Any]:
    """A launch whose checkpoint is already at (or past) trainer.max_steps: say so, change nothing."""
    if rank_zero:
        config = Path(cfg.run.dir) / "config.yaml"
        further = shell_command("train", "--config", config, f"trainer.max_steps={2 * step}")
        console.print(
            f"Run {cfg.run.dir} is already at step {step:,} ({checkpoint}), trainer.max_steps="
            f"{cfg.trainer.max_steps:,}: nothing to do. To train further: {further}"
        )
    return {"run_dir": cfg.run.dir, "steps": step, "steps_this_session": 0, "checkpoint": str(checkpoint)}


def with_plugin_options(cfg: TrainConfig, plugins: list[Plugin]) -> TrainConfig:
    """`cfg` with every option of every plugin written out, defaults included, as the plugins were built: config.yaml
    and checkpoints then hold the options the run used, even if a later version changes a default."""
    keys = [key for key, spec in cfg.plugins.items() if isinstance(spec, dict) and "_target_" in spec]
    blocks = {
        key: {"_target_": cfg.plugins[key]["_target_"], **dataclasses.asdict(p.cfg)} for key, p in zip(keys, plugins)
    }
    return dataclasses.replace(cfg, plugins=blocks)


def release_process_group() -> None:
    """Destroy torch.distributed's process group once the work is done.

    Lightning leaves it alive; its communication threads still running at interpreter exit can abort the process
    ("terminate called without an active exception") after a run that succeeded, and an in-process caller could
    not start another distributed run.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def processes_per_node(trainer: TrainerConfig) -> int:
    """trainer.devices as a number of processes per node (Lightning also accepts a list or auto / -1)."""
    devices = trainer.devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        gpu = trainer.accelerator in ("gpu", "cuda") or (trainer.accelerator == "auto" and torch.cuda.is_available())
        return max(torch.cuda.device_count(), 1) if gpu else 1
    if isinstance(devices, int) and devices > 0:
        return devices
    raise UserError(f"trainer.devices={devices!r}: give a number of devices per node, a list of device ids or auto.")


def parallel_sizes(cfg: TrainConfig) -> tuple[int, int, int]:
    """(data-parallel, context-parallel, tensor-parallel size) of the run; their product is the number of processes."""
    per_node = processes_per_node(cfg.trainer)
    world = per_node * cfg.trainer.num_nodes
    strategy = cfg.strategy
    if strategy.name not in MODEL_PARALLEL_STRATEGIES:
        return world, 1, 1
    cp = strategy.context_parallel_size
    default_tp = {"fsdp": 1, "tp": max(world // cp, 1), "fsdp_tp": per_node}[strategy.name]
    tp = strategy.tensor_parallel_size or default_tp
    dp = strategy.data_parallel_size or max(world // (tp * cp), 1)
    if dp * cp * tp != world:
        raise UserError(
            f"strategy={strategy.name} with data_parallel_size={dp} x context_parallel_size={cp} x "
            f"tensor_parallel_size={tp} = {dp * cp * tp} processes, but the run has {world} (trainer.devices="
            f"{cfg.trainer.devices} x trainer.num_nodes={cfg.trainer.num_nodes}). Make the product equal the number "
            "of processes, or leave data_parallel_size or tensor_parallel_size null to derive it."
        )
    return dp, cp, tp


def build_strategy(name: str, data_parallel: int, context_parallel: int, tensor_parallel: int) -> Strategy | str:
    if name == "ddp":
        return DDPStrategy()
    if name in MODEL_PARALLEL_STRATEGIES:
        # A (data, context, tensor)-parallel mesh; distributed checkpoints: one shard file per process, loadable
        # with another number of processes.
        return model_parallel_strategy(data_parallel, context_parallel, tensor_parallel)
    return "auto"


def check_checkpoint_kind(path: Path, strategy: str) -> None:
    """A sharded (directory) checkpoint loads only into a sharded model."""
    if path.is_dir() and strategy not in MODEL_PARALLEL_STRATEGIES:
        raise UserError(
            f"{path} is a sharded checkpoint (saved with strategy=fsdp, tp or fsdp_tp) and strategy={strategy} "
            "cannot load it. Resume with strategy=fsdp (it also runs on a single device) or another of those."
        )


def ensure_writable(run_dir: Path) -> None:
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"run.dir={str(run_dir)!r} is not writable ({err.strerror}). Choose another with run.dir=PATH."
        ) from None


def ensure_data(cfg: TrainConfig, rank_zero: bool, need_train: bool = True) -> list[Source]:
    """Prepare the sources on first use when the data config says how (other ranks wait for rank 0); check them
    all and return the opened training sources."""
    data = cfg.data
    train_sources = data.sources if need_train else []
    # released formats (lit_open.data.released) are read in place; only lit-open's own sources are prepared
    paths = [Path(s.path).expanduser() for s in train_sources + data.val_sources if s.format == "litdata"]
    missing = [p for p in paths if not (p / "index.json").is_file()]
    output = Path(data.prepare.output).expanduser().resolve() if data.prepare is not None else None
    foreign = [p for p in missing if output is not None and p.resolve().parent != output]
    if foreign:  # data.prepare builds its own output only, never a source the user named elsewhere
        sources = [(f"data.sources[{i}]", s.path) for i, s in enumerate(train_sources)]
        sources += [(f"data.val_sources[{i}]", s.path) for i, s in enumerate(data.val_sources)]
        key, path = next((k, v) for k, v in sources if Path(v).expanduser() == foreign[0])
        raise UserError(
            f"{key}.path={path!r} holds no prepared data (no {Path(path).expanduser() / 'index.json'}"
            f"{'' if Path(path).expanduser().exists() else '; the directory does not exist'}). Check the path, or "
            "write the data there with `lit-open prepare inputs=[...] output=DIR` and give DIR/train (and DIR/val)."
        )
    every = [Path(s.path).expanduser() for s in train_sources + data.val_sources]
    mixed = [p for p in every if output is not None and p.resolve().parent != output]
    if missing and mixed:  # e.g. a recipe's own data.prepare and val_sources beside the user's data.sources
        raise UserError(
            f"data.prepare would build {output} for {', '.join(map(str, missing))}, but {mixed[0]} is other data: "
            "a recipe's prepared data would be mixed with yours. Give your own data.val_sources (or "
            "data.val_sources=[]) and data.tokenizer, and data.prepare=null."
        )
    if missing and data.prepare is not None:
        if rank_zero:
            console.print(f"Preparing data into {data.prepare.output} (first use)...")
            prepare(data.prepare)
        else:
            deadline = time.monotonic() + 3600
            while any(not (p / "index.json").is_file() for p in paths) and time.monotonic() < deadline:
                time.sleep(2)
    if need_train and not data.sources:
        raise UserError(
            "data.sources is empty. Give the prepared data to train on, e.g. "
            "'data.sources=[{path:/data/mine/train,weight:1.0}]' (quoted for the shell; write the data with "
            "`lit-open prepare`)."
        )
    block = data.seq_len + 1
    vocab_size = cfg.model.padded_vocab_size
    sources = open_sources(train_sources, block, "data.sources", vocab_size) + open_sources(
        data.val_sources, block, "data.val_sources", vocab_size
    )
    if data.tokenizer and not Path(data.tokenizer).expanduser().exists():
        raise UserError(
            f"data.tokenizer={data.tokenizer!r} does not exist. Give the tokenizer.json the data was prepared with "
            "(`lit-open prepare` writes it beside train/ and val/), or null to take the one beside data.sources."
        )
    # the tokenizer that samples, benchmarks and exports use must be the one every source was prepared with
    tokenizer = data_tokenizer_file(dataclasses.asdict(cfg)) if need_train else None
    if tokenizer is not None and data.val_sources:
        prepared_val = [s.path for s in data.val_sources if s.format == "litdata"]  # released ones have no manifest
        check_tokenizer_matches(tokenizer, prepared_val, "data.tokenizer")
    prepared = [s for s in sources if s.manifest is not None]  # released formats: ids checked when opened
    vocab = max((s.manifest["tokenizer"]["vocab_size"] for s in prepared), default=0)
    if vocab > cfg.model.padded_vocab_size:
        raise UserError(
            f"The data was tokenized with a {vocab}-token vocabulary but the model has "
            f"{cfg.model.padded_vocab_size} embedding rows (model.vocab_size={cfg.model.vocab_size}); "
            f"set model.vocab_size={vocab} or use data tokenized for this model."
        )
    return sources[: len(train_sources)]


def with_data_start(
    cfg: TrainConfig, saved: dict[str, Any] | None, sources: list[Source], check_span: bool = True
) -> TrainConfig:
    """`cfg` with data.start_step fixed: the checkpoint's on resume; else as given, or (a released order) where
    init_from's revision stopped, else 0. A released order is checked to hold the run's steps unless `check_span`
    is false."""
    data = cfg.data
    revision = hub_revision(cfg.init_from) if cfg.init_from else None
    if saved is not None and data.start_step is None:  # a changed one is refused by check_resumable
        start, why = saved["data"].get("start_step") or 0, "the checkpoint's data.start_step"
    elif data.start_step is not None:
        start, why = data.start_step, "data.start_step"
    elif data.order == "mixture":  # lit-open's own order starts at its beginning; only an explicit step moves the LR
        start, why = 0, "the start"
    else:
        files = [f for s in sources for f in s.chunk_files()]
        start = start_from_revision(revision, data.order, files, data.global_batch_size)
        why = f"init_from's revision {revision}" if revision_position(revision or "") else "the start"
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(data, start_step=start))
    if check_span and data.order != "mixture":
        check_released_span(cfg, sources, why)
    return cfg


def check_released_span(cfg: TrainConfig, sources: list[Source], why: str) -> None:
    """Refuse a released order whose data ends before trainer.max_steps (`why`: where data.start_step came from)."""
    data, start = cfg.data, cfg.data.start_step
    order = released_order_of(data, sources, cfg.run.seed)
    end = start + cfg.trainer.max_steps
    if order.steps is not None and end > order.steps:
        what = "is past the end of" if start >= order.steps else "leaves too few global batches in"
        raise UserError(
            f"data.start_step={start} (from {why}) {what} the data: data.order={data.order} over data.sources "
            f"gives {order.steps:,} global batches of {data.global_batch_size}, and this run needs released steps "
            f"{start:,}-{end - 1:,} (trainer.max_steps={cfg.trainer.max_steps}). Lower trainer.max_steps to "
            f"{max(order.steps - start, 0)}, give an earlier data.start_step, or add the missing files."
        )


def check_resumable(cfg: TrainConfig, saved: dict[str, Any]) -> dict[str, list]:
    """Refuse a checkpoint of another architecture or batch shape; return the other config keys that changed."""
    current = run_record(cfg)
    model_diff = {
        k: (saved["model"].get(k), v)
        for k, v in current["model"].items()
        if k not in NON_ARCHITECTURE_KEYS and saved["model"].get(k) != v
    }
    if model_diff:
        listing = ", ".join(f"model.{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in model_diff.items())
        raise UserError(
            f"The checkpoint to resume was trained with another model ({listing}). Resume with the same model "
            "settings, or start a new run (another run.dir, or move_aside=true)."
        )
    # The data position, the token counts and the data-sequence log count global batches of this shape: another
    # shape would skip or repeat samples and make every token count wrong.
    shape_diff = [k for k in BATCH_SHAPE_KEYS if saved["data"].get(k) != current["data"][k]]
    if shape_diff:
        old = {k: saved["data"].get(k) for k in shape_diff}
        listing = ", ".join(f"data.{k}={old[k]} in the checkpoint, {current['data'][k]} now" for k in shape_diff)
        keep = " ".join(f"data.{k}={old[k]}" for k in shape_diff)
        raise UserError(
            f"A resumed run keeps the global batch of its checkpoint ({listing}): its data position and token counts "
            f"are in those batches. Resume with {keep}, "
            "or start a new run from these weights with init_from=CHECKPOINT and another run.dir (it reads its own "
            "data order from the start)."
        )
    order_diff = [k for k in ORDER_KEYS if k in saved["data"] and saved["data"][k] != current["data"][k]]
    if order_diff:
        listing = ", ".join(
            f"data.{k}={saved['data'][k]} in the checkpoint, {current['data'][k]} now" for k in order_diff
        )
        raise UserError(
            f"A resumed run keeps the data order of its checkpoint ({listing}): its data position counts global "
            "batches of that order. Resume without changing these keys, or start a new run from these weights with "
            "init_from=CHECKPOINT and another run.dir."
        )
    return {key: [old, new] for key, (old, new) in _flat_diff(saved, current).items()}


def with_schedule_length(cfg: TrainConfig, saved: dict[str, Any] | None) -> tuple[TrainConfig, int | None]:
    """`cfg` with schedule.total_steps fixed: at a fresh start trainer.max_steps unless set; on resume the
    checkpoint's, unless set to another value (a re-plan). Returns the checkpoint's length when it was re-planned."""
    schedule = cfg.schedule
    if saved is None:
        total = schedule.total_steps or (cfg.data.start_step or 0) + cfg.trainer.max_steps
        return dataclasses.replace(cfg, schedule=dataclasses.replace(schedule, total_steps=total)), None
    # checkpoints from before the length was saved stretched the schedule over their trainer.max_steps
    before = saved["schedule"].get("total_steps") or saved["trainer"]["max_steps"]
    total = schedule.total_steps or before
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(schedule, total_steps=total))
    return cfg, before if total != before else None


def _flat_diff(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    diff = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff.update(_flat_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            diff[f"{prefix}{key}"] = (a, b)
    return diff
