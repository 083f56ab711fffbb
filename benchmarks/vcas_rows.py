"""VCAS rows of `sift bench` (benchmarks/throughput.py): which variants, what each row adds, and the
FLOPs-saved vs wall-clock-saved table.

    sift bench --preset cpu-tiny --variants vanilla,vcas,sift+vcas --exits 1 --criteria loss

Fixed ratios rho x nu in {1, 0.75, 0.5} x {1, 0.5, 0.25} (``vcas.adaptive: false``), the adaptive
controller, and SIFT + VCAS (adaptive, and rho = nu = 0.5). A short benchmark cannot learn ratios: the
adaptive rows run at what the controller starts from (exact rows and weights, plus the exact
last-block saving), and each times one calibration after its timed steps (``calibration_s``) to give
its cost amortized over ``vcas.calib_every`` steps.
"""

from __future__ import annotations

import time
from typing import Any

import torch

KINDS = ("vcas", "sift+vcas")
FIXED = tuple((rho, nu) for rho in (1.0, 0.75, 0.5) for nu in (1.0, 0.5, 0.25))


def ratios_for(kind: str) -> tuple[tuple[float, float] | None, ...]:
    """(rho, nu) pairs of a kind's rows; None: adaptive."""
    return (*FIXED, None) if kind == "vcas" else (None, (0.5, 0.5))


def overrides(kind: str, ratios: tuple[float, float] | None) -> list[str]:
    o = [f"method={'vcas' if kind == 'vcas' else 'sift+vcas'}"]
    if ratios is not None:
        o += ["vcas.adaptive=false", f"vcas.rho={ratios[0]}", f"vcas.nu={ratios[1]}"]
    return o


def suffix(ratios: tuple[float, float] | None) -> str:
    return "adaptive" if ratios is None else f"rho{ratios[0]:g}-nu{ratios[1]:g}"


def row_extra(methods: Any, cuda: bool) -> dict[str, Any]:
    """What a VCAS row adds: the ratios it ran at, the expected training-FLOP ratio from VCAS's FLOP model
    (engine/methods/vcas/flops.py) and, adaptive, one calibration's time and amortized FLOPs."""
    vcas = next(m for m in methods.methods if m.name == "vcas")
    r, c = vcas.ratios, vcas.cfg
    out: dict[str, Any] = {"adaptive": c.adaptive, "rho": list(r.rho), "nu": list(r.nu),
                           "flops_ratio": vcas.flops.ratio(r.rho, r.nu)}
    if c.adaptive:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        vcas.calibrate(step=0, rank=0)
        if cuda:
            torch.cuda.synchronize()
        out |= {"calibration_s": time.perf_counter() - t0, "calib_every": c.calib_every,
                "flops_ratio_with_calibration": vcas.flops.ratio(r.rho, r.nu, batches=c.calib_batches,
                                                                 every=c.calib_every, grad_accum=vcas.grad_accum)}
    return out


def markdown(result: dict[str, Any]) -> str:
    """FLOPs saved (the model) against wall clock saved (measured), per VCAS row, vs vanilla."""
    rows = result["rows"]
    vanilla = {r["seq_len"]: r for r in rows if r["variant"] == "vanilla" and not r["compile"]}
    lines = ["", "## VCAS: FLOPs saved vs wall clock saved", "",
             "Expected training FLOPs per back-propagated sequence relative to exact training (VCAS's FLOP model; "
             "SIFT's scoring not included), against the median step time relative to vanilla's (same B). "
             "Adaptive rows ran at the controller's starting ratios; their calibration is timed once.", "",
             "| variant | step ms | × vanilla seq/s | FLOP ratio | FLOPs saved | wall saved | calibration s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r.get("vcas")
        if v is None:
            continue
        base = vanilla.get(r["seq_len"])
        wall = r["step_time_s"]["median"] / base["step_time_s"]["median"] if base else None
        calib = v.get("calibration_s")
        lines.append(f"| {r['name']} | {1e3 * r['step_time_s']['median']:.1f} | "
                     f"{'–' if r.get('overhead_ratio') is None else format(r['overhead_ratio'], '.3f')} | "
                     f"{v['flops_ratio']:.3f} | {1 - v['flops_ratio']:.1%} | "
                     f"{'–' if wall is None else format(1 - wall, '.1%')} | "
                     f"{'–' if calib is None else format(calib, '.2f')} |")
    return "\n".join(lines) + "\n"
