"""Typed configuration: the schema every composed Hydra config is validated against before anything runs.

Hydra composes YAML groups and `key=value` overrides; `validate` then merges the result into these dataclasses,
so an unknown key, a wrong type or an unsupported choice stops the run at start-up with a `UserError` that
names the key.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig

from lit_open.context_parallel import check_context_parallel
from lit_open.errors import UserError, check_choice
from lit_open.model.config import ModelConfig
from lit_open.typed import to_typed

SOURCE_FORMATS = ("litdata", "megatron", "numpy", "llm360")
DATA_ORDERS = ("mixture", "sequential", "olmo", "llm360")
CHUNK_SHUFFLES = ("none", "amber")
# The data keys that define which samples form each global batch: a resumed run cannot change them.
ORDER_KEYS = ("order", "start_step", "order_seed", "order_first_epoch", "global_indices", "chunk_shuffle")
NUMPY_TOKEN_DTYPES = ("uint16", "uint32")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
OPTIMIZERS = ("adamw", "adamw8bit")
SCHEDULES = ("cosine", "linear", "wsd", "constant")
STRATEGIES = ("auto", "ddp", "fsdp", "tp", "fsdp_tp")
MODEL_PARALLEL_STRATEGIES = ("fsdp", "tp", "fsdp_tp")  # built on Lightning's ModelParallelStrategy
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")
WANDB_MODES = ("online", "offline")
DEFAULT_MAX_GEN_TOKENS = 32  # new tokens of an lm-eval generation task that does not set max_gen_toks
UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP", "SIGINT", "SIGCHLD")  # not stop signals: uncatchable, or taken
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
MIXED_PRECISION_DTYPES = ("float32", "bfloat16")  # FSDP2 compute/reduce dtypes (float16 would need loss scaling)


@dataclass
class RunConfig:
    name: str = "lit-open"
    dir: str = "runs/${run.name}"
    seed: int = 1234
    recipe: str | None = None  # filled in from the `recipe=` choice; recorded for provenance


@dataclass
class SourceConfig:
    path: str = MISSING  # litdata: a directory written by `lit-open prepare`; released formats: docs/data.md
    weight: float = 1.0  # relative share of this source in every global batch
    # litdata (lit-open prepare) | megatron (.bin + .idx, e.g. Pythia's preshuffled Pile) | numpy (OLMo / Dolma
    # headerless token arrays) | llm360 (JSON lines of token_ids, e.g. AmberDatasets): read in place
    format: str = "litdata"
    dtype: str | None = None  # numpy: the token dtype of the files, uint16 or uint32
    # data.val_sources: the metrics' name, val/<name>/loss (letters, digits, _ . -); None: the path's last component,
    # or its parent's when that is a split of `lit-open prepare` (train, val): /data/web/val -> web
    name: str | None = None


@dataclass
class PrepareConfig:
    """How `lit-open prepare` turns raw text into litdata token chunks."""

    inputs: list[str] = field(default_factory=list)  # files, directories, globs, `stdlib`, hf-dataset:ORG/NAME...
    output: str = MISSING  # a directory; receives train/, val/ (if val_fraction > 0) and tokenizer.json
    tokenizer: str | None = None  # a tokenizer.json (or a directory holding one); None: train a byte-level BPE
    vocab_size: int = 4096  # size of the BPE trained when `tokenizer` is None
    val_fraction: float = 0.0  # share of documents held out (chosen by a hash of file and document index)
    val_by_input: bool = False  # held-out documents in one split per input, val-<name>/, instead of one val/
    text_key: str = "text"  # field holding the text in jsonl, parquet and dataset inputs
    eos_token: str | None = None  # None: read from tokenizer_config.json next to the tokenizer, else guessed
    add_special_tokens: bool = False  # let the tokenizer's post-processor add BOS/EOS of its own
    chunk_tokens: int = 4_194_304  # tokens per litdata chunk file
    num_workers: int = 2
    overwrite: bool = False


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    val_sources: list[SourceConfig] = field(default_factory=list)
    tokenizer: str | None = None  # the tokenizer.json the sources were prepared with (else the one beside them)
    seq_len: int = 2048
    micro_batch_size: int = 4  # sequences per forward/backward on one data-parallel rank
    global_batch_size: int = 512  # sequences per optimizer step over all ranks (sets gradient accumulation)
    num_workers: int = 1
    val_samples: int = 256  # held-out sequences scored at each validation
    # Tokens attend only within their own document (EOS-delimited) instead of across the packed sequence.
    document_mask: bool = False
    prepare: PrepareConfig | None = None  # when set, builds the sources above on first use if they are missing
    # Relative source paths are taken under this directory (e.g. where a released corpus was downloaded).
    root: str | None = None
    # mixture: lit-open's weighted mixture | a publisher's order, replayed (docs/data.md): sequential (Pythia, K2),
    # olmo (OLMo's seeded global indices), llm360 (Amber's chunks, one file each, in order)
    order: str = "mixture"
    # The released run's step this run continues from: the LR schedule continues there, and a released order's
    # data too (None: with a released order, where init_from's revision stopped, stepN / stageK-stepS-... / ckpt_N;
    # else 0). With data.order=mixture it moves the LR schedule only: your data starts at its beginning.
    start_step: int | None = None
    order_seed: int | None = None  # olmo: the shuffle's seed (OLMo 2 stage 1: 6198); None: run.seed
    order_first_epoch: int = 0  # olmo: the first epoch's number, 0 for OLMo's trainer (OLMo 2), 1 for OLMo-core
    global_indices: str | None = None  # olmo: a global-indices file to replay instead of computing the shuffle
    chunk_shuffle: str = "none"  # llm360: none (each chunk's lines in file order) | amber (amber-train's draw)


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000
    keep_last: int = 3  # older resumable checkpoints are deleted (0: keep all) ...
    keep_every: int = 0  # ... except those at multiples of this step (0: none), e.g. for later analysis
    # true: training goes on while a checkpoint is written (it waits only for a copy of the state in host memory,
    # which needs that much free host memory); a checkpoint becomes visible to resume=auto once complete on every rank
    asynchronous: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (torch) | adamw8bit (bitsandbytes: 8-bit moments, about 1/4 of the optimizer memory)
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    decay_embeddings: bool = False
    decay_norms: bool = False
    decay_biases: bool = False


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | linear | wsd | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final LR as a fraction of optim.lr (cosine, linear, wsd)
    decay_fraction: float = 0.1  # wsd: share of the steps spent decaying (when decay_steps is not set)
    decay_steps: int | None = None  # wsd: length of the final decay
    # The schedule's length, fixed when the run starts (None there: trainer.max_steps); a resumed run keeps its
    # checkpoint's, so a larger trainer.max_steps continues at the schedule's final LR. Set it to re-plan.
    total_steps: int | None = None


@dataclass
class StrategyConfig:
    """How the model is spread over processes, and the memory/speed switches applied to it (lit_open.parallel)."""

    name: str = "auto"  # auto | ddp | fsdp | tp | fsdp_tp
    # fsdp, tp, fsdp_tp: data-parallel x context-parallel x tensor-parallel must equal the number of processes.
    data_parallel_size: int | None = None  # None: processes / tensor_parallel_size
    tensor_parallel_size: int | None = None  # None: 1 for fsdp, all processes for tp, trainer.devices for fsdp_tp
    # fsdp, tp, fsdp_tp: processes that share each sequence (lit_open/context_parallel.py); data.seq_len must be a
    # multiple of 2 x context_parallel_size, and data x context x tensor parallel the number of processes.
    context_parallel_size: int = 1
    activation_checkpointing: str = "none"  # none | full (recompute each block) | selective (keep matmul outputs)
    compile: bool = False  # torch.compile each block
    param_dtype: str | None = None  # fsdp/tp/fsdp_tp compute and all-gather dtype (bfloat16); None: as stored
    reduce_dtype: str = "float32"  # fsdp/tp/fsdp_tp gradient reduce-scatter dtype
    float8: str = "none"  # none | tensorwise | rowwise: torchao float8 matmuls (Hopper GPUs), output head excluded
    loss_chunk_tokens: int = (
        1024  # tokens per chunk of output head + cross-entropy (lit_open.train.loss); 0: all at once
    )


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    precision: str = "32-true"  # 32-true | bf16-mixed | bf16-true
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    val_check_interval: int = 100  # optimizer steps between validations; 0: only at the start and the end
    validate_at_start: bool = True
    matmul_precision: str | None = None  # torch.set_float32_matmul_precision on GPUs (e.g. high)
    # On these signals every rank finishes its optimizer step, writes a checkpoint and exits with status 75.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # e.g. 3h50m: stop like on a stop signal early enough to write the checkpoint within it (None: no limit)
    time_limit: str | None = None


@dataclass
class WandbConfig:
    """Weights & Biases (`logger=wandb`); the run's files go to <run.dir>/logs/wandb/."""

    # online (needs an API key: WANDB_API_KEY or `wandb login`) | offline (no network: `wandb sync` or
    # `lit-open logs sync` publishes it later)
    mode: str = "online"
    project: str = "lit-open"
    entity: str | None = None  # team or user; None: your API key's default entity
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class MLflowConfig:
    """MLflow (`logger=mlflow`)."""

    tracking_uri: str | None = None  # None: a local store, sqlite:///<run.dir>/logs/mlflow.db
    experiment: str = "lit-open"


@dataclass
class LoggerConfig:
    csv: bool = True
    tensorboard: bool = True
    wandb: WandbConfig | None = None
    mlflow: MLflowConfig | None = None


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    # MISSING, not a default instance: a default ModelConfig() would bake the head_dim and n_kv_head that its
    # __post_init__ derives for the default sizes into the schema, and they would survive the merge of a preset.
    model: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    plugins: dict[str, Any] = field(default_factory=dict)
    # initial weights of a new run: hf:ORG/NAME@REVISION | hf:/local/dir | a lit-open checkpoint (see
    # lit_open.checkpoint.source); its config defines model.*
    init_from: str | None = None
    # Launch options (LAUNCH_KEYS): how this launch starts, not what the run is; never saved with the run.
    resume: str = "auto"  # auto: newest checkpoint in run.dir, if any | none: from scratch | a checkpoint path
    # a fresh start in a run.dir holding checkpoints moves the earlier run's files to run.dir/superseded/TIME/
    # instead of being refused
    move_aside: bool = False


LAUNCH_KEYS = ("resume", "move_aside")


def run_record(cfg: TrainConfig) -> dict[str, Any]:
    """The run's config as saved in config.yaml and in checkpoints: everything but the launch options."""
    record = asdict(cfg)
    for key in LAUNCH_KEYS:
        del record[key]
    return record


@dataclass
class EvalConfig:
    """`lit-open eval`: the held-out loss of a run checkpoint, or lm-eval tasks on a checkpoint or HF directory."""

    checkpoint: str = MISSING  # a run checkpoint (<run.dir>/checkpoints/step-N.ckpt) or, with tasks, hf:DIR
    tasks: list[str] | None = None  # lm-eval task names / local task directories; None: the held-out loss
    limit: int | None = None  # documents per task (None: all)
    batch_size: int = 8  # sequences per forward pass
    num_fewshot: int | None = None  # None: each task's own setting
    max_gen_tokens: int = DEFAULT_MAX_GEN_TOKENS  # new tokens for generation tasks that do not set max_gen_toks
    tokenizer: str | None = None  # the tokenizer.json the model was trained with (default: the run's or the HF dir's)
    out: str | None = None  # write the results as JSON here


@dataclass
class ConvertConfig:
    """`lit-open convert`: a run checkpoint to a Hugging Face directory, or a Hugging Face checkpoint to lit-open."""

    source: str = MISSING  # a run checkpoint, or hf:ORG/NAME@REVISION | hf:/dir
    out: str = MISSING  # the directory (to Hugging Face) or .ckpt file (to lit-open) to write
    dtype: str | None = None  # float32 | bfloat16 | float16 (None: as stored)
    tokenizer: str | None = None  # the tokenizer.json to ship (default: the run's data's; must be the data's)
    overwrite: bool = False  # replace an existing out (only once the new one is complete)


@dataclass
class RunDir:
    dir: str = MISSING  # a run directory (run.dir of `lit-open train`)


@dataclass
class ReportConfig:
    """`lit-open report`: a run's curves with its events marked, other runs overlaid (PNG + HTML)."""

    run: RunDir = field(default_factory=RunDir)
    compare: list[str] = field(default_factory=list)  # other run directories, overlaid
    labels: list[str] | None = None  # one per run (run.dir first); None: the directories' names
    x: str = "step"  # step | tokens
    out: str | None = None  # default: <run.dir>/report/


@dataclass
class LogsConfig:
    """`lit-open logs sync`: a run's metrics.csv and events.jsonl replayed into W&B or MLflow, each row once."""

    run: RunDir = field(default_factory=RunDir)
    to: str = MISSING  # wandb | mlflow
    # Unset keys: the run's own logger.wandb / logger.mlflow settings, else their defaults.
    mode: str | None = None  # wandb: online | offline
    project: str | None = None  # wandb
    entity: str | None = None  # wandb
    tracking_uri: str | None = None  # mlflow
    experiment: str | None = None  # mlflow


COMMAND_SCHEMAS: dict[str, type] = {
    "prepare": PrepareConfig,
    "eval": EvalConfig,
    "convert": ConvertConfig,
    "report": ReportConfig,
    "logs": LogsConfig,
}


def check_sources(data: DataConfig) -> None:
    """Each source's format and dtype; released formats carry no end-of-document metadata for document masks."""
    for key, sources in (("data.sources", data.sources), ("data.val_sources", data.val_sources)):
        for i, source in enumerate(sources):
            check_choice(f"{key}[{i}].format", source.format, SOURCE_FORMATS)
            if source.format == "numpy":
                check_choice(f"{key}[{i}].dtype", source.dtype, NUMPY_TOKEN_DTYPES)
            elif source.dtype is not None:
                raise UserError(
                    f"{key}[{i}].dtype={source.dtype} applies to format=numpy only ({source.format} files record "
                    "their own token type); drop it."
                )
            if data.document_mask and source.format != "litdata":
                raise UserError(
                    f"data.document_mask=true needs the end-of-document id that `lit-open prepare` records; "
                    f"{key}[{i}] is format={source.format}. Set data.document_mask=false for released formats."
                )
    check_order(data)


def val_source_names(data: DataConfig) -> list[str]:
    """Each val source's metrics name (SourceConfig.name, else from its path); a UserError unless valid and unique."""
    names: list[str] = []
    for i, source in enumerate(data.val_sources):
        head, name = os.path.split(os.path.normpath(os.path.expanduser(source.path)))
        name = source.name or (os.path.basename(head) if name in ("train", "val") and os.path.basename(head) else name)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            fault = f"is also data.val_sources[{names.index(name)}]'s" if name in names else "is not a valid"
            raise UserError(
                f"data.val_sources[{i}].name={name!r}{'' if source.name else f' (from path {source.path})'} {fault} "
                "name: each held-out source logs val/<name>/loss, so give each a unique name of letters, digits, "
                "'_', '.' and '-', e.g. data.val_sources=[{path:DIR_A,name:web},{path:DIR_B,name:code}]."
            )
        names.append(name)
    return names


def check_order(data: DataConfig) -> None:
    """A released order reads its sources as the publisher did: in the listed order, unweighted, one mixture."""
    check_choice("data.order", data.order, DATA_ORDERS)
    check_choice("data.chunk_shuffle", data.chunk_shuffle, CHUNK_SHUFFLES)
    only = {
        "order_seed": (None, ("olmo",)),
        "order_first_epoch": (0, ("olmo",)),
        "global_indices": (None, ("olmo",)),
        "chunk_shuffle": ("none", ("llm360",)),
    }
    for key, (default, orders) in only.items():
        if getattr(data, key) != default and data.order not in orders:
            raise UserError(
                f"data.{key}={getattr(data, key)} applies to data.order={'|'.join(orders)}, not "
                f"data.order={data.order}; drop it or choose that order."
            )
    if data.start_step is not None and data.start_step < 0:
        raise UserError(f"data.start_step={data.start_step} must be 0 or a positive step.")
    if data.order == "mixture":
        return
    for i, source in enumerate(data.sources):
        if source.weight != 1.0:
            raise UserError(
                f"data.sources[{i}].weight={source.weight}: data.order={data.order} reads the sources one after "
                "another in the listed order, as the publisher did, without weights. Drop the weights, or use "
                "data.order=mixture to mix sources by weight."
            )
        if data.order == "llm360" and source.format == "litdata":
            raise UserError(
                f"data.sources[{i}] is format=litdata, but data.order=llm360 trains released chunk files "
                "(format=llm360, numpy or megatron) one after another; use data.order=sequential or mixture for "
                "prepared data."
            )


def parse_duration(text: str, key: str = "trainer.time_limit") -> float:
    """Seconds of `3h50m`, `90m`, `1d2h`, `45s` or a plain number of seconds."""
    value = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    elif value and _DURATION.sub("", value) == "":
        seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(value))
    else:
        seconds = -1.0
    if seconds <= 0:
        raise UserError(
            f"{key}={text!r} is not a duration: give hours, minutes and seconds such as 3h50m, 90m, 1d2h or 45s "
            "(or a number of seconds)."
        )
    return seconds


def check_stop_signals(names: list[str], key: str = "trainer.stop_signals") -> list[signal.Signals]:
    """The signals named in `names`, each one a run can stop on."""
    catchable = sorted(s.name for s in signal.valid_signals() if isinstance(s, signal.Signals))
    catchable = [name for name in catchable if name not in UNCATCHABLE_SIGNALS]
    found = []
    for name in names:
        if name not in catchable:
            raise UserError(
                f"{key} has {name!r}, which is not a signal a run can stop on; give names such as SIGTERM, SIGUSR1 "
                f"(accepted: {', '.join(catchable)}). Ctrl-C (SIGINT) always interrupts."
            )
        found.append(signal.Signals[name])
    return found


def validate(cfg: DictConfig | dict) -> TrainConfig:
    """Return the typed config for a composed one, or raise a UserError that names the first problem."""
    typed: TrainConfig = to_typed(TrainConfig, cfg, "config")
    check_choice("optim.name", typed.optim.name, OPTIMIZERS)
    check_choice("schedule.name", typed.schedule.name, SCHEDULES)
    strategy = typed.strategy
    check_choice("strategy.name", strategy.name, STRATEGIES)
    check_choice("strategy.activation_checkpointing", strategy.activation_checkpointing, ACTIVATION_CHECKPOINTING)
    check_choice("strategy.float8", strategy.float8, FLOAT8_RECIPES)
    check_choice("strategy.reduce_dtype", strategy.reduce_dtype, MIXED_PRECISION_DTYPES)
    if strategy.param_dtype is not None:
        check_choice("strategy.param_dtype", strategy.param_dtype, MIXED_PRECISION_DTYPES)
    for key in ("data_parallel_size", "tensor_parallel_size"):
        value = getattr(strategy, key)
        if value is not None and value < 1:
            raise UserError(f"strategy.{key}={value} must be a positive integer (or null to derive it).")
    if strategy.context_parallel_size < 1:
        raise UserError(f"strategy.context_parallel_size={strategy.context_parallel_size} must be a positive integer.")
    if strategy.name not in MODEL_PARALLEL_STRATEGIES:
        for key, default in (
            ("data_parallel_size", None),
            ("tensor_parallel_size", None),
            ("context_parallel_size", 1),
            ("param_dtype", None),
        ):
            if getattr(strategy, key) != default:
                raise UserError(
                    f"strategy.{key} applies to strategy=fsdp, tp or fsdp_tp, not strategy={strategy.name}; "
                    f"drop it or choose one of those (for mixed precision under {strategy.name}, set "
                    "trainer.precision=bf16-mixed)."
                )
    check_choice("trainer.precision", typed.trainer.precision, PRECISIONS)
    if typed.logger.wandb is not None:
        check_choice("logger.wandb.mode", typed.logger.wandb.mode, WANDB_MODES)
    data = typed.data
    check_sources(data)
    if data.root is not None:  # a path join, no I/O: relative source paths are under data.root
        for source in [*data.sources, *data.val_sources]:
            source.path = os.path.join(os.path.expanduser(data.root), os.path.expanduser(source.path))
    val_source_names(data)  # from the paths as joined
    for key in ("seq_len", "micro_batch_size", "global_batch_size"):
        if getattr(data, key) < 1:
            raise UserError(f"data.{key}={getattr(data, key)} must be a positive integer.")
    if data.seq_len > typed.model.max_seq_len:
        raise UserError(
            f"data.seq_len={data.seq_len} is longer than the model's context, model.max_seq_len="
            f"{typed.model.max_seq_len}; lower data.seq_len or raise model.max_seq_len."
        )
    if data.global_batch_size % data.micro_batch_size:
        raise UserError(
            f"data.global_batch_size={data.global_batch_size} must be a multiple of data.micro_batch_size="
            f"{data.micro_batch_size} (times the number of data-parallel processes)."
        )
    check_context_parallel(typed.data.seq_len, strategy.context_parallel_size, typed.model.attention)
    for key, sources in (("data.sources", data.sources), ("data.val_sources", data.val_sources)):
        for i, source in enumerate(sources):
            if source.weight <= 0:
                raise UserError(f"{key}[{i}].weight={source.weight} must be positive.")
    if typed.trainer.max_steps < 1:
        raise UserError(f"trainer.max_steps={typed.trainer.max_steps} must be at least 1.")
    if typed.checkpoint.every_n_steps < 1:
        raise UserError(f"checkpoint.every_n_steps={typed.checkpoint.every_n_steps} must be at least 1.")
    for key in ("keep_last", "keep_every"):
        if getattr(typed.checkpoint, key) < 0:
            raise UserError(f"checkpoint.{key}={getattr(typed.checkpoint, key)} must be 0 (off) or a positive number.")
    check_stop_signals(typed.trainer.stop_signals)
    if typed.trainer.time_limit is not None:
        parse_duration(typed.trainer.time_limit)
    if typed.trainer.val_check_interval < 0:
        raise UserError("trainer.val_check_interval must be 0 (start and end only) or a number of steps.")
    schedule = typed.schedule
    if not 0.0 <= schedule.min_lr_ratio <= 1.0:
        raise UserError(f"schedule.min_lr_ratio={schedule.min_lr_ratio} must be between 0 and 1.")
    if not 0.0 < schedule.decay_fraction <= 1.0:
        raise UserError(f"schedule.decay_fraction={schedule.decay_fraction} must be in (0, 1].")
    if typed.optim.name == "adamw8bit" and strategy.name in MODEL_PARALLEL_STRATEGIES:
        raise UserError(
            f"optim.name=adamw8bit does not work with strategy={strategy.name}: bitsandbytes updates plain tensors, "
            "not the sharded DTensor parameters of fsdp, tp and fsdp_tp. Use strategy=auto or ddp, or "
            "optim.name=adamw."
        )
    if len(typed.optim.betas) != 2:
        raise UserError(f"optim.betas={typed.optim.betas} must be two numbers, e.g. [0.9,0.95].")
    return typed
