"""Selection policies: pure functions from per-sequence scores to the rows to back-propagate.

Policies never see DeepSpeed, ranks or devices beyond the tensors they are given; selection is per
rank (each rank keeps B of its own G rows), as in the paper. A policy returns the kept row indices, or
a ``Kept``: the indices with a weight for each row, which the loss applies (``row_weights`` in
engine/models/base.py). The weighted policies (``stratified``, ``importance``) are sampling designs:
row i is kept with a known probability pi_i and weighted by 1 / pi_i (Horvitz-Thompson), so a weighted
sum over the kept rows is an unbiased estimate of the same sum over the gross batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


def topk_indices(scores: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(G,) scores -> (k,) row indices of the k highest scores, ascending.

    Ties go to the lower row index (a stable descending sort), so the result is deterministic.
    Runs on the scores' device without a host sync.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def random_indices(scores: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k rows uniformly without replacement (the control: same G and B, scores ignored), ascending."""
    if generator is None:
        raise ValueError("random selection needs an explicit generator")
    G = scores.shape[0]
    picked = torch.randperm(G, generator=generator)[:k]
    return torch.sort(picked).values.to(scores.device, non_blocking=True)


@dataclass(frozen=True, slots=True)
class Kept:
    """A weighted selection: the kept rows and the weight of each in the loss."""

    indices: torch.Tensor
    """(k,) kept row indices, ascending, on the scores' device."""
    weights: torch.Tensor
    """(k,) float32 weights, positive (here inverse inclusion probabilities, so >= 1): the loss becomes
    sum_i w_i loss_sum_i / sum_i w_i tokens_i (engine/models/base.py)."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """The policy's statistics of this draw (device tensors), logged with the method's."""


def effective_share(weights: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size of a weighted draw over its number of rows, (sum w)^2 / (k sum w^2):
    1 for equal weights, lower as they spread (a weighted gradient is as noisy as one of that many
    equally weighted rows, to first order). Logged by the weighted policies as ``effective_rows``."""
    w = weights.double()
    return (w.sum() ** 2 / (w.numel() * (w * w).sum())).float()


def stratified_indices(scores: torch.Tensor, k: int, generator: torch.Generator | None = None, *,
                       quantile: float | None = None) -> Kept:
    """InfoBatch's rule on one gross batch: keep every row scoring above a threshold (the scores' mean,
    or their ``quantile``) with weight 1; fill the other k - n_above places with a uniform draw without
    replacement from the n_below rows at or under it, each weighted n_below / (k - n_above), the inverse
    of its inclusion probability. Unbiased whenever n_above < k. When n_above >= k no row below can be
    drawn, so no weighting is unbiased: the top k rows are kept with weight 1 (top-k selection) and the
    draw is counted (``stratified_overflow``: 1 for such a draw, 0 otherwise; averaged over micro-steps
    in the log, it is how often it happened) and ``effective_rows``. No host sync."""
    if generator is None:
        raise ValueError("stratified selection needs an explicit generator")
    G = scores.shape[0]
    s = scores.float()
    threshold = s.mean() if quantile is None else torch.quantile(s, quantile)
    above = s > threshold
    n_above = above.sum()
    # Order: the rows above by score (descending, ties to the lower index), then the rows below in a
    # uniformly random order; the first k are the kept set, and its below part is a uniform draw.
    rand = torch.randperm(G, generator=generator).to(scores.device, non_blocking=True)
    order = torch.sort(torch.where(above, s, rand.float()), descending=True, stable=True).indices
    order = order[torch.sort(above[order].to(torch.int8), descending=True, stable=True).indices]
    kept = torch.sort(order[:k]).values
    overflow = n_above >= k
    below_weight = torch.where(overflow, 1.0, (G - n_above) / (k - n_above).clamp(min=1))
    weights = torch.where(above[kept], 1.0, below_weight).float()
    return Kept(kept, weights, {"stratified_overflow": overflow.float(), "stratified_above": n_above.float() / G,
                                "effective_rows": effective_share(weights)})


def inclusion_probabilities(sizes: torch.Tensor, k: int) -> torch.Tensor:
    """(G,) positive sizes -> (G,) float64 inclusion probabilities proportional to them, capped at 1,
    summing to k (0 < k <= G). The standard rule caps every row whose share k q_i / sum q exceeds 1, then
    shares what is left among the others in proportion, and repeats until none exceeds 1; here in closed
    form: with q sorted descending and S_j = sum_{i >= j} q_i, the rule caps the smallest number c of
    largest rows for which the largest uncapped one fits, (k - c) q_c <= S_c; then pi_i = (k - c) q_i / S_c
    for the rest. No host sync."""
    G = sizes.shape[0]
    q, order = torch.sort(sizes.double(), descending=True, stable=True)
    tail = q.flip(0).cumsum(0).flip(0)
    j = torch.arange(G, device=sizes.device)
    fits = ((k - j) * q <= tail) & (j < k)  # true at j = k - 1 always, so c exists
    c = torch.argmax(fits.to(torch.int8))  # the first j that fits
    pi_sorted = torch.where(j < c, 1.0, ((k - c) * q / tail.gather(0, c.view(1))).clamp(max=1.0))
    return torch.empty_like(pi_sorted).scatter_(0, order, pi_sorted)


def systematic_sample(pi: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(G,) inclusion probabilities (each <= 1, summing to k) -> (k,) distinct row indices, ascending,
    each row kept with probability exactly pi_i: randomised systematic sampling (Madow 1949; rows in a
    random order, then one uniform start u and the k points u, u + 1, ..., u + k - 1 on the cumulated
    probabilities). A row's interval is pi_i <= 1 long, so it holds at most one point. Chosen because it
    is exact for any pi with a fixed size, one sort and one uniform draw; conditional Poisson sampling
    has better spread joint inclusion probabilities but needs an iterative fit to make its pi exact."""
    G = pi.shape[0]
    perm = torch.randperm(G, generator=generator).to(pi.device, non_blocking=True)
    start = torch.rand((), generator=generator, dtype=torch.float64).to(pi.device, non_blocking=True)
    edges = pi.double()[perm].cumsum(0)
    edges[-1] = k  # the exact total, so that rounding never puts a point past the last row
    points = start + torch.arange(k, dtype=torch.float64, device=pi.device)
    return torch.sort(perm[torch.searchsorted(edges, points, right=True)]).values


def importance_indices(scores: torch.Tensor, k: int, generator: torch.Generator | None = None, *,
                       temperature: float = 1.0, uniform_mix: float = 0.1) -> Kept:
    """Importance sampling of k of G rows: sizes q = (1 - uniform_mix) softmax(scores / temperature) +
    uniform_mix / G (every q_i > 0 when uniform_mix > 0, so every row can be drawn), inclusion
    probabilities pi proportional to q capped at 1 (``inclusion_probabilities``), a fixed-size draw with
    exactly those probabilities (``systematic_sample``), Horvitz-Thompson weights 1 / pi_i. Logs the share
    of kept rows drawn with certainty (``importance_capped``), the largest weight and ``effective_rows``.
    No host sync."""
    if generator is None:
        raise ValueError("importance selection needs an explicit generator")
    G = scores.shape[0]
    sizes = (1.0 - uniform_mix) * torch.softmax(scores.double() / temperature, 0) + uniform_mix / G
    pi = inclusion_probabilities(sizes, k)
    kept = systematic_sample(pi, k, generator)
    weights = (1.0 / pi[kept]).float()
    return Kept(kept, weights, {"importance_capped": (pi[kept] >= 1.0).float().mean(),
                                "importance_max_weight": weights.max(), "effective_rows": effective_share(weights)})


Policy = Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor | Kept]
POLICIES: dict[str, Policy] = {"topk": topk_indices, "random": random_indices, "stratified": stratified_indices,
                               "importance": importance_indices}
"""Selection policies by name: (G,) scores, k, generator -> (k,) kept row indices, ascending, or a
``Kept`` (indices and weights). ``sift.policy`` accepts exactly these names; a plugin may register more.
The generator is keyed on (seed, draw, rank) (``selection_generator``), so a resumed run draws the same."""


def selection_active(step: int, *, total_steps: int, warmup_steps: int, stop_fraction: float | None) -> bool:
    """Does optimizer step ``step`` (0-based) select? Not during the warm-up (the paper: the first 20K
    steps), not after ``stop_fraction`` of training."""
    if step < warmup_steps:
        return False
    return stop_fraction is None or step < stop_fraction * total_steps


def selection_generator(seed: int, draw: int, rank: int) -> torch.Generator:
    """A CPU generator for draw ``draw`` on ``rank``: stateless, so resuming needs no saved state."""
    state = np.random.SeedSequence([seed, draw, rank, 0x5E1EC7]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def position_generator(seed: int, draw: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` for the positions the scorer samples in draw ``draw`` on ``rank``
    (``sift.score_positions``): stateless, like ``selection_generator``, and independent of it."""
    state = np.random.SeedSequence([seed, draw, rank, 0x9051710]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


# ----------------------------------------------------------------------------- statistics


def kept_dropped_means(scores: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean score of the kept rows and of the dropped rows (device tensors, no sync: no boolean-mask
    indexing, whose output size the host would have to read)."""
    kept_sum = scores.index_select(0, kept).sum()
    n_kept, n = kept.numel(), scores.numel()
    return kept_sum / max(n_kept, 1), (scores.sum() - kept_sum) / max(n - n_kept, 1)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1, ties sharing their average rank (as Spearman's coefficient defines them)."""
    sorted_x, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0)
    average = (ends - counts + ends - 1).double() / 2
    r = torch.empty_like(x, dtype=torch.float64)
    r[order] = average[inverse]
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of two (G,) vectors (0 when either is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return torch.where(denom > 0, (ra * rb).sum() / denom.clamp(min=1e-30), torch.zeros_like(denom))


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """|top-k(a) & top-k(b)| / k: how many of the rows the proxy keeps the exact loss would keep."""
    in_a = torch.zeros_like(a, dtype=torch.bool)
    in_a[topk_indices(a, k)] = True
    return in_a[topk_indices(b, k)].float().mean()
