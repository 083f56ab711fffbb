"""The source diagnostic's selection simulation (a pure function of scores, shares and an RNG)."""

from __future__ import annotations

import numpy as np
import pytest

from study.sources import kept_shares


def test_a_source_that_always_scores_higher_fills_the_kept_rows():
    scores = {"hard": np.ones(10), "easy": np.zeros(10)}
    got = kept_shares(scores, {"hard": 1.0, "easy": 1.0}, gross=4, keep=2, batches_=4000,
                      rng=np.random.default_rng(0))
    # n_hard ~ Binomial(4, 1/2) of the 4 drawn rows; the kept 2 hold min(n_hard, 2) of them: E = 26/16
    assert got["hard"] == pytest.approx(26 / 32, abs=0.02)
    assert got["hard"] + got["easy"] == pytest.approx(1.0)


def test_identically_scored_sources_are_kept_in_their_drawn_proportions():
    rng = np.random.default_rng(1)
    scores = {"a": rng.random(500), "b": rng.random(500)}
    got = kept_shares(scores, {"a": 3.0, "b": 1.0}, gross=32, keep=16, batches_=2000, rng=np.random.default_rng(2))
    assert got["a"] == pytest.approx(0.75, abs=0.02)


def test_the_kept_rows_statistic_follows_the_scores():
    """Rows scored by their own statistic: the kept half has a higher mean of it than all drawn rows."""
    rng = np.random.default_rng(3)
    stat = {"a": rng.random(200)}
    got = kept_shares({"a": stat["a"]}, {"a": 1.0}, gross=8, keep=4, batches_=500, rng=rng, stat=stat)
    assert got["a"] == 1.0
    assert got["stat_drawn"] == pytest.approx(0.5, abs=0.03)
    assert got["stat_kept"] > got["stat_drawn"] + 0.15
