"""The study's figures (PNG, matplotlib's Agg backend): like the paper's figures 1 and 2, with seed bands,
plus the paired difference to vanilla and the proxy's fidelity over training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from study.report import RunCurves, fidelity_curve, mean_curve, paired_difference
from study.spec import Arm

_LOSS = ("#08306b", "#2171b5", "#6baed6", "#9ecae1")  # blues, deep exits darker last
_ENTROPY = ("#7f2704", "#d94801", "#fd8d3c", "#fdbe85")
_STYLES = ("-", "--", "-.", ":")


_OTHER = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")  # arms of other methods


def settings(arm: Arm) -> dict[str, str]:
    """The arm's overrides as a mapping (what the plots colour by)."""
    return dict(o.split("=", 1) for o in arm.overrides)


def arm_style(arm: Arm, exits: Sequence[int], others: Sequence[str] = ()) -> dict[str, object]:
    """Colour by criterion (vanilla black, random grey, loss blue, entropy orange), dash by exit depth;
    arms of other methods (any other overrides) in other colours, in the order of ``others``."""
    s = settings(arm)
    method, policy = s.get("method"), s.get("sift.policy")
    if method is None and policy == "none":
        return {"color": "black", "linestyle": "-", "linewidth": 2.2}
    if method is None and policy == "random":
        return {"color": "#7f7f7f", "linestyle": "-", "linewidth": 1.8}
    if method is None and policy == "topk" and s.get("sift.criterion") in ("loss", "entropy"):
        j = int(s.get("sift.exit_layer", "1"))
        i = list(exits).index(j) if j in exits else 0
        palette = _LOSS if s["sift.criterion"] == "loss" else _ENTROPY
        return {"color": palette[i % len(palette)], "linestyle": _STYLES[i % len(_STYLES)], "linewidth": 1.6}
    i = list(others).index(arm.name) if arm.name in others else 0
    return {"color": _OTHER[i % len(_OTHER)], "linestyle": _STYLES[i // len(_OTHER) % len(_STYLES)], "linewidth": 1.6}


def _samples_fmt(x: float, _pos: int) -> str:
    return f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k" if x >= 1e3 else f"{x:g}"


def _band(ax, xs, lo, hi, style) -> None:
    ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.12, linewidth=0)


def _exits(arms: Sequence[Arm]) -> list[int]:
    return sorted({int(settings(a).get("sift.exit_layer", "1")) for a in arms if settings(a).get("sift.policy") == "topk"})


def _styles(arms: Sequence[Arm]) -> dict[str, dict[str, object]]:
    exits = _exits(arms)
    plain = [a.name for a in arms if arm_style(a, exits)["color"] in _OTHER]
    return {a.name: arm_style(a, exits, plain) for a in arms}


AXIS_LABELS = {"backprop_samples": "back-propagated samples", "hours": "wall-clock hours", "cpu_s": "CPU minutes"}


def accuracy_figure(path: Path, arms: Sequence[Arm], runs: dict[str, list[RunCurves]], *, x: str,
                    title: str, targets: Sequence[float] = (), ref: str | None = "vanilla", key: str = "val_mlm_acc",
                    warm: RunCurves | None = None, since_branch: bool = False) -> None:
    """Left: ``key`` (mean over seeds, min–max band) against ``x``, with the warm-up run's curve before the
    branch point when given. Right, for the samples axis: the paired difference to ``ref`` (mean and 95%
    t interval); for the time axes: the last half of the run, zoomed."""
    styles = _styles(arms)
    scale = 1 / 60 if x == "cpu_s" else 1.0
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.6), gridspec_kw={"width_ratios": [1.15, 1]})
    xlabel = AXIS_LABELS[x] + (" since the branch point" if since_branch else "")
    if warm is not None and x == "backprop_samples":
        wx, wy = warm.series(key, x)
        end = warm.final["backprop_samples"] if warm.final else 0
        ax.plot([v - end for v in wx], wy, color="#bbbbbb", linewidth=1.6, marker="o", markersize=2,
                label="vanilla warm-up (shared)")
    for arm in arms:
        done = [r for r in runs.get(arm.name, []) if r.evals]
        if not done:
            continue
        st = styles[arm.name]
        c = mean_curve(done, key=key, x=x)
        if not c.steps:
            continue
        xs = [v * scale for v in c.x]
        ax.plot(xs, c.mean, label=f"{arm.title()} (n={len(done)})", marker="o", markersize=2.5, **st)
        _band(ax, xs, c.lo, c.hi, st)
        if x == "backprop_samples":
            if arm.name == ref:
                ax2.axhline(0.0, **st)
                continue
            d = paired_difference(done, runs.get(ref or "", []), key=key)
            if d.steps:
                ax2.plot(d.x, [v * 100 for v in d.mean], marker="o", markersize=2.5, **st)
                ax2.fill_between(d.x, [v * 100 for v in d.ci_lo], [v * 100 for v in d.ci_hi], color=st["color"],
                                 alpha=0.12, linewidth=0)
        else:
            half = [i for i, s in enumerate(c.steps) if s >= (c.steps[0] + c.steps[-1]) / 2]
            ax2.plot([xs[i] for i in half], [c.mean[i] for i in half], marker="o", markersize=3, **st)
            _band(ax2, [xs[i] for i in half], [c.lo[i] for i in half], [c.hi[i] for i in half], st)
    for t in targets:
        ax.axhline(t, color="#444444", linewidth=0.8, linestyle=":")
        ax.annotate(f"target {t:.4f}", xy=(0.01, t), xycoords=("axes fraction", "data"), fontsize=8,
                    va="bottom", color="#444444")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    if x == "backprop_samples":
        ax.xaxis.set_major_formatter(FuncFormatter(_samples_fmt))
        ax2.xaxis.set_major_formatter(FuncFormatter(_samples_fmt))
        ax2.set_ylabel(f"{key.replace('_', ' ')} minus {ref}, same seed (percentage points)")
        ax2.set_title(f"paired difference to {ref} (mean, 95% t interval over seeds)", fontsize=10)
    else:
        ax2.set_ylabel(key.replace("_", " "))
        ax2.set_title("second half of training, zoomed", fontsize=10)
    ax2.set_xlabel(xlabel)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fidelity_figure(path: Path, arms: Sequence[Arm], runs: dict[str, list[RunCurves]], *, title: str) -> None:
    """Spearman correlation and top-B overlap of the exit scores with exact losses, and the kept and
    dropped mean scores, over training (mean over seeds), for each selecting (top-k) arm."""
    styles = _styles(arms)
    selecting = [a for a in arms if any("spearman" in rec or "kept_score" in rec
                                        for r in runs.get(a.name, []) for rec in r.steps)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for arm in selecting:
        st = styles[arm.name]
        for ax, key in zip(axes[:2], ("spearman", "topk_overlap")):
            steps, vals = fidelity_curve(runs[arm.name], key)
            if steps:
                ax.plot(steps, vals, label=arm.title(), marker="o", markersize=2, **st)
        steps, kept = fidelity_curve(runs[arm.name], "kept_score")
        _, dropped = fidelity_curve(runs[arm.name], "dropped_score")
        if steps:
            axes[2].plot(steps, [k - d for k, d in zip(kept, dropped)], label=arm.title(), **st)
    axes[0].set_ylabel("Spearman(exit score, exact loss)")
    axes[1].set_ylabel("top-B overlap with exact-loss selection")
    axes[1].axhline(0.5, color="#7f7f7f", linewidth=1, linestyle=":")
    axes[1].annotate("chance (keep = 0.5)", xy=(0.02, 0.5), xycoords=("axes fraction", "data"), fontsize=8,
                     va="bottom", color="#555555")
    axes[2].set_ylabel("mean kept score − mean dropped score")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
