"""Markdown table and PNG chart of a throughput result (the JSON that benchmarks/throughput.py writes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PHASE_COLORS = {"data": "#b0b0b0", "scoring": "#d95f02", "forward": "#1b9e77", "backward": "#7570b3",
                "optimizer": "#e7298a"}
BAR_STYLES = {("serial", 0): ("#7fb2d9", ""), ("pipelined", 0): ("#1f5f99", ""),
              ("serial", 1): ("#f2b27a", "//"), ("pipelined", 1): ("#b35806", "//")}


def _f(x: float | None, spec: str, scale: float = 1.0) -> str:
    if x is None:
        return "–"
    return format(x if scale == 1.0 else x * scale, spec)


def _row(r: dict[str, Any], show_compile: bool) -> str:
    st, ph = r["step_time_s"], r["phases_s"]
    mfu = r["mfu"]
    cells = [
        str(r["seq_len"]), r["variant"], _f(r["exit_layer"], "d"), r["criterion"] or "–",
        *(["on" if r["compile"] else "off"] if show_compile else []),
        f"{1e3 * st['median']:.1f} ({1e3 * st['p10']:.1f}–{1e3 * st['p90']:.1f})",
        f"{r['backprop_seq_per_s']:.1f}", f"{r['backprop_tokens_per_s']:,.0f}", f"{r['scored_seq_per_s']:.1f}",
        _f(r["overhead_ratio"], ".3f"), _f(r["overlap_efficiency"], ".2f"),
        f"{r['model_tflops']['train']:.3g} / {r['model_tflops']['with_scoring']:.3g}",
        f"{_f(mfu['train'], '.1%')} / {_f(mfu['with_scoring'], '.1%')}",
        *(f"{1e3 * ph[k]:.1f}" for k in ("scoring", "forward", "backward", "optimizer", "data")),
        f"{_f(r['peak_mem_bytes'], '.2f', 2.0**-30)} / {_f(r['peak_reserved_bytes'], '.2f', 2.0**-30)}",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(result: dict[str, Any]) -> str:
    m, s, rows = result["meta"], result["meta"]["settings"], result["rows"]
    show_compile = len({r["compile"] for r in rows}) > 1
    G = round(s["micro_batch"] / s["keep"])
    head = [
        f"# Throughput: {m['preset']}",
        "",
        f"- device: {m['device']}" + (f" (CUDA {m['cuda']})" if m.get("cuda") else ""),
        f"- versions: python {m['python']}, torch {m['torch']}, deepspeed {m['deepspeed']}, "
        f"transformers {m['transformers']}",
        f"- date: {m['date']}; git commit: {m['git_commit']}",
        f"- command: `{m['command']}`" + (f" (DS_ACCELERATOR={m['ds_accelerator']})" if m.get("ds_accelerator") else ""),
        f"- model: {s.get('family', 'bert')} preset {s['model']}, vocabulary {s['vocab']}, {s['precision']}, ZeRO-{s['zero_stage']}, "
        f"compile {m['compile']}; B = {s['micro_batch']} back-propagated, G = {G} scored per step",
        f"- {s['warmup']} warm-up + {s['steps']} timed steps per variant; timing: {m['timing']}; "
        f"synthetic data, {m['real_token_fraction']:.0%} of positions are text",
        f"- MFU peak: {_f(m['peak_flops'], '.0f', 1e-12)} TFLOP/s" + ("" if m["peak_flops"] else
                                                                     " (unknown for this device: MFU not computed)"),
        "",
        "Step time: median (p10–p90). Throughputs, MFU and ratios use the median step time. "
        "× vanilla: back-propagated seq/s over vanilla's. Overlap: (serial − pipelined median step time) / "
        "serial scoring time per step. Phase columns: mean ms per step (pipelined scoring runs on a side stream, overlapped). "
        "Token counts include padding.",
        "",
    ]
    cols = ["T", "variant", "exit", "criterion", *(["compile"] if show_compile else []), "step ms",
            "bp seq/s", "bp tok/s", "scored seq/s", "× vanilla", "overlap", "TFLOP/s train / +scoring",
            "MFU train / +scoring", "scoring ms", "fwd ms", "bwd ms", "opt ms", "data ms",
            "peak GiB alloc / reserved"]
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += [_row(r, show_compile) for r in rows]
    tail = ["", f"FLOPs: {m['flop_formula']}."]
    if m["device_type"] != "cuda":
        tail.append("CPU smoke run: it checks the harness end to end; its numbers are not GPU predictions "
                    "(on CPU the pipelined schedule runs sequentially, so it cannot overlap).")
    return "\n".join(head + table + tail) + "\n"


def _panels(rows: list[dict[str, Any]]) -> list[tuple[int, bool]]:
    return sorted({(r["seq_len"], r["compile"]) for r in rows})


def chart(result: dict[str, Any], path: Path) -> None:
    """Top: back-propagated seq/s per exit layer (vanilla and the 0.90x serial / 0.96x pipelined targets as lines).
    Bottom: mean step-time breakdown per variant (first criterion), the median step time as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, meta = result["rows"], result["meta"]
    panels = _panels(rows)
    fig, axes = plt.subplots(2, len(panels), figsize=(6.5 * len(panels), 9), squeeze=False)
    for col, (T, comp) in enumerate(panels):
        mine = [r for r in rows if r["seq_len"] == T and r["compile"] == comp]
        title = f"T = {T}" + (", compiled" if comp else "")
        _throughput_panel(axes[0][col], mine, title)
        _breakdown_panel(axes[1][col], mine)
    fig.suptitle(f"{meta['preset']} on {meta['device']}\ntorch {meta['torch']}, deepspeed {meta['deepspeed']}, "
                 f"{meta['settings']['precision']}, B = {meta['settings']['micro_batch']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput_panel(ax: Any, rows: list[dict[str, Any]], title: str) -> None:
    exits = sorted({r["exit_layer"] for r in rows if r["exit_layer"] is not None})
    criteria = sorted({r["criterion"] for r in rows if r["criterion"]}, key=lambda c: (c != "loss", c))
    series = [(k, c) for c in criteria for k in ("serial", "pipelined")]
    width = 0.8 / max(1, len(series))
    for i, (kind, crit) in enumerate(series):
        by_exit = {r["exit_layer"]: r["backprop_seq_per_s"] for r in rows if r["variant"] == kind and r["criterion"] == crit}
        xs = [x + (i - (len(series) - 1) / 2) * width for x, j in enumerate(exits) if j in by_exit]
        color, hatch = BAR_STYLES[(kind, criteria.index(crit) % 2)]
        ax.bar(xs, [by_exit[j] for j in exits if j in by_exit], width, label=f"{kind}, {crit}", color=color,
               hatch=hatch, edgecolor="black", linewidth=0.5)
        for x, j in zip(xs, [j for j in exits if j in by_exit]):
            ratio = next(r["overhead_ratio"] for r in rows if r["variant"] == kind and r["criterion"] == crit
                         and r["exit_layer"] == j)
            if ratio is not None:
                ax.text(x, by_exit[j], f"{ratio:.2f}", ha="center", va="bottom", fontsize=7, rotation=90,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    top = max([r["backprop_seq_per_s"] for r in rows] or [1.0])
    vanilla = next((r for r in rows if r["variant"] == "vanilla"), None)
    if vanilla:
        v = vanilla["backprop_seq_per_s"]
        ax.axhline(v, color="black", lw=1.5, label=f"vanilla {v:,.1f}")
        ax.axhline(0.96 * v, color="black", lw=1, ls="--", label="0.96 x vanilla (pipelined target)")
        ax.axhline(0.90 * v, color="black", lw=1, ls=":", label="0.90 x vanilla (serial target)")
    ax.set_ylim(0, 1.45 * top)  # headroom for the legend above the bars
    ax.set_xticks(range(len(exits)), [f"exit {j}" for j in exits])
    ax.set_ylabel("back-propagated sequences / s\n(bar labels: x vanilla)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", ncol=4, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)


def _breakdown_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    crit = next((r["criterion"] for r in rows if r["criterion"]), None)
    chosen = [r for r in rows if r["variant"] == "vanilla" or r["criterion"] == crit]
    labels = ["vanilla" if r["variant"] == "vanilla" else f"{r['variant']} j{r['exit_layer']}" for r in chosen]
    bottom = [0.0] * len(chosen)
    for phase, color in PHASE_COLORS.items():
        ms = [1e3 * r["phases_s"][phase] for r in chosen]
        ax.bar(range(len(chosen)), ms, 0.7, bottom=bottom, color=color, label=phase)
        bottom = [b + m for b, m in zip(bottom, ms)]
    ax.plot(range(len(chosen)), [1e3 * r["step_time_s"]["median"] for r in chosen], "k_", ms=22, mew=2.5,
            label="median step")
    ax.set_xticks(range(len(chosen)), labels, rotation=45, ha="right")
    ax.set_ylabel("ms per step (phases; pipelined scoring overlaps)")
    ax.set_title(f"step-time breakdown ({crit or 'vanilla'})")
    ax.set_ylim(0, 1.3 * max(max(bottom), *(1e3 * r["step_time_s"]["median"] for r in chosen)))
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
