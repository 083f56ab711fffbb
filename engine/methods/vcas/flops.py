"""VCAS's FLOP model, next to the model's own (``engine.models.base.FlopCounts``, SIFT's).

Per sequence of T positions; multiply-add = 2 FLOPs. A sampled Linear i in block l with F_i = 2 T
in_i out_i forward FLOPs costs, in the backward, F_i rho_l t_i for its input gradient and
F_i rho_l t_i nu_i for its weight gradient, where t_i is the share of positions it runs on (the live
positions P' / T for the last block's position-wise Linears, else 1). Everything else (attention's
score and value products, the output head, extra heads) keeps backward = 2 x forward: VCAS samples
only the Linears. With rho = nu = t = 1 this is ``FlopCounts.train()``.

A calibration runs, per batch of B rows, one exact forward + backward and, when some rho < 1, M
forwards + backwards with activation sampling (weight gradients in full): M (1 + M) passes of B rows
every F optimizer steps (``calibration``).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.methods.vcas.layers import Site
from engine.models.base import FlopCounts


@dataclass(frozen=True, slots=True)
class VcasFlops:
    base: FlopCounts
    seq_len: int
    sites: tuple[Site, ...]
    live_tokens: int | None = None
    """Positions per row the loss reads (the last block's position-wise Linears run there); None: all."""

    def _linear(self, site: Site) -> float:
        return 2.0 * self.seq_len * site.in_features * site.out_features

    def _share(self, site: Site) -> float:
        last = site.block == self.base.layers - 1
        if self.live_tokens is None or not (last and site.token_local):
            return 1.0
        return min(1.0, self.live_tokens / self.seq_len)

    def train(self, rho: list[float], nu: list[float], *, sample_weights: bool = True) -> float:
        """Expected training FLOPs of one sequence at these ratios (``sample_weights=False``: weight
        gradients in full, as calibration's sampled passes compute them)."""
        b = self.base
        per_block = [0.0] * b.layers
        for s in self.sites:
            per_block[s.block] += self._linear(s)
        backward = 2.0 * (b.head + b.extra) + sum(2.0 * (b.block - lin) for lin in per_block)
        for s in self.sites:
            w = nu[s.index] if sample_weights else 1.0
            backward += self._linear(s) * rho[s.block] * self._share(s) * (1.0 + w)
        return b.forward() + backward

    def exact(self) -> float:
        return self.train([1.0] * self.base.layers, [1.0] * len(self.sites))

    def calibration(self, rho: list[float], batches: int) -> float:
        """FLOPs of one calibration per row of a micro-batch (multiply by B; amortize over F steps)."""
        exact = batches * self.exact()
        sampled = batches * batches * self.train(rho, [1.0] * len(self.sites), sample_weights=False)
        return exact + (sampled if any(r < 1.0 for r in rho) else 0.0)

    def ratio(self, rho: list[float], nu: list[float], *, batches: int = 0, every: int = 1,
              grad_accum: int = 1) -> float:
        """Training FLOPs relative to exact training, calibration amortized over ``every`` optimizer steps
        of ``grad_accum`` micro-batches (``batches`` = 0: without calibration)."""
        calib = self.calibration(rho, batches) / (every * grad_accum) if batches else 0.0
        return (self.train(rho, nu) + calib) / self.base.train()
