"""Writing a study's report: results.json, report.md, the per-run curves and the PNG figures, per regime;
and, for a study over several data regimes, the verdict across them (verdict.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study.markdown import (
    holm_lines,
    markdown_budget,
    markdown_comparisons,
    markdown_costs,
    markdown_equal_time,
    markdown_fidelity,
    markdown_final,
    markdown_kept,
    markdown_per_seed,
    markdown_reference,
    markdown_targets,
    markdown_turn_on,
    verdict_lines,
)
from study.report import (
    RunCurves,
    auto_targets,
    comparisons,
    continuation_targets,
    cost_table,
    fidelity_table,
    final_table,
    kept_table,
    load_run,
    metric_keys,
    read_metrics,
    target_table,
    token_name,
)
from study.spec import StudyError, StudySpec, selection_of
from study.turn_on import turn_on_row

if TYPE_CHECKING:
    from study.jobs import RunPlan

FIGURES = {
    "samples": "accuracy_vs_samples.png",
    "heldout": "heldout_vs_samples.png",
    "cpu": "accuracy_vs_cpu.png",
    "hours": "accuracy_vs_hours.png",
    "fidelity": "fidelity.png",
}


def _by_arm(keys: list[str]) -> str:
    """``regime/arm/seedK`` keys as ``regime/arm (seeds 0, 1)``, one entry per arm, in order."""
    seeds: dict[str, list[str]] = {}
    for key in keys:
        arm, _, seed = key.rpartition("/seed")
        seeds.setdefault(arm, []).append(seed)
    return "; ".join(f"{arm} (seed{'s' if len(v) > 1 else ''} {', '.join(v)})" for arm, v in seeds.items())


def selection(plan: RunPlan) -> tuple[str, int] | None:
    """(criterion, exit layer) of a run that picks rows by their early-exit scores (top-k, stratified or
    importance): the arms with a proxy fidelity."""
    sift = plan.config.get("sift", {})
    if sift.get("policy") not in ("topk", "stratified", "importance") or plan.config.get("method") in ("none", "vcas"):
        return None
    return str(sift.get("criterion")), int(sift.get("exit_layer"))


def load_runs(plans: list[RunPlan]) -> tuple[dict[str, list[RunCurves]], RunCurves | None]:
    """The arms' runs (continuations with their seed's start evaluation first) and the warm-up run."""
    starts = {p.seed: load_run(p.dir, "start", p.seed, p.steps) for p in plans if p.kind == "start"}
    warm = next((load_run(p.dir, "warm", p.seed, p.steps) for p in plans if p.kind == "warm"), None)
    runs: dict[str, list[RunCurves]] = {}
    for plan in plans:
        if plan.kind != "run":
            continue
        start = starts.get(plan.seed)
        run = load_run(plan.dir, plan.arm.name, plan.seed, plan.steps,
                       start=start if start is not None and start.complete else None)
        if run.evals or run.steps:
            runs.setdefault(plan.arm.name, []).append(run)
    return runs, warm


def write_curves(report: Path, plans: list[RunPlan]) -> None:
    """curves/<arm>/seed<k>.jsonl: each run's logged records (deduplicated by step), to look at the runs
    without their directories (not committed: results.json holds what the tables need); also the warm-up run's and the start evaluations', and each run's CPU trace and probe."""
    for plan in plans:
        evals, steps = read_metrics(plan.dir / "metrics.jsonl")
        if not evals and not steps:
            continue
        name = {"warm": "warm/warm", "start": f"start/seed{plan.seed}"}.get(plan.kind, f"{plan.arm.name}/seed{plan.seed}")
        path = report / "curves" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = sorted([*steps, *evals], key=lambda r: (r["step"], r.get("event") == "eval"))
        path.write_text("".join(json.dumps(r) + "\n" for r in merged))
        for extra, suffix in (("cputime.jsonl", ".cputime.jsonl"), ("probe.json", ".probe.json"),
                              ("branch.json", ".branch.json")):
            if (plan.dir / extra).is_file():
                (report / "curves" / f"{name}{suffix}").write_text((plan.dir / extra).read_text())


def write_report(report: Path, spec: StudySpec, plans: list[RunPlan], record: dict[str, Any],
                 regime: str = "") -> str:
    """Compute every table, write the files, and return the headline table as markdown."""
    from study.plots import accuracy_figure, fidelity_figure

    report.mkdir(parents=True, exist_ok=True)
    runs, warm = load_runs(plans)
    arm_plans = [p for p in plans if p.kind == "run"]
    names = [a.name for a in spec.arms]
    ref = spec.reference if spec.reference in names else None
    refs = [r for r in (spec.reference, spec.control) if r in names]
    total = max((p.steps for p in arm_plans), default=0)  # vanilla's under study.budget: flops
    first = spec.branch.warm_steps if spec.branch else 0
    complete = {k: [r for r in v if r.complete] for k, v in runs.items()}
    token = token_name(complete)  # mlm (BERT) or lm (decoders)
    keys = metric_keys(complete, token)
    acc = keys[0]

    targets = spec.targets
    if targets is None:
        ref_final = [r.final[acc] for r in complete.get(ref or "", []) if r.final]
        if spec.branch is not None:
            starts = [r.evals[0][acc] for rs in complete.values() for r in rs
                      if r.evals and r.evals[0].get("branch_point")]
            targets = continuation_targets(starts, ref_final)
        else:
            targets = auto_targets(ref_final)
    final = final_table(names, complete, ref, token)
    compared = comparisons(names, complete, refs, keys, spec.budget)
    to_target = target_table(names, complete, targets, ref, key=acc)  # the targets are levels of this metric
    sel_plans = {p.arm.name: selection(p) for p in arm_plans if selection(p)}
    fidelity = fidelity_table([(n, *sel_plans[n]) for n in names if n in sel_plans], complete,
                              {p.arm.name: p.steps for p in arm_plans}, first)
    probed = {p.arm.name: sel for p in arm_plans if (sel := selection_of(p.config))}  # every selecting arm
    kept = kept_table(list(probed.items()), complete,
                      warm.probe if warm is not None else {})
    costs = cost_table(names, complete)

    write_curves(report, plans)
    family = ((arm_plans[0].config or {}).get("model") or {}).get("family", "bert") if arm_plans else "bert"
    what = f"{spec.num_layers}-layer {family}" + (f", {regime}" if regime else "")
    steps_text = (f"warm-up {first} steps, then {total - first} steps per arm" if spec.branch else f"{total} steps")
    title = f"{spec.name}: {what}, {steps_text}, seeds {spec.seeds}"
    warm_curve = warm if warm is not None and warm.evals else None
    accuracy_figure(report / FIGURES["samples"], spec.arms, complete, x="backprop_samples", key=acc, title=title,
                    targets=targets, ref=ref, warm=warm_curve, since_branch=spec.branch is not None)
    for key in keys[1:2]:
        accuracy_figure(report / FIGURES["heldout"], spec.arms, complete, x="backprop_samples", key=key,
                        title=f"{title} — {key}", ref=ref, since_branch=spec.branch is not None)
    if any(r.cpu for rs in complete.values() for r in rs):
        accuracy_figure(report / FIGURES["cpu"], spec.arms, complete, x="cpu_s", key=acc, title=title, targets=targets,
                        ref=ref, since_branch=spec.branch is not None)
    accuracy_figure(report / FIGURES["hours"], spec.arms, complete, x="hours", key=acc, title=title, targets=targets,
                    ref=ref, since_branch=spec.branch is not None)
    if sel_plans:
        fidelity_figure(report / FIGURES["fidelity"], spec.arms, complete,
                        title=f"{spec.name}{f' ({regime})' if regime else ''}: early-exit proxy vs exact loss on the "
                              "gross batch (mean over seeds)")

    missing = [p.key for p in arm_plans
               if not any(r.seed == p.seed and r.complete for r in runs.get(p.arm.name, []))]
    warm_cost = None
    if warm is not None and warm.complete and warm.final:
        warm_cost = {"steps": first, "metric": acc, "value": warm.final.get(acc),
                     "cpu_s": warm.x(warm.final, "cpu_s"), "wall_s": warm.x(warm.final, "hours") * 3600,
                     "load": warm.load}
    results = {
        "budget": budget_record(spec, arm_plans, first), "reference_model": reference_record(plans),
        "study": {k: record.get(k) for k in ("name", "source", "seeds", "arms", "arm_overrides", "num_layers",
                                             "parallel", "overrides", "data", "branch", "reference", "control")},
        "regime": regime,
        "base_config": max(arm_plans, key=lambda p: p.steps).config if arm_plans else None,  # the longest run's
        "targets": targets, "targets_source": "given" if spec.targets is not None else f"auto ({ref} final)",
        "metrics": keys, "warm": warm_cost,
        "comparisons": compared, "final": final, "time_to_target": to_target, "fidelity": fidelity, "kept": kept,
        "costs": costs, "incomplete_runs": missing, "invocations": record.get("invocations", []),
        "labels": {a.name: a.title() for a in spec.arms},
    }
    out = arm_plans[0].dir.parents[2] if arm_plans else report
    (report / "results.json").write_text(json.dumps(_portable(results, out), indent=1) + "\n")
    return render_report(report, spec, regime)


def budget_record(spec: StudySpec, arm_plans: list[RunPlan], first: int) -> dict[str, Any]:
    """The study's budget; under flops each arm's steps (from the branch point) and FLOPs per step, and
    vanilla's budget (its steps x its FLOPs per step)."""
    out: dict[str, Any] = {"kind": spec.budget}
    arms = {p.arm.name: {"steps": p.steps - first, "total": p.flops.total, "train": p.flops.train,
                         "score": p.flops.score, "reference": p.flops.reference,
                         # selection warm-up steps after the branch point cost vanilla's (study/budget.py)
                         "warmup": max(0, p.config["sift"].get("warmup_steps", 0) - first) if p.flops.score else 0}
            for p in arm_plans if p.flops is not None}
    if arms:
        out["arms"] = arms
        vanilla = arms.get(spec.reference)
        out["budget_flops"] = vanilla["steps"] * vanilla["total"] if vanilla else None
        if vanilla:
            for a in arms.values():  # what the arm spends: at most the budget (its steps are rounded down)
                a["flops_spent"] = a["warmup"] * vanilla["total"] + (a["steps"] - a["warmup"]) * a["total"]
    return out


def reference_record(plans: list[RunPlan]) -> dict[str, Any] | None:
    """The reference job's cost (its reference.json, from `sift reference`), or None."""
    from study.jobs import REFERENCE_FILE

    job = next((p for p in plans if p.kind == "reference"), None)
    if job is None or not (job.dir / REFERENCE_FILE).is_file():
        return None
    cost = json.loads((job.dir / REFERENCE_FILE).read_text())
    for r in cost.get("references", []):
        r["name"] = Path(r["path"]).name
    return {**cost, "command": ["sift", "reference", *job.command[3:]]}  # not `python -m launcher.reference`


def render_report(report: Path, spec: StudySpec, regime: str = "") -> str:
    """report.md from the study's results.json alone (the compact form committed per study: every table's
    numbers, the study record and its invocations); returns the headline table as markdown. The figures
    are listed when they are there."""
    res = json.loads((report / "results.json").read_text())
    check_design(report / "results.json", res, spec)
    record = res["study"] | {"invocations": res.get("invocations", [])}
    names = [a.name for a in spec.arms]
    labels = {a.name: a.title() for a in spec.arms}
    ref = spec.reference if spec.reference in names else None
    refs = [r for r in (spec.reference, spec.control) if r in names]
    total = ((res.get("base_config") or {}).get("train") or {}).get("steps", 0)
    first = spec.branch.warm_steps if spec.branch else 0
    steps_text = (f"warm-up {first} steps, then {total - first} steps per arm" if spec.branch else f"{total} steps")
    budget = res.get("budget") or {"kind": "samples"}
    flops = budget["kind"] == "flops"
    if flops:
        steps_text = ((f"warm-up {first} steps, then " if spec.branch else "")
                      + f"each arm as many steps as vanilla's {total - first} steps of counted FLOPs allow")
    keys = res["metrics"]
    token = keys[0].removeprefix("val_").removesuffix("_acc")  # mlm (BERT) or lm (decoders)
    final, compared, to_target = res["final"], res["comparisons"], res["time_to_target"]
    fidelity, kept, costs, missing, warm_cost = (res["fidelity"], res["kept"], res["costs"], res["incomplete_runs"],
                                                 res["warm"])
    table = markdown_final(final, labels, ref, token)
    selecting = [n for n in names if n not in refs]
    md = [
        f"# {spec.name}{f' — {regime}' if regime else ''}", "",
        f"Generated by `sift study` from `{record.get('source')}`; {len(spec.arms)} arms x {len(spec.seeds)} seeds, "
        f"{steps_text}, on `{_data_name(record, regime)}`.", "",
        *([f"**Incomplete runs (not in the tables):** {_by_arm(missing)}", ""] if missing else []),
        *(_warm_lines(warm_cost, spec) if spec.branch else []),
        "## Verdict (95% t intervals over seeds, paired by seed)", "",
        *(["Headline: equal counted FLOPs (each arm at its own end, its learning rate fully decayed there); "
           "equal back-propagated samples second.", ""] if flops else []),
        *(verdict_lines(compared, labels, selecting, refs, keys,
                        ("flops", "backprop_samples", "cpu_s") if flops else ("backprop_samples", "cpu_s"))
          or ["(no complete comparison yet)"]),
        *holm_lines(compared, labels), "",
        *[line for ref_ in refs for key in keys for line in (
            f"## {key}: paired difference to {ref_}", "", markdown_comparisons(compared, labels, ref_, key), "")],
        "Δ: arm minus reference with the same seed, in percentage points, mean over seeds [95% t interval]. "
        + ("Equal counted FLOPs: each run's end (study/budget.py). Equal samples: both runs read at the samples "
           "the shorter one back-propagated. " if flops else "Equal samples: the end of training. ")
        + "Equal CPU time / wall clock: both runs read at the budget the faster "
        "one used up. A verdict is per comparison, not corrected for the number of comparisons; the Holm line "
        "is.", "",
        f"## Final validation {token.upper()} accuracy (table 1)", "", table, "",
        "Per seed:", "", markdown_per_seed(final, labels), "",
        "## At equal wall clock", "", markdown_equal_time(final, labels, ref, token) if ref else "(no reference arm)", "",
        f"## Time to target ({res['targets_source']})", "", markdown_targets(to_target, labels), "",
        "Interpolated linearly between evaluations (from the branch point in a continuation study); an arm reaches "
        "a target only when all its seeds do.", "",
        *(["## Rows back-propagated, by kind", "", markdown_kept(kept, labels), "",
           KEPT_NOTE if any("weighted" in r for r in kept) else KEPT_ROWS_NOTE, ""] if kept else []),
        *(["## When to turn it on", "", markdown_turn_on([turn_on_row(res)], labels), "", TURN_ON_NOTE, ""]
          if flops and not regime else []),
        *(["## Equal compute: steps and counted FLOPs per arm", "", markdown_budget(budget, labels), "",
           "Per step: B rows trained (3 x forward), G rows scored at the arm's exit, and for reducible arms "
           "without a sidecar the reference's forward of G rows (engine/models FLOP counts). Vanilla's budget: "
           + (f"{budget['budget_flops']:.4g} FLOPs." if budget.get("budget_flops") else "–"), ""]
          if budget.get("arms") else []),
        *(["## Reference model (reducible arms)", "",
           markdown_reference(res["reference_model"], budget.get("budget_flops")), "",
           "Trained once per regime by `" + " ".join(res["reference_model"]["command"]) + "`. "
           "Its cost is not in the equal-compute budget (RHO-LOSS amortises a reference over many runs); "
           "counting it, a reducible arm spends vanilla's budget plus the share in the last column.", ""]
          if res.get("reference_model") else []),
        "## Proxy fidelity and cost per exit", "",
        markdown_fidelity(fidelity, labels) if fidelity else "(no selecting arm)", "",
        "## Cost per run", "", markdown_costs(costs, labels), "",
        "## Figures", "", *(f"![{k}]({v})" for k, v in FIGURES.items() if (report / v).is_file()), "",
        "## Invocations", "",
        *(f"- `{i.get('command')}` at {i.get('started')} ({i.get('seconds', '?')} s, load {i.get('load_before')} -> "
          f"{i.get('load_after')}), commit {i.get('commit')}" for i in record.get("invocations", [])), "",
    ]
    (report / "report.md").write_text("\n".join(md))
    return table


def check_design(path: Path, res: dict[str, Any], spec: StudySpec) -> None:
    """Refuse to render results.json under a spec it was not made with (a preset changed since, or the
    wrong --name/--seeds/--arms: the tables' labels and header would be the spec's), or in a form older than
    the one rendered here (no paired comparisons)."""
    if "comparisons" not in res or "metrics" not in res:
        raise StudyError(f"{path} predates the compact form `--report-only` renders (no paired comparisons); "
                         "rerun the study (a committed one's README.md gives the command)")
    made = res.get("study") or {}
    ours = {"name": spec.name, "arms": [a.name for a in spec.arms], "seeds": spec.seeds}
    wrong = [f"{k} {made.get(k)} (asked: {v})" for k, v in ours.items() if made.get(k) != v]
    if wrong:
        raise StudyError(f"{path} was made with {'; '.join(wrong)}: pass the --name, --seeds and --arms it was "
                         "made with (its report.md names its invocations), so that its tables come out the same")


def _data_name(record: dict[str, Any], regime: str) -> str:
    data = record.get("data", {})
    ident = data.get("regimes", {}).get(regime, data) if regime else data
    return f"{data.get('path')}{'/' + regime if regime else ''} (index.json sha256 {str(ident.get('index_sha256'))[:12]})"


def _warm_lines(warm: dict[str, Any] | None, spec: StudySpec) -> list[str]:
    assert spec.branch is not None
    if warm is None:
        return ["**Warm-up run not complete yet.**", ""]
    cpu = f"{warm['cpu_s'] / 60:.1f} CPU min, " if warm.get("cpu_s") is not None else ""
    load = f", load {warm['load']:.2f}" if warm.get("load") is not None else ""
    return [f"Protocol: one vanilla warm-up run of {spec.branch.warm_steps} steps from random init (seed "
            f"{spec.branch.warm_seed}), ending at {warm['metric']} {warm['value']:.4f}; its cost, paid "
            f"once for every arm and seed: {cpu}{warm['wall_s'] / 60:.1f} wall-clock min{load}. Every arm and seed "
            f"continues from its checkpoint for {spec.branch.steps} steps on one LR schedule over "
            f"{spec.branch.total} steps.", ""]


def write_verdict(report: Path, spec: StudySpec, regime_reports: dict[str, Path], record: dict[str, Any]) -> str:
    """verdict.md across regimes, from each regime's results.json (which hold every number it cites);
    returns the markdown."""
    report.mkdir(parents=True, exist_ok=True)
    names = [a.name for a in spec.arms]
    labels = {a.name: a.title() for a in spec.arms}
    refs = [r for r in (spec.reference, spec.control) if r in names]
    selecting = [n for n in names if n not in refs]
    found = {r: json.loads((w / "results.json").read_text()) for r, w in regime_reports.items()
             if (w / "results.json").is_file()}
    # the budget the results were made under (results.json before study.budget existed: samples), which a
    # preset changed since does not rewrite
    budget = next((res.get("budget") or {"kind": "samples"} for res in found.values()), {"kind": spec.budget})["kind"]
    md = [f"# {spec.name}: where does SIFT win?", "",
          "Per data regime, which arms beat (or lose to) the reference and the control beyond the 95% t interval "
          "of the paired difference over seeds (each comparison on its own), then which comparisons at "
          + ("equal counted FLOPs (each arm at its own end; the headline)" if budget == "flops" else "equal samples")
          + " survive Holm's correction for all of the regime's comparisons; details in each regime's report.md.", ""]
    axes = ("flops", "backprop_samples", "cpu_s") if budget == "flops" else ("backprop_samples", "cpu_s")
    if budget == "flops" and found:
        md += ["## When to turn it on", "", markdown_turn_on([turn_on_row(res) for res in found.values()], labels), "",
               TURN_ON_NOTE, ""]
    for regime in regime_reports:
        if regime not in found:
            md += [f"## {regime}", "", "(no results yet)", ""]
            continue
        res = found[regime]
        md += [f"## {regime} ([report]({regime}/report.md))", ""]
        if res.get("incomplete_runs"):
            md += [f"Incomplete: {len(res['incomplete_runs'])} run(s).", ""]
        md += [*(verdict_lines(res["comparisons"], labels, selecting, refs, res.get("metrics", ["val_mlm_acc"]), axes)
                 or ["(no complete comparison yet)"]),
               *holm_lines(res["comparisons"], labels), *_kept_lines(res.get("kept", []), labels),
               *_fidelity_lines(res.get("fidelity", []), labels), ""]
    (report / "verdict.md").write_text("\n".join(md))
    return "\n".join(md)


KEPT_NOTE = ("From each run's probe (study/probe.py): simulated gross batches of G rows drawn from each kind "
             "in its share of the training data (\"drawn\": what vanilla and random back-propagate), of which the "
             "arm's own policy keeps B, scored by the arm's exit (and by the exact loss), at the branch point and "
             "at the run's final weights. **Kept rows**: each kind's share of the B rows back-propagated. **Weight "
             "share**: its share of the kept rows' loss weights (sum of w_i), what the gradient sees of each kind "
             "when rows carry equal numbers of target tokens; the stratified and importance draws weight a row "
             "by 1 / its inclusion probability, so their weight share is near the drawn share where their kept "
             "rows are not, and top-k weighs every kept row 1 (weight share = kept rows). Reducible arms are "
             "scored against the regime's reference model, which trained on half of the training rows: about "
             "half of the sampled rows (with other masks) were seen by it.")
# results.json from before the probe recorded loss weights (every arm top-k)
KEPT_ROWS_NOTE = ("From each run's probe (study/probe.py): the share of each kind among the B rows top-k keeps of "
                  "simulated gross batches, scored by the arm's exit (and by the exact loss) at the branch point and "
                  "at the run's final weights.")

TURN_ON_NOTE = ("At equal counted FLOPs (each arm as many steps as vanilla's budget pays for, its learning rate "
                "fully decayed at its own end), paired by seed, 95% t intervals, each comparison on its own (the "
                "Holm lines correct for all of a regime's comparisons). The method: of the arms other than the "
                "control, the one with the largest mean gain among those that beat vanilla beyond the interval "
                "on validation; its cost is its counted FLOPs over vanilla's, plus, for a reducible arm, its "
                "reference's training (outside the budget) as a share of vanilla's budget. Made by "
                "study/turn_on.py (`python -m study.turn_on REPORT_DIR...` prints it for several studies).")


def _kept_lines(kept: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """One line per kind of row other than `original`: its share drawn, and kept by each selecting arm (for
    the weighted arms also its share of the loss weights)."""
    out = []

    def share(r: dict[str, Any]) -> str:
        w = r.get("end_exit_weight") or {}
        weight = f" (weight share {w['mean']:.1%})" if r.get("weighted") and "mean" in w else ""
        return f"{labels.get(r['arm'], r['arm'])} {r['end_exit']['mean']:.1%}{weight}"

    for kind in dict.fromkeys(r["kind"] for r in kept if r["kind"] != "original"):
        rows = [r for r in kept if r["kind"] == kind and "mean" in r["end_exit"]]
        if rows:
            arms = "; ".join(map(share, rows))
            out.append(f"- {kind} rows back-propagated at the end of training: {rows[0]['drawn']:.1%} by vanilla and "
                       f"random (drawn); {arms}")
    return out


def _fidelity_lines(fidelity: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    cells = [f"{labels.get(r['arm'], r['arm'])} {r['spearman_last_third']:.2f}" for r in fidelity
             if r.get("spearman_last_third") is not None]
    return [f"- early-exit fidelity (Spearman with the exact loss, last third of the continuation): {'; '.join(cells)}"
            ] if cells else []


def _portable(obj: Any, out: Path) -> Any:
    """JSON with string keys (seeds become "0", "1", ...) and no machine-specific directories: paths under
    the study directory become relative to it, other absolute paths keep their last component."""
    if isinstance(obj, dict):
        return {str(k): _portable(v, out) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_portable(v, out) for v in obj]
    if isinstance(obj, str) and obj.startswith("/"):
        path = Path(obj)
        return str(path.relative_to(out)) if path.is_relative_to(out) else f".../{path.name}"
    return obj
