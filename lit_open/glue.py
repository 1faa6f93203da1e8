"""Every use of a private attribute or a monkeypatch of Lightning, litdata, lm-eval or torch, each behind one named
function.

Nothing else in lit-open touches those libraries' internals. Each function reaches them through `_internal`, so a
library upgrade that renames or removes one fails at once with a message naming the library, its version and the
internal, not deep inside a run; `tests/unit/test_glue.py` exercises every function against the installed versions.

Each function imports its library itself: `lit-open prepare`'s worker processes import this module (through
`lit_open.data.prepare`) and must not pay for importing Lightning.
"""

from __future__ import annotations

import bisect
import csv
import functools
import json
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

NEVER = sys.maxsize  # a batch interval Lightning never reaches


class InternalChanged(RuntimeError):
    """A library no longer has an internal that lit-open relies on (see the message for which and where)."""


def internal_changed(library: str, what: str) -> InternalChanged:
    try:
        installed = version(library)
    except PackageNotFoundError:
        installed = "(version unknown)"
    return InternalChanged(
        f"lit-open relies on {what}, an internal of {library}, and {library} {installed} does not have it. Install "
        f"the {library} version that pyproject.toml admits, or update lit_open/glue.py for {library} {installed}."
    )


def _internal(owner: Any, attribute: str, library: str) -> Any:
    """`owner.attribute`, or InternalChanged naming the library version when it is gone."""
    try:
        return getattr(owner, attribute)
    except AttributeError:
        name = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        raise internal_changed(library, f"{name}.{attribute}") from None


# -- Lightning ------------------------------------------------------------------------------------------------------


def _epoch_loop(trainer: Any) -> Any:
    return _internal(_internal(trainer, "fit_loop", "lightning"), "epoch_loop", "lightning")


def set_optimizer_step_count(trainer: Any, step: int) -> None:
    """Make `trainer.global_step` read `step`.

    Why: a rollback restores the training state of an earlier step, and the step counter must go back with it;
    Lightning has no public setter (global_step counts the optimizer steps of manual optimization in the loop's
    progress trackers).
    """
    manual = _internal(_epoch_loop(trainer), "manual_optimization", "lightning")
    progress = _internal(manual, "optim_step_progress", "lightning")
    for tracker in (progress.total, progress.current):
        tracker.ready = tracker.completed = step


def validate_after_this_batch(trainer: Any, due: bool) -> None:
    """Have Lightning validate right after the current training batch (due) or not.

    Why: lit-open validates every `trainer.val_check_interval` optimizer updates, and Lightning schedules validation
    by counting batches; after a skipped update or a rollback a number of batches no longer maps to a number of
    updates. Marking the very batch as Lightning's check point keeps validation on the update (a validation between
    micro-batches would also release the gradients accumulated so far). The Trainer is built with
    `val_check_interval=NEVER`, so nothing else schedules a validation.
    """
    batch = _internal(_epoch_loop(trainer), "total_batch_idx", "lightning")
    _internal(trainer, "val_check_batch", "lightning")  # the attribute the epoch loop reads: it must still exist
    trainer.val_check_batch = batch + 1 if due else NEVER


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """The checkpoint dict that `trainer.save_checkpoint` would write, with every checkpoint hook called.

    Why: an asynchronous save (lit_open.checkpoint.background) writes that dict itself, from a host copy, in a
    background thread; `Trainer.save_checkpoint` builds and writes it in one blocking call.
    """
    connector = _internal(trainer, "_checkpoint_connector", "lightning")
    return _internal(connector, "dump_checkpoint", "lightning")(weights_only=False)


def saves_sharded(strategy: Any) -> bool:
    """Whether `strategy` writes distributed (one shard file per process) checkpoints.

    Why: the asynchronous save writes the same layout as `ModelParallelStrategy.save_checkpoint`, whose choice is
    the private `_save_distributed_checkpoint`.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy  # glue is imported without Lightning (prepare)

    return isinstance(strategy, ModelParallelStrategy) and bool(
        _internal(strategy, "_save_distributed_checkpoint", "lightning")
    )


MESH_DIMS = ("data_parallel", "context_parallel", "tensor_parallel")


def model_parallel_strategy(data_parallel: int, context_parallel: int, tensor_parallel: int) -> Any:
    """Lightning's ModelParallelStrategy on a 3-D device mesh named MESH_DIMS, with distributed checkpoints.

    Why: ModelParallelStrategy builds its 2-D (data_parallel, tensor_parallel) mesh inside `setup_environment`,
    with no hook for another shape; the subclass builds the 3-D mesh there instead, which takes the private
    `_setup_distributed` (process-group start) and `_device_mesh` (what `LightningModule.device_mesh` returns).
    """
    return _mesh_strategy_class()(data_parallel, context_parallel, tensor_parallel)


@functools.cache
def _mesh_strategy_class() -> type:
    from lightning.pytorch.strategies import ModelParallelStrategy, ParallelStrategy  # not imported by prepare
    from torch.distributed.device_mesh import init_device_mesh

    class MeshStrategy(ModelParallelStrategy):
        def __init__(self, data_parallel: int, context_parallel: int, tensor_parallel: int) -> None:
            super().__init__(
                data_parallel_size=data_parallel * context_parallel,
                tensor_parallel_size=tensor_parallel,
                save_distributed_checkpoint=True,
            )
            self.mesh_shape = (data_parallel, context_parallel, tensor_parallel)

        def setup_environment(self) -> None:
            ParallelStrategy.setup_environment(self)  # the accelerator's device setup, not the parent's 2-D mesh
            _internal(self, "_setup_distributed", "lightning")()
            mesh = init_device_mesh(self.root_device.type, self.mesh_shape, mesh_dim_names=MESH_DIMS)
            _internal(self, "_device_mesh", "lightning")
            self._device_mesh = mesh
            _internal(self.lightning_module, "_device_mesh", "lightning")
            self.lightning_module._device_mesh = mesh

    return MeshStrategy


def resuming_csv_logger(save_dir: str | Path, keep_through: int | None, **kwargs: Any) -> Any:
    """Lightning's CSVLogger, except that a run resumed from step N keeps the rows of steps <= N of metrics.csv.

    Why: Lightning's CSV writer deletes an existing metrics.csv when it starts (in a private method, with no
    option); a resumed run must keep the history before its checkpoint and log the later steps again as it
    replays them. `keep_through=None` (a fresh run) keeps Lightning's behaviour. Only global rank 0 touches the file.
    """
    return _resuming_csv_logger_class()(save_dir, keep_through, **kwargs)


@functools.cache
def _resuming_csv_logger_class() -> type:
    # each library is imported in the function that needs it (see the module docstring)
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    _internal(ExperimentWriter, "_check_log_dir_exists", "lightning")

    class ResumingWriter(ExperimentWriter):
        def __init__(self, log_dir: str, keep_through: int | None) -> None:
            self.keep_through = keep_through
            super().__init__(log_dir)

        def _check_log_dir_exists(self) -> None:
            fs = _internal(self, "_fs", "lightning")
            if not fs.isfile(self.metrics_file_path):
                return
            if self.keep_through is None:
                fs.rm_file(self.metrics_file_path)
                return
            with fs.open(self.metrics_file_path, "r", newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                kept = [row for row in reader if row.get("step") and int(row["step"]) <= self.keep_through]
            with fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(kept)
            self.metrics_keys = header

    class ResumingCSVLogger(CSVLogger):
        def __init__(self, save_dir: str | Path, keep_through: int | None, **kwargs: Any) -> None:
            super().__init__(save_dir=str(save_dir), **kwargs)
            self.keep_through = keep_through

        @property
        @rank_zero_experiment  # as Lightning's own: other ranks get a no-op and never touch (or truncate) the file
        def experiment(self) -> ExperimentWriter:
            if _internal(self, "_experiment", "lightning") is None:
                _internal(self, "_fs", "lightning").makedirs(self.root_dir, exist_ok=True)
                self._experiment = ResumingWriter(self.log_dir, self.keep_through)
            return self._experiment

    return ResumingCSVLogger


# -- litdata --------------------------------------------------------------------------------------------------------


@contextmanager
def litdata_optimize_sandbox(work_dir: Path) -> Iterator[None]:
    """Undo what litdata's `optimize` changes process-wide, keep its scratch directories private, and let Ctrl-C
    raise KeyboardInterrupt instead of exiting with status 0.

    Why: `optimize` sets the multiprocessing start method to spawn (force=True), installs a SIGINT handler that calls
    os._exit(0) (so Ctrl-C would exit "successfully" and skip the clean-up of a half-written output), sets
    DATA_OPTIMIZER_* environment variables, and empties `$TMPDIR/chunks` and `$TMPDIR/data` unless
    DATA_OPTIMIZER_CACHE_FOLDER / DATA_OPTIMIZER_DATA_CACHE_FOLDER point elsewhere. While inside, its SIGINT
    handler is replaced by one that stops the workers and raises KeyboardInterrupt.
    """
    from litdata.processing.data_processor import DataProcessor  # see the module docstring

    litdata_handler = _internal(DataProcessor, "_signal_handler", "litdata")
    DataProcessor._signal_handler = _interrupt_optimize
    start_method = multiprocessing.get_start_method(allow_none=True)
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    env_keys = (
        "DATA_OPTIMIZER_CACHE_FOLDER",
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER",
        "DATA_OPTIMIZER_NUM_WORKERS",
        "DATA_OPTIMIZER_GLOBAL_RANK",
    )
    saved_env = {k: os.environ.get(k) for k in env_keys}
    os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = str(work_dir / "litdata-chunks")
    os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = str(work_dir / "litdata-data")
    try:
        yield
    finally:
        DataProcessor._signal_handler = litdata_handler
        multiprocessing.set_start_method(start_method, force=True)
        if main_thread and sigint is not None:
            signal.signal(signal.SIGINT, sigint)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _interrupt_optimize(self: Any, signum: int, frame: Any) -> None:
    """SIGINT during `optimize`: stop litdata's worker processes, then raise KeyboardInterrupt (not os._exit(0))."""
    for worker in getattr(self, "workers", []):
        worker.terminate()
    raise KeyboardInterrupt


def litdata_token_reader(input_dir: str | Path, block_size: int) -> LitdataTokens | None:
    """The samples of `block_size` tokens of the litdata token chunks in `input_dir`, read in place (sample i is
    StreamingDataset(input_dir, item_loader=TokensLoader(block_size))[i]); None when the chunks are not plain
    token arrays (compressed, encrypted, another serializer or item loader): StreamingDataset reads those.

    Why: StreamingDataset maps a chunk file whenever it reads from another chunk than the last (and unmaps that
    one), so samples in a random order cost a file mapping each, several times the read itself. This reads litdata's
    chunk layout (litdata/streaming/writer.py `_create_chunk`: uint32 item count N, uint32 offsets[N + 1], then the
    items' bytes, the tokens of TokensLoader chunks back to back) with the dtype codes of its private
    `constants._NUMPY_DTYPES_MAPPING`; each chunk's header is checked against index.json when the chunk is first read.
    """
    from litdata import constants  # see the module docstring

    index = json.loads((Path(input_dir) / "index.json").read_text())
    config = index.get("config") or {}
    data_format = config.get("data_format") or []
    if (
        config.get("item_loader") != "TokensLoader"
        or config.get("compression")
        or config.get("encryption")
        or len(data_format) != 1
        or not str(data_format[0]).startswith("no_header_numpy:")
    ):
        return None
    dtypes = _internal(constants, "_NUMPY_DTYPES_MAPPING", "litdata")
    return LitdataTokens(Path(input_dir), index["chunks"], dtypes[int(data_format[0].split(":")[1])], block_size)


class LitdataTokens:
    """Samples of litdata TokensLoader chunks by index, one pread each (see `litdata_token_reader`)."""

    def __init__(self, root: Path, chunks: list[dict], dtype: Any, block_size: int) -> None:
        self.root, self.block_size, self.dtype = root, block_size, np.dtype(dtype)
        self.chunks = [(c["filename"], int(c["chunk_size"]), int(c["dim"])) for c in chunks]
        self.starts = [0]  # first sample of each chunk; samples never straddle chunks (TokensLoader's intervals)
        for _, _, dim in self.chunks:
            self.starts.append(self.starts[-1] + dim // block_size)
        self.samples = self.starts[-1]
        self._files: dict[int, tuple[Any, int]] = {}  # chunk -> (open file, byte offset of its first token)

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> Any:
        """Sample `index`: block_size tokens in the chunks' dtype (a read-only array)."""
        if not 0 <= index < self.samples:
            raise IndexError(f"sample {index} out of range [0, {self.samples})")
        c = bisect.bisect_right(self.starts, index) - 1
        opened = self._files.get(c) or self._open_chunk(c)
        nbytes = self.block_size * self.dtype.itemsize
        data = os.pread(opened[0].fileno(), nbytes, opened[1] + (index - self.starts[c]) * nbytes)
        if len(data) != nbytes:
            raise RuntimeError(f"{self.root / self.chunks[c][0]} ends inside sample {index}: the file is truncated.")
        return np.frombuffer(data, dtype=self.dtype)

    def _open_chunk(self, c: int) -> tuple[Any, int]:
        name, items, dim = self.chunks[c]
        fh = open(self.root / name, "rb", buffering=0)
        head = os.pread(fh.fileno(), 8, 0)
        last = os.pread(fh.fileno(), 4, 4 + 4 * items)
        count, first = (int.from_bytes(head[i : i + 4], "little") for i in (0, 4)) if len(head) == 8 else (-1, -1)
        end = int.from_bytes(last, "little") if len(last) == 4 else -1
        if count != items or first != 4 * (items + 2) or end - first != dim * self.dtype.itemsize:
            fh.close()
            raise internal_changed(
                "litdata",
                f"the chunk layout of writer.py _create_chunk (found in {self.root / name}: {count} items, "
                f"data bytes [{first}, {end}); index.json: {items} items of {dim} tokens)",
            )
        self._files[c] = (fh, first)
        return self._files[c]

    def __getstate__(self) -> dict:  # a DataLoader worker opens its own files
        return {**self.__dict__, "_files": {}}


# -- lm-eval --------------------------------------------------------------------------------------------------------


@contextmanager
def lm_eval_progress_bars_off() -> Iterator[None]:
    """Silence lm-eval's per-request progress bars while inside.

    Why: they have no switch (lm-eval passes disable=False itself in places); in the training loop they would
    interleave with the trainer's own progress, and an evaluation is reported in one line when done.
    """
    import lm_eval.api.model  # see the module docstring
    import lm_eval.api.task
    from tqdm import tqdm

    def quiet(*args: Any, **kwargs: Any) -> tqdm:
        return tqdm(*args, **{**kwargs, "disable": True})

    modules = (lm_eval.api.task, lm_eval.api.model)
    before = [_internal(module, "tqdm", "lm_eval") for module in modules]
    for module in modules:
        module.tqdm = quiet
    try:
        yield
    finally:
        for module, original in zip(modules, before):
            module.tqdm = original


def load_lm_eval_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it (its `!function` tags and `include:` resolved).

    Why: lm-eval reads task YAMLs with a loader of its private `_yaml_loader` module; a local task directory must
    be read the same way to be passed on as an inline task config.
    """
    import lm_eval.tasks._yaml_loader as yaml_loader  # see the module docstring

    return _internal(yaml_loader, "load_yaml", "lm_eval")(str(path))


# -- torch.distributed ----------------------------------------------------------------------------------------------


def flattened_mesh(mesh: Any, dims: tuple[str, ...], name: str) -> Any:
    """The 1-D mesh over `dims` of `mesh` (e.g. data x context parallel, over which FSDP2 shards), named `name`.

    Why: a 1-D view of several dimensions is what FSDP2 needs to shard over them jointly, and torch builds it only
    with the private `DeviceMesh._flatten` (as torchtitan does).
    """
    return _internal(mesh[dims], "_flatten", "torch")(name)


def nccl_flight_record() -> bytes:
    """The NCCL flight recorder's trace of this process (pickled; `torchfrtrace` reads it), dumped now.

    Why: NCCL dumps it by itself only when a collective times out (TORCH_NCCL_DUMP_ON_TIMEOUT), which the process
    group's timeout may put long after the watchdog plugin has found the hang; the dump on demand is private.
    """
    import torch._C._distributed_c10d as c10d  # glue is imported without torch.distributed's bindings (prepare)

    return _internal(c10d, "_dump_nccl_trace", "torch")()
