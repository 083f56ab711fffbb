"""The study's analysis on synthetic curves: time to target, seed aggregation, paired differences, tables."""

from __future__ import annotations

import json

import pytest

from study.markdown import markdown_targets
from study.report import (
    RunCurves,
    auto_targets,
    fidelity_table,
    final_table,
    mean_curve,
    paired_difference,
    read_metrics,
    spread,
    target_table,
    time_to_target,
    value_at,
)


def test_time_to_target_interpolates_between_the_straddling_evaluations():
    xs, ys = [100, 200, 300, 400], [0.10, 0.20, 0.30, 0.40]
    assert time_to_target(xs, ys, 0.25) == pytest.approx(250.0)
    assert time_to_target(xs, ys, 0.30) == 300.0  # exactly on an evaluation
    assert time_to_target([0, 10], [0.0, 0.4], 0.1) == pytest.approx(2.5)


def test_time_to_target_first_crossing_unreached_and_first_point():
    assert time_to_target([1, 2, 3, 4], [0.1, 0.5, 0.2, 0.6], 0.3) == pytest.approx(1.5)  # the first crossing
    assert time_to_target([1, 2, 3], [0.1, 0.2, 0.25], 0.3) is None
    assert time_to_target([50, 100], [0.4, 0.5], 0.3) == 50.0  # reached by the first evaluation: its x
    assert time_to_target([], [], 0.3) is None
    with pytest.raises(ValueError):
        time_to_target([1, 2], [0.1], 0.3)


def test_value_at_interpolates_and_holds_the_final_value():
    xs, ys = [1.0, 2.0, 4.0], [0.1, 0.3, 0.4]
    assert value_at(xs, ys, 1.5) == pytest.approx(0.2)
    assert value_at(xs, ys, 3.0) == pytest.approx(0.35)
    assert value_at(xs, ys, 2.0) == pytest.approx(0.3)
    assert value_at(xs, ys, 9.0) == 0.4  # finished before then: its final accuracy
    assert value_at(xs, ys, 0.5) is None and value_at([], [], 1.0) is None


def test_auto_targets_round_down_vanilla_final_and_ninety_percent():
    assert auto_targets([0.30, 0.32]) == [0.275, 0.31]  # mean 0.31; 0.9 x 0.31 = 0.279 -> 0.275
    assert auto_targets([]) == []


def test_spread_mean_sample_std_min_max():
    s = spread([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)
    assert spread([0.5])["std"] == 0.0
    assert spread([]) == {"n": 0}


def run(arm: str, seed: int, points: list[tuple[int, int, float, float]], complete: bool = True) -> RunCurves:
    """points: (step, backprop_samples, hours, val_mlm_acc)."""
    evals = [{"event": "eval", "step": s, "backprop_samples": b, "hours": h, "val_mlm_acc": a,
              "val_mlm_loss": 5.0 - a} for s, b, h, a in points]
    return RunCurves(arm, seed, evals, [], complete, {"steps": points[-1][0]} if complete else None)


VANILLA = [run("vanilla", 0, [(10, 100, 0.1, 0.10), (20, 200, 0.2, 0.20)]),
           run("vanilla", 1, [(10, 100, 0.1, 0.14), (20, 200, 0.2, 0.22)])]
SIFT = [run("sift", 0, [(10, 100, 0.2, 0.15), (20, 200, 0.4, 0.30)]),
        run("sift", 1, [(10, 100, 0.2, 0.12), (20, 200, 0.4, 0.26)])]


def test_mean_curve_and_paired_difference():
    c = mean_curve(VANILLA)
    assert c.steps == [10, 20] and c.x == [100, 200]
    assert c.mean == pytest.approx([0.12, 0.21]) and c.lo == [0.10, 0.20] and c.hi == [0.14, 0.22]
    h = mean_curve(SIFT, x="hours")
    assert h.x == pytest.approx([0.2, 0.4])
    d = paired_difference(SIFT, VANILLA)
    assert d.steps == [10, 20]
    assert d.mean == pytest.approx([(0.05 - 0.02) / 2, (0.10 + 0.04) / 2])
    assert d.lo == pytest.approx([-0.02, 0.04]) and d.hi == pytest.approx([0.05, 0.10])


def test_mean_curve_uses_only_steps_every_seed_has():
    short = run("vanilla", 2, [(10, 100, 0.1, 0.3)], complete=False)
    assert mean_curve([*VANILLA, short]).steps == [10]


def test_final_table_paired_delta_and_spread():
    rows = final_table(["vanilla", "sift"], {"vanilla": VANILLA, "sift": SIFT}, "vanilla")
    van, sift = rows
    assert van["delta_vs_ref"] is None and van["val_mlm_acc"]["mean"] == pytest.approx(0.21)
    assert sift["val_mlm_acc"]["mean"] == pytest.approx(0.28)
    assert sift["delta_vs_ref"]["mean"] == pytest.approx(0.07)
    assert sift["delta_vs_ref"]["min"] == pytest.approx(0.04) and sift["delta_vs_ref"]["max"] == pytest.approx(0.10)
    assert sift["per_seed"] == {0: 0.30, 1: 0.26} and sift["backprop_samples"] == 200
    # equal wall clock: vanilla ends at 0.2 h, when sift (twice as slow) is at its step-10 evaluation
    assert sift["acc_at_ref_hours"]["mean"] == pytest.approx((0.15 + 0.12) / 2)
    assert sift["delta_at_ref_hours"]["mean"] == pytest.approx((0.15 - 0.20 + 0.12 - 0.22) / 2)


def test_target_table_not_reached_and_speedup():
    rows = target_table(["vanilla", "sift"], {"vanilla": VANILLA, "sift": SIFT}, [0.15, 0.25], "vanilla")
    by = {(r["target"], r["arm"]): r for r in rows}
    # vanilla seed 0 reaches 0.15 at 150 samples, seed 1 at 100 + 100 * 0.01 / 0.08 = 112.5
    v = by[(0.15, "vanilla")]["backprop_samples"]
    assert v["per_seed"] == {0: pytest.approx(150.0), 1: pytest.approx(112.5)} and v["mean"] == pytest.approx(131.25)
    s = by[(0.15, "sift")]["backprop_samples"]  # seed 0 at its first evaluation; seed 1: 100 + 100 * 0.03 / 0.14
    assert s["per_seed"] == {0: 100.0, 1: pytest.approx(100 + 300 / 14)}
    assert s["speedup_vs_ref"] == pytest.approx(131.25 / s["mean"])
    assert by[(0.25, "vanilla")]["backprop_samples"]["reached"] == 0
    assert "mean" not in by[(0.25, "vanilla")]["backprop_samples"]
    assert by[(0.25, "sift")]["hours"]["reached"] == 2 and by[(0.25, "sift")]["hours"]["speedup_vs_ref"] is None
    md = markdown_targets(rows, {})
    assert "not reached (0/2 seeds)" in md


def test_fidelity_table_windows():
    steps = [{"step": s, "spearman": s / 100, "topk_overlap": 0.5, "kept_score": 6.0, "dropped_score": 5.0,
              "time_scoring": 0.1, "time_forward": 0.2, "time_backward": 0.3, "time_optimizer": 0.0}
             for s in (10, 20, 30, 40, 50, 60, 70, 80, 90)]
    r = RunCurves("loss-1", 0, [], steps, True)
    row = fidelity_table([("loss-1", "loss", 1)], {"loss-1": [r]}, total_steps=90)[0]
    assert row["records"] == 9
    assert row["spearman"] == pytest.approx(0.5)
    assert row["spearman_first_third"] == pytest.approx(0.2)  # steps 10, 20, 30
    assert row["spearman_last_third"] == pytest.approx(0.8)  # steps 70, 80, 90
    assert row["kept_score"] == 6.0 and row["time_scoring"] == pytest.approx(0.1)
    assert row["time_train"] == pytest.approx(0.5)
    assert row["spearman_last_third_per_seed"] == {0: pytest.approx(0.8)}


def test_read_metrics_keeps_the_last_record_per_step_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"event": "eval", "step": 20, "val_mlm_acc": 0.1},
             # resumed from the step-10 checkpoint: step 20 is logged again
             {"step": 20, "loss": 1.5}, {"event": "eval", "step": 20, "val_mlm_acc": 0.2}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 30, "lo')
    evals, steps = read_metrics(path)
    assert [s["loss"] for s in steps] == [3.0, 1.5]
    assert [e["val_mlm_acc"] for e in evals] == [0.2]


# ----------------------------------------------------------------------------- continuation studies


def cont(arm: str, seed: int, points: list[tuple[int, float, float, float]], cpu: list[float],
         heldout: list[float] | None = None) -> RunCurves:
    """A continuation branched at step 100 (1,600 samples, 0.5 h): points (step, hours, val acc, unused)."""
    evals = [{"event": "eval", "step": s, "backprop_samples": 16 * s, "hours": h, "val_mlm_acc": a}
             for s, h, a, _ in points]
    for e, v in zip(evals, heldout or []):
        e["heldout_val_mlm_acc"] = v
    return RunCurves(arm, seed, evals, [], True, {"steps": points[-1][0]},
                     origin={"backprop_samples": 1600, "hours": 0.5},
                     cpu={s: c for (s, *_), c in zip(points, cpu)})


def test_axes_count_from_the_branch_point():
    r = cont("a", 0, [(110, 0.6, 0.2, 0), (120, 0.7, 0.3, 0)], [40.0, 80.0])
    assert r.series("val_mlm_acc", "backprop_samples") == ([160, 320], [0.2, 0.3])
    assert r.series("val_mlm_acc", "hours")[0] == pytest.approx([0.1, 0.2])
    assert r.series("val_mlm_acc", "cpu_s") == ([40.0, 80.0], [0.2, 0.3])
    r.evals.insert(0, {"event": "eval", "step": 100, "backprop_samples": 1600, "hours": 0.9, "val_mlm_acc": 0.1,
                       "branch_point": True})  # the start evaluation ran in its own process: still x = 0
    assert r.series("val_mlm_acc", "hours")[0][0] == 0.0 and r.series("val_mlm_acc", "cpu_s")[0][0] == 0.0


def test_paired_comparisons_against_a_direct_computation():
    from study.report import comparisons, paired_at_end, paired_at_equal
    from study.stats import mean_ci

    # vanilla: 10 CPU s per 10 steps; sift: 20 CPU s per 10 steps (scoring), better per sample
    van = [cont("vanilla", s, [(110, 0.6, 0.20 + d, 0), (120, 0.7, 0.30 + d, 0)], [10.0, 20.0]) for s, d in
           ((0, 0.00), (1, 0.01), (2, -0.01))]
    sift = [cont("sift", s, [(110, 0.7, 0.22 + d, 0), (120, 0.9, 0.33 + d, 0)], [20.0, 40.0]) for s, d in
            ((0, 0.00), (1, 0.02), (2, -0.01))]
    end = paired_at_end(sift, van, "val_mlm_acc")
    want = [0.33 - 0.30, 0.35 - 0.31, 0.32 - 0.29]
    assert end["per_seed"] == {0: pytest.approx(want[0]), 1: pytest.approx(want[1]), 2: pytest.approx(want[2])}
    assert end["lo"] == pytest.approx(mean_ci(want)["lo"]) and end["hi"] == pytest.approx(mean_ci(want)["hi"])
    # at equal CPU: vanilla's budget (20 s), when sift is at its first evaluation (20 s): 0.22 vs 0.30
    cpu = paired_at_equal(sift, van, "val_mlm_acc", "cpu_s")
    assert cpu["per_seed"][0] == pytest.approx(0.22 - 0.30) and cpu["per_seed"][1] == pytest.approx(0.24 - 0.31)
    assert cpu["budget"]["mean"] == pytest.approx(20.0)
    # at equal wall clock: vanilla's 0.2 h budget, sift at 0.2 h is its first evaluation again
    wall = paired_at_equal(sift, van, "val_mlm_acc", "hours")
    assert wall["per_seed"][2] == pytest.approx(0.21 - 0.29)
    rows = comparisons(["vanilla", "sift"], {"vanilla": van, "sift": sift}, ["vanilla", "random"], ["val_mlm_acc"])
    by = {(r["arm"], r["axis"]): r for r in rows}
    assert set(by) == {("sift", "backprop_samples"), ("sift", "cpu_s"), ("sift", "hours")}
    assert by[("sift", "backprop_samples")]["verdict"] == "better" and by[("sift", "cpu_s")]["verdict"] == "worse"
    # the family at equal samples is this one comparison: its Holm-adjusted p is its own p
    assert by[("sift", "backprop_samples")]["p_holm"] == by[("sift", "backprop_samples")]["p"] < 0.05
    assert "p_holm" not in by[("sift", "cpu_s")]


def test_continuation_targets_and_the_kept_and_cost_tables():
    from study.report import continuation_targets, cost_table, kept_table

    assert continuation_targets([0.10, 0.12], [0.15, 0.17]) == [0.135, 0.16]
    assert continuation_targets([0.2], [0.19]) == []
    probe = {"kept": {"loss:1": {"drawn": {"original": 0.75, "noise": 0.25}, "exit": {"original": 0.6, "noise": 0.4},
                                 "exact": {"original": 0.65, "noise": 0.35}}}}
    runs = [RunCurves("loss-1", s, [], [], True, probe=probe) for s in (0, 1)]
    runs[1].probe = {"kept": {"loss:1": {**probe["kept"]["loss:1"], "exit": {"original": 0.7, "noise": 0.3}}}}
    rows = {r["kind"]: r for r in kept_table([("loss-1", "loss:1")], {"loss-1": runs}, probe)}
    assert rows["noise"]["drawn"] == 0.25 and rows["noise"]["branch_exit"] == 0.4
    assert rows["noise"]["end_exit"]["mean"] == pytest.approx(0.35) and rows["noise"]["end_exact"]["mean"] == 0.35
    assert "p" not in rows["noise"]["end_exit"]  # a share is a level, not a difference to test against 0
    # a top-k probe made before the weights were recorded: every kept row weighs 1, so the weight share
    # is the row share
    assert rows["noise"]["end_exit_weight"]["mean"] == pytest.approx(0.35) and not rows["noise"]["weighted"]
    # a weighted arm: its weight share is read as recorded, apart from its row share
    key = "stratified-loss:1@q=0.75"
    strat = {"drawn": {"original": 0.75, "noise": 0.25}, "exit": {"original": 0.5, "noise": 0.5},
             "exact": {"original": 0.55, "noise": 0.45}, "exit_weight": {"original": 0.74, "noise": 0.26},
             "exact_weight": {"original": 0.76, "noise": 0.24}}
    sruns = [RunCurves("stratified-loss-1", s, [], [], True, probe={"kept": {key: strat}}) for s in (0, 1)]
    rows = {r["kind"]: r for r in kept_table([("stratified-loss-1", key)], {"stratified-loss-1": sruns}, {})}
    assert rows["noise"]["weighted"] and rows["noise"]["end_exit"]["mean"] == 0.5
    assert rows["noise"]["end_exit_weight"]["mean"] == pytest.approx(0.26)
    assert rows["noise"]["end_exact_weight"]["mean"] == pytest.approx(0.24) and rows["noise"]["branch_exit"] is None
    from study.markdown import markdown_kept
    from study.output import _kept_lines

    line = next(x for x in markdown_kept(list(rows.values()), {}).splitlines() if "| noise |" in x)
    assert "| 25.0% | – | – | 50.0% [50.0%, 50.0%] | 26.0% [26.0%, 26.0%] | 45.0% / 24.0% |" in line
    (noise_line,) = _kept_lines(list(rows.values()), {"stratified-loss-1": "strat"})
    assert "25.0% by vanilla and random (drawn); strat 50.0% (weight share 26.0%)" in noise_line
    # a weighted arm's probe without weights has no weight share (never its row share)
    del strat["exit_weight"], strat["exact_weight"]
    rows = {r["kind"]: r for r in kept_table([("stratified-loss-1", key)], {"stratified-loss-1": sruns}, {})}
    assert rows["noise"]["end_exit_weight"] == {"n": 0}
    costs = cost_table(["a"], {"a": [cont("a", 0, [(110, 0.6, 0.2, 0), (120, 0.8, 0.3, 0)], [30.0, 61.0])]})
    assert costs[0]["cpu_s"]["mean"] == 61.0 and costs[0]["wall_s"]["mean"] == pytest.approx(0.3 * 3600)
    assert costs[0]["vcas_flops"] is None
    vcas = [cont("v", s, [(110, 0.6, 0.2, 0)], [30.0]) for s in (0, 1)]
    for r, f in zip(vcas, ((0.8, 0.9), (0.7, 0.7))):
        r.steps = [{"step": 105, "vcas_flops_calib": f[0]}, {"step": 110, "vcas_flops_calib": f[1]}]
    assert cost_table(["v"], {"v": vcas})[0]["vcas_flops"]["mean"] == pytest.approx(0.775)


def test_load_run_joins_the_start_evaluation_branch_point_and_cpu_trace(tmp_path):
    from study.report import load_run

    start_dir, run_dir = tmp_path / "start", tmp_path / "run"
    for d in (start_dir, run_dir):
        d.mkdir()
    (start_dir / "metrics.jsonl").write_text(json.dumps(
        {"event": "eval", "step": 100, "backprop_samples": 1600, "hours": 0.6, "val_mlm_acc": 0.11,
         "heldout_val_mlm_acc": 0.05}) + "\n")
    (start_dir / "summary.json").write_text(json.dumps({"steps": 100}))
    recs = [{"step": 110, "loss": 3.0}, {"event": "eval", "step": 110, "backprop_samples": 1760, "hours": 0.55,
                                         "val_mlm_acc": 0.12},
            {"step": 120, "loss": 2.9}, {"event": "eval", "step": 120, "backprop_samples": 1920, "hours": 0.6,
                                         "val_mlm_acc": 0.13, "heldout_val_mlm_acc": 0.07}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run_dir / "summary.json").write_text(json.dumps({"steps": 120}))
    (run_dir / "branch.json").write_text(json.dumps({"step": 100, "backprop_samples": 1600, "hours": 0.5}))
    (run_dir / "probe.json").write_text(json.dumps({"step": 120, "kept": {}}))
    (run_dir / "cputime.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 110, "event": "train", "cpu_s": 9.0, "load1": 2.0}, {"step": 110, "event": "eval", "cpu_s": 10.0,
                                                                      "load1": 2.0},
        {"step": 120, "event": "eval", "cpu_s": 21.0, "load1": 4.0})))
    start = load_run(start_dir, "start", 0, 100)
    run = load_run(run_dir, "loss-1", 0, 120, start=start)
    assert run.complete and [e["step"] for e in run.evals] == [100, 110, 120]
    assert run.series("val_mlm_acc", "backprop_samples") == ([0, 160, 320], [0.11, 0.12, 0.13])
    assert run.series("val_mlm_acc", "cpu_s") == ([0.0, 10.0, 21.0], [0.11, 0.12, 0.13])
    assert run.series("heldout_val_mlm_acc", "backprop_samples") == ([0, 320], [0.05, 0.07])
    assert run.load == pytest.approx(8 / 3) and run.probe == {"step": 120, "kept": {}}


def test_verdict_lines_sort_arms_by_what_their_interval_says():
    from study.markdown import verdict_lines

    rows = [{"arm": a, "ref": "vanilla", "metric": "val_mlm_acc", "axis": "backprop_samples", "n": n, "mean": m,
             "lo": m - 0.001, "hi": m + 0.001, "verdict": v} for a, n, m, v in
            (("up", 5, 0.004, "better"), ("down", 5, -0.004, "worse"), ("flat", 5, 0.0, "n.s."))]
    rows.append({"arm": "new", "ref": "vanilla", "metric": "val_mlm_acc", "axis": "backprop_samples", "n": 1,
                 "mean": 0.01, "verdict": "–"})
    (line,) = verdict_lines(rows, {}, ["up", "down", "flat", "new"], ["vanilla"], ["val_mlm_acc"])
    assert "**better**: up (+0.40 [+0.30, +0.50])" in line and "**worse**: down (-0.40 [-0.50, -0.30])" in line
    assert "within the interval: flat" in line and "one seed, no interval yet: new" in line


def test_holm_line_names_what_survives_the_correction():
    from study.markdown import holm_lines

    def row(arm, mean, p_holm, p=0.01):
        return {"arm": arm, "ref": "vanilla", "metric": "val_mlm_acc", "axis": "backprop_samples", "n": 5,
                "mean": mean, "lo": mean - 0.001, "hi": mean + 0.001, "p": p, "p_holm": p_holm}

    (line,) = holm_lines([row("up", 0.004, 0.01), row("down", -0.004, 0.2)], {"up": "Up"})
    assert "over the 2 comparisons" in line and "**significant at 5%**: Up vs vanilla" in line
    assert "adjusted p 0.010" in line and "down" not in line
    (line,) = holm_lines([row("up", 0.004, 0.3), row("down", -0.004, 0.2)], {})
    assert "none significant at 5%; the closest: down vs vanilla" in line
    (line,) = holm_lines([row("a", 0.001, 1.0, p=0.6), row("b", -0.002, 1.0, p=0.3)], {})  # ties: the smaller raw p
    assert "the closest: b vs vanilla" in line
    assert holm_lines([{k: v for k, v in row("x", 0.0, 1.0).items() if k != "p_holm"}], {}) == []


def test_decoder_runs_are_read_by_their_own_metric_names():
    """A decoder's evals say val_lm_acc / val_lm_loss (summary token_loss "lm"); tables follow."""
    from study.markdown import markdown_final
    from study.report import metric_keys, target_table, token_name

    def as_lm(r: RunCurves) -> RunCurves:
        evals = [{k.replace("_mlm_", "_lm_"): v for k, v in e.items()} for e in r.evals]
        return RunCurves(r.arm, r.seed, evals, [], r.complete, {"token_loss": "lm"})

    runs = {"vanilla": [as_lm(r) for r in VANILLA], "sift": [as_lm(r) for r in SIFT]}
    assert token_name(runs) == "lm" and token_name({"vanilla": VANILLA}) == "mlm"
    assert token_name({"v": [RunCurves("v", 0, runs["sift"][0].evals, [], True)]}) == "lm"  # no summary
    assert metric_keys(runs, "lm") == ["val_lm_acc"]
    rows = final_table(["vanilla", "sift"], runs, "vanilla", "lm")
    assert rows[1]["val_lm_acc"]["mean"] == pytest.approx(0.28) and rows[1]["delta_vs_ref"]["mean"] == pytest.approx(0.07)
    assert "val LM acc" in markdown_final(rows, {}, "vanilla", "lm")
    hits = target_table(["vanilla", "sift"], runs, [0.2], "vanilla", key="val_lm_acc")
    assert all(r["backprop_samples"]["reached"] == 2 for r in hits)


def test_incomplete_runs_are_listed_once_per_arm():
    from study.output import _by_arm

    keys = ["noisy/loss-2/seed0", "noisy/loss-2/seed1", "noisy/vcas/seed3", "vanilla/seed2"]
    assert _by_arm(keys) == "noisy/loss-2 (seeds 0, 1); noisy/vcas (seed 3); vanilla (seed 2)"
