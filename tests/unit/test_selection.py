"""Selection policies are pure functions; check them on their own."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.selection import (
    effective_share,
    importance_indices,
    inclusion_probabilities,
    kept_dropped_means,
    random_indices,
    selection_active,
    selection_generator,
    spearman,
    stratified_indices,
    systematic_sample,
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


# ----------------------------------------------------------------------------- weighted policies


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=48), st.data())
def test_stratified_keeps_every_row_above_and_weights_the_draw_below(values, data):
    scores = torch.tensor(values, dtype=torch.float32)
    G = len(values)
    k = data.draw(st.integers(1, G - 1))
    quantile = data.draw(st.none() | st.floats(0.05, 0.95))
    kept = stratified_indices(scores, k, selection_generator(0, data.draw(st.integers(0, 99)), 0), quantile=quantile)
    idx, w = kept.indices, kept.weights
    threshold = scores.mean() if quantile is None else torch.quantile(scores, quantile)
    above = scores > threshold
    n_above = int(above.sum())
    assert idx.shape == (k,) and torch.equal(idx, torch.sort(idx).values) and len(set(idx.tolist())) == k
    assert kept.stats["stratified_overflow"].item() == float(n_above >= k)
    if n_above >= k:  # cannot be unbiased: the top k with weight 1
        assert torch.equal(idx, topk_indices(scores, k)) and torch.all(w == 1)
    else:
        assert set(torch.nonzero(above).flatten().tolist()) <= set(idx.tolist())
        assert torch.all(w[above[idx]] == 1)
        assert torch.allclose(w[~above[idx]], torch.tensor((G - n_above) / (k - n_above)))


def test_stratified_draws_the_rows_below_uniformly():
    scores = torch.tensor([9.0, 8.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # 2 above the mean, 6 below
    counts = torch.zeros(8)
    for draw in range(3000):
        kept = stratified_indices(scores, 4, selection_generator(2, draw, 0))
        counts[kept.indices] += 1
    assert counts[:2].tolist() == [3000, 3000]
    assert torch.all((counts[2:] / 3000 - 2 / 6).abs() < 4 * (2 / 6 * 4 / 6 / 3000) ** 0.5)


def test_effective_rows_is_kish_share():
    assert effective_share(torch.ones(16)).item() == pytest.approx(1.0)
    # the studies' stratified draw at q = 0.75, G = 32, B = 16: 8 rows of weight 1, 8 of weight 3
    assert effective_share(torch.tensor([1.0] * 8 + [3.0] * 8)).item() == pytest.approx(12.8 / 16)
    scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    kept = stratified_indices(scores, 6, selection_generator(0, 1, 0), quantile=0.75)
    assert kept.stats["effective_rows"].item() == pytest.approx(effective_share(kept.weights).item())
    assert kept.stats["effective_rows"].item() < 1


def _capped_iteratively(q: torch.Tensor, k: int) -> torch.Tensor:
    """The textbook rule, step by step: cap what exceeds 1, share the rest in proportion, repeat."""
    capped = torch.zeros_like(q, dtype=torch.bool)
    while True:
        pi = torch.where(capped, 1.0, (k - capped.sum()) * q / q[~capped].sum())
        if not torch.any(pi[~capped] > 1):
            return pi
        capped |= pi > 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=40), st.data())
def test_inclusion_probabilities_follow_the_capping_rule(sizes, data):
    q = torch.tensor(sizes, dtype=torch.float64) ** 2  # squared: often several rows capped
    k = data.draw(st.integers(1, len(sizes)))
    pi = inclusion_probabilities(q, k)
    assert torch.allclose(pi, _capped_iteratively(q, k), rtol=1e-9, atol=1e-12)
    assert pi.sum().item() == pytest.approx(k) and torch.all(pi <= 1) and torch.all(pi > 0)


def test_systematic_sampling_has_exactly_the_inclusion_probabilities():
    """Empirical inclusion frequencies over many keyed draws match pi within 4 standard errors, and every
    draw keeps k distinct rows."""
    q = torch.tensor([5.0, 3.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.2, 0.1, 0.1, 4.0, 0.05])
    k, n = 5, 4000
    pi = inclusion_probabilities(q, k)
    assert (pi == 1).sum() >= 1 and (pi < 1).sum() >= 8  # some rows certain, most not
    counts = torch.zeros(len(q), dtype=torch.float64)
    for draw in range(n):
        idx = systematic_sample(pi, k, selection_generator(3, draw, 0))
        assert idx.shape == (k,) and len(set(idx.tolist())) == k and torch.equal(idx, torch.sort(idx).values)
        counts[idx] += 1
    se = (pi * (1 - pi) / n).sqrt()
    assert torch.all((counts / n - pi).abs() <= 4 * se + 1e-12), (counts / n, pi)


def test_importance_weights_are_inverse_inclusion_probabilities():
    scores = torch.tensor([3.0, 2.5, 0.1, 0.2, 1.0, 0.0, 0.3, 0.4])
    kept = importance_indices(scores, 4, selection_generator(0, 7, 1), temperature=0.5, uniform_mix=0.2)
    sizes = 0.8 * torch.softmax(scores.double() / 0.5, 0) + 0.2 / 8
    pi = inclusion_probabilities(sizes, 4)
    assert torch.allclose(kept.weights.double(), 1 / pi[kept.indices], rtol=1e-6)
    assert kept.stats["importance_capped"].item() == (pi[kept.indices] == 1).float().mean().item()
    w = kept.weights.double()
    assert kept.stats["effective_rows"].item() == pytest.approx((w.sum() ** 2 / (4 * (w * w).sum())).item())
    again = importance_indices(scores, 4, selection_generator(0, 7, 1), temperature=0.5, uniform_mix=0.2)
    assert torch.equal(kept.indices, again.indices)  # keyed on (seed, draw, rank): a resume draws the same
    with pytest.raises(ValueError, match="generator"):
        importance_indices(scores, 4, None)
    # uniform_mix = 1 ignores the scores: every row has pi = k / G, every weight G / k
    flat = importance_indices(scores, 4, selection_generator(0, 7, 1), uniform_mix=1.0)
    assert torch.allclose(flat.weights, torch.full((4,), 2.0))
