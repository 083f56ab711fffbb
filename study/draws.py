"""Gross batches drawn from kinds of rows, shared by the two selection diagnostics (study.sources and
study.probe): each row's kind is drawn with probability proportional to its weight, then a row uniformly
within that kind."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def gross_batches(scores: dict[str, np.ndarray], weights: dict[str, float], *, gross: int, batches_: int,
                  rng: np.random.Generator) -> Iterator[tuple[np.ndarray, list[int], np.ndarray]]:
    """Yield, for each of ``batches_`` gross batches of ``gross`` rows: the kind of every row (an index
    into ``sorted(scores)``), the row drawn within its kind, and the rows' scores."""
    names = sorted(scores)
    p = np.array([weights[k] for k in names], dtype=np.float64)
    p /= p.sum()
    for _ in range(batches_):
        kinds = rng.choice(len(names), size=gross, p=p)
        rows = [int(rng.integers(len(scores[names[k]]))) for k in kinds]
        yield kinds, rows, np.array([scores[names[k]][r] for k, r in zip(kinds, rows)])
