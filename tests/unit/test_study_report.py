"""The study's analysis on synthetic curves: time to target, seed aggregation, paired differences, tables."""

from __future__ import annotations

import json

import pytest

from benchmarks.study_report import (
    RunCurves,
    auto_targets,
    fidelity_table,
    final_table,
    markdown_targets,
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


def test_decoder_runs_are_read_by_their_own_metric_names():
    """A decoder's evals say val_lm_acc / val_lm_loss (summary token_loss "lm"); tables follow."""
    from benchmarks.study_report import markdown_final, target_table, token_name

    def as_lm(r: RunCurves) -> RunCurves:
        evals = [{k.replace("_mlm_", "_lm_"): v for k, v in e.items()} for e in r.evals]
        return RunCurves(r.arm, r.seed, evals, [], r.complete, {"token_loss": "lm"})

    runs = {"vanilla": [as_lm(r) for r in VANILLA], "sift": [as_lm(r) for r in SIFT]}
    assert token_name(runs) == "lm" and token_name({"vanilla": VANILLA}) == "mlm"
    assert token_name({"v": [RunCurves("v", 0, runs["sift"][0].evals, [], True)]}) == "lm"  # no summary
    rows = final_table(["vanilla", "sift"], runs, "vanilla", "lm")
    assert rows[1]["val_lm_acc"]["mean"] == pytest.approx(0.28) and rows[1]["delta_vs_ref"]["mean"] == pytest.approx(0.07)
    assert "val LM acc" in markdown_final(rows, {}, "vanilla", "lm")
    hits = target_table(["vanilla", "sift"], runs, [0.2], "vanilla", "lm")
    assert all(r["backprop_samples"]["reached"] == 2 for r in hits)
