"""Study specs: the arm grammar, the default grid, presets, and the errors a user can cause (exit 2)."""

from __future__ import annotations

import json

import pytest
import yaml

from engine.config import load_config
from study import cli as study
from study.spec import (
    RANDOM,
    VANILLA,
    StudyError,
    build_spec,
    default_arms,
    default_exits,
    needs_reference,
    parse_arm,
    parse_arms,
)
from tests.distributed.common import REPO


def test_default_exits_deduplicate_for_shallow_models():
    assert default_exits(1) == [1]
    assert default_exits(2) == [1, 2]
    assert default_exits(3) == [1, 2, 3]
    assert default_exits(4) == [1, 2, 4]
    assert default_exits(12) == [1, 2, 6, 12]


def test_default_grid_for_bert_base():
    names = [a.name for a in default_arms(12)]
    assert names == ["vanilla", "random", "loss-1", "loss-2", "loss-6", "loss-12",
                     "entropy-1", "entropy-2", "entropy-6", "entropy-12"]


def test_arm_grammar():
    assert parse_arm("vanilla", 4) == VANILLA and parse_arm(" Random ", 4) == RANDOM
    a = parse_arm("entropy:L/2", 12)
    assert a.name == "entropy-6" and a.overrides == ("sift.policy=topk", "sift.criterion=entropy", "sift.exit_layer=6")
    assert parse_arm("loss:L", 4).overrides[-1] == "sift.exit_layer=4"
    assert parse_arm("loss:3", 4).title() == "loss-SIFT, exit 3"
    assert VANILLA.overrides == ("sift.policy=none", "sift.schedule=serial")
    assert "sift.policy=random" in RANDOM.overrides


def test_an_arm_is_a_name_and_overrides_so_new_methods_need_no_code():
    arm = parse_arm({"name": "vcas", "overrides": ["method=vcas", "vcas.ratio=0.5"], "label": "VCAS"}, 4)
    assert (arm.name, arm.overrides, arm.title()) == ("vcas", ("method=vcas", "vcas.ratio=0.5"), "VCAS")
    assert arm.keys() == {"method", "vcas.ratio"}
    arms = parse_arms(["vanilla", {"name": "sift-vcas", "overrides": ["method=sift+vcas"]}, "loss:1"], 4)
    assert [a.name for a in arms] == ["vanilla", "sift-vcas", "loss-1"]
    with pytest.raises(StudyError, match="two different arms are named 'loss-1'"):
        parse_arms(["loss:1", {"name": "loss-1", "overrides": ["sift.keep=0.25"]}], 4)
    with pytest.raises(StudyError, match="not key=value"):
        parse_arm({"name": "x", "overrides": ["method"]}, 4)
    with pytest.raises(StudyError, match="names a directory"):
        parse_arm({"name": "a/b", "overrides": []}, 4)
    with pytest.raises(StudyError, match="expected"):
        parse_arm({"name": "x", "overides": []}, 4)


@pytest.mark.parametrize("spec, message", [
    ("loss:5", "outside 1..4"), ("loss:0", "outside 1..4"), ("loss:x", "not a layer number"),
    ("greedy:1", "not understood"), ("loss", "not understood"), ("", "not understood"),
])
def test_bad_arms_are_study_errors(spec, message):
    with pytest.raises(StudyError, match=message):
        parse_arm(spec, 4)


def test_parse_arms_expands_default_and_drops_duplicates():
    arms = parse_arms("vanilla,loss:1,default", 2)
    assert [a.name for a in arms] == ["vanilla", "loss-1", "random", "loss-2", "entropy-1", "entropy-2"]
    assert [a.name for a in parse_arms(["loss:L", "loss:2"], 2)] == ["loss-2"]


def write(tmp_path, tree):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_build_spec_reads_the_study_section_and_cli_wins(tmp_path):
    path = write(tmp_path, {"model": {"preset": "mini"}, "study": {"name": "x", "seeds": 2, "targets": [0.3, 0.2],
                                                                  "arms": ["vanilla", "entropy:L"]}})
    spec = build_spec(path)
    assert (spec.name, spec.seeds, spec.targets, spec.num_layers) == ("x", [0, 1], [0.2, 0.3], 4)
    assert [a.name for a in spec.arms] == ["vanilla", "entropy-4"] and "study" not in spec.base
    assert build_spec(path, seeds="3").seeds == [0, 1, 2] and build_spec(path, seeds="5,").seeds == [5]
    spec = build_spec(path, seeds="3,5", arms="random", targets="auto", overrides=["model.num_layers=6"])
    assert spec.seeds == [3, 5] and [a.name for a in spec.arms] == ["random"] and spec.targets is None
    assert spec.num_layers == 6


@pytest.mark.parametrize("kwargs, message", [
    ({"overrides": ["sift.policy=random"]}, "would change what an arm is"),
    ({"overrides": ["train.seed=3"]}, "would change what an arm is"),
    ({"arms": [{"name": "k", "overrides": ["sift.keep=0.25"]}], "overrides": ["sift.keep=0.5"]}, "would change"),
    ({"seeds": "0,0"}, "distinct"), ({"seeds": "a"}, "integers"), ({"seeds": 0}, ">= 1"),
    ({"targets": "1.5"}, "accuracies in"), ({"parallel": 0}, ">= 1"), ({"arms": "loss:9"}, "outside"),
])
def test_build_spec_errors(tmp_path, kwargs, message):
    with pytest.raises(StudyError, match=message):
        build_spec(write(tmp_path, {"model": {"preset": "tiny"}}), **kwargs)


def test_the_continuation_protocol_and_its_errors(tmp_path):
    tree = {"model": {"preset": "tiny"}, "study": {"warm": {"steps": 30, "seed": 2}, "continue_steps": 20}}
    spec = build_spec(write(tmp_path, tree))
    assert (spec.branch.warm_steps, spec.branch.steps, spec.branch.warm_seed, spec.branch.total) == (30, 20, 2, 50)
    assert build_spec(write(tmp_path, tree), warm_steps=5, continue_steps=7).branch.total == 12
    with pytest.raises(StudyError, match="study's protocol"):
        build_spec(write(tmp_path, tree), overrides=["train.steps=9"])
    for bad, message in (({"warm": {"steps": 3}}, "go together"), ({"warm": {"steps": 0}, "continue_steps": 2}, ">= 1"),
                         ({"warm": {"steps": 3, "sed": 1}, "continue_steps": 2}, "unknown key")):
        with pytest.raises(StudyError, match=message):
            build_spec(write(tmp_path, {"study": bad}))
    assert build_spec(write(tmp_path, {"model": {"preset": "tiny"}})).branch is None


def test_unknown_study_key_and_unreadable_file(tmp_path):
    with pytest.raises(StudyError, match="unknown study key"):
        build_spec(write(tmp_path, {"study": {"seed": 1}}))
    with pytest.raises(StudyError, match="cannot read"):
        build_spec(tmp_path / "absent.yaml")


@pytest.mark.parametrize("preset", ["cpu", "gpu", "gpt2-cpu", "gpt2-continue-cpu"],
                         ids=lambda p: f"preset-{p}")  # an id "gpu" would read as the gpu marker
def test_presets_are_valid_run_configs_for_every_arm(preset, tmp_path):
    spec = build_spec(study.PRESETS[preset])
    assert len(spec.seeds) >= 2 and spec.arms[0] == VANILLA
    steps = [] if spec.branch is None else [f"train.steps={spec.branch.total}"]
    base = write(tmp_path, spec.base)
    for arm in spec.arms:
        ref = ["sift.reference=ref"] if needs_reference(arm) else []  # the study sets it (test_study_budget)
        cfg = load_config(base, [*arm.overrides, *steps, *ref])
        assert cfg.train.eval_every <= cfg.train.steps
    # the corpus is referenced relative to the repository, never by a machine's absolute path
    assert spec.prepare is not None and spec.prepare.inputs == ["../shared/corpus/english-reference.parquet"]


def test_regimes_preset_plans_a_warm_run_start_evaluations_and_every_arm(tmp_path):
    spec = build_spec(study.PRESETS["regimes-cpu"])
    assert len(spec.seeds) >= 5 and spec.num_layers == 4 and spec.branch is not None and spec.budget == "flops"
    assert [a.name for a in spec.arms] == ["vanilla", "random", "loss-1", "entropy-1", "reducible-1", "reducible-4",
                                           "stratified-loss-1", "stratified-entropy-1", "importance-loss-1"]
    assert spec.regimes["input"] == "../shared/corpus/english-reference.parquet"
    regime = study.Regime("noisy", tmp_path / "noisy", tmp_path / "out", {"heldout": tmp_path / "h"},
                          {"noise": (tmp_path / "k", 0.25)})
    plans = study.plan_runs(spec, regime)  # no data there: equal steps (the FLOPs: test_study_budget.py)
    W, total = spec.branch.warm_steps, spec.branch.total
    assert [p.kind for p in plans[:3]] == ["warm", "reference", "start"] and len(plans) == 2 + len(spec.seeds) * 10
    warm = plans[0]
    assert warm.steps == W and warm.config["optim"]["schedule_steps"] == total and warm.config["sift"]["policy"] == "none"
    for p in plans[2:]:
        assert p.deps[0] == warm.key and p.branch == warm.dir and p.config["optim"]["schedule_steps"] == total
        assert p.steps == (W if p.kind == "start" else total) and p.config["train"]["eval_every"] <= spec.branch.steps
    # every run evaluates the held-out set at every evaluation, the warm-up and the start evaluations too
    assert all(p.config["data"]["extra_eval"] == {"heldout": str(tmp_path / "h")} for p in plans)
    loss1 = next(p for p in plans if p.key == "noisy/loss-1/seed0")
    assert loss1.probe[loss1.probe.index("--select") + 1] == "loss:1" and "--kind" in loss1.probe
    assert next(p for p in plans if p.key == "noisy/vanilla/seed0").probe == []
    # every selecting arm is probed; a reducible arm with its own sift.reference (the regime's)
    red = next(p for p in plans if p.key == "noisy/reducible-1/seed0")
    assert red.probe[red.probe.index("--select") + 1] == "reducible:1" and "--reference" not in red.probe
    assert red.config["sift"]["reference"] == str(regime.out / "reference")
    strat = next(p for p in plans if p.key == "noisy/stratified-loss-1/seed0")
    assert strat.probe[strat.probe.index("--select") + 1] == "stratified-loss:1@q=0.75"
    imp = next(p for p in plans if p.key == "noisy/importance-loss-1/seed0")
    assert imp.probe[imp.probe.index("--select") + 1] == "importance-loss:1@t=1.0,u=0.1"
    assert next(p for p in plans if p.key == "noisy/random/seed0").probe == []
    # at the branch point: the 7 selections, the reducible ones against the regime's reference, so the
    # warm-up waits for it
    assert warm.probe.count("--select") == 7 and warm.probe[warm.probe.index("--reference") + 1] == red.config["sift"]["reference"]
    assert warm.deps == ["noisy/reference"]


def test_arms_on_the_command_line_may_name_the_study_files_arms():
    """`--arms vcas` picks the preset's `vcas` mapping (an extra arm, outside the grid); shorthands still
    parse; an unknown name says so."""
    preset = study.PRESETS["regimes-cpu"]
    whole = {a.name: a for a in build_spec(preset).arms}
    assert "vcas" not in whole
    spec = build_spec(preset, arms="vcas,loss:1,sift+vcas")
    assert [a.name for a in spec.arms] == ["vcas", "loss-1", "sift+vcas"] and spec.arms[1] == whole["loss-1"]
    assert "method=vcas" in spec.arms[0].overrides
    with pytest.raises(StudyError, match="'vcas2' is not understood.*name of an arm of the study file"):
        build_spec(preset, arms="vanilla,vcas2")


def run_main(argv, capsys):
    """`sift study ...` as the command line runs it (errors become a message and exit status 2)."""
    from launcher.cli import main as sift

    code = sift(["study", *argv])
    return code, capsys.readouterr()


def test_missing_data_dir_exits_2(tmp_path, capsys):
    code, out = run_main(["--config", str(REPO / "tests/assets/tiny-run.yaml"), "--data", str(tmp_path / "none"),
                          "--out", str(tmp_path / "study")], capsys)
    assert code == 2 and "no prepared dataset" in out.err and "Traceback" not in out.err


def test_bad_arm_and_bad_override_exit_2(tmp_path, capsys):
    base = ["--config", str(REPO / "tests/assets/tiny-run.yaml"), "--data", str(tmp_path), "--out", str(tmp_path / "s")]
    code, out = run_main([*base, "--arms", "vanilla,loss:7"], capsys)
    assert code == 2 and "outside 1..2" in out.err
    code, out = run_main([*base, "--dry-run", "train.steps=0"], capsys)
    assert code == 2 and "train.steps" in out.err


def test_bad_preset_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        study.main(["--preset", "tpu"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_preset_without_its_corpus_says_so(tmp_path, capsys, monkeypatch):
    """A clone without ../shared/: the CPU preset cannot make its data and says what to do instead."""
    spec_path = tmp_path / "study.yaml"
    tree = yaml.safe_load(study.PRESETS["cpu"].read_text())
    tree["study"]["prepare"]["inputs"] = ["../no-such-dir/corpus.parquet"]
    spec_path.write_text(yaml.safe_dump(tree))
    code, out = run_main(["--config", str(spec_path), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "s")],
                         capsys)
    assert code == 2 and "pass --data DIR" in out.err


def test_dry_run_lists_every_run(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.json").write_text(json.dumps({"seq_len": 64, "splits": {}}))
    code, out = run_main(["--config", str(REPO / "tests/assets/tiny-run.yaml"), "--data", str(data), "--out",
                          str(tmp_path / "s"), "--seeds", "2", "--dry-run"], capsys)
    assert code == 0
    lines = [ln for ln in out.out.splitlines() if ln.startswith("  ")]
    assert len(lines) == 2 * 6 and all(" new " in ln for ln in lines)  # 6 arms for a 2-layer model
    assert lines[0].split()[0] == "vanilla/seed0" and lines[6].split()[0] == "vanilla/seed1"


def test_portable_arg_strips_machine_paths(monkeypatch):
    monkeypatch.chdir(REPO)  # paths under the working directory (here the checkout) become relative
    assert study.portable_arg("--seeds") == "--seeds"
    assert study.portable_arg("/scratch/me/english-128") == ".../english-128"
    assert study.portable_arg(str(REPO / "configs" / "x.yaml")) == "configs/x.yaml"
    assert study.portable_arg("data.path=/a/b/c") == "data.path=.../c"


def test_comparable_ignores_locations_and_vanilla_selection_settings():
    base = {"data": {"path": "/a", "mask_prob": 0.15}, "train": {"out_dir": "/x", "steps": 5},
            "sift": {"policy": "none", "warmup_steps": 10}}
    moved = {"data": {"path": "/b", "mask_prob": 0.15}, "train": {"out_dir": "/y", "steps": 5},
             "sift": {"policy": "none", "warmup_steps": 99}}
    assert study.comparable(base) == study.comparable(moved)  # vanilla never reads sift.warmup_steps
    sift = [{**c, "sift": {**c["sift"], "policy": "topk"}} for c in (base, moved)]
    assert study.comparable(sift[0]) != study.comparable(sift[1])
    assert study.comparable({**base, "train": {"out_dir": "/x", "steps": 6}}) != study.comparable(base)


def test_runs_made_before_a_new_knob_existed_still_match():
    """A key the marker lacks is ignored while it holds its default (an engine upgrade added it), and
    counts as soon as it does not."""
    from engine.config import load_config, to_dict

    now = to_dict(load_config(None, ["train.steps=7"]))
    old = {k: v for k, v in now.items() if k != "vcas"}
    old["sift"] = {k: v for k, v in now["sift"].items() if k != "fidelity_every"}
    assert study.comparable(study.without_new_defaults(now, old)) == study.comparable(old)
    changed = to_dict(load_config(None, ["train.steps=7", "vcas.alpha=0.5", "sift.fidelity_every=3"]))
    kept = study.without_new_defaults(changed, old)
    assert kept["vcas"]["alpha"] == 0.5 and kept["sift"]["fidelity_every"] == 3
    assert study.comparable(kept) != study.comparable(old)


def test_regimes_preset_without_its_corpus_says_so(tmp_path, capsys):
    """A clone without ../shared/: the regimes study cannot build its data and says what to do instead."""
    tree = yaml.safe_load(study.PRESETS["regimes-cpu"].read_text())
    tree["study"]["regimes"]["input"] = "../no-such-dir/corpus.parquet"
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(yaml.safe_dump(tree))
    code, out = run_main(["--config", str(spec_path), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "s")],
                         capsys)
    assert code == 2 and "which is not there" in out.err and "Traceback" not in out.err
