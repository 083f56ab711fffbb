"""Reading a study's runs and summarising them: pure functions over the logged curves, then the tables.

Every number here comes from a run's metrics.jsonl: the "eval" records (validation token accuracy and
loss: ``val_mlm_*`` for BERT, ``val_lm_*`` for decoders, see ``token_name``; back-propagated samples,
wall-clock hours) and the step records (fidelity, kept/dropped scores,
throughput, phase times). Plots live in study_plots.py.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- one run


@dataclass(slots=True)
class RunCurves:
    """The logged curves of one (arm, seed) run."""

    arm: str
    seed: int
    evals: list[dict[str, Any]]  # eval records in step order, one per step
    steps: list[dict[str, Any]]  # step records in step order, one per step
    complete: bool
    summary: dict[str, Any] | None = None

    def series(self, key: str, x: str = "backprop_samples") -> tuple[list[float], list[float]]:
        """(x, y) of an eval quantity, e.g. ("val_mlm_acc", "hours")."""
        pts = [(e[x], e[key]) for e in self.evals if key in e and x in e]
        return [p[0] for p in pts], [p[1] for p in pts]

    @property
    def final(self) -> dict[str, Any] | None:
        return self.evals[-1] if self.evals else None


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(eval records, step records), each deduplicated by step with the last record winning.

    A run resumed from a checkpoint re-logs the steps after that checkpoint; the later records are the
    ones that led to the final weights. A truncated last line (a killed writer) is ignored.
    """
    evals: dict[int, dict[str, Any]] = {}
    steps: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        target = evals if rec.get("event") == "eval" else steps if "event" not in rec else None
        if target is not None and "step" in rec:
            target[int(rec["step"])] = rec
    return [evals[s] for s in sorted(evals)], [steps[s] for s in sorted(steps)]


def load_run(run_dir: Path, arm: str, seed: int, total_steps: int) -> RunCurves:
    evals, steps = read_metrics(run_dir / "metrics.jsonl")
    summary = None
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    complete = summary is not None and summary.get("steps") == total_steps
    return RunCurves(arm, seed, evals, steps, complete, summary)


# ----------------------------------------------------------------------------- time to target


def time_to_target(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """The x at which the curve (xs, ys) first reaches ``target``, interpolating linearly between the
    two evaluations that straddle it; None when no evaluation reaches it.

    When the first evaluation already reaches it, that evaluation's x is returned: the curve is not
    known before its first point, so this is an upper bound.
    """
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys differ in length ({len(xs)} vs {len(ys)})")
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y >= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (target - y0) * (x - x0) / (y - y0))  # y > target > y0 here
    return None


def value_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """The curve's value at ``x`` by linear interpolation; its last value past its end (the run had
    finished by then); None before its first point."""
    if not xs or x < xs[0]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return float(y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return float(ys[-1])


def auto_targets(final_accs: Sequence[float]) -> list[float]:
    """Targets when a study names none: what the reference arm (vanilla) ends at, and 90% of it,
    each rounded down to a multiple of 0.005 — "how soon does an arm reach what vanilla reaches"."""
    if not final_accs:
        return []
    ref = statistics.fmean(final_accs)
    return sorted({math.floor(t * 200 + 1e-9) / 200 for t in (0.9 * ref, ref) if t > 0})


# ----------------------------------------------------------------------------- across seeds


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


@dataclass(slots=True)
class MeanCurve:
    """An arm's evaluation curve over seeds, at the evaluation steps every seed has."""

    steps: list[int]
    x: list[float]  # mean over seeds of the x quantity at each step
    mean: list[float]
    lo: list[float]  # min over seeds
    hi: list[float]  # max over seeds


def token_name(runs: dict[str, list[RunCurves]]) -> str:
    """The model's token-objective name in its metric keys (engine/models: ``mlm`` for BERT, ``lm`` for
    decoders), from any run's summary.json, else from its eval records; ``mlm`` when nothing says."""
    for rs in runs.values():
        for r in rs:
            if r.summary and r.summary.get("token_loss"):
                return str(r.summary["token_loss"])
            for e in r.evals:
                for k in e:
                    if k.startswith("val_") and k.endswith("_acc"):
                        return k[len("val_"):-len("_acc")]
    return "mlm"


def mean_curve(runs: Sequence[RunCurves], key: str = "val_mlm_acc", x: str = "backprop_samples") -> MeanCurve:
    common = sorted(set.intersection(*(set(e["step"] for e in r.evals) for r in runs))) if runs else []
    by_run = [{e["step"]: e for e in r.evals} for r in runs]
    out = MeanCurve([], [], [], [], [])
    for s in common:
        ys = [b[s][key] for b in by_run]
        out.steps.append(s)
        out.x.append(statistics.fmean(b[s][x] for b in by_run))
        out.mean.append(statistics.fmean(ys))
        out.lo.append(min(ys))
        out.hi.append(max(ys))
    return out


def paired_difference(runs: Sequence[RunCurves], ref: Sequence[RunCurves], key: str = "val_mlm_acc") -> MeanCurve:
    """Arm minus reference at each common evaluation step, paired by seed (same init, same validation
    masks), over the seeds both have; x is the arm's mean back-propagated samples."""
    ref_by_seed = {r.seed: {e["step"]: e for e in r.evals} for r in ref}
    pairs = [(r, ref_by_seed[r.seed]) for r in runs if r.seed in ref_by_seed]
    out = MeanCurve([], [], [], [], [])
    if not pairs:
        return out
    common = sorted(set.intersection(*(set(e["step"] for e in r.evals) & set(b) for r, b in pairs)))
    for s in common:
        mine = [{e["step"]: e for e in r.evals}[s] for r, _ in pairs]
        diffs = [m[key] - b[s][key] for m, (_, b) in zip(mine, pairs)]
        out.steps.append(s)
        out.x.append(statistics.fmean(m["backprop_samples"] for m in mine))
        out.mean.append(statistics.fmean(diffs))
        out.lo.append(min(diffs))
        out.hi.append(max(diffs))
    return out


# ----------------------------------------------------------------------------- tables


def _median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def run_costs(run: RunCurves) -> dict[str, float | None]:
    """Median training throughput and mean per-step phase times (seconds) over the run's step records."""
    recs = run.steps
    out: dict[str, float | None] = {"backprop_seq_per_s": _median([r.get("backprop_seq_per_s") for r in recs])}
    for phase in ("scoring", "forward", "backward", "optimizer", "data"):
        vals = [r[f"time_{phase}"] for r in recs if f"time_{phase}" in r]
        out[f"time_{phase}"] = statistics.fmean(vals) if vals else None
    return out


def final_table(arms: Sequence[str], runs: dict[str, list[RunCurves]], ref: str | None,
                token: str = "mlm") -> list[dict[str, Any]]:
    """Table 1: final validation token accuracy (``val_<token>_acc``: mean, spread over seeds), paired
    difference to the reference arm, final loss, and cost (hours, throughput)."""
    acc_key, loss_key = f"val_{token}_acc", f"val_{token}_loss"
    ref_final = {r.seed: r.final[acc_key] for r in runs.get(ref or "", []) if r.final}
    ref_hours = {r.seed: r.final["hours"] for r in runs.get(ref or "", []) if r.final}
    rows = []
    for arm in arms:
        done = [r for r in runs.get(arm, []) if r.complete and r.final]
        if not done:
            rows.append({"arm": arm, "seeds": 0})
            continue
        acc = [r.final[acc_key] for r in done]
        diffs = [r.final[acc_key] - ref_final[r.seed] for r in done if r.seed in ref_final]
        costs = [run_costs(r) for r in done]
        # accuracy when the same seed's reference run had finished: the equal-wall-clock comparison
        at_ref = {r.seed: value_at(*r.series(acc_key, "hours"), ref_hours[r.seed])
                  for r in done if r.seed in ref_hours}
        at_ref_delta = [v - ref_final[k] for k, v in at_ref.items() if v is not None]
        rows.append({
            "arm": arm, "seeds": len(done), "per_seed": {r.seed: r.final[acc_key] for r in done},
            acc_key: spread(acc),
            loss_key: spread([r.final[loss_key] for r in done]),
            "delta_vs_ref": spread(diffs) if arm != ref and diffs else None,
            "backprop_samples": done[0].final["backprop_samples"],
            "hours": spread([r.final["hours"] for r in done]),
            "backprop_seq_per_s": spread([c["backprop_seq_per_s"] for c in costs if c["backprop_seq_per_s"]]),
            "time_scoring": _mean_or_none([c["time_scoring"] for c in costs]),
            "time_train": _mean_or_none([_sum_or_none(c, ("forward", "backward", "optimizer")) for c in costs]),
            "acc_at_ref_hours": spread([v for v in at_ref.values() if v is not None]),
            "delta_at_ref_hours": spread(at_ref_delta) if arm != ref and at_ref_delta else None,
        })
    return rows


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _sum_or_none(costs: dict[str, float | None], phases: Sequence[str]) -> float | None:
    vals = [costs.get(f"time_{p}") for p in phases]
    return None if any(v is None for v in vals) else float(sum(vals))  # type: ignore[arg-type]


def target_table(arms: Sequence[str], runs: dict[str, list[RunCurves]], targets: Sequence[float],
                 ref: str | None, token: str = "mlm") -> list[dict[str, Any]]:
    """Per target and arm: back-propagated samples and hours to reach it, per seed and over seeds.

    An arm counts as reaching a target only when every one of its seeds does; otherwise the row says
    how many did. The ratio to the reference arm is of the means (ref / arm: > 1 means sooner).
    """
    rows = []
    for target in targets:
        per_arm: dict[str, dict[str, Any]] = {}
        for arm in arms:
            done = [r for r in runs.get(arm, []) if r.complete]
            if not done:
                continue
            row: dict[str, Any] = {"target": target, "arm": arm, "seeds": len(done)}
            for x in ("backprop_samples", "hours"):
                hits = [time_to_target(*r.series(f"val_{token}_acc", x), target) for r in done]
                reached = [h for h in hits if h is not None]
                row[x] = {"per_seed": {r.seed: h for r, h in zip(done, hits)}, "reached": len(reached),
                          **(spread(reached) if len(reached) == len(done) else {})}
            per_arm[arm] = row
            rows.append(row)
        base = per_arm.get(ref or "")
        for row in per_arm.values():
            for x in ("backprop_samples", "hours"):
                ok = base is not None and "mean" in base[x] and "mean" in row[x] and row[x]["mean"] > 0
                row[x]["speedup_vs_ref"] = base[x]["mean"] / row[x]["mean"] if ok else None
    return rows


def fidelity_table(arms: Sequence[tuple[str, str, int]], runs: dict[str, list[RunCurves]],
                   total_steps: int) -> list[dict[str, Any]]:
    """Proxy fidelity per selecting arm: Spearman correlation and top-B overlap of the early-exit scores
    with the exact full-model losses on the same gross batch, pooled over seeds, over all of training
    and over its first and last thirds; plus the mean kept and dropped scores and the scoring cost.

    ``arms`` holds (name, criterion, exit layer) of the arms to include.
    """
    rows = []
    for name, criterion, exit_layer in arms:
        recs = [rec for r in runs.get(name, []) for rec in r.steps]
        fid = [rec for rec in recs if "spearman" in rec]
        sel = [rec for rec in recs if "kept_score" in rec]

        def window(lo: float, hi: float, key: str, pool: list[dict[str, Any]] = fid) -> float | None:
            vals = [rec[key] for rec in pool if lo * total_steps < rec["step"] <= hi * total_steps]
            return statistics.fmean(vals) if vals else None

        per_seed_last = {}
        for r in runs.get(name, []):
            vals = [rec["spearman"] for rec in r.steps if "spearman" in rec and rec["step"] > 2 / 3 * total_steps]
            if vals:
                per_seed_last[r.seed] = statistics.fmean(vals)
        rows.append({
            "arm": name, "criterion": criterion, "exit_layer": exit_layer, "records": len(fid),
            "spearman_last_third_per_seed": per_seed_last,
            "spearman": window(0, 1, "spearman"), "spearman_first_third": window(0, 1 / 3, "spearman"),
            "spearman_last_third": window(2 / 3, 1, "spearman"),
            "topk_overlap": window(0, 1, "topk_overlap"),
            "topk_overlap_first_third": window(0, 1 / 3, "topk_overlap"),
            "topk_overlap_last_third": window(2 / 3, 1, "topk_overlap"),
            "kept_score": window(0, 1, "kept_score", sel), "dropped_score": window(0, 1, "dropped_score", sel),
            "time_scoring": _mean_or_none([run_costs(r)["time_scoring"] for r in runs.get(name, [])]),
            "time_train": _mean_or_none([_sum_or_none(run_costs(r), ("forward", "backward", "optimizer"))
                                         for r in runs.get(name, [])]),
        })
    return rows


def fidelity_curve(runs: Sequence[RunCurves], key: str = "spearman") -> tuple[list[int], list[float]]:
    """Mean over seeds of a step-record quantity at each logged step where any seed has it."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for rec in r.steps:
            if key in rec:
                by_step.setdefault(rec["step"], []).append(rec[key])
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


# ----------------------------------------------------------------------------- markdown


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
    name, acc, loss = token.upper(), f"val_{token}_acc", f"val_{token}_loss"
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
    lines = ["| target acc | arm | back-prop samples to target (mean [min, max]) | × vs ref | wall-clock min to target"
             " (mean [min, max]) | × vs ref |", "|" + "---|" * 6]
    for r in rows:
        cells = []
        for x, digits, scale in (("backprop_samples", 0, 1.0), ("hours", 1, 60.0)):
            s = r[x]
            if "mean" in s:
                cells.append(f"{s['mean'] * scale:,.{digits}f} {_range(s, digits, scale)}")
                cells.append(_num(s.get("speedup_vs_ref"), ".2f"))
            else:
                hits = ", ".join(f"seed {k}: {v * scale:,.{digits}f}" for k, v in s["per_seed"].items() if v is not None)
                cells.append(f"not reached ({s['reached']}/{r['seeds']} seeds{'; ' + hits if hits else ''})")
                cells.append("–")
        lines.append(f"| {r['target']:.3f} | {labels.get(r['arm'], r['arm'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_fidelity(rows: list[dict[str, Any]]) -> str:
    lines = ["| criterion | exit | Spearman (all) | first ⅓ | last ⅓ | last ⅓, worst seed | top-B overlap (all) |"
             " first ⅓ | last ⅓ | kept score | dropped score | scoring s/step | fwd+bwd+opt s/step |",
             "|" + "---|" * 13]
    for r in rows:
        per = r.get("spearman_last_third_per_seed") or {}
        worst = min(per.items(), key=lambda kv: kv[1]) if per else None
        lines.append(
            f"| {r['criterion']} | {r['exit_layer']} | {_num(r['spearman'], '.3f')} | {_num(r['spearman_first_third'], '.3f')}"
            f" | {_num(r['spearman_last_third'], '.3f')} | {f'{worst[1]:.3f} (seed {worst[0]})' if worst else '–'}"
            f" | {_num(r['topk_overlap'], '.3f')}"
            f" | {_num(r['topk_overlap_first_third'], '.3f')} | {_num(r['topk_overlap_last_third'], '.3f')}"
            f" | {_num(r['kept_score'], '.3f')} | {_num(r['dropped_score'], '.3f')}"
            f" | {_num(r['time_scoring'], '.3f')} | {_num(r['time_train'], '.3f')} |"
        )
    return "\n".join(lines)
