"""Selection policies are pure functions; check them on their own."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.selection import (
    kept_dropped_means,
    random_indices,
    selection_active,
    selection_generator,
    spearman,
    topk_indices,
    topk_overlap,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=64), st.data())
def test_topk_keeps_exactly_the_k_highest(values, data):
    scores = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, len(values)))
    kept = topk_indices(scores, k)
    assert kept.shape == (k,)
    assert torch.equal(kept, torch.sort(kept).values) and len(set(kept.tolist())) == k
    dropped = sorted(set(range(len(values))) - set(kept.tolist()))
    if dropped:
        assert scores[kept].min() >= scores[dropped].max()


def test_topk_ties_go_to_the_lower_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    assert topk_indices(scores, 2).tolist() == [1, 2]
    assert topk_indices(torch.zeros(6), 3).tolist() == [0, 1, 2]


def test_random_selection_is_reproducible_distinct_and_ignores_scores():
    scores = torch.arange(16.0)
    a = random_indices(scores, 8, selection_generator(0, 5, 1))
    b = random_indices(-scores, 8, selection_generator(0, 5, 1))
    c = random_indices(scores, 8, selection_generator(0, 6, 1))
    d = random_indices(scores, 8, selection_generator(0, 5, 0))
    assert torch.equal(a, b) and len(set(a.tolist())) == 8
    assert not torch.equal(a, c) and not torch.equal(a, d)
    with pytest.raises(ValueError, match="generator"):
        random_indices(scores, 8, None)


def test_random_selection_is_uniform():
    counts = torch.zeros(8)
    for draw in range(2000):
        counts[random_indices(torch.zeros(8), 4, selection_generator(1, draw, 0))] += 1
    assert torch.all((counts / 2000 - 0.5).abs() < 0.05)


def test_schedule_warmup_and_stop_fraction():
    kw = dict(total_steps=100, warmup_steps=10, stop_fraction=0.5)
    assert [selection_active(s, **kw) for s in (0, 9, 10, 49, 50, 99)] == [False, False, True, True, False, False]
    assert selection_active(99, total_steps=100, warmup_steps=0, stop_fraction=None)


def test_statistics():
    scores = torch.tensor([4.0, 1.0, 3.0, 2.0])
    kept_mean, dropped_mean = kept_dropped_means(scores, torch.tensor([0, 2]))
    assert kept_mean.item() == 3.5 and dropped_mean.item() == 1.5
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x * 10 + 3).item() == pytest.approx(1.0)
    assert spearman(x, -x).item() == pytest.approx(-1.0)
    assert spearman(x, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])).item() == pytest.approx(0.8)
    assert spearman(x, torch.ones(5)).item() == 0.0
    assert topk_overlap(x, x, 2).item() == 1.0
    assert topk_overlap(x, -x, 2).item() == 0.0
    assert topk_overlap(x, torch.tensor([0.0, 0.0, 0.0, 9.0, 0.0]), 2).item() == 0.5


def test_selection_scope_simulation(tmp_path):
    from benchmarks.probes.selection_scope import main, per_rank_and_global, simulate

    # Rank 0 holds every high score: the global top 4 is all of rank 0, per rank keeps 2 of each.
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 3.0, 4.0]])
    local, glob = per_rank_and_global(scores, 2)
    assert local.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert glob.tolist() == [[True, True, True, True], [False, False, False, False]]
    assert simulate(1, 16, 8, trials=5)["overlap"] == 1.0  # one rank: the same selection
    assert simulate(4, 4, 2, trials=5, shift=100.0)["overlap"] == 0.5  # ranks far apart: as above
    iid = simulate(8, 64, 32, trials=50)["overlap"]
    assert 0.9 < iid < 1.0  # iid ranks: close to, not equal to, the global selection
    assert main(["--out", str(tmp_path), "--worlds", "2", "--shifts", "0.1", "--trials", "3"]) == 0
    assert "| 2 | 0 |" in (tmp_path / "selection_scope.md").read_text()
