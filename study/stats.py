"""Confidence intervals for a study's paired differences: Student's t over seeds, computed here (no SciPy).

With 5 seeds a bootstrap interval is too narrow (a simulation of the percentile bootstrap of the mean of
5 normal values: 84% coverage for a nominal 95%), so intervals are t intervals: mean ± t(0.975, n - 1) · sd / √n, which assume the
per-seed differences are roughly normal. The t quantile comes from the t distribution's CDF, written with
the regularized incomplete beta function (a continued fraction), inverted by bisection.

A study makes dozens of such comparisons, so a few intervals exclude 0 by chance alone: each interval
also carries its two-sided p-value, and ``holm`` adjusts a family of them (Holm's step-down method, which
keeps the chance of any false "beyond the interval" in the family at 5% without assuming independence).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)), -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on t_cdf to ~1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], level: float = 0.95, test: bool = True) -> dict[str, Any]:
    """Mean, sample standard deviation and the two-sided t interval of the mean of ``values``
    ({"n": 0} when empty; no interval for a single value), and with ``test`` the p-value of "the mean is
    0" (meaningful for paired differences, not for a level such as a share)."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"n": 0}
    mean = statistics.fmean(vals)
    out: dict[str, Any] = {"n": n, "mean": mean, "values": vals}
    if n < 2:
        return out
    sd = statistics.stdev(vals)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    out.update(sd=sd, lo=mean - half, hi=mean + half, half=half, level=level)
    if test:
        out["p"] = t_test_p(mean, sd, n)
    return out


def t_test_p(mean: float, sd: float, n: int) -> float:
    """Two-sided p-value of the one-sample t test of mean 0 (1 for a zero mean with zero spread)."""
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return 2.0 * t_cdf(-abs(mean) / (sd / math.sqrt(n)), n - 1)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: the k-th smallest of m is multiplied by m - k + 1,
    made monotone (never below a smaller one's adjusted value) and capped at 1."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out, running = [1.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(ci: dict[str, Any] | None) -> str:
    """"better" when the whole interval is above 0, "worse" when below, "n.s." when it contains 0, "–"
    without an interval."""
    if not ci or "lo" not in ci:
        return "–"
    if ci["lo"] > 0:
        return "better"
    if ci["hi"] < 0:
        return "worse"
    return "n.s."
