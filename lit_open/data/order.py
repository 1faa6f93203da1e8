"""The global data order: which samples form global batch s, as a pure function of s.

The order is defined for the whole run first, independently of the number of processes: global batch s is a
list of (source, sample index) pairs. Each data-parallel rank then takes its contiguous slice. So a run can resume
on another number of GPUs, a 1-process run sees exactly the batches of a multi-process one, and the position in
the data is a single integer (the number of global batches consumed).

Mixing is stratified, not sampled: over every period of at least 2**16 samples, each source contributes its share
of the weights to within one sample, interleaved evenly (Webster/Sainte-Laguë order). Within a source, epoch e
visits the samples in a seeded pseudo-random permutation (a Feistel network over the index space), so any
position can be computed in O(1) without storing a permutation of billions of indices.
"""

from __future__ import annotations

import math

import numpy as np

_MIN_PERIOD_SAMPLES = 1 << 16
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a fast, well-distributed 64-bit hash (uint64 arithmetic wraps by design)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x & _MASK64


def hash_key(*parts: int) -> int:
    """One 64-bit key from several integers (seed, source, epoch...)."""
    key = np.zeros(1, dtype=np.uint64)
    for part in parts:
        with np.errstate(over="ignore"):
            key = _mix64(key ^ np.array([part & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return int(key[0])


class Permutation:
    """A seeded bijection of [0, n) computed index by index: a balanced Feistel network with cycle walking."""

    ROUNDS = 6

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self.half_bits = max(1, math.ceil(math.log2(n) / 2)) if n > 1 else 1
        self.half_mask = np.uint64((1 << self.half_bits) - 1)
        self.round_keys = [np.uint64(hash_key(key, r)) for r in range(self.ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.half_mask
        for round_key in self.round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & self.half_mask)
        return (left << shift) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        # The Feistel domain is the next power of 4 >= n (at most 4n); values that land outside [0, n) are
        # mapped again until they fall inside ("cycle walking"), which keeps the map a bijection of [0, n).
        x = self._feistel(np.asarray(index, dtype=np.uint64))
        outside = x >= self.n
        while outside.any():
            x[outside] = self._feistel(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)


class GlobalOrder:
    """Global batches as a pure function of the batch number; each data-parallel rank reads a contiguous slice."""

    global_batch_size: int
    name = "mixture"
    data_steps: int | None = None  # how many global batches the order has (None: it never ends)

    def global_batch(self, step: int) -> np.ndarray:
        """The samples of global batch `step`: an int64 array of shape (global_batch_size, 2) of (source, index)."""
        raise NotImplementedError

    def rank_slice(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """This data-parallel rank's contiguous share of global batch `step`."""
        per_rank = self.global_batch_size // world_size
        return self.global_batch(step)[rank * per_rank : (rank + 1) * per_rank]


class DataOrder(GlobalOrder):
    """Global batches of a weighted mixture of sources, as a pure function of the batch number."""

    def __init__(
        self,
        source_sizes: list[int],
        weights: list[float],
        global_batch_size: int,
        seed: int,
        *,
        source_ids: list[int] | None = None,
        start_positions: list[int] | None = None,
    ) -> None:
        """source_ids: the sources' numbers in the batches it returns and in their permutations' keys (default
        0..n-1); start_positions: samples of each source already read (by an earlier phase of the run), where its
        stream continues."""
        if len(source_sizes) != len(weights) or not source_sizes:
            raise ValueError("need one weight per source and at least one source")
        if min(source_sizes) < 1:
            raise ValueError(f"every source needs at least one sample, got sizes {source_sizes}")
        self.sizes = list(source_sizes)
        self.source_ids = np.asarray(source_ids if source_ids is not None else range(len(source_sizes)), np.int64)
        self.start_positions = np.asarray(start_positions or [0] * len(source_sizes), dtype=np.int64)
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.period_steps = math.ceil(_MIN_PERIOD_SAMPLES / global_batch_size)
        period = self.period_steps * global_batch_size
        self._period_sources = self._interleave(period)
        per_step = self._period_sources.reshape(self.period_steps, global_batch_size)
        onehot = per_step[:, :, None] == np.arange(len(self.sizes))[None, None, :]
        step_counts = onehot.sum(axis=1)
        # counts of each source consumed before step p of a period, p = 0..period_steps
        self._cumulative = np.vstack([np.zeros(len(self.sizes), np.int64), np.cumsum(step_counts, axis=0)])
        # the rank of each slot among the slots of the same source within its step
        self._ordinal_in_step = (np.cumsum(onehot, axis=1) - 1)[onehot].reshape(self.period_steps, -1)
        self._permutations: dict[tuple[int, int], Permutation] = {}

    def _interleave(self, period: int) -> np.ndarray:
        """Source of each slot of a period: slots sorted by the ideal times (j + 1/2) / w_i of each source."""
        keys, labels = [], []
        for source, weight in enumerate(self.weights):
            j = np.arange(math.ceil(period * weight) + 1)
            keys.append((j + 0.5) / weight)
            labels.append(np.full(len(j), source))
        order = np.lexsort((np.concatenate(labels), np.concatenate(keys)))
        return np.concatenate(labels)[order[:period]]

    @property
    def realized_weights(self) -> np.ndarray:
        return self._cumulative[-1] / self._cumulative[-1].sum()

    def consumed_before(self, step: int) -> np.ndarray:
        """Samples taken from each source by global batches 0 .. step-1."""
        cycles, offset = divmod(step, self.period_steps)
        return cycles * self._cumulative[-1] + self._cumulative[offset]

    def global_batch(self, step: int) -> np.ndarray:
        """The samples of global batch `step`: an int64 array of shape (global_batch_size, 2) of (source, index)."""
        offset = step % self.period_steps
        sources = self._period_sources[offset * self.global_batch_size : (offset + 1) * self.global_batch_size]
        position = self.start_positions[sources] + self.consumed_before(step)[sources] + self._ordinal_in_step[offset]
        epoch, within = np.divmod(position, np.asarray(self.sizes)[sources])
        index = np.empty_like(position)
        for source, e in np.unique(np.stack([sources, epoch], axis=1), axis=0):
            at = (sources == source) & (epoch == e)
            index[at] = self._permutation(int(source), int(e))(within[at])
        return np.stack([self.source_ids[sources], index], axis=1)

    def _permutation(self, source: int, epoch: int) -> Permutation:
        key = (source, epoch)
        if key not in self._permutations:
            if len(self._permutations) > 64:  # keep the cache small across many epochs of small sources
                self._permutations.clear()
            permutation_key = hash_key(self.seed, int(self.source_ids[source]), epoch)
            self._permutations[key] = Permutation(self.sizes[source], permutation_key)
        return self._permutations[key]


class PhasedOrder(GlobalOrder):
    """Mixtures that follow each other in one run: phase k supplies global batches [starts[k], starts[k+1]).

    Each phase mixes its own sources with its own weights (e.g. an anneal switching to a high-quality mix). The
    sources of all phases are numbered together; a source shared by several phases continues its stream where the
    earlier phases left it (same permutations, next positions), so no sample repeats before its epoch is over.
    """

    def __init__(
        self,
        sizes: list[int],
        phases: list[tuple[int, list[int], list[float]]],
        global_batch_size: int,
        seed: int,
    ) -> None:
        """sizes: samples of every source of the run; phases: (first global batch, source numbers, weights),
        the first starting at 0, in increasing order."""
        if not phases or phases[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(phases, phases[1:])):
            raise ValueError(f"phases must start at global batch 0 and increase, got starts {[p[0] for p in phases]}")
        self.sizes = list(sizes)
        self.global_batch_size = global_batch_size
        self.starts = [start for start, _, _ in phases]
        self.phases: list[DataOrder] = []
        read = np.zeros(len(sizes), dtype=np.int64)  # samples of each source read by the phases so far
        for k, (start, ids, weights) in enumerate(phases):
            order = DataOrder(
                [sizes[i] for i in ids],
                weights,
                global_batch_size,
                seed,
                source_ids=ids,
                start_positions=read[ids].tolist(),
            )
            self.phases.append(order)
            if k + 1 < len(phases):
                read[ids] += order.consumed_before(phases[k + 1][0] - start)

    def phase_of(self, step: int) -> int:
        return int(np.searchsorted(self.starts, step, side="right")) - 1

    def global_batch(self, step: int) -> np.ndarray:
        k = self.phase_of(step)
        return self.phases[k].global_batch(step - self.starts[k])
