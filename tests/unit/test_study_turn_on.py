"""The "when to turn it on" table from fabricated results.json: which arm, its cost, its gain, or none."""

from __future__ import annotations

import json

import pytest

from study.markdown import markdown_turn_on
from study.turn_on import main, turn_on_row

GFLOP = 1e9


def comparison(arm: str, mean: float, verdict: str, *, ref: str = "vanilla", metric: str = "val_mlm_acc",
               axis: str = "flops") -> dict:
    return {"arm": arm, "ref": ref, "metric": metric, "axis": axis, "n": 5, "mean": mean, "lo": mean - 0.001,
            "hi": mean + 0.001, "verdict": verdict}


def results(regime: str, comparisons: list[dict], *, family: str = "bert", budget: str = "flops") -> dict:
    arms = {"vanilla": {"steps": 600, "total": 3 * GFLOP, "warmup": 0},
            "entropy-1": {"steps": 450, "total": 4 * GFLOP, "warmup": 0},
            "reducible-1": {"steps": 359, "total": 5 * GFLOP, "warmup": 0},
            "stratified-loss-1": {"steps": 450, "total": 4 * GFLOP, "warmup": 0}}
    for a in arms.values():
        a["flops_spent"] = a["steps"] * a["total"]
    return {"regime": regime, "base_config": {"model": {"family": family}},
            "study": {"reference": "vanilla", "control": "random", "branch": {"warm_steps": 800},
                      "arm_overrides": {"reducible-1": ["sift.policy=topk", "sift.criterion=reducible"]}},
            "metrics": ["val_mlm_acc", "heldout_val_mlm_acc"], "incomplete_runs": [],
            "budget": {"kind": budget, "arms": arms, "budget_flops": 1800 * GFLOP},
            "reference_model": {"references": [{"flops": 270 * GFLOP}]},
            "comparisons": comparisons}


def test_the_best_arm_beyond_its_interval_with_its_cost_and_gain():
    res = results("noisy", [
        comparison("random", 0.004, "better"),  # the control is never the method
        comparison("entropy-1", 0.0015, "better"), comparison("reducible-1", 0.0025, "better"),
        comparison("stratified-loss-1", 0.003, "n.s."),
        comparison("reducible-1", 0.0020, "better", metric="heldout_val_mlm_acc"),
        comparison("reducible-1", 0.0012, "better", ref="random"),
        comparison("reducible-1", 0.009, "better", axis="backprop_samples"),  # not the headline
    ])
    row = turn_on_row(res)
    assert row["label"] == "BERT noisy" and row["method"] == "reducible-1" and row["also"] == ["entropy-1"]
    assert row["gain"]["mean"] == 0.0025 and row["heldout"]["heldout_val_mlm_acc"]["mean"] == 0.0020
    assert row["vs_control"]["mean"] == 0.0012
    # 359 steps x 5 GFLOPs of vanilla's 600 x 3; its reference: 270 of vanilla's 1,800 GFLOPs
    assert row["cost"]["flops_vs_vanilla"] == pytest.approx(1795 / 1800) and row["cost"]["reference"] == pytest.approx(0.15)
    assert (row["cost"]["steps"], row["cost"]["vanilla_steps"]) == (359, 600)
    line = markdown_turn_on([row], {"reducible-1": "reducible, exit 1"}).splitlines()[2]
    assert line.startswith("| BERT noisy | reducible, exit 1 (also beyond the interval: entropy-1) | 1.00× (359 steps, "
                           "vanilla 600); + 15.0% of vanilla's budget for the reference")
    assert "**+0.25 [+0.15, +0.35]**" in line and "| +0.20 [+0.10, +0.30] | +0.12 [+0.02, +0.22] |" in line
    # a non-reducible winner carries no reference cost
    res["comparisons"] = [comparison("entropy-1", 0.0015, "better")]
    row = turn_on_row(res)
    assert row["method"] == "entropy-1" and row["cost"]["reference"] is None and row["vs_control"] is None
    assert row["cost"]["flops_vs_vanilla"] == 1.0


def test_none_when_no_arm_beats_vanilla_beyond_its_interval():
    res = results("clean", [comparison("entropy-1", 0.001, "n.s."), comparison("stratified-loss-1", -0.004, "worse"),
                            comparison("random", 0.004, "better")], family="gpt2")
    res["regime"] = ""
    row = turn_on_row(res)
    assert row["method"] is None and row["closest"]["arm"] == "entropy-1" and row["label"] == "GPT-2 continuation"
    line = markdown_turn_on([row], {}).splitlines()[2]
    assert line == ("| GPT-2 continuation | none: no arm beats vanilla beyond its interval | – | highest mean: entropy-1 "
                    "+0.10 [+0.00, +0.20] | – | – |")


def test_no_verdict_at_equal_samples_or_without_complete_comparisons():
    row = turn_on_row(results("clean", [comparison("entropy-1", 0.002, "better")], budget="samples"))
    assert row["method"] is None and "equal samples" in row["status"]
    res = results("redundant", [])
    res["incomplete_runs"] = ["redundant/entropy-1/seed0"]
    row = turn_on_row(res)
    assert "no complete comparison" in row["status"]
    assert "| BERT redundant (1 run(s) incomplete) | no complete comparison" in markdown_turn_on([row], {})


def test_the_command_reads_a_regimes_report_and_a_single_study(tmp_path, capsys):
    regimes, single = tmp_path / "regimes", tmp_path / "gpt2"
    for name, comps in (("noisy", [comparison("entropy-1", 0.002, "better")]),
                        ("clean", [comparison("entropy-1", 0.0, "n.s.")])):
        (regimes / name).mkdir(parents=True)
        (regimes / name / "results.json").write_text(json.dumps(results(name, comps)))
    single.mkdir()
    gpt2 = results("", [comparison("stratified-loss-1", 0.001, "n.s.")], family="gpt2")
    gpt2["labels"] = {"stratified-loss-1": "stratified loss, exit 1"}
    (single / "results.json").write_text(json.dumps(gpt2))
    assert main([str(regimes), str(single)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| BERT clean", "| BERT noisy", "| GPT-2 continuation"]
    assert "highest mean: stratified loss, exit 1" in rows[2]


def test_the_verdict_of_a_regimes_study_leads_with_the_table(tmp_path):
    from study.cli import PRESETS
    from study.output import write_verdict
    from study.spec import build_spec

    spec = build_spec(PRESETS["regimes-cpu"])
    assert spec.budget == "flops"
    reports = {}
    for name, comps in (("clean", [comparison("entropy-1", 0.001, "n.s.")]),
                        ("noisy", [comparison("reducible-1", 0.0025, "better")])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results(name, comps)))
        reports[name] = tmp_path / name
    reports["redundant"] = tmp_path / "redundant"  # not reported yet
    md = write_verdict(tmp_path, spec, reports, {}).splitlines()
    table = md.index("## When to turn it on") + 2
    assert md[table].startswith("| regime / model | method |")
    assert md[table + 2].startswith("| BERT clean | none: no arm beats vanilla beyond its interval |")
    assert md[table + 3].startswith("| BERT noisy | reducible-SIFT, exit 1 | 1.00× (359 steps, vanilla 600)")
    assert md.index("## redundant") > table and (tmp_path / "verdict.md").read_text().splitlines() == md


@pytest.mark.parametrize("doc", ["README.md", "docs/study.md"])
def test_the_docs_quote_the_table_the_command_prints_from_the_committed_studies(doc, capsys):
    from tests.distributed.common import REPO

    results = REPO / "benchmarks" / "results"
    assert main([str(results / "study-regimes-flops-cpu"), str(results / "study-gpt2-continue-flops-cpu")]) == 0
    table = capsys.readouterr().out.strip()
    assert table in (REPO / doc).read_text(), f"{doc}: regenerate its 'when to turn it on' table"
