"""Run configs: typed loading, dotted overrides, one error listing every problem; shipped configs parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, RunConfig, load_config, parse_overrides, to_dict
from engine.ds_config import DSConfigError, RunFacts, bucket_sizes, fill, load_json, zero_stage

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  steps: 7\nsift:\n  exit_layer: 2\n"),
                      ["sift.criterion=entropy", "optim.betas=[0.8, 0.9]", "optim.lr=3e-4"])
    assert cfg.train.steps == 7 and cfg.sift.exit_layer == 2 and cfg.sift.criterion == "entropy"
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.lr == 3e-4
    assert cfg.gross_batch_size == 32  # B = 16, keep = 0.5
    assert load_config(None, ["sift.policy=none"]).gross_batch_size == 16
    assert isinstance(load_config(), RunConfig)


def test_every_problem_is_reported_at_once(tmp_path):
    text = "train:\n  stpes: 5\n  micro_batch_size: 0\nsift:\n  policy: greedy\n  keep: 0.3\nbogus: {}\n"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), ["optim.lr=fast"])
    msg = str(e.value)
    assert "train.stpes: unknown key (did you mean 'steps'?)" in msg
    assert "bogus: unknown key" in msg
    assert "optim.lr: expected float, got 'fast'" in msg
    # bad values in the same config are reported in the same message
    assert "train.micro_batch_size: must be >= 1, got 0" in msg
    assert "sift.policy: 'greedy' is not one of topk, random, stratified, importance, none" in msg
    assert len(e.value.problems) == 5
    # a value of the wrong type is reported once, not again by the value checks (which see its default)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.micro_batch_size=four", "sift.keep=0.3", "train.stpes=1", "train.steps=0"])
    assert e.value.problems == [  # each names the override it came from
        "command-line override 'train.micro_batch_size=four': train.micro_batch_size: expected int, got 'four'",
        "command-line override 'train.stpes=1': train.stpes: unknown key (did you mean 'steps'?)",
        "command-line override 'train.steps=0': train.steps: must be >= 1, got 0",
    ]
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  micro_batch_size: 0\nsift:\n  policy: greedy\n  keep: 1.5\n"))
    msg = str(e.value)
    assert "sift.policy: 'greedy' is not one of topk, random, stratified, importance, none" in msg
    assert "train.micro_batch_size: must be >= 1" in msg and "sift.keep: must be in (0, 1]" in msg
    with pytest.raises(ConfigError, match="model.preset: 'huge' is not one of tiny"):
        load_config(None, ["model.preset=huge"])


def test_inconsistent_values(tmp_path):
    with pytest.raises(ConfigError, match="B / keep = 13.3333 must be a whole number"):
        load_config(None, ["train.micro_batch_size=4", "sift.keep=0.3"])
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sift.threshold_quantile=1.5", "sift.temperature=0", "sift.uniform_mix=0"])
    assert [p.split(": ", 1)[1] for p in e.value.problems] == [  # after "command-line override '...'"
        "sift.threshold_quantile: must be in (0, 1) or null, got 1.5",
        "sift.temperature: must be > 0, got 0.0",
        "sift.uniform_mix: must be in (0, 1] (every row needs a chance to be drawn), got 0.0"]
    with pytest.raises(ConfigError, match=r"use a quantile above 1 - keep = 0.5"):
        load_config(None, ["sift.policy=stratified", "sift.threshold_quantile=0.4"])
    assert load_config(None, ["sift.policy=stratified", "sift.threshold_quantile=0.75"]).sift.threshold_quantile == 0.75


def test_reducible_needs_a_reference_and_the_reference_knobs_are_checked():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sift.criterion=reducible", "data.train_half=2"])
    assert "sift.criterion: reducible needs sift.reference" in str(e.value)
    assert "data.train_half: must be 0, 1 or null, got 2" in str(e.value)
    with pytest.raises(ConfigError, match="sift.reference_losses is only read by sift.criterion: reducible"):
        load_config(None, ["sift.reference_losses=x.sidecar"])
    cfg = load_config(None, ["sift.criterion=reducible", "sift.reference=runs/ref", "data.train_half=1"])
    assert (cfg.sift.reference, cfg.data.train_half) == ("runs/ref", 1)
    load_config(None, ["method=none", "sift.criterion=reducible"])  # vanilla scores nothing: no reference needed


def test_collective_timeout_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match=r"train.collective_timeout_s: must be > 0, got 0.0"):
        load_config(None, ["train.collective_timeout_s=0"])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1,\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n"))
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(None, ["train=3"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_run_configs_parse(path, tmp_path):
    import yaml

    tree = yaml.safe_load(path.read_text())
    if "study" in tree:  # a `sift study` preset: a run config plus its `study:` section
        del tree["study"]
        path = tmp_path / path.name
        path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    assert to_dict(cfg)["train"]["steps"] == cfg.train.steps


FACTS = RunFacts(micro_batch_size=8, grad_accum=2, world_size=4, grad_clip=1.0, precision="bf16", num_params=10**6)


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_deepspeed_configs_fill(path):
    template = load_json(path)
    out = fill(template, FACTS, path.name)
    assert out["train_micro_batch_size_per_gpu"] == 8
    assert out["train_batch_size"] == 64 and out["gradient_accumulation_steps"] == 2
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False
    assert zero_stage(out) in (0, 1, 2, 3)
    assert "auto" not in str(out)


def test_deepspeed_conflicts_are_errors_not_overrides(tmp_path):
    template = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2,
                "train_batch_size": 999, "optimizer": {"type": "Adam"}, "bf16": {"enabled": False},
                "zero_optimization": {"stage": 2, "foo": "auto"}}
    with pytest.raises(DSConfigError) as e:
        fill(template, FACTS, "mine.json")
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu is 16 but the run needs 8" in msg
    assert "train_batch_size is 999 but the run needs 64" in msg
    assert "'optimizer' block" in msg and "bf16.enabled is False" in msg
    assert "zero_optimization.foo: \"auto\" is not supported" in msg
    assert len(e.value.problems) == 5
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,,}')
    with pytest.raises(DSConfigError, match="not valid JSON.*line 1"):
        load_json(bad)


def test_zero_stage_override_and_auto_buckets():
    out = fill(load_json(ROOT / "ds_configs" / "zero3.json"), FACTS)
    assert out["zero_optimization"]["stage3_prefetch_bucket_size"] == bucket_sizes(10**6, 4)["stage3_prefetch_bucket_size"]
    facts = RunFacts(micro_batch_size=8, grad_accum=2, world_size=4, grad_clip=1.0, precision="fp32",
                     num_params=10**6, zero_stage=1)
    assert zero_stage(fill(load_json(ROOT / "ds_configs" / "zero3.json"), facts)) == 1
