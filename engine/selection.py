"""Selection policies: pure functions from per-sequence scores to the rows to back-propagate.

Policies never see DeepSpeed, ranks or devices beyond the tensors they are given; selection is per
rank (each rank keeps B of its own G rows), as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable

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


Policy = Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]
POLICIES: dict[str, Policy] = {"topk": topk_indices, "random": random_indices}
"""Selection policies by name: (G,) scores, k, generator -> (k,) kept row indices, ascending.
``sift.policy`` accepts exactly these names; a plugin may register more."""


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
