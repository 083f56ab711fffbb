"""Weighted selection end to end on one gross batch: the model applies row weights as the loss contract
says (weights all 1 change nothing, bitwise), the cross-rank objective weighs ranks right, and over many
keyed draws the weighted loss and gradient of the kept rows average to the gross batch's, within a few
standard errors, while a 5% biased weighting is rejected by the same test."""

from __future__ import annotations

import copy

import pytest
import torch

from data_pipeline.batch import select_rows, weighted_rows
from engine import schedule
from engine.selection import importance_indices, selection_generator, stratified_indices
from tests.helpers import clm_batch, random_batch, tiny_decoder, tiny_model

G, B, DRAWS = 16, 8, 2000
POLICIES = {"stratified": lambda s, g: stratified_indices(s, B, g),
            "importance": lambda s, g: importance_indices(s, B, g, temperature=0.5, uniform_mix=0.1)}


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_weights_all_one_change_nothing_bitwise(family):
    model = tiny_model(seed=1, dropout=0.0) if family == "bert" else tiny_decoder(family, seed=1, dropout=0.0)
    batch = random_batch(G=B) if family == "bert" else clm_batch(G=B)
    twin = copy.deepcopy(model)
    plain, weighted = model(**batch), twin(**batch, row_weights=torch.ones(B))
    plain["loss"].backward()
    weighted["loss"].backward()
    for key, value in plain.items():
        assert torch.equal(value.float(), weighted[key].float()), key
    assert torch.equal(_grads(model), _grads(twin))


def test_bert_weighs_the_nsp_term_and_the_counts():
    model = tiny_model(seed=1, dropout=0.0)
    batch = random_batch(G=4)
    w = torch.tensor([1.0, 3.0, 2.0, 1.5])
    out = model(**batch, row_weights=w)
    rows = [model(**select_rows(batch, torch.tensor([i]))) for i in range(4)]
    loss_sum = sum(wi * r["loss_sum"] for wi, r in zip(w, rows))
    tokens = sum(wi * r["loss_tokens"] for wi, r in zip(w, rows))
    nsp = sum(wi * r["nsp_loss"] for wi, r in zip(w, rows)) / w.sum()
    torch.testing.assert_close(out["loss_sum"], loss_sum)
    torch.testing.assert_close(out["loss_tokens"], tokens)
    torch.testing.assert_close(out["nsp_loss"], nsp)
    torch.testing.assert_close(out["loss"], loss_sum / tokens + nsp)
    assert out["extra_weight"].item() == w.sum().item() == out["nsp_count"].item()


def test_cross_rank_objective_trains_two_weighted_ranks_like_one(monkeypatch):
    """Two ranks with different weights (simulated: all_reduce adds the other rank's tensor): the mean of
    their objectives, as DeepSpeed averages gradients, is the one-rank objective over all their rows."""
    model = tiny_model(seed=1, dropout=0.0)
    batch = random_batch(G=8, short_rows=4)
    w = torch.tensor([1.0, 4.0, 2.0, 1.0, 1.0, 1.0, 6.0, 3.0])
    halves = [torch.arange(4), torch.arange(4, 8)]
    outs = [model(**weighted_rows(batch, h, w[h])) for h in halves]
    monkeypatch.setattr(schedule, "_world", lambda: 2)
    losses = []
    for rank in (0, 1):
        other = outs[1 - rank]
        partner = torch.stack([other["loss_tokens"], other["extra_weight"]]).detach().float()
        monkeypatch.setattr(schedule.dist, "all_reduce", lambda t, p=partner: t.add_(p))
        losses.append(schedule.global_objective(outs[rank]))
    whole = model(**weighted_rows(batch, torch.arange(8), w))["loss"]
    torch.testing.assert_close((losses[0] + losses[1]) / 2, whole)


@pytest.fixture(scope="module")
def gross():
    """A tiny GPT-2 that has seen 10 of the 16 rows for a few steps (so the rows' losses differ, and the
    policies have something to select), and each row's loss sum, token count and gradient, projected on
    the gross batch's gradient direction and two random ones."""
    model = tiny_decoder("gpt2", seed=0, dropout=0.0)
    batch = clm_batch(G=G, seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        model(**select_rows(batch, torch.arange(10)))["loss"].backward()
        opt.step()
    model.zero_grad()
    model(**batch)["loss_sum"].backward()
    full = _grads(model)
    dirs = torch.cat([full[None] / full.norm(), torch.randn(2, full.numel(), generator=torch.Generator().manual_seed(0))])
    per_row, tokens = [], []
    for i in range(G):
        model.zero_grad()
        out = model(**select_rows(batch, torch.tensor([i])))
        out["loss_sum"].backward()
        per_row.append(torch.cat([out["loss_sum"].detach()[None], dirs @ _grads(model)]))
        tokens.append(float(out["loss_tokens"]))
    x, n = torch.stack(per_row).double(), torch.tensor(tokens, dtype=torch.float64)
    return model, batch, dirs, x, n, (x[:, 0] / n).float()


@pytest.mark.parametrize("policy", POLICIES)
def test_the_model_computes_the_weighted_sums(gross, policy):
    """What the Monte Carlo test below sums per row is what the model's forward and backward compute on
    the kept rows with their weights."""
    model, batch, dirs, x, n, scores = gross
    kept = POLICIES[policy](scores, selection_generator(0, 1, 0))
    w = kept.weights.double()
    model.zero_grad()
    out = model(**weighted_rows(batch, kept.indices, kept.weights))
    out["loss"].backward()
    want = (w[:, None] * x[kept.indices]).sum(0) / (w * n[kept.indices]).sum()
    got = torch.cat([out["loss"].detach()[None], dirs @ _grads(model)]).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _z_scores(x: torch.Tensor, n: torch.Tensor, scores: torch.Tensor, policy: str, bias: float) -> dict:
    """Over DRAWS keyed draws: z = (mean estimate - gross value) / its standard error, for the weighted sum
    sum_i w_i x_i and for the objective sum_i w_i x_i / sum_i w_i tokens_i; x = (loss sum, gradient
    projections). ``bias`` multiplies the weight of every row not kept with certainty."""
    sums, ratios = [], []
    for draw in range(DRAWS):
        kept = POLICIES[policy](scores, selection_generator(4, draw, 0))
        w = kept.weights.double()
        w = torch.where(w > 1, w * bias, w)
        total = (w[:, None] * x[kept.indices]).sum(0)
        sums.append(total)
        ratios.append(total / (w * n[kept.indices]).sum())
    out = {}
    for name, est, truth in (("sum", sums, x.sum(0)), ("objective", ratios, x.sum(0) / n.sum())):
        est = torch.stack(est)
        out[name] = (est.mean(0) - truth) / (est.std(0) / DRAWS**0.5)
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_weighted_loss_and_gradient_are_unbiased_and_the_test_has_power(gross, policy):
    """Components: the loss, the gradient along the gross gradient, the gradient along two random
    directions. Unbiased weights: every |z| < 4. Weights 5% too high on the rows drawn at random: the
    loss and the gradient along the gross gradient are far off. (The objective, a ratio of two unbiased
    sums, is exactly unbiased here for ``stratified``, whose sum of weights is G in every draw on rows
    of equal token counts; for ``importance`` its O(1/B) bias is below this test's resolution.)"""
    _, _, _, x, n, scores = gross
    fair = _z_scores(x, n, scores, policy, bias=1.0)
    for name, z in fair.items():
        assert torch.all(z.abs() < 4), (name, z)
    biased = _z_scores(x, n, scores, policy, bias=1.05)
    for name, z in biased.items():
        assert z[0].abs() > 10 and z[1].abs() > 4, (name, z)
