"""VCAS's sampling maths as pure tensor functions: keep probabilities (soft top-k), Bernoulli draws from
stateless generators, the share of rows holding a given share of the gradient-norm mass, and the
analytic variance of leverage-score sampling. Probabilities are computed in fp32 at least (bf16 sums
over ~16K tokens lose the mass; fp16 underflows to 0 / 0)."""

from __future__ import annotations

import math

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def keep_probabilities(x: torch.Tensor, k: int) -> torch.Tensor:
    """(n,) non-negative importances -> (n,) keep probabilities p_i = min(1, c x_i) with sum p = k.

    Rows with x_i = 0 get p_i = 0; when fewer than k rows are positive, every positive row gets 1 (the
    sum is then their count). k >= n keeps everything. No host sync. Dtype: fp32, or fp64 for fp64 input.
    """
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    n = x.numel()
    if k >= n:
        return torch.ones_like(x)
    if k < 1:
        raise ValueError(f"keep_probabilities: k must be >= 1, got {k}")
    xs = torch.sort(x, descending=True).values
    tail = xs.flip(0).cumsum(0).flip(0)  # tail[m] = sum of xs[m:]
    m = torch.arange(n, device=x.device, dtype=x.dtype)
    # Clamp the m largest to 1 and share k - m over the rest: valid once the largest unclamped one fits.
    # The first valid m exists (m = k - 1 always fits) and is the water level.
    fits = ((k - m) * xs <= tail) & (m < k)
    first = fits.to(torch.int8).argmax()
    c = (k - m[first]) / tail[first]  # inf when the rest are all zero: every positive row then gets 1
    return torch.where(x > 0, (c * x).clamp(max=1.0), torch.zeros_like(x))


def bernoulli(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool: True with probability p_i (p = 1 always, p = 0 never)."""
    return torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) < p


def mass_fraction(norms: torch.Tensor, s: float) -> float:
    """The smallest fraction of the rows whose (N,) gradient norms hold a share ``s`` of their sum (1 for
    s >= 1 or when every norm is zero). Host value (one sync): the controller runs every F steps."""
    n = norms.numel()
    if s >= 1.0 or n == 0:
        return 1.0
    x = torch.sort(norms.detach().double().flatten(), descending=True).values
    total = float(x.sum())
    if total <= 0.0:
        return 1.0
    count = int((x.cumsum(0) < s * total).sum()) + 1
    return min(count, n) / n


def leverage_variance(a_sq: torch.Tensor, b_sq: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Variance (summed over the matrix's entries) of sum_t mask_t / q_t a_t b_t^T, mask_t ~ Bernoulli(q_t):
    sum_t (1 / q_t - 1) |a_t|^2 |b_t|^2 over the tokens with q_t > 0. (K,) inputs, 0-dim fp32+ output."""
    q = q.to(torch.promote_types(q.dtype, torch.float32))
    w = a_sq.to(q.dtype) * b_sq.to(q.dtype)
    return torch.where(q > 0, (1.0 / q.clamp(min=torch.finfo(q.dtype).tiny) - 1.0) * w, torch.zeros_like(w)).sum()


def count_for(ratio: float, n: int) -> int:
    """How many of n items a ratio keeps: at least one (a ratio never rounds to nothing), at most n."""
    return min(n, max(1, math.floor(ratio * n + 1e-9)))


# ----------------------------------------------------------------------------- stateless randomness


def base_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, draw, rank, ...): the start of a family of stateless streams."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts] + [0x7CA5]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def mix(key: int, site: int) -> int:
    """Key of sub-stream ``site`` (a layer, a Linear, a pass) of ``key``: splitmix64 of both, cheap on the host."""
    z = (key + 0x9E3779B97F4A7C15 * (site + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def generator(key: int, device: torch.device | str) -> torch.Generator:
    """A fresh generator on ``device`` seeded by ``key``: draws depend only on the key."""
    return torch.Generator(device=device).manual_seed(key)
