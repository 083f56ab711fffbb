"""VCAS's sampling maths (engine/methods/vcas/ops.py): soft top-k, Bernoulli unbiasedness, the mass
fraction, the analytic leverage-sampling variance, stateless streams."""

from __future__ import annotations

import pytest
import torch

from engine.methods.vcas import ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 3, 17, 63])
def test_soft_topk_sums_to_k_and_stays_a_probability(dtype, k):
    g = torch.Generator().manual_seed(k)
    x = (torch.rand(64, generator=g) ** 4 * 1e-3).to(dtype)  # skewed, and tiny: fp16 maths would underflow
    x[:5] = 0
    p = ops.keep_probabilities(x, k)
    assert p.dtype in (torch.float32, torch.float64)
    assert torch.all((p >= 0) & (p <= 1)) and torch.all(p[:5] == 0)
    assert float(p.sum()) == pytest.approx(min(k, int((x > 0).sum())), rel=1e-5)  # all positives when fewer
    # p is proportional to x below the clamp: the water level is one constant
    free = (p < 1) & (x > 0)
    if free.any():
        c = p[free].double() / x[free].double()
        assert float(c.max() / c.min()) == pytest.approx(1.0, rel=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5)
        assert torch.all(x[p == 1].double() >= x[free].double().max() - 1e-12)


def test_soft_topk_edge_cases():
    assert torch.equal(ops.keep_probabilities(torch.tensor([0.0, 2.0, 1.0]), 3), torch.ones(3))
    # fewer positives than k: each positive is kept for sure, zeros never (no 0 / 0)
    p = ops.keep_probabilities(torch.tensor([0.0, 5.0, 0.0, 1.0, 0.0]), 3)
    assert torch.equal(p, torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(ops.keep_probabilities(torch.zeros(4), 2), torch.zeros(4))
    with pytest.raises(ValueError, match="k must be >= 1"):
        ops.keep_probabilities(torch.ones(4), 0)
    assert ops.count_for(0.001, 10) == 1 and ops.count_for(0.5, 10) == 5 and ops.count_for(1.0, 7) == 7
    assert ops.count_for(0.3, 10) == 3  # 0.3 * 10 is 2.9999999999999996 in floating point


def test_bernoulli_mask_over_p_is_unbiased():
    x = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.0, 3.0])
    p = ops.keep_probabilities(x, 3)
    R = 40_000
    gen = ops.generator(ops.base_key(0, 1), "cpu")
    draws = torch.stack([ops.bernoulli(p, gen) for _ in range(R)]).double()
    est = (draws / p.double().clamp(min=1e-30)).mean(0)  # E[mask / p] = 1 where p > 0
    se = (draws / p.double().clamp(min=1e-30)).std(0) / R ** 0.5
    pos = p > 0
    assert torch.all((est[pos] - 1).abs() <= 5 * se[pos] + 1e-12)
    assert float(draws.sum(1).mean()) == pytest.approx(3.0, abs=0.05)  # k rows kept on average


def test_mass_fraction():
    norms = torch.tensor([5.0, 3.0, 1.0, 1.0])  # total 10
    assert ops.mass_fraction(norms, 0.5) == 0.25  # 5 holds half
    assert ops.mass_fraction(norms, 0.51) == 0.5
    assert ops.mass_fraction(norms, 0.9) == 0.75
    assert ops.mass_fraction(norms, 1.0) == 1.0 and ops.mass_fraction(torch.zeros(3), 0.5) == 1.0
    assert ops.mass_fraction(norms, 0.0) == 0.25  # never below one row


def test_analytic_leverage_variance_matches_the_empirical_one():
    """sum_t (1/q_t - 1) |a_t|^2 |b_t|^2 is the variance of the leverage-sampled product, within 10%."""
    g = torch.Generator().manual_seed(0)
    K, n_out, n_in = 200, 6, 5
    A = torch.randn(K, n_out, generator=g, dtype=torch.float64) * torch.rand(K, 1, generator=g, dtype=torch.float64)
    B = torch.randn(K, n_in, generator=g, dtype=torch.float64)
    a_sq, b_sq = A.square().sum(1), B.square().sum(1)
    q = ops.keep_probabilities((a_sq * b_sq).sqrt(), 50)
    exact = A.t() @ B
    gen = ops.generator(ops.base_key(1, 2), "cpu")
    R = 4000
    sq = 0.0
    for _ in range(R):
        keep = ops.bernoulli(q, gen)
        est = (A[keep] / q[keep, None]).t() @ B[keep]
        sq += float((est - exact).square().sum())
    assert sq / R == pytest.approx(float(ops.leverage_variance(a_sq, b_sq, q)), rel=0.10)


def test_streams_are_stateless_and_distinct():
    k = ops.base_key(7, 3, 1)
    assert k == ops.base_key(7, 3, 1) and k != ops.base_key(7, 3, 0) and k != ops.base_key(7, 4, 1)
    a = torch.rand(5, generator=ops.generator(ops.mix(k, 2), "cpu"))
    assert torch.equal(a, torch.rand(5, generator=ops.generator(ops.mix(k, 2), "cpu")))
    assert not torch.equal(a, torch.rand(5, generator=ops.generator(ops.mix(k, 3), "cpu")))
    assert 0 <= ops.mix(2**64 - 1, 10**6) < 2**63
