"""The study's figures (PNG, matplotlib's Agg backend): like the paper's figures 1 and 2, with seed bands,
plus the paired difference to vanilla and the proxy's fidelity over training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from benchmarks.study_report import RunCurves, fidelity_curve, mean_curve, paired_difference
from benchmarks.study_spec import Arm

_LOSS = ("#08306b", "#2171b5", "#6baed6", "#9ecae1")  # blues, deep exits darker last
_ENTROPY = ("#7f2704", "#d94801", "#fd8d3c", "#fdbe85")
_STYLES = ("-", "--", "-.", ":")


def arm_style(arm: Arm, exits: Sequence[int]) -> dict[str, object]:
    """Colour by criterion (vanilla black, random grey, loss blue, entropy orange), dash by exit depth."""
    if arm.policy == "none":
        return {"color": "black", "linestyle": "-", "linewidth": 2.2}
    if arm.policy == "random":
        return {"color": "#7f7f7f", "linestyle": "-", "linewidth": 1.8}
    i = list(exits).index(arm.exit_layer) if arm.exit_layer in exits else 0
    palette = _LOSS if arm.criterion == "loss" else _ENTROPY
    return {"color": palette[i % len(palette)], "linestyle": _STYLES[i % len(_STYLES)], "linewidth": 1.6}


def _samples_fmt(x: float, _pos: int) -> str:
    return f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k" if x >= 1e3 else f"{x:g}"


def _band(ax, xs, lo, hi, style) -> None:
    ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.12, linewidth=0)


def _exits(arms: Sequence[Arm]) -> list[int]:
    return sorted({a.exit_layer for a in arms if a.policy == "topk"})


def accuracy_figure(path: Path, arms: Sequence[Arm], runs: dict[str, list[RunCurves]], *, x: str,
                    title: str, targets: Sequence[float] = (), ref: str | None = "vanilla", token: str = "mlm") -> None:
    """Left: validation token accuracy (``val_<token>_acc``; mean over seeds, min–max band) against ``x``.
    Right, for the samples axis: the paired difference to ``ref``; for the hours axis: the last half of
    the run, zoomed."""
    key, ylabel = f"val_{token}_acc", f"validation {token.upper()} accuracy"
    exits = _exits(arms)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.6), gridspec_kw={"width_ratios": [1.15, 1]})
    xlabel = "back-propagated samples" if x == "backprop_samples" else "wall-clock hours"
    for arm in arms:
        done = [r for r in runs.get(arm.name, []) if r.evals]
        if not done:
            continue
        st = arm_style(arm, exits)
        c = mean_curve(done, key=key, x=x)
        label = f"{arm.label()} (n={len(done)})"
        ax.plot(c.x, c.mean, label=label, marker="o", markersize=2.5, **st)
        _band(ax, c.x, c.lo, c.hi, st)
        if x == "backprop_samples":
            if arm.name == ref:
                ax2.axhline(0.0, **st)
                continue
            d = paired_difference(done, runs.get(ref or "", []), key=key)
            if d.steps:
                ax2.plot(d.x, [v * 100 for v in d.mean], marker="o", markersize=2.5, **st)
                ax2.fill_between(d.x, [v * 100 for v in d.lo], [v * 100 for v in d.hi], color=st["color"],
                                 alpha=0.12, linewidth=0)
        else:
            half = [i for i, s in enumerate(c.steps) if s >= c.steps[-1] / 2]
            ax2.plot([c.x[i] for i in half], [c.mean[i] for i in half], marker="o", markersize=3, **st)
            _band(ax2, [c.x[i] for i in half], [c.lo[i] for i in half], [c.hi[i] for i in half], st)
    for t in targets:
        ax.axhline(t, color="#444444", linewidth=0.8, linestyle=":")
        ax.annotate(f"target {t:.3f}", xy=(0.01, t), xycoords=("axes fraction", "data"), fontsize=8,
                    va="bottom", color="#444444")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    if x == "backprop_samples":
        ax.xaxis.set_major_formatter(FuncFormatter(_samples_fmt))
        ax2.xaxis.set_major_formatter(FuncFormatter(_samples_fmt))
        ax2.set_ylabel(f"accuracy minus {ref}, same seed (percentage points)")
        ax2.set_title(f"paired difference to {ref} (mean, min–max over seeds)", fontsize=11)
    else:
        ax2.set_ylabel(ylabel)
        ax2.set_title("second half of training, zoomed", fontsize=11)
    ax2.set_xlabel(xlabel)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fidelity_figure(path: Path, arms: Sequence[Arm], runs: dict[str, list[RunCurves]], *, title: str) -> None:
    """Spearman correlation and top-B overlap of the exit scores with exact losses, and the kept and
    dropped mean scores, over training (mean over seeds), for each selecting (top-k) arm."""
    exits = _exits(arms)
    selecting = [a for a in arms if a.policy == "topk" and runs.get(a.name)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for arm in selecting:
        st = arm_style(arm, exits)
        for ax, key in zip(axes[:2], ("spearman", "topk_overlap")):
            steps, vals = fidelity_curve(runs[arm.name], key)
            if steps:
                ax.plot(steps, vals, label=arm.label(), marker="o", markersize=2, **st)
        steps, kept = fidelity_curve(runs[arm.name], "kept_score")
        _, dropped = fidelity_curve(runs[arm.name], "dropped_score")
        if steps:
            axes[2].plot(steps, [k - d for k, d in zip(kept, dropped)], label=arm.label(), **st)
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
