"""Publishers' data orders, replayed: which released samples form global batch s of a released run.

`data.order` picks one (lit-open's own weighted mixture, `order.DataOrder`, stays the default). Each is a pure
function of the released run's step, so a replay resumes exactly and `lit-open data locate` needs no log. The
layouts and the publishers' code they follow are in docs/data.md (section 6); in short:

- "sequential" (Pythia, K2): global batch s is samples [G·s, G·(s+1)) of the sources concatenated in the order
  listed (pythia@a19eecb utils/batch_viewer.py#L41-L43).
- "olmo": OLMo's global indices, a PCG64 shuffle of all instances per epoch seeded `order_seed + epoch` (epochs
  counted from `order_first_epoch`: 0 for OLMo's trainer, 1 for OLMo-core); global batch s is indices
  [G·s, G·(s+1)) of its epoch (allenai/OLMo@59a53e3 olmo/data/iterable_dataset.py#L56-L98), or of a global-indices
  file given instead.
- "llm360" (Amber): every file of the sources is a chunk; chunks train one after another, each for
  floor(lines / G) steps, its lines in file order or (chunk_shuffle=amber) in amber-train's permutation
  (amber-train@64bc595 main.py#L143-L177, main_utils.py#L15-L33).

The run's data step d (global batches this run consumed) is released step `start_step + d`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from lit_open.data.order import GlobalOrder
from lit_open.errors import UserError

AMBER_SEED = 11111  # amber-train's RANDOM_SEED (main.py#L43): a launch after ckpt_K seeds 11111 + K + 1

# Where a released revision stopped, per family: (revision pattern, unit of the number it names).
# "step": optimizer steps trained (Pythia stepN, gpt-neox training.py#L569-L619; OLMo stageK-stepS-tokensTB,
# OLMo train.py#L1197-L1212); "chunk": LLM360's ckpt_N was saved after chunks 0..N (amber-train main.py#L111-L116).
RELEASED_REVISIONS = (
    (re.compile(r"^step(?P<n>\d+)$"), "step"),
    (re.compile(r"^stage\d+-step(?P<n>\d+)(-tokens\d+[TB])?$"), "step"),
    (re.compile(r"^ckpt_(?P<n>\d+)$"), "chunk"),
)


def revision_position(revision: str) -> tuple[str, int] | None:
    """("step", S) or ("chunk", N) for a released revision name; None for another name (main, a commit...)."""
    for pattern, unit in RELEASED_REVISIONS:
        found = pattern.match(revision)
        if found:
            return unit, int(found["n"])
    return None


class ReleasedOrder(GlobalOrder):
    """A publisher's order from step `start_step` on; `steps` is how many global batches it has (None: unbounded)."""

    steps: int | None
    name: str

    def __init__(self, sizes: list[int], global_batch_size: int, start_step: int) -> None:
        self.sizes = list(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])
        self.global_batch_size = global_batch_size
        self.start_step = start_step

    @property
    def data_steps(self) -> int | None:  # global batches left from start_step on
        return None if self.steps is None else max(self.steps - self.start_step, 0)

    def released_batch(self, step: int) -> np.ndarray:
        """Global batch `step` of the released run, as indices into the sources' concatenation."""
        raise NotImplementedError

    def global_batch(self, step: int) -> np.ndarray:
        released = self.start_step + step
        if self.steps is not None and released >= self.steps:
            raise UserError(
                f"The data of order {self.name} ends after released step {self.steps} (global batch "
                f"{self.global_batch_size}); this run asked for step {released}. Lower trainer.max_steps to "
                f"{self.steps - self.start_step} or add data."
            )
        flat = self.released_batch(released)
        source = np.searchsorted(self.offsets, flat, side="right") - 1
        return np.stack([source, flat - self.offsets[source]], axis=1)

    def steps_of(self, source: int, index: int) -> list[int]:
        """Released steps whose global batch holds sample `index` of source `source` (each epoch's, when several)."""
        raise NotImplementedError


class SequentialOrder(ReleasedOrder):
    name = "sequential"

    def __init__(self, sizes: list[int], global_batch_size: int, start_step: int) -> None:
        super().__init__(sizes, global_batch_size, start_step)
        self.steps = int(self.offsets[-1]) // global_batch_size

    def released_batch(self, step: int) -> np.ndarray:
        return np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size, dtype=np.int64)

    def steps_of(self, source: int, index: int) -> list[int]:
        step = (int(self.offsets[source]) + index) // self.global_batch_size
        return [step] if step < self.steps else []


class OlmoOrder(ReleasedOrder):
    """OLMo's global indices: epoch e is `Generator(PCG64(seed + first_epoch + e)).shuffle(arange(N, uint32))`
    over the N instances; batches do not straddle epochs (the last N mod G indices of each are not trained)."""

    name = "olmo"

    def __init__(
        self,
        sizes: list[int],
        global_batch_size: int,
        start_step: int,
        seed: int,
        first_epoch: int = 0,
        global_indices: str | None = None,
    ) -> None:
        super().__init__(sizes, global_batch_size, start_step)
        self.seed, self.first_epoch = seed, first_epoch
        self.instances = int(self.offsets[-1])
        self.file: np.ndarray | None = None
        if global_indices is not None:
            self.file = read_global_indices(Path(global_indices).expanduser(), self.instances)
        size = len(self.file) if self.file is not None else self.instances
        self.steps_per_epoch = size // global_batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"data.order=olmo: {size} instances are fewer than one global batch of {global_batch_size}."
            )
        self.steps = self.steps_per_epoch if self.file is not None else None  # a given file is one epoch
        self._epoch: tuple[int, np.ndarray] | None = None

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The global indices of epoch `epoch` (0: the first this order trains), computed once and kept."""
        if self.file is not None:
            return self.file
        if self._epoch is None or self._epoch[0] != epoch:
            dtype = np.uint32 if self.instances < 2**32 else np.uint64
            indices = np.arange(self.instances, dtype=dtype)
            np.random.Generator(np.random.PCG64(self.seed + self.first_epoch + epoch)).shuffle(indices)
            self._epoch = (epoch, indices)
        return self._epoch[1]

    def released_batch(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        size = self.global_batch_size
        return self.epoch_indices(epoch)[within * size : (within + 1) * size].astype(np.int64)

    def steps_of(self, source: int, index: int, epochs: int = 1) -> list[int]:
        flat = int(self.offsets[source]) + index
        steps = []
        for epoch in range(epochs if self.file is None else 1):
            (position,) = np.nonzero(self.epoch_indices(epoch) == flat)
            if len(position) and position[0] < self.steps_per_epoch * self.global_batch_size:
                steps.append(epoch * self.steps_per_epoch + int(position[0]) // self.global_batch_size)
        return steps


def read_global_indices(path: Path, instances: int) -> np.ndarray:
    """OLMo's global_indices.npy: raw uint32 written through np.memmap (OLMo iterable_dataset.py#L80-L86), or a
    standard .npy array; memory-mapped, every index checked to be < instances."""
    if not path.is_file():
        raise UserError(f"data.global_indices={str(path)!r} does not exist.")
    with path.open("rb") as f:
        is_npy = f.read(6) == b"\x93NUMPY"
    indices = np.load(path, mmap_mode="r") if is_npy else np.memmap(path, dtype=np.uint32, mode="r")
    if indices.ndim != 1 or indices.dtype.kind not in "ui":
        raise UserError(
            f"data.global_indices={str(path)!r} holds a {indices.dtype} array of shape {indices.shape}; expected "
            "one dimension of unsigned integers (OLMo's raw uint32 file, or a .npy)."
        )
    largest = int(indices.max()) if len(indices) else -1
    if largest >= instances:
        raise UserError(
            f"data.global_indices={str(path)!r} names instance {largest}, but data.sources hold {instances} "
            "instances of data.seq_len tokens: the file belongs to other sources, another file order or another "
            "data.seq_len."
        )
    return indices


class ChunkOrder(ReleasedOrder):
    """LLM360: each file a chunk, numbered by the number in its name (train_121.jsonl: chunk 121; else by position),
    each trained for S = floor(lines / G) steps, its other lines never. As amber-train numbers steps (main.py#L66),
    batch k of chunk c is released step c·S + k, so a subset of the chunks (those after a checkpoint) is enough;
    the chunks must all have S steps.

    A chunk's lines are trained in file order or, with shuffle "amber", as amber-train drew them: one legacy NumPy
    permutation per chunk, drawn in chunk order after `np.random.seed(11111 + first chunk of the launch)`.
    amber-train reseeded at every relaunch; LLM360 did not publish when it relaunched, so the released run's
    permutations cannot be recovered. Here the launch is the chunk `start_step` falls in, fixed for the run, so a
    resumed lit-open run keeps its order.
    """

    name = "llm360"

    def __init__(
        self,
        sizes: list[int],
        file_samples: list[int],
        file_names: list[str],
        global_batch_size: int,
        start_step: int,
        shuffle: str = "none",
    ) -> None:
        """sizes: samples per source; file_samples, file_names: per file of all the sources, in order (the chunks)."""
        super().__init__(sizes, global_batch_size, start_step)
        self.file_samples = list(file_samples)
        self.file_offsets = np.concatenate([[0], np.cumsum(np.asarray(file_samples, dtype=np.int64))])
        self.chunk_ids = chunk_numbers(file_names)
        self.file_of_chunk = {chunk: f for f, chunk in enumerate(self.chunk_ids)}
        self.chunk_steps = chunk_steps(file_samples, file_names, global_batch_size)
        self.shuffle = shuffle
        self.launch_chunk = start_step // self.chunk_steps
        last = self.launch_chunk  # the chunks present from the launch on, without a gap, are what can be trained
        while last in self.file_of_chunk:
            last += 1
        self.steps = max(last * self.chunk_steps, start_step)
        self._drawn: tuple[int, np.ndarray, np.random.RandomState] | None = None  # last chunk drawn

    def chunk_lines(self, chunk: int) -> np.ndarray:
        """The lines of chunk `chunk` in the order they are trained (the first S·G of them)."""
        used = self.chunk_steps * self.global_batch_size
        if self.shuffle == "none":
            return np.arange(used, dtype=np.int64)
        if chunk < self.launch_chunk:
            raise ValueError(f"chunk {chunk} precedes this order's launch chunk {self.launch_chunk}")
        if self._drawn is None or self._drawn[0] > chunk:
            state = np.random.RandomState(AMBER_SEED + self.launch_chunk)
            self._drawn = (self.launch_chunk - 1, np.empty(0, np.int64), state)
        current, lines, state = self._drawn
        while current < chunk:  # the draws of the chunks in between come first, as in amber-train's loop
            current += 1
            lines = state.permutation(self.file_samples[self.file_of_chunk[current]])
        self._drawn = (current, lines, state)
        return lines[:used].astype(np.int64)

    def released_batch(self, step: int) -> np.ndarray:
        chunk, within = divmod(step, self.chunk_steps)
        size = self.global_batch_size
        f = self.file_of_chunk[chunk]  # present: global_batch checked step < steps
        return int(self.file_offsets[f]) + self.chunk_lines(chunk)[within * size : (within + 1) * size]

    def steps_of(self, source: int, index: int) -> list[int]:
        flat = int(self.offsets[source]) + index
        f = int(np.searchsorted(self.file_offsets, flat, side="right")) - 1
        chunk = self.chunk_ids[f]
        if self.shuffle == "amber" and chunk < self.launch_chunk:
            return []  # trained before this order's launch: its permutation is not known
        (position,) = np.nonzero(self.chunk_lines(chunk) == flat - int(self.file_offsets[f]))
        if not len(position):
            return []  # one of the lines past the chunk's last full batch: never trained
        return [chunk * self.chunk_steps + int(position[0]) // self.global_batch_size]


def chunk_numbers(names: list[str]) -> list[int]:
    """Each chunk file's number: the last number in its name when every name has one and they increase
    (train_000.jsonl, chunk_7.jsonl), else its position."""
    found = [re.findall(r"\d+", name) for name in names]
    if all(found):
        numbers = [int(f[-1]) for f in found]
        if all(a < b for a, b in zip(numbers, numbers[1:])):
            return numbers
    return list(range(len(names)))


def chunk_steps(file_samples: list[int], file_names: list[str], global_batch_size: int) -> int:
    """S, the steps every chunk trains: floor(lines / G), the same for each chunk (amber-train's step numbering)."""
    steps = {n // global_batch_size for n in file_samples}
    if len(steps) != 1 or 0 in steps:
        listing = ", ".join(f"{name}: {n:,} lines" for name, n in list(zip(file_names, file_samples))[:6])
        raise UserError(
            f"data.order=llm360 trains each chunk file for floor(lines / data.global_batch_size="
            f"{global_batch_size}) steps, which must be the same number, at least 1, for every file ({listing}"
            f"{', ...' if len(file_names) > 6 else ''}). Give the publisher's chunk files and global batch (Amber: "
            "1,706,976 lines, 2240), or data.order=sequential to read the files one after another."
        )
    return steps.pop()


def build_released_order(
    order: str,
    sizes: list[int],
    files: list[tuple[str, int]],
    global_batch_size: int,
    start_step: int,
    *,
    seed: int,
    first_epoch: int = 0,
    global_indices: str | None = None,
    chunk_shuffle: str = "none",
) -> ReleasedOrder:
    """The released order `order` over sources of `sizes` samples (their files: (name, samples), in order)."""
    if order == "sequential":
        return SequentialOrder(sizes, global_batch_size, start_step)
    if order == "olmo":
        return OlmoOrder(sizes, global_batch_size, start_step, seed, first_epoch, global_indices)
    names, samples = [name for name, _ in files], [n for _, n in files]
    return ChunkOrder(sizes, samples, names, global_batch_size, start_step, chunk_shuffle)


def start_from_revision(revision: str | None, order: str, files: list[tuple[str, int]], global_batch_size: int) -> int:
    """The released step a run starting from released weights at `revision` continues at (0 for no revision or
    one that names no position, such as main)."""
    position = revision_position(revision) if revision else None
    if position is None:
        return 0
    unit, n = position
    if unit == "step":
        return n
    if order != "llm360":
        raise UserError(
            f"init_from's revision {revision!r} counts LLM360 chunks (ckpt_N: chunks 0..N trained), which only "
            f"data.order=llm360 knows; with data.order={order}, give the released step with data.start_step=STEP."
        )
    names, samples = [name for name, _ in files], [k for _, k in files]
    return (n + 1) * chunk_steps(samples, names, global_batch_size)  # the first step of chunk n + 1
