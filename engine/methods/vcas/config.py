"""VCAS's settings (the ``vcas`` section of the run config) and their checks, owned by the method."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class VcasConfig:
    """VCAS (``method: vcas`` or ``sift+vcas``): sampling inside the backward pass, see docs/vcas.md."""

    adaptive: bool = True
    """true: the controller sets the ratios (exact training until its first calibration); false: the
    fixed ratios ``rho`` and ``nu`` below, no calibration (for benchmarks)."""
    rho: float = 1.0
    """Fixed mode: fraction of the rows whose activation gradient each block back-propagates."""
    nu: float = 1.0
    """Fixed mode: fraction of the tokens (of the kept rows) each Linear's weight gradient is sampled from."""
    tau_act: float = 0.025
    """Accepted activation-sampling variance, relative to the SGD variance."""
    tau_w: float = 0.025
    """Accepted weight-sampling variance of each Linear, relative to its SGD variance."""
    alpha: float = 0.01
    """Step of s, the share of the gradient-norm mass the kept rows hold, per calibration."""
    beta: float = 0.95
    """Multiplier of a weight ratio per calibration (nu * beta, or nu / beta)."""
    nu_min: float = 0.05
    """Floor of the weight ratios (the reference has none; see docs/vcas.md)."""
    rho_decay: float = 0.6
    """The new activation ratios are decay x old + (1 - decay) x target (the reference's smoothing)."""
    calib_every: int = 100
    """F: calibrate after every F optimizer steps."""
    calib_batches: int = 2
    """M: micro-batches per calibration (the last M trained on), and sampled passes per batch."""
    var_fraction: float = 0.01
    """Share of each weight's entries the SGD and activation variances are estimated on (at least 1024)."""
    live_positions: bool = True
    """In the last block, back-propagate the position-wise Linears only where the loss reads the output
    (BERT: the masked positions and [CLS]); exact, a saving at no variance cost."""


def check_vcas(v: VcasConfig) -> list[str]:
    """Every problem with the ``vcas`` section (empty when usable)."""
    p = [f"vcas.{k}: must be in (0, 1], got {x}" for k, x in
         {"rho": v.rho, "nu": v.nu, "nu_min": v.nu_min, "var_fraction": v.var_fraction}.items() if not 0.0 < x <= 1.0]
    p += [f"vcas.{k}: must be in (0, 1), got {x}" for k, x in {"alpha": v.alpha, "beta": v.beta}.items()
          if not 0.0 < x < 1.0]
    p += [f"vcas.{k}: must be >= 0, got {x}" for k, x in {"tau_act": v.tau_act, "tau_w": v.tau_w}.items() if x < 0]
    if not 0.0 <= v.rho_decay < 1.0:
        p.append(f"vcas.rho_decay: must be in [0, 1), got {v.rho_decay}")
    if v.calib_every < 1:
        p.append(f"vcas.calib_every: must be >= 1, got {v.calib_every}")
    if v.calib_batches < 2:
        p.append(f"vcas.calib_batches: must be >= 2 (a variance needs two batches), got {v.calib_batches}")
    if v.adaptive and (v.rho != 1.0 or v.nu != 1.0):
        p.append(f"vcas.rho={v.rho}, vcas.nu={v.nu}: fixed ratios need vcas.adaptive=false (the controller "
                 "starts from 1)")
    return p
