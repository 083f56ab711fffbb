"""VCAS's controller: from one calibration's variance estimates to the next sampling ratios.

Every F steps the method measures, on M micro-batches: the SGD variance of each Linear's weight
gradient (across the batches), the extra variance activation sampling adds (Monte Carlo: M sampled
passes per batch against its exact gradient) and the extra variance weight sampling would add at the
current nu (analytic). Then (``update``):

- s, the share of the gradient-norm mass the kept rows must hold, moves by alpha: up when
  V_act >= tau_act V_sgd (summed over Linears), down otherwise (tau_act = 0: exact rows for good);
- rho_l becomes the smallest share of rows holding s of block l's row-gradient-norm mass, measured at
  the *updated* s (the reference code uses the ratios of s -/+ alpha while moving s +/- alpha), made
  non-decreasing with depth and smoothed (``rho_decay``);
- nu_i is divided by beta when V_w,i(nu_i) > tau_w V_sgd,i, multiplied by it when the variance at the
  lower ratio is still acceptable, V_w,i(beta nu_i) <= tau_w V_sgd,i, and held otherwise; within
  [nu_min, 1]. (The reference moves nu every time, so at a small tau it oscillates between 1 and beta;
  the weight variance being analytic, checking the lower candidate costs nothing.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.methods.vcas import ops
from engine.methods.vcas.config import VcasConfig


@dataclass(slots=True)
class Ratios:
    s: float
    rho: list[float]
    """Per block, non-decreasing with depth."""
    nu: list[float]
    """Per sampled Linear."""

    @classmethod
    def exact(cls, blocks: int, linears: int) -> Ratios:
        return cls(1.0, [1.0] * blocks, [1.0] * linears)

    def candidates(self, alpha: float) -> tuple[float, float]:
        """The two values s can take next: (up, down)."""
        return min(1.0, self.s + alpha), max(0.0, self.s - alpha)


@dataclass(slots=True)
class Estimates:
    """One calibration's statistics, averaged over ranks (identical everywhere)."""

    sgd: list[float]
    """Per Linear: SGD variance of its weight gradient (sum over entries)."""
    act: list[float]
    """Per Linear: variance activation sampling adds to it."""
    w: list[float]
    """Per Linear: variance weight sampling at its current nu adds."""
    w_down: list[float]
    """Per Linear: the same at the lower candidate ``down_nu``."""
    frac_up: list[float]
    """Per block: the share of rows holding s_up of the gradient-norm mass (``Ratios.candidates``)."""
    frac_down: list[float]

    def vector(self) -> list[float]:
        return [*self.sgd, *self.act, *self.w, *self.w_down, *self.frac_up, *self.frac_down]

    @classmethod
    def from_vector(cls, v: list[float], linears: int, blocks: int) -> Estimates:
        n, L = linears, blocks
        return cls(v[:n], v[n:2 * n], v[2 * n:3 * n], v[3 * n:4 * n], v[4 * n:4 * n + L], v[4 * n + L:4 * n + 2 * L])


def down_nu(nu: float, cfg: VcasConfig) -> float:
    """The weight ratio one step down (within the floor)."""
    return max(cfg.nu_min, nu * cfg.beta)


def monotone(values: list[float]) -> list[float]:
    """Non-decreasing with depth: each block keeps at least the share of any block below it."""
    out, top = [], 0.0
    for v in values:
        top = max(top, v)
        out.append(top)
    return out


def update(r: Ratios, e: Estimates, cfg: VcasConfig) -> Ratios:
    """The ratios after one calibration (see the module docstring)."""
    s_up, s_down = r.candidates(cfg.alpha)
    grow = sum(e.act) >= cfg.tau_act * sum(e.sgd)
    s, target = (s_up, e.frac_up) if grow else (s_down, e.frac_down)
    target = monotone(target)
    rho = [cfg.rho_decay * old + (1.0 - cfg.rho_decay) * new for old, new in zip(r.rho, target, strict=True)]
    rho = [min(1.0, x) for x in monotone(rho)]  # already monotone; guards rounding
    nu = []
    for n, w, w_down, g in zip(r.nu, e.w, e.w_down, e.sgd, strict=True):
        if w > cfg.tau_w * g:
            n = min(1.0, n / cfg.beta)
        elif w_down <= cfg.tau_w * g:
            n = down_nu(n, cfg)
        nu.append(n)
    return Ratios(s, rho, nu)


class Tally:
    """This rank's sums over the M batches of one calibration, reduced to ``Estimates``.

    Gradients are compared on a sample of each weight's entries (``entries``); the SGD and activation
    variances are scaled back to the whole weight by numel / sampled entries.
    """

    def __init__(self, scale: list[float], blocks: int, s_up: float, s_down: float):
        self.scale, self.blocks, self.s_up, self.s_down = scale, blocks, s_up, s_down
        n = len(scale)
        self.exact: list[dict[int, torch.Tensor]] = []
        self.act, self.w, self.w_down = [0.0] * n, [0.0] * n, [0.0] * n
        self.frac_up, self.frac_down = [0.0] * blocks, [0.0] * blocks
        self.sampled_passes = 0
        self.w_passes = 0

    def add_exact(self, grads: dict[int, torch.Tensor], norms: dict[int, torch.Tensor],
                  w_var: dict[int, torch.Tensor]) -> None:
        self.exact.append(grads)
        for b in range(self.blocks):
            self.frac_up[b] += ops.mass_fraction(norms[b], self.s_up)
            self.frac_down[b] += ops.mass_fraction(norms[b], self.s_down)
        self._add_w(w_var)

    def add_sampled(self, grads: dict[int, torch.Tensor], w_var: dict[int, torch.Tensor]) -> None:
        exact = self.exact[-1]
        for i in range(len(self.scale)):
            self.act[i] += float((grads[i] - exact[i]).square().sum()) * self.scale[i]
        self.sampled_passes += 1
        self._add_w(w_var)

    def _add_w(self, w_var: dict[int, torch.Tensor]) -> None:
        if not w_var:
            return
        for i in range(len(self.scale)):
            now, down = w_var[i].tolist()
            self.w[i] += now
            self.w_down[i] += down
        self.w_passes += 1

    def estimates(self) -> Estimates:
        M = len(self.exact)
        sgd = []
        for i in range(len(self.scale)):
            g = torch.stack([grads[i] for grads in self.exact]).double()  # (M, entries)
            sgd.append(float(g.var(dim=0, correction=1).sum()) * self.scale[i])
        acts = [a / max(self.sampled_passes, 1) for a in self.act]
        ws = [w / max(self.w_passes, 1) for w in self.w]
        ws_down = [w / max(self.w_passes, 1) for w in self.w_down]
        return Estimates(sgd, acts, ws, ws_down, [f / M for f in self.frac_up], [f / M for f in self.frac_down])
