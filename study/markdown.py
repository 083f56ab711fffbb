"""A study's tables as markdown: pure formatting of the rows study/report.py computes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from study.report import FLOPS_AXES, X_AXES


def _pm(s: dict[str, Any] | None, digits: int = 4, scale: float = 1.0) -> str:
    if not s or "mean" not in s:
        return "–"
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def _range(s: dict[str, Any] | None, digits: int = 4, scale: float = 1.0) -> str:
    if not s or "mean" not in s:
        return "–"
    return f"[{s['min'] * scale:.{digits}f}, {s['max'] * scale:.{digits}f}]"


def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def markdown_final(rows: list[dict[str, Any]], labels: dict[str, str], ref: str | None, token: str = "mlm") -> str:
    acc, loss, name = f"val_{token}_acc", f"val_{token}_loss", token.upper()
    head = (f"| arm | seeds | val {name} acc (mean ± std) | min–max | Δ vs " + (ref or "ref") +
            f" (paired, mean ± std) | Δ min–max | val {name} loss | wall clock, min | backprop seq/s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if not r.get("seeds"):
            lines.append(f"| {labels.get(r['arm'], r['arm'])} | 0 | no complete run | | | | | | |")
            continue
        lines.append(
            f"| {labels.get(r['arm'], r['arm'])} | {r['seeds']} | {_pm(r[acc])} | {_range(r[acc])}"
            f" | {_pm(r['delta_vs_ref'], scale=1.0) if r['delta_vs_ref'] else '(reference)'}"
            f" | {_range(r['delta_vs_ref']) if r['delta_vs_ref'] else ''}"
            f" | {_pm(r[loss], 3)} | {_pm(r['hours'], 1, 60.0)} | {_pm(r['backprop_seq_per_s'], 0)} |"
        )
    return "\n".join(lines)


def markdown_equal_time(rows: list[dict[str, Any]], labels: dict[str, str], ref: str | None,
                        token: str = "mlm") -> str:
    """Accuracy of each arm when its seed's reference run had finished (same wall clock)."""
    lines = [f"| arm | val {token.upper()} acc at {ref}'s final wall clock (mean ± std) | Δ vs {ref} (paired, mean ± std)"
             " | Δ min–max |", "|---|---|---|---|"]
    for r in rows:
        if not r.get("seeds"):
            continue
        d = r.get("delta_at_ref_hours")
        lines.append(f"| {labels.get(r['arm'], r['arm'])} | {_pm(r.get('acc_at_ref_hours'))} | "
                     f"{_pm(d) if d else '(reference)'} | {_range(d) if d else ''} |")
    return "\n".join(lines)


def markdown_per_seed(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    seeds = sorted({int(k) for r in rows for k in (r.get("per_seed") or {})})
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|" + "---|" * (1 + len(seeds))]
    for r in rows:
        per = {int(k): v for k, v in (r.get("per_seed") or {}).items()}
        lines.append(f"| {labels.get(r['arm'], r['arm'])} | "
                     + " | ".join(f"{per[s]:.4f}" if s in per else "–" for s in seeds) + " |")
    return "\n".join(lines)


def markdown_targets(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    if not rows:
        return "(no targets: none given, and the reference arm did not improve on its start)"
    axes = [a for a in X_AXES if any(a in r for r in rows)]
    names = {"backprop_samples": ("back-prop samples", 0, 1.0), "hours": ("wall-clock min", 1, 60.0),
             "cpu_s": ("CPU min", 1, 1 / 60)}
    lines = ["| target acc | arm | " + " | ".join(f"{names[a][0]} to target (mean [min, max]) | × vs ref"
                                                 for a in axes) + " |", "|" + "---|" * (2 + 2 * len(axes))]
    for r in rows:
        cells = []
        for x in axes:
            _, digits, scale = names[x]
            s = r.get(x)
            if s is None:
                cells += ["–", "–"]
            elif "mean" in s:
                cells.append(f"{s['mean'] * scale:,.{digits}f} {_range(s, digits, scale)}")
                cells.append(_num(s.get("speedup_vs_ref"), ".2f"))
            else:
                hits = ", ".join(f"seed {k}: {v * scale:,.{digits}f}" for k, v in s["per_seed"].items() if v is not None)
                cells.append(f"not reached ({s['reached']}/{r['seeds']} seeds{'; ' + hits if hits else ''})")
                cells.append("–")
        lines.append(f"| {r['target']:.4f} | {labels.get(r['arm'], r['arm'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_fidelity(rows: list[dict[str, Any]], labels: dict[str, str] | None = None) -> str:
    labels = labels or {}
    lines = ["| arm | criterion | exit | Spearman (all) | first ⅓ | last ⅓ | last ⅓, worst seed | top-B overlap (all) |"
             " first ⅓ | last ⅓ | kept score | dropped score | scoring s/step | fwd+bwd+opt s/step |",
             "|" + "---|" * 14]
    for r in rows:
        per = r.get("spearman_last_third_per_seed") or {}
        worst = min(per.items(), key=lambda kv: kv[1]) if per else None
        lines.append(
            f"| {labels.get(r['arm'], r['arm'])} | {r['criterion']} | {r['exit_layer']} | {_num(r['spearman'], '.3f')} | {_num(r['spearman_first_third'], '.3f')}"
            f" | {_num(r['spearman_last_third'], '.3f')} | {f'{worst[1]:.3f} (seed {worst[0]})' if worst else '–'}"
            f" | {_num(r['topk_overlap'], '.3f')}"
            f" | {_num(r['topk_overlap_first_third'], '.3f')} | {_num(r['topk_overlap_last_third'], '.3f')}"
            f" | {_num(r['kept_score'], '.3f')} | {_num(r['dropped_score'], '.3f')}"
            f" | {_num(r['time_scoring'], '.3f')} | {_num(r['time_train'], '.3f')} |"
        )
    return "\n".join(lines)


def _pp(ci: dict[str, Any] | None) -> str:
    """A paired accuracy difference in percentage points: "+0.12 [−0.05, +0.29]" (mean [95% CI])."""
    if not ci or "mean" not in ci:
        return "–"
    if "lo" not in ci:
        return f"{ci['mean'] * 100:+.2f} (n={ci['n']})"
    return f"{ci['mean'] * 100:+.2f} [{ci['lo'] * 100:+.2f}, {ci['hi'] * 100:+.2f}]"


AXIS_NAMES = {"flops": "equal counted FLOPs", "backprop_samples": "equal back-propagated samples",
              "cpu_s": "equal CPU time", "hours": "equal wall clock"}


def markdown_comparisons(rows: list[dict[str, Any]], labels: dict[str, str], ref: str, metric: str) -> str:
    """One table: every arm against ``ref`` on ``metric``, at the three equalities."""
    mine = [r for r in rows if r["ref"] == ref and r["metric"] == metric]
    axes = [a for a in FLOPS_AXES if any(r["axis"] == a and r.get("n") for r in mine)]
    lines = ["| arm | seeds | " + " | ".join(f"Δ at {AXIS_NAMES[a]}, pp [95% CI] | verdict" for a in axes) + " |",
             "|---|---|" + "---|---|" * len(axes)]
    for arm in dict.fromkeys(r["arm"] for r in mine):
        cells = []
        n = 0
        for a in axes:
            r = next((x for x in mine if x["arm"] == arm and x["axis"] == a), None)
            n = max(n, (r or {}).get("n", 0))
            cells += [_pp(r), (r or {}).get("verdict", "–")]
        lines.append(f"| {labels.get(arm, arm)} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_lines(rows: list[dict[str, Any]], labels: dict[str, str], arms: Sequence[str], refs: Sequence[str],
                  metrics: Sequence[str], axes: Sequence[str] = ("backprop_samples", "cpu_s")) -> list[str]:
    """Per metric, reference and equality: which of ``arms`` are better / worse beyond the 95% interval."""
    out = []
    for metric in metrics:
        for ref in refs:
            for axis in axes:
                mine = [r for r in rows if r["metric"] == metric and r["ref"] == ref and r["axis"] == axis
                        and r["arm"] in arms and r.get("n")]
                if not mine:
                    continue
                parts = []
                for word in ("better", "worse"):
                    hit = [f"{labels.get(r['arm'], r['arm'])} ({_pp(r)})" for r in mine if r["verdict"] == word]
                    if hit:
                        parts.append(f"**{word}**: " + "; ".join(hit))
                rest = [labels.get(r["arm"], r["arm"]) for r in mine if r["verdict"] == "n.s."]
                if rest:
                    parts.append("within the interval: " + ", ".join(rest))
                few = [labels.get(r["arm"], r["arm"]) for r in mine if r["verdict"] == "–"]
                if few:
                    parts.append("one seed, no interval yet: " + ", ".join(few))
                out.append(f"- {metric}, vs {ref}, at {AXIS_NAMES[axis]}: " + "; ".join(parts))
    return out


def holm_lines(rows: list[dict[str, Any]], labels: dict[str, str], level: float = 0.05) -> list[str]:
    """The comparisons at equal samples that stay significant after Holm's correction over all of them
    (every arm against the reference and the control, every metric), or the closest one."""
    family = [r for r in rows if "p_holm" in r]
    if not family:
        return []

    def name(r: dict[str, Any]) -> str:
        return f"{labels.get(r['arm'], r['arm'])} vs {r['ref']} on {r['metric']} ({_pp(r)}, adjusted p {r['p_holm']:.3f})"

    axis = AXIS_NAMES.get(family[0].get("axis", "backprop_samples"), "the end of training")
    head = f"- Holm-corrected over the {len(family)} comparisons at {axis}: "
    hold = sorted((r for r in family if r["p_holm"] < level), key=lambda r: r["p_holm"])
    if hold:
        return [head + f"**significant at {level:.0%}**: " + "; ".join(map(name, hold))]
    closest = min(family, key=lambda r: (r["p_holm"], r["p"]))  # adjusted values tie at 1
    return [head + f"none significant at {level:.0%}; the closest: " + name(closest)]


def markdown_budget(budget: dict[str, Any], labels: dict[str, str]) -> str:
    """Per arm under ``study.budget: flops``: its steps and counted FLOPs per step, by part."""
    lines = ["| arm | steps | GFLOPs/step | train | scoring | reference forward |", "|---|---|---|---|---|---|"]
    for name, a in budget.get("arms", {}).items():
        lines.append(f"| {labels.get(name, name)} | {a['steps']} | {a['total'] / 1e9:.3f} | {a['train'] / 1e9:.3f} | "
                     f"{a['score'] / 1e9:.3f} | {a['reference'] / 1e9:.3f} |")
    return "\n".join(lines)


def markdown_reference(ref: dict[str, Any], budget_flops: float | None) -> str:
    """The reference model's cost (`sift reference`), and its share of vanilla's budget."""
    lines = ["| reference | trained on | steps | rows trained | wall-clock seconds | GFLOPs | share of vanilla's budget |",
             "|---|---|---|---|---|---|---|"]
    for r in ref.get("references", []):
        share = f"{r['flops'] / budget_flops:.1%}" if budget_flops else "–"
        rows = f"half {r['half']}" if r.get("half") is not None else f"split {r.get('split')}"
        lines.append(f"| {r['name']} | {rows} | {r['steps']} | {r['backprop_samples']} | {r['seconds']:.0f} | "
                     f"{r['flops'] / 1e9:.1f} | {share} |")
    side = ref.get("sidecar")
    if side:
        share = f"{side['flops'] / budget_flops:.1%}" if budget_flops else "–"
        lines.append(f"| loss sidecar | every training row | – | {side['rows']} forwards | {side['seconds']:.0f} | "
                     f"{side['flops'] / 1e9:.1f} | {share} |")
    return "\n".join(lines)


def _share_ci(ci: dict[str, Any] | None) -> str:
    if not ci or "mean" not in ci:
        return "–"
    return f"{ci['mean']:.1%} [{ci['lo']:.1%}, {ci['hi']:.1%}]" if "lo" in ci else f"{ci['mean']:.1%}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def markdown_kept(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    """Per arm and kind: the drawn share, then the kept-row share and the loss-weight share (the gradient's
    view; the same for top-k) at the branch point and at the end of the runs. Rows from a results.json made
    before the probe recorded weights (no ``weighted`` key: every arm top-k) get the kept-row columns only."""
    if not any("weighted" in r for r in rows):
        return _markdown_kept_rows(rows, labels)
    lines = ["| arm | kind of row | drawn (= vanilla, random) | kept rows at the branch point, exit / exact | "
             "weight share at the branch point, exit | kept rows at the end, exit [95% CI] | "
             "weight share at the end, exit [95% CI] | kept rows / weight share at the end, exact |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        branch = (f"{_pct(r['branch_exit'])} / {_pct(r['branch_exact'])}"
                  if r["branch_exit"] is not None or r["branch_exact"] is not None else "–")
        exact, exact_w = _pct(r["end_exact"].get("mean")), _pct((r.get("end_exact_weight") or {}).get("mean"))
        lines.append(f"| {labels.get(r['arm'], r['arm'])} | {r['kind']} | {r['drawn']:.1%} | {branch} | "
                     f"{_pct(r.get('branch_exit_weight'))} | {_share_ci(r['end_exit'])} | "
                     f"{_share_ci(r.get('end_exit_weight'))} | {exact} / {exact_w} |")
    return "\n".join(lines)


def _markdown_kept_rows(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    lines = ["| arm | kind of row | drawn (= vanilla, random) | kept at the branch point, exit / exact | "
             "kept at the end, exit [95% CI] | kept at the end, exact |", "|---|---|---|---|---|---|"]
    for r in rows:
        branch = (f"{_pct(r['branch_exit'])} / {_pct(r['branch_exact'])}"
                  if r["branch_exit"] is not None and r["branch_exact"] is not None else "–")
        lines.append(f"| {labels.get(r['arm'], r['arm'])} | {r['kind']} | {r['drawn']:.1%} | {branch} | "
                     f"{_share_ci(r['end_exit'])} | {_pct(r['end_exact'].get('mean'))} |")
    return "\n".join(lines)


def markdown_costs(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    lines = ["| arm | seeds | CPU min per run (mean ± std) | wall-clock min per run | load average (1 min) "
             "| VCAS training FLOPs vs exact |", "|---|---|---|---|---|---|"]
    for r in rows:
        load, flops = r["load"], r.get("vcas_flops")
        lines.append(f"| {labels.get(r['arm'], r['arm'])} | {r['seeds']} | {_pm(r['cpu_s'], 1, 1 / 60)} | "
                     f"{_pm(r['wall_s'], 1, 1 / 60)} | {_pm(load, 2) if 'mean' in load else '–'} | "
                     f"{_pm(flops, 3) if flops else '–'} |")
    return "\n".join(lines)


def markdown_turn_on(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    """"When to turn it on" (study/turn_on.py): per regime and model kind, the method, its cost and its gain
    at equal counted FLOPs, or why there is none."""
    lines = ["| regime / model | method | cost: counted FLOPs vs vanilla (steps), reference | gain at equal compute: "
             "Δ validation acc vs vanilla, pp [95% CI] | held-out Δ vs vanilla | Δ vs the random control |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        label = r["label"] + (f" ({r['incomplete']} run(s) incomplete)" if r.get("incomplete") else "")
        if r.get("status"):
            lines.append(f"| {label} | {r['status']} | – | – | – | – |")
            continue
        if r["method"] is None:
            c = r["closest"]
            lines.append(f"| {label} | none: no arm beats vanilla beyond its interval | – | highest mean: "
                         f"{labels.get(c['arm'], c['arm'])} {_pp(c)} | – | – |")
            continue
        cost = r["cost"]
        ratio = "–" if cost["flops_vs_vanilla"] is None else f"{cost['flops_vs_vanilla']:.2f}×"
        ref = cost["reference"]
        ref_text = ("" if ref is None else "; + its own reference (cost not measured)" if ref == "own"
                    else f"; + {ref:.1%} of vanilla's budget for the reference (once per regime)")
        also = f" (also beyond the interval: {', '.join(labels.get(a, a) for a in r['also'])})" if r["also"] else ""
        held = "; ".join(_pp(ci) for ci in r["heldout"].values()) or "–"
        lines.append(f"| {label} | {labels.get(r['method'], r['method'])}{also} | {ratio} ({cost['steps']} steps, "
                     f"vanilla {cost['vanilla_steps']}){ref_text} | **{_pp(r['gain'])}** | {held} | "
                     f"{_pp(r['vs_control'])} |")
    return "\n".join(lines)
