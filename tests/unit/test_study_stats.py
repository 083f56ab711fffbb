"""The study's confidence intervals against direct computations: the t quantile against the textbook
table and a numerical integral of the t density, the interval against its formula and a simulation."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from study.stats import betainc, holm, mean_ci, t_cdf, t_quantile, t_test_p, verdict

# Student's t, two-sided 95% (the 0.975 quantile), from the standard table
TABLE = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 5: 2.5705818, 9: 2.2621572, 29: 2.0452296}


@pytest.mark.parametrize("df", sorted(TABLE))
def test_t_quantile_matches_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(TABLE[df], abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-TABLE[df], abs=1e-6)


def test_t_cdf_matches_a_numerical_integral_of_the_density():
    for df in (1, 4, 10):
        const = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
        xs = np.linspace(0.0, 2.5, 200_001)
        dens = const * (1 + xs**2 / df) ** (-(df + 1) / 2)
        integral = float(np.sum((dens[1:] + dens[:-1]) / 2 * np.diff(xs)))  # trapezoid from 0 to 2.5
        assert t_cdf(2.5, df) - 0.5 == pytest.approx(integral, abs=1e-8)
    assert t_cdf(0.0, 3) == 0.5 and t_cdf(-1.0, 3) == pytest.approx(1 - t_cdf(1.0, 3))
    # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b
    assert betainc(2.5, 1.0, 0.3) == pytest.approx(0.3**2.5) and betainc(1.0, 3.0, 0.2) == pytest.approx(1 - 0.8**3)


def test_mean_ci_is_the_t_interval():
    vals = [0.0021, 0.0009, 0.0035, 0.0012, 0.0018]
    ci = mean_ci(vals)
    mean, sd = statistics.fmean(vals), statistics.stdev(vals)
    half = 2.7764451 * sd / math.sqrt(5)
    assert (ci["n"], ci["mean"], ci["sd"]) == (5, pytest.approx(mean), pytest.approx(sd))
    assert ci["lo"] == pytest.approx(mean - half, abs=1e-9) and ci["hi"] == pytest.approx(mean + half, abs=1e-9)
    assert verdict(ci) == "better" and verdict(mean_ci([-v for v in vals])) == "worse"
    assert verdict(mean_ci([0.001, -0.002, 0.0005])) == "n.s."
    assert mean_ci([]) == {"n": 0} and "lo" not in mean_ci([0.3]) and verdict(mean_ci([0.3])) == "–"


def test_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = sum(ci["lo"] <= 1.0 <= ci["hi"] for ci in (mean_ci(rng.normal(1.0, 2.0, 5)) for _ in range(4000)))
    assert 0.935 <= hits / 4000 <= 0.965


def test_p_value_is_the_two_sided_t_test():
    # t = 2.7764451 with 4 degrees of freedom is the 0.975 quantile: p = 0.05
    assert t_test_p(2.7764451, math.sqrt(5), 5) == pytest.approx(0.05, abs=1e-7)
    assert t_test_p(-2.7764451, math.sqrt(5), 5) == pytest.approx(0.05, abs=1e-7)
    assert t_test_p(0.0, 1.0, 5) == 1.0 and t_test_p(0.1, 0.0, 3) == 0.0 and t_test_p(0.0, 0.0, 3) == 1.0
    # an interval that just excludes 0 has p just under 0.05, and the other way round
    vals = [0.0021, 0.0009, 0.0035, 0.0012, 0.0018]
    assert mean_ci(vals)["p"] < 0.05 and mean_ci([0.001, -0.002, 0.0005])["p"] > 0.05


def test_holm_steps_down_and_stays_monotone():
    # sorted 0.01, 0.02, 0.03, 0.5 of m = 4: x4, x3, x2, x1 -> 0.04, 0.06, 0.06 (monotone), 0.5
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []


def test_holm_keeps_the_familywise_error_at_five_percent():
    """20 true nulls of 5 normal seeds each: some comparison is "beyond the interval" in most families
    (1 - 0.95^20 = 64%), a Holm-significant one in about 5% at most."""
    rng = np.random.default_rng(1)
    raw = holm_hits = 0
    for _ in range(1000):
        ps = [mean_ci(rng.normal(0.0, 1.0, 5))["p"] for _ in range(20)]
        raw += min(ps) < 0.05
        holm_hits += min(holm(ps)) < 0.05
    assert raw / 1000 > 0.55 and holm_hits / 1000 <= 0.065
