"""Equal compute (study.budget: flops): the step arithmetic by hand, every arm's LR schedule ending at its
own last step, reducible arms planned after their reference, and the report's headline at equal FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.config import load_config
from engine.models.base import DataFacts, FlopCounts
from study import cli as study
from study.budget import StepFlops, budget_steps, step_flops
from study.report import comparisons
from study.spec import build_spec, parse_arm
from tests.distributed.common import REPO
from tests.unit.test_study_report import cont

# a made-up model: block 10 FLOPs per row, head 4: forward 2 x 10 + 4 = 24, training 72, exit-1 scoring 14
COUNTS = FlopCounts(layers=2, block=10.0, head=4.0)


def cfg(*overrides: str):
    return load_config(REPO / "tests/assets/tiny-run.yaml", list(overrides))  # B = 4, keep 0.5: G = 8


def test_step_flops_by_hand():
    assert step_flops(cfg("method=none"), COUNTS, 64) == StepFlops(4 * 72)
    assert step_flops(cfg("sift.exit_layer=1"), COUNTS, 64) == StepFlops(288, 8 * 14)
    assert step_flops(cfg("sift.exit_layer=2"), COUNTS, 64).score == 8 * 24
    # reducible, its reference run online on the gross batch: + G x the reference's forward (24 here)
    online = step_flops(cfg("sift.criterion=reducible", "sift.reference=r"), COUNTS, 64, 24.0)
    assert online == StepFlops(288, 112, 8 * 24) and online.total == 592
    # ... read from a sidecar: no per-step reference cost (the sidecar's one-off cost is reported)
    assert step_flops(cfg("sift.criterion=reducible", "sift.reference=r", "sift.reference_losses=s"),
                      COUNTS, 64, 24.0).reference == 0
    # two micro-steps per optimizer step cost twice
    assert step_flops(cfg("train.grad_accum=2"), COUNTS, 64).total == 2 * 400


def test_budget_steps_by_hand():
    vanilla = StepFlops(288)
    assert budget_steps(100, vanilla, vanilla) == 100
    assert budget_steps(100, vanilla, StepFlops(288, 112)) == 72  # 28,800 / 400
    assert budget_steps(100, vanilla, StepFlops(288, 112, 192)) == 48  # 28,800 / 592 = 48.6
    assert budget_steps(100, vanilla, StepFlops(288, 112), warmup_steps=10) == 74  # 10 + 25,920 / 400
    assert budget_steps(3, StepFlops(0.1 + 0.2), StepFlops(0.3)) == 3  # float sums do not lose a step


def test_new_arm_shorthands():
    assert parse_arm("reducible:L", 4).overrides == ("sift.policy=topk", "sift.criterion=reducible",
                                                     "sift.exit_layer=4")
    strat = parse_arm("stratified-loss:1", 4)
    assert strat.name == "stratified-loss-1" and "sift.policy=stratified" in strat.overrides
    assert "sift.threshold_quantile=0.75" in strat.overrides
    imp = parse_arm("importance-loss:1", 4)
    assert imp.name == "importance-loss-1" and "sift.policy=importance" in imp.overrides
    assert parse_arm("stratified-entropy:L/2", 4).name == "stratified-entropy-2"


@pytest.fixture
def flops_spec(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "_facts", lambda data: DataFacts(600, 64, "mlm_packed", 0))
    tree = yaml.safe_load((REPO / "tests/assets/tiny-run.yaml").read_text())
    tree["sift"]["warmup_steps"] = 0
    tree["study"] = {"warm": {"steps": 10, "seed": 0}, "continue_steps": 30, "budget": "flops",
                     "arms": ["vanilla", "loss:1", "loss:2", "reducible:1"], "reference_model": {"steps": 7}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tree))
    return build_spec(path, seeds="2")


def test_each_arm_runs_to_vanillas_flops_with_its_schedule_ending_there(flops_spec, tmp_path):
    plans = study.plan_runs(flops_spec, study.Regime("", tmp_path / "data", tmp_path / "out"))
    runs = {p.key: p for p in plans}
    counts = study._Flops(DataFacts(600, 64, "mlm_packed", 0)).per_row(cfg().model)
    vanilla = 4 * counts.train()
    for arm, exit_layer in (("loss-1", 1), ("loss-2", 2)):
        own = 30 * vanilla // (vanilla + 8 * counts.scoring(exit_layer))
        assert runs[f"{arm}/seed1"].steps == 10 + own < 40
    reducible = runs["reducible-1/seed0"]
    assert reducible.steps - 10 == 30 * vanilla // (vanilla + 8 * counts.scoring(1) + 8 * counts.scoring(2))
    assert runs["vanilla/seed0"].steps == 40 and runs["warm"].steps == 10
    for p in plans:
        if p.kind == "run":  # the schedule ends at the arm's own last step, warm-up included
            assert p.config["optim"]["schedule_steps"] == p.steps
            assert p.flops is not None
    assert runs["loss-2/seed0"].steps < runs["loss-1/seed0"].steps < runs["vanilla/seed0"].steps


def test_reducible_arms_wait_for_the_regimes_reference(flops_spec, tmp_path):
    plans = study.plan_runs(flops_spec, study.Regime("", tmp_path / "data", tmp_path / "out"))
    ref = next(p for p in plans if p.kind == "reference")
    assert ref.steps == 7 and ref.config["method"] == "none" and ref.command[-2:] == ["--half", "1"]
    for p in plans:
        uses = p.kind == "run" and p.arm.name == "reducible-1"
        assert (ref.key in p.deps) == uses
        if uses:  # BERT: the reference trained on half 1, the arm trains on half 0 and runs it online
            assert p.config["sift"]["reference"] == str(ref.dir) and p.config["data"]["train_half"] == 0
            assert Path(p.dir).parent.parent.name == "runs"


def test_dry_run_prints_steps_and_flops(flops_spec, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.json").write_text("{}")
    monkeypatch.setattr(study, "data_fingerprint", lambda d: {"index_sha256": "x"})
    src = Path(flops_spec.source)
    assert study.main(["--config", str(src), "--data", str(data), "--out", str(tmp_path / "s"), "--seeds", "1",
                       "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(budget: flops)" in out and "FLOPs/step" in out and "reference " in out


def test_equal_flops_is_the_headline_family_and_equal_samples_the_second_view():
    # vanilla: 3 evaluations to step 130; the arm stops at step 120 (its budget) and is ahead there
    van = [cont("vanilla", s, [(110, 0.6, 0.20, 0), (120, 0.7, 0.30, 0), (130, 0.8, 0.34 + s / 100, 0)],
                [40.0, 80.0, 120.0]) for s in (0, 1, 2)]
    arm = [cont("sift", s, [(110, 0.6, 0.25, 0), (120, 0.7, 0.36 + s / 50, 0)], [45.0, 90.0]) for s in (0, 1, 2)]
    rows = comparisons(["vanilla", "sift"], {"vanilla": van, "sift": arm}, ["vanilla"], ["val_mlm_acc"], "flops")
    assert [r["axis"] for r in rows] == ["flops", "backprop_samples", "cpu_s", "hours"]
    at_flops, at_samples = rows[0], rows[1]
    # each at its own end: 0.36 + s/50 - (0.34 + s/100)
    assert at_flops["per_seed"] == pytest.approx({s: 0.02 + s / 100 for s in (0, 1, 2)})
    # at the 320 samples the arm back-propagated: vanilla read at step 120 (0.30)
    assert at_samples["per_seed"] == pytest.approx({s: 0.06 + s / 50 for s in (0, 1, 2)})
    assert "p_holm" in at_flops and "p_holm" not in at_samples
