"""Reading a study's runs and summarising them: pure functions over the logged curves, then the tables.

Every number here comes from a run's metrics.jsonl: the "eval" records (validation MLM accuracy and
loss, back-propagated samples, wall-clock hours) and the step records (fidelity, kept/dropped scores,
throughput, phase times). Plots live in plots.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.spec import parse_selection
from study.stats import holm, mean_ci, verdict

# ----------------------------------------------------------------------------- one run


X_AXES = ("backprop_samples", "cpu_s", "hours")
# ``study.budget: flops``: the end of training is equal counted FLOPs, the headline; equal samples is read
# from the curves like equal time
FLOPS_AXES = ("flops", "backprop_samples", "cpu_s", "hours")
"""A curve's x: back-propagated samples, wall-clock hours, or process CPU seconds, each counted from the
branch point in a continuation study (from the start otherwise)."""


@dataclass(slots=True)
class RunCurves:
    """The logged curves of one (arm, seed) run."""

    arm: str
    seed: int
    evals: list[dict[str, Any]]  # eval records in step order, one per step
    steps: list[dict[str, Any]]  # step records in step order, one per step
    complete: bool
    summary: dict[str, Any] | None = None
    origin: dict[str, float] = field(default_factory=dict)  # backprop_samples and hours at the branch point
    cpu: dict[int, float] = field(default_factory=dict)  # eval step -> process CPU seconds (from the branch)
    probe: dict[str, Any] = field(default_factory=dict)  # probe.json, when the run has one
    load: float | None = None  # mean 1-minute load average over the run's traced records

    def x(self, record: dict[str, Any], axis: str) -> float | None:
        """An eval record's position on ``axis`` (see X_AXES)."""
        if record.get("branch_point"):  # the shared start evaluation: the origin of every axis
            return 0.0
        if axis == "cpu_s":
            return self.cpu.get(int(record["step"]))
        if axis in ("backprop_samples", "hours") and axis in record:
            return record[axis] - self.origin.get(axis, 0)
        return record.get(axis)

    def series(self, key: str, x: str = "backprop_samples") -> tuple[list[float], list[float]]:
        """(x, y) of an eval quantity, e.g. ("val_mlm_acc", "hours")."""
        pts = [(self.x(e, x), e[key]) for e in self.evals if key in e]
        pts = [p for p in pts if p[0] is not None]
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


def _json(path: Path) -> dict[str, Any]:
    if path.is_file():
        with contextlib.suppress(ValueError, OSError):
            return json.loads(path.read_text())
    return {}


def load_run(run_dir: Path, arm: str, seed: int, total_steps: int, start: RunCurves | None = None) -> RunCurves:
    """A run's curves. A continuation (branch.json, written when it was branched) gets the seed's start
    evaluation (``start``: the warm-up weights evaluated with this seed's masks) as its first point, and
    its axes counted from the branch point; a probe's held-out metrics join the eval record of its step."""
    from study.jobs import read_cpu_trace

    evals, steps = read_metrics(run_dir / "metrics.jsonl")
    summary = _json(run_dir / "summary.json") or None
    complete = summary is not None and summary.get("steps") == total_steps
    probe = _json(run_dir / "probe.json")
    branch = _json(run_dir / "branch.json")
    origin = {k: float(branch[k]) for k in ("backprop_samples", "hours") if k in branch}
    if start is not None and start.evals and (not evals or start.evals[-1]["step"] < evals[0]["step"]):
        evals.insert(0, {**start.evals[-1], "branch_point": True})
    trace = read_cpu_trace(run_dir)
    cpu = {s: r["cpu_s"] for (event, s), r in trace.items() if event == "eval"}
    loads = [r["load1"] for r in trace.values() if r.get("load1") is not None]
    load = statistics.fmean(loads) if loads else None
    return RunCurves(arm, seed, evals, steps, complete, summary, origin, cpu, probe, load)


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
    ci_lo: list[float] = field(default_factory=list)  # paired differences: the 95% t interval of the mean
    ci_hi: list[float] = field(default_factory=list)


def mean_curve(runs: Sequence[RunCurves], key: str = "val_mlm_acc", x: str = "backprop_samples") -> MeanCurve:
    common = sorted(set.intersection(*(set(e["step"] for e in r.evals if key in e and r.x(e, x) is not None)
                                       for r in runs))) if runs else []
    by_run = [{e["step"]: e for e in r.evals} for r in runs]
    out = MeanCurve([], [], [], [], [])
    for s in common:
        ys = [b[s][key] for b in by_run]
        out.steps.append(s)
        out.x.append(statistics.fmean(r.x(b[s], x) for r, b in zip(runs, by_run)))
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
    common = sorted(set.intersection(*({e["step"] for e in r.evals if key in e} & {s for s, e in b.items() if key in e}
                                       for r, b in pairs)))
    for s in common:
        mine = [{e["step"]: e for e in r.evals}[s] for r, _ in pairs]
        diffs = [m[key] - b[s][key] for m, (_, b) in zip(mine, pairs)]
        out.steps.append(s)
        out.x.append(statistics.fmean(r.x(m, "backprop_samples") for m, (r, _) in zip(mine, pairs)))
        out.mean.append(statistics.fmean(diffs))
        out.lo.append(min(diffs))
        out.hi.append(max(diffs))
        ci = mean_ci(diffs)
        out.ci_lo.append(ci.get("lo", out.mean[-1]))
        out.ci_hi.append(ci.get("hi", out.mean[-1]))
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


def final_table(arms: Sequence[str], runs: dict[str, list[RunCurves]], ref: str | None,
                token: str = "mlm") -> list[dict[str, Any]]:
    """Table 1: final validation token accuracy (``val_<token>_acc``: mean, spread over seeds), paired
    difference to the reference arm, final loss, and cost (hours, throughput)."""
    acc_key, loss_key = f"val_{token}_acc", f"val_{token}_loss"
    ref_final = {r.seed: r.final[acc_key] for r in runs.get(ref or "", []) if r.final}
    ref_hours = {r.seed: r.x(r.final, "hours") for r in runs.get(ref or "", []) if r.final}
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
            "backprop_samples": done[0].x(done[0].final, "backprop_samples"),
            "hours": spread([r.x(r.final, "hours") for r in done]),
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
                 ref: str | None, key: str = "val_mlm_acc") -> list[dict[str, Any]]:
    """Per target and arm: back-propagated samples, wall-clock hours and CPU seconds (where traced) to
    reach it, per seed and over seeds.

    An arm counts as reaching a target only when every one of its seeds does; otherwise the row says
    how many did. The ratio to the reference arm is of the means (ref / arm: > 1 means sooner);
    ``delta_vs_ref`` is the paired difference (arm - ref) over the seeds where both reach it, with its
    t interval.
    """
    rows = []
    for target in targets:
        per_arm: dict[str, dict[str, Any]] = {}
        for arm in arms:
            done = [r for r in runs.get(arm, []) if r.complete]
            if not done:
                continue
            row: dict[str, Any] = {"target": target, "arm": arm, "seeds": len(done), "metric": key}
            for x in X_AXES:
                hits = [time_to_target(*r.series(key, x), target) for r in done]
                if x == "cpu_s" and not any(r.cpu for r in done):
                    continue
                reached = [h for h in hits if h is not None]
                row[x] = {"per_seed": {r.seed: h for r, h in zip(done, hits)}, "reached": len(reached),
                          **(spread(reached) if len(reached) == len(done) else {})}
            per_arm[arm] = row
            rows.append(row)
        base = per_arm.get(ref or "")
        for row in per_arm.values():
            for x in (x for x in X_AXES if x in row):
                ok = base is not None and "mean" in base.get(x, {}) and "mean" in row[x] and row[x]["mean"] > 0
                row[x]["speedup_vs_ref"] = base[x]["mean"] / row[x]["mean"] if ok else None
                if base is not None and x in base and row is not base:  # paired by seed where both reach it
                    pairs = [(v, base[x]["per_seed"].get(k)) for k, v in row[x]["per_seed"].items()]
                    row[x]["delta_vs_ref"] = mean_ci([a - b for a, b in pairs if a is not None and b is not None])
    return rows


def fidelity_table(arms: Sequence[tuple[str, str, int]], runs: dict[str, list[RunCurves]],
                   total_steps: int | dict[str, int], first_step: int = 0) -> list[dict[str, Any]]:
    """Proxy fidelity per selecting arm: Spearman correlation and top-B overlap of the early-exit scores
    with the exact full-model losses on the same gross batch, pooled over seeds, over all of the steps
    first_step..total_steps (the continuation, in a continuation study) and over their first and last
    thirds; plus the mean kept and dropped scores and the scoring cost.

    ``arms`` holds (name, criterion, exit layer) of the arms to include; ``total_steps`` is every arm's,
    or by arm name (under study.budget: flops each arm ends at its own step).
    """
    rows = []
    for name, criterion, exit_layer in arms:
        total = total_steps if isinstance(total_steps, int) else total_steps[name]
        span = max(total - first_step, 1)
        recs = [rec for r in runs.get(name, []) for rec in r.steps]
        fid = [rec for rec in recs if "spearman" in rec]
        sel = [rec for rec in recs if "kept_score" in rec]

        def window(lo: float, hi: float, key: str, pool: list[dict[str, Any]] = fid, span: int = span) -> float | None:
            vals = [rec[key] for rec in pool if first_step + lo * span < rec["step"] <= first_step + hi * span]
            return statistics.fmean(vals) if vals else None

        per_seed_last = {}
        for r in runs.get(name, []):
            vals = [rec["spearman"] for rec in r.steps if "spearman" in rec and rec["step"] > first_step + 2 / 3 * span]
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


# ----------------------------------------------------------------------------- paired comparisons


def metric_keys(runs: dict[str, list[RunCurves]], token: str = "mlm") -> list[str]:
    """val_<token>_acc, then every extra evaluation set's accuracy (``<name>_val_<token>_acc``) any final
    eval has."""
    main = f"val_{token}_acc"
    extra = {k for rs in runs.values() for r in rs if r.final for k in r.final if k.endswith("_" + main)}
    return [main, *sorted(extra)]


def paired_at_end(runs: Sequence[RunCurves], ref: Sequence[RunCurves], key: str) -> dict[str, Any]:
    """Final ``key`` minus the reference's, seed by seed, each run at its own end (equal back-propagated
    samples, or equal counted FLOPs under ``study.budget: flops``), with the t interval of the mean
    difference."""
    base = {r.seed: r.final[key] for r in ref if r.complete and r.final and key in r.final}
    diffs = {r.seed: r.final[key] - base[r.seed] for r in runs
             if r.complete and r.final and key in r.final and r.seed in base}
    return {**mean_ci(list(diffs.values())), "per_seed": diffs}


def paired_at_equal(runs: Sequence[RunCurves], ref: Sequence[RunCurves], key: str, axis: str) -> dict[str, Any]:
    """``key`` minus the reference's at equal ``axis`` (hours, cpu_s or backprop_samples), seed by seed: both curves read at
    the budget the faster of the two used up (its final value against the other's interpolated one)."""
    base = {r.seed: r for r in ref if r.complete}
    diffs, budgets = {}, {}
    for r in runs:
        b = base.get(r.seed)
        if not r.complete or b is None:
            continue
        (xa, ya), (xb, yb) = r.series(key, axis), b.series(key, axis)
        if not xa or not xb:
            continue
        budget = min(xa[-1], xb[-1])
        va, vb = value_at(xa, ya, budget), value_at(xb, yb, budget)
        if va is not None and vb is not None:
            diffs[r.seed], budgets[r.seed] = va - vb, budget
    return {**mean_ci(list(diffs.values())), "per_seed": diffs, "budget": spread(list(budgets.values()))}


def comparisons(arms: Sequence[str], runs: dict[str, list[RunCurves]], refs: Sequence[str],
                keys: Sequence[str], budget: str = "samples") -> list[dict[str, Any]]:
    """Every arm against every reference arm, per metric, at the end of training (equal back-propagated
    samples; under ``budget`` flops equal counted FLOPs, with equal samples read from the curves), equal
    CPU time and equal wall clock: mean paired difference, 95% t interval, verdict, and for the
    comparisons at the end (the study's primary family) the Holm-adjusted p-value."""
    axes, end = (FLOPS_AXES, "flops") if budget == "flops" else (X_AXES, "backprop_samples")
    rows = []
    for ref in refs:
        if ref not in runs:
            continue
        for arm in arms:
            if arm == ref or arm not in runs:
                continue
            for key in keys:
                for axis in axes:
                    ci = (paired_at_end(runs[arm], runs[ref], key) if axis == end
                          else paired_at_equal(runs[arm], runs[ref], key, axis))
                    rows.append({"arm": arm, "ref": ref, "metric": key, "axis": axis, **ci, "verdict": verdict(ci)})
    family = [r for r in rows if r["axis"] == end and "p" in r]
    for r, adjusted in zip(family, holm([r["p"] for r in family]), strict=True):
        r["p_holm"] = adjusted
    return rows


def continuation_targets(start: Sequence[float], ref_final: Sequence[float]) -> list[float]:
    """Targets in a continuation study: half of the reference arm's mean gain over the shared start,
    and all of it ("how soon does an arm get as far as vanilla does"), to 4 decimals."""
    if not start or not ref_final:
        return []
    s, f = statistics.fmean(start), statistics.fmean(ref_final)
    return [round(s + 0.5 * (f - s), 4), round(f, 4)] if f > s else []


def kept_table(arms: Sequence[tuple[str, str]], runs: dict[str, list[RunCurves]],
               warm_probe: dict[str, Any]) -> list[dict[str, Any]]:
    """Share of each kind of row among those a selecting arm back-propagates: at the branch point (the
    warm-up weights) and at the end of each seed's run (mean and t interval over seeds), by the arm's
    exit score and by the exact loss; ``drawn`` is what vanilla and random back-propagate.

    Two shares per kind (study/probe.py): of the kept rows (``*_exit``, ``*_exact``), and of their loss
    weights (``*_exit_weight``, ``*_exact_weight``: what the gradient sees; a weighted policy's rows carry
    different weights, top-k's all 1, so for top-k it is the row share, also in probes made before the
    weights were recorded). ``arms``: (name, selection key) of the selecting arms."""
    rows = []
    for name, select in arms:
        unweighted = not parse_selection(select).weighted

        def shares(entry: dict[str, Any], which: str, unweighted: bool = unweighted) -> dict[str, float]:
            return entry.get(f"{which}_weight", entry.get(which, {}) if unweighted else {})

        at_end = [r.probe["kept"][select] for r in runs.get(name, []) if select in r.probe.get("kept", {})]
        at_branch = warm_probe.get("kept", {}).get(select, {})
        drawn = (at_end[0] if at_end else at_branch).get("drawn", {})
        for kind in drawn:
            row = {"arm": name, "select": select, "kind": kind, "drawn": drawn[kind], "weighted": not unweighted}
            for which in ("exit", "exact"):
                row[f"branch_{which}"] = at_branch.get(which, {}).get(kind)
                row[f"branch_{which}_weight"] = shares(at_branch, which).get(kind)
                row[f"end_{which}"] = mean_ci([e[which][kind] for e in at_end], test=False)
                row[f"end_{which}_weight"] = mean_ci([w[kind] for e in at_end if kind in (w := shares(e, which))],
                                                     test=False)
            rows.append(row)
    return rows


def cost_table(arms: Sequence[str], runs: dict[str, list[RunCurves]]) -> list[dict[str, Any]]:
    """Per arm: CPU seconds and wall-clock seconds of a run (from the branch point), the machine's mean
    1-minute load average while it ran, and for VCAS arms their expected training FLOPs per step
    relative to exact training (mean of the logged ``vcas_flops_calib``)."""
    rows = []
    for arm in arms:
        done = [r for r in runs.get(arm, []) if r.complete and r.final]
        if not done:
            continue
        cpu = [r.x(r.final, "cpu_s") for r in done]
        # VCAS logs its expected training FLOPs relative to exact training, calibration included
        flops = [statistics.fmean(v) for r in done
                 if (v := [s["vcas_flops_calib"] for s in r.steps if "vcas_flops_calib" in s])]
        rows.append({"arm": arm, "seeds": len(done),
                     "cpu_s": spread([c for c in cpu if c is not None]),
                     "wall_s": spread([r.x(r.final, "hours") * 3600 for r in done]),
                     "load": spread([r.load for r in done if r.load is not None]),
                     "vcas_flops": spread(flops) if flops else None})
    return rows
