"""The global data order: a bijective shuffle per epoch, exact mixture weights, and O(1) positions."""

import numpy as np
import pytest

from lit_open.data.order import DataOrder, Permutation, PhasedOrder


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097, 65537])
def test_permutation_is_a_bijection(n):
    out = Permutation(n, key=7)(np.arange(n))
    assert np.array_equal(np.sort(out), np.arange(n))


def test_permutation_depends_on_key_and_looks_shuffled():
    n = 10_000
    a, b = Permutation(n, 1)(np.arange(n)), Permutation(n, 2)(np.arange(n))
    assert not np.array_equal(a, b)
    assert (a == np.arange(n)).mean() < 0.01  # hardly any fixed points
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05  # no trace of the input order


def replay(order: DataOrder, steps: int) -> np.ndarray:
    return np.concatenate([order.global_batch(s) for s in range(steps)])


def test_weights_are_met_within_one_sample_per_source():
    order = DataOrder([5000, 3000, 700], [0.5, 0.3, 0.2], global_batch_size=64, seed=3)
    samples = replay(order, 200)  # 12,800 samples
    counts = np.bincount(samples[:, 0], minlength=3)
    assert np.all(np.abs(counts - np.array([0.5, 0.3, 0.2]) * len(samples)) <= 1.5)
    # every global batch is itself mixed, not long runs of one source
    first = order.global_batch(0)[:, 0]
    assert set(first.tolist()) == {0, 1, 2}


def test_consumed_before_matches_replay_and_costs_nothing_at_large_steps():
    order = DataOrder([100, 37], [0.7, 0.3], global_batch_size=16, seed=0)
    counts = np.zeros(2, dtype=np.int64)
    for step in range(300):
        assert np.array_equal(order.consumed_before(step), counts)
        counts += np.bincount(order.global_batch(step)[:, 0], minlength=2)
    big = DataOrder([10**9, 10**8], [0.9, 0.1], global_batch_size=512, seed=1)
    batch = big.global_batch(3_000_000)  # 1.5B samples into the run, computed directly
    assert batch.shape == (512, 2) and batch[:, 1].max() < 10**9


def test_each_epoch_of_a_source_visits_every_sample_once_in_a_new_order():
    order = DataOrder([50], [1.0], global_batch_size=10, seed=5)
    samples = replay(order, 10)[:, 1]  # two epochs
    first, second = samples[:50], samples[50:]
    assert sorted(first) == list(range(50)) and sorted(second) == list(range(50))
    assert not np.array_equal(first, second)


def test_order_is_a_pure_function_of_seed_and_step():
    a = DataOrder([300, 200], [0.6, 0.4], 32, seed=11)
    b = DataOrder([300, 200], [0.6, 0.4], 32, seed=11)
    c = DataOrder([300, 200], [0.6, 0.4], 32, seed=12)
    assert np.array_equal(a.global_batch(57), b.global_batch(57))
    assert not np.array_equal(a.global_batch(57), c.global_batch(57))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_partition_the_global_batch(world_size):
    order = DataOrder([300, 200], [0.6, 0.4], 32, seed=11)
    slices = [order.rank_slice(9, r, world_size) for r in range(world_size)]
    assert np.array_equal(np.concatenate(slices), order.global_batch(9))
    seen = {tuple(x) for s in slices for x in s}
    assert len(seen) == 32  # disjoint


# -- phases: a mixture switch at a given global batch (e.g. an anneal's high-quality mix) ------------------------


def test_one_phase_is_the_plain_order():
    phased = PhasedOrder([300, 200], [(0, [0, 1], [0.6, 0.4])], 32, seed=11)
    plain = DataOrder([300, 200], [0.6, 0.4], 32, seed=11)
    for step in (0, 1, 7, 50):
        assert np.array_equal(phased.global_batch(step), plain.global_batch(step))


def test_switch_draws_only_the_new_mixture_and_a_shared_source_continues_its_stream():
    # source 0 (1000 samples) alone for 10 batches of 16, then half source 0, half source 1 (new)
    phased = PhasedOrder([1000, 500], [(0, [0], [1.0]), (10, [0, 1], [0.5, 0.5])], 16, seed=3)
    before = np.concatenate([phased.global_batch(s) for s in range(10)])
    after = np.concatenate([phased.global_batch(s) for s in range(10, 40)])
    assert set(before[:, 0].tolist()) == {0}
    assert np.bincount(after[:, 0], minlength=2).tolist() == [240, 240]  # the new weights, exactly
    # 160 + 240 = 400 samples of source 0, all distinct: the second phase did not start its epoch over
    read = np.concatenate([before[before[:, 0] == 0, 1], after[after[:, 0] == 0, 1]])
    assert len(read) == 400 and len(np.unique(read)) == 400
    # and they are the first 400 of source 0's epoch-0 permutation, as if the run had read it without a switch
    alone = np.concatenate([DataOrder([1000], [1.0], 16, seed=3).global_batch(s) for s in range(25)])
    assert sorted(read.tolist()) == sorted(alone[:, 1].tolist())


def test_phases_must_start_at_zero_and_increase():
    with pytest.raises(ValueError, match="start at global batch 0"):
        PhasedOrder([10], [(5, [0], [1.0])], 2, seed=0)
