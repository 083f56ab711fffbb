"""The probe's kept-row shares for every selecting policy: a 6-row batch by hand, the weighted draws'
expectations, top-k against the source diagnostic, and reducible scores against a tiny reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.methods.sift import configured_policy
from engine.methods.sift_config import SiftConfig
from engine.reference import OnlineReference
from engine.scoring import exit_scores, per_sequence_mean
from engine.selection import selection_generator
from study.probe import batch_shares, policy_shares
from study.sources import kept_shares, source_scores
from study.spec import Selection
from tests.helpers import random_batch, tiny_model

# a 6-row gross batch: kinds original (0), noise (1), duplicate (2), two rows each
KINDS = np.array([0, 0, 1, 1, 2, 2])
SCORES = torch.tensor([5.0, 1.0, 4.0, 0.0, 3.0, 2.0])


def test_top_k_of_a_six_row_batch_by_hand():
    # top 3 by score: rows 0 (original), 2 (noise), 4 (duplicate)
    rows, weight = batch_shares(configured_policy(SiftConfig(policy="topk"))(SCORES, 3, None), KINDS, 3)
    assert rows.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3]) and weight.tolist() == pytest.approx(rows.tolist())
    rows, _ = batch_shares(configured_policy(SiftConfig(policy="topk"))(SCORES, 2, None), KINDS, 3)
    assert rows.tolist() == [0.5, 0.5, 0.0]


def test_a_stratified_draw_of_a_six_row_batch_by_hand():
    """Quantile 0.75 of the scores is 3.75: rows 0 and 2 are above it and kept with weight 1; one of the
    four rows below (1: original, 3: noise, 4 and 5: duplicate) is drawn with weight 4 / 1. The weights
    sum to G = 6, so each draw's weight share is exact, and in expectation the weight share is the
    batch's own composition (1/3 each) while the kept rows are not (5/12, 5/12, 1/6)."""
    policy = configured_policy(SiftConfig(policy="stratified", threshold_quantile=0.75))
    kind_below = {1: 0, 3: 1, 4: 2, 5: 2}
    rows_sum, weight_sum, n = np.zeros(3), np.zeros(3), 1500
    for draw in range(n):
        kept = policy(SCORES, 3, selection_generator(0, draw, 0))
        (below,) = [i for i in kept.indices.tolist() if i not in (0, 2)]
        rows, weight = batch_shares(kept, KINDS, 3)
        want = np.array([1.0, 1.0, 0.0])  # the rows above: an original and a noise row, weight 1 each
        want[kind_below[below]] += 4.0
        assert weight.tolist() == pytest.approx((want / 6).tolist())
        want_rows = np.array([1.0, 1.0, 0.0])
        want_rows[kind_below[below]] += 1
        assert rows.tolist() == pytest.approx((want_rows / 3).tolist())
        rows_sum, weight_sum = rows_sum + rows, weight_sum + weight
    se = 4 / 6 * 0.5 / np.sqrt(n)  # the weight share's largest standard error (a duplicate: 4/6 w.p. 1/2)
    assert (weight_sum / n).tolist() == pytest.approx([1 / 3] * 3, abs=4 * se)
    assert (rows_sum / n).tolist() == pytest.approx([5 / 12, 5 / 12, 1 / 6], abs=4 * se)


def test_policy_shares_top_k_equals_the_source_diagnostics_simulation():
    """The same batches (one RNG state) and top-k's stable ties: the probe and study/sources.py agree."""
    rng = np.random.default_rng(5)
    scores = {"a": rng.random(40), "b": rng.random(40) + 0.3, "c": rng.random(40) - 0.2}
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    got = policy_shares(scores, weights, Selection("topk", "loss", 1), gross=8, keep=4, batches_=300,
                        rng=np.random.default_rng(9), seed=0)
    want = kept_shares(scores, weights, gross=8, keep=4, batches_=300, rng=np.random.default_rng(9))
    assert got["rows"] == pytest.approx(want) and got["weight"] == pytest.approx(want)


@pytest.mark.parametrize("selection", [Selection("stratified", "loss", 1, threshold_quantile=0.75),
                                       Selection("importance", "loss", 1, temperature=1.0, uniform_mix=0.1)],
                         ids=["stratified", "importance"])
def test_weighted_draws_keep_the_hard_rows_but_weigh_them_back_to_the_drawn_share(selection):
    """Hard rows (score 3) against easy ones (0), drawn 1 : 3: both policies keep more hard rows than drawn,
    and their inverse-probability weights bring the gradient's share back near the drawn 25% (exactly in
    expectation for stratified, whose weights sum to G; a ratio estimate for importance)."""
    scores = {"easy": np.zeros(50), "hard": np.full(50, 3.0)}
    got = policy_shares(scores, {"easy": 3.0, "hard": 1.0}, selection, gross=16, keep=8, batches_=1000,
                        rng=np.random.default_rng(1), seed=7)
    assert got["rows"]["hard"] > 0.3  # drawn 0.25; top-k would keep min(n_hard, 8) / 8 of them
    assert got["weight"]["hard"] == pytest.approx(0.25, abs=0.02)
    assert sum(got["weight"].values()) == pytest.approx(1.0) and sum(got["rows"].values()) == pytest.approx(1.0)


def test_reducible_scores_subtract_the_references_loss_on_the_same_targets():
    model, ref_model = tiny_model(seed=0, layers=3).eval(), tiny_model(seed=1, layers=2).eval()
    reference = OnlineReference(ref_model, 32)
    parts = {"original": [random_batch(G=6, seed=0)], "noise": [random_batch(G=4, seed=1)]}
    plain = source_scores(model, parts, "loss", 1)
    reducible = source_scores(model, parts, "reducible", 1, reference)
    for kind, (batch,) in parts.items():
        path = model.exit_path(1)
        ref_mean = per_sequence_mean(reference.token_losses(batch), path.targets(batch) >= 0).numpy()
        assert reducible[kind]["exit"] == pytest.approx(plain[kind]["exit"] - ref_mean, abs=1e-5)
        assert reducible[kind]["exact"] == pytest.approx(plain[kind]["exact"] - ref_mean, abs=1e-5)
        assert plain[kind]["exit"] == pytest.approx(exit_scores(path, batch, "loss").numpy())
        assert len(reducible[kind]["exit"]) == batch["input_ids"].shape[0]
    assert not np.allclose(reducible["original"]["exit"], plain["original"]["exit"])


def test_selection_keys_round_trip_and_name_what_is_wrong():
    from study.spec import StudyError, parse_selection, selection_of

    config = {"sift": {"policy": "importance", "criterion": "loss", "exit_layer": 1, "temperature": 2.0,
                       "uniform_mix": 0.2}}
    assert selection_of(config) == "importance-loss:1@t=2.0,u=0.2"
    for key in ("loss:1", "reducible:4", "stratified-entropy:1@q=0.75", "stratified-loss:2@q=mean",
                "importance-loss:1@t=2.0,u=0.2"):
        assert parse_selection(key).key == key
    assert parse_selection("stratified-loss:1@q=mean").threshold_quantile is None
    assert selection_of({"sift": {"policy": "random"}}) is None and selection_of({"method": "vcas"}) is None
    for bad in ("loss", "stratified-loss:1", "loss:1@q=0.5", "importance-loss:1@q=0.5", "stratified-loss:1@q=x"):
        with pytest.raises(StudyError, match="probe selection"):
            parse_selection(bad)
