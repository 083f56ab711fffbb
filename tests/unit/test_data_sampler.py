"""The sampler's order as pure functions: exactly once per epoch, disjoint ranks, exact resume."""

from __future__ import annotations

from itertools import islice
from math import factorial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline.sampler import (
    DrawSampler,
    EpochPermutation,
    draw_start,
    epoch_permutation,
    positions_to_samples,
    rank_indices,
)


def cycle_sizes(sizes: list[int]):
    return lambda d: sizes[d % len(sizes)]


def global_draws(n, seed, world, size_fn, start_draw, consumed, draws):
    """Per draw: the concatenation of every rank's (ids, epochs), rank 0 first."""
    samplers = [
        iter(DrawSampler(n, seed=seed, rank=r, world_size=world, size_fn=size_fn, start_draw=start_draw,
                         consumed_samples=consumed))
        for r in range(world)
    ]  # fmt: skip
    out = []
    for _ in range(draws):
        reqs = [next(s) for s in samplers]
        assert len({q.draw for q in reqs}) == 1
        out.append((np.concatenate([q.sample_ids for q in reqs]), np.concatenate([q.epochs for q in reqs])))
    return out


@pytest.mark.parametrize("n", [1, 2, 7, 100, 32768 * 2 + 5])
def test_epoch_permutation_is_a_deterministic_permutation(n):
    p = epoch_permutation(3, 1, n)
    assert np.array_equal(np.sort(p), np.arange(n))
    assert np.array_equal(p, epoch_permutation(3, 1, n))
    if n > 10:
        assert not np.array_equal(p, epoch_permutation(3, 2, n))
        assert not np.array_equal(p, epoch_permutation(4, 1, n))


def test_epoch_permutation_is_uniform_on_small_n():
    # All 4! orders should appear about equally often over many epochs.
    counts: dict[tuple, int] = {}
    trials = 4800
    for e in range(trials):
        key = tuple(epoch_permutation(0, e, 4).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == factorial(4)
    expected = trials / factorial(4)
    assert all(abs(c - expected) < 0.3 * expected for c in counts.values()), counts


def test_lazy_permutation_equals_the_full_one_in_any_access_order():
    n = 32768 * 5 + 11
    full = epoch_permutation(7, 2, n)
    lazy = EpochPermutation(7, 2, n)
    rng = np.random.default_rng(0)
    for offsets in (np.array([n - 40_000, 3]), rng.integers(0, n, 1000), np.arange(n - 5, n)):
        assert np.array_equal(lazy.take(offsets), full[offsets])
    assert np.array_equal(EpochPermutation(7, 2, n).take(np.arange(n)), full)


def test_bucketed_permutation_spreads_rows_across_the_whole_range():
    n = 32768 * 4
    p = epoch_permutation(0, 0, n).astype(np.int64)
    # A two-pass shuffle must still move rows far: the first quarter holds rows from every quarter.
    quarters = np.bincount(p[: n // 4] // (n // 4), minlength=4)
    assert quarters.min() > 0.2 * (n // 4)


@settings(max_examples=60, deadline=None, database=None)
@given(
    n=st.integers(1, 40),
    world=st.integers(1, 8),
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_sample_exactly_once_per_epoch_and_ranks_disjoint(n, world, sizes, seed):
    size_fn = cycle_sizes(sizes)
    draws = global_draws(n, seed, world, size_fn, 0, 0, draws=12)
    ids = np.concatenate([d[0] for d in draws])
    epochs = np.concatenate([d[1] for d in draws])
    total = len(ids)
    # The global stream is the concatenation of the per-epoch permutations: nothing dropped or repeated.
    stream_ids, stream_epochs = positions_to_samples(seed, n, np.arange(total))
    assert np.array_equal(ids, stream_ids) and np.array_equal(epochs, stream_epochs)
    assert np.array_equal(epochs, np.arange(total) // n)
    for e in range(total // n):  # every complete epoch holds every row exactly once
        assert np.array_equal(np.sort(ids[e * n : (e + 1) * n]), np.arange(n))
    # Within a draw, ranks never share a (row, epoch) pair.
    for d, (draw_ids, draw_epochs) in enumerate(draws):
        size = size_fn(d)
        assert len(draw_ids) == world * size
        pairs = set(zip(draw_ids.tolist(), draw_epochs.tolist(), strict=True))
        assert len(pairs) == world * size


@settings(max_examples=60, deadline=None, database=None)
@given(
    n=st.integers(1, 50),
    world_a=st.integers(1, 8),
    world_b=st.integers(1, 8),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    stop=st.integers(0, 9),
    seed=st.integers(0, 1000),
)
def test_resume_at_any_world_size_continues_the_stream_exactly(n, world_a, world_b, sizes, stop, seed):
    size_fn = cycle_sizes(sizes)
    before = global_draws(n, seed, world_a, size_fn, 0, 0, draws=stop)
    consumed = sum(world_a * size_fn(d) for d in range(stop))
    after = global_draws(n, seed, world_b, size_fn, stop, consumed, draws=5)
    ids = np.concatenate([d[0] for d in before + after])
    stream_ids, _ = positions_to_samples(seed, n, np.arange(len(ids)))
    assert np.array_equal(ids, stream_ids)


@settings(max_examples=40, deadline=None, database=None)
@given(
    n=st.integers(1, 30),
    world=st.integers(1, 8),
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    start=st.integers(0, 4),
    consumed=st.integers(0, 100),
)
def test_sampler_matches_the_pure_functions(n, world, sizes, start, consumed):
    size_fn = cycle_sizes(sizes)
    for rank in range(world):
        sampler = DrawSampler(n, seed=5, rank=rank, world_size=world, size_fn=size_fn, start_draw=start,
                              consumed_samples=consumed)  # fmt: skip
        for req in islice(sampler, 4):
            pos = draw_start(consumed, start, req.draw, world, size_fn)
            ids, epochs = rank_indices(5, pos, size_fn(req.draw), rank, world, n)
            assert np.array_equal(req.sample_ids, ids) and np.array_equal(req.epochs, epochs)
            assert req.sample_ids.dtype == np.int64


def test_unshuffled_stream_is_in_order():
    ids, epochs = rank_indices(0, consumed=8, size=4, rank=1, world_size=2, n=10, shuffle=False)
    assert ids.tolist() == [2, 3, 4, 5] and epochs.tolist() == [1, 1, 1, 1]


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        DrawSampler(0, seed=0, rank=0, world_size=1, size_fn=lambda d: 1)
    with pytest.raises(ValueError):
        DrawSampler(5, seed=0, rank=2, world_size=2, size_fn=lambda d: 1)
    with pytest.raises(ValueError):
        next(iter(DrawSampler(5, seed=0, rank=0, world_size=1, size_fn=lambda d: 0)))
    with pytest.raises(ValueError):
        draw_start(0, 3, 2, 1, lambda d: 1)
