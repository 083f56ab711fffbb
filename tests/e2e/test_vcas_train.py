"""`sift train` with VCAS on CPU: at ratio 1 it is vanilla training; adaptive SIFT + VCAS logs its
controller and resumes exactly, and trains with a weighted selection policy under ZeRO-3 as under ZeRO-1."""

from __future__ import annotations

import json

import pytest

from tests.runs import concurrently, evals, losses, train

SHORT = ("train.steps=6", "train.eval_every=6", "train.save_every=0")
ADAPTIVE = ("method=sift+vcas", "vcas.calib_every=2", "vcas.tau_act=1e9", "vcas.tau_w=1e9", "vcas.alpha=0.2",
            "vcas.beta=0.5", "train.steps=10", "train.eval_every=10", "train.save_every=5")


def test_vcas_at_ratio_one_trains_like_vanilla(tiny_data, tmp_path):
    """Fixed rho = nu = 1 without the last-block saving: every loss bitwise the vanilla run's."""
    concurrently(lambda: train(tmp_path / "vanilla", tiny_data, "method=none", *SHORT),
                 lambda: train(tmp_path / "vcas", tiny_data, "method=vcas", "vcas.adaptive=false",
                               "vcas.live_positions=false", *SHORT))
    assert losses(tmp_path / "vcas") == losses(tmp_path / "vanilla")
    assert evals(tmp_path / "vcas")[-1]["val_mlm_loss"] == evals(tmp_path / "vanilla")[-1]["val_mlm_loss"]


@pytest.fixture(scope="module")
def adaptive_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sift-vcas")
    train(out, tiny_data, *ADAPTIVE)
    return out


def test_adaptive_sift_vcas_logs_its_controller(adaptive_run):
    records = [json.loads(x) for x in (adaptive_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert len(steps) == 10 and all(r["vcas_rho"] <= 1 and 0 < r["vcas_flops"] <= 1 for r in steps)
    calibrated = [r for r in steps if "vcas_var_sgd" in r]
    assert [r["step"] for r in calibrated] == [2, 4, 6, 8, 10]
    assert all(r["vcas_var_sgd"] > 0 for r in calibrated)
    assert steps[-1]["vcas_rho"] < 1 and steps[-1]["vcas_nu"] < 1  # a huge tau lets the ratios fall
    assert steps[-1]["vcas_flops"] < steps[0]["vcas_flops"]
    assert "kept_score" in steps[-1]  # SIFT selects as usual


def test_adaptive_sift_vcas_resumes_exactly(adaptive_run, tiny_data, tmp_path):
    killed = train(tmp_path, tiny_data, *ADAPTIVE, env={"SIFT_FAULT": "after_save:5"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    train(tmp_path, tiny_data, *ADAPTIVE)
    assert losses(tmp_path) == losses(adaptive_run)
    assert evals(tmp_path)[-1]["val_mlm_loss"] == evals(adaptive_run)[-1]["val_mlm_loss"]


def test_weighted_sift_vcas_under_zero3_trains_like_zero1(tiny_data, tmp_path):
    """sift+vcas with the stratified policy (weights in the sampled backward and in VCAS's calibration
    passes): ZeRO-3, whose scorer reads a gathered replica, trains like ZeRO-1 and logs the policy's stats."""
    args = ("method=sift+vcas", "sift.policy=stratified", "sift.threshold_quantile=0.75", "vcas.calib_every=2",
            "vcas.tau_act=1e9", "vcas.tau_w=1e9", "model.dropout=0", "sift.fidelity_every=0", *SHORT)
    concurrently(lambda: train(tmp_path / "z1", tiny_data, *args),
                 lambda: train(tmp_path / "z3", tiny_data, *args, "deepspeed.zero_stage=3"))
    assert losses(tmp_path / "z3") == pytest.approx(losses(tmp_path / "z1"), rel=1e-3)
    steps = [r for r in map(json.loads, (tmp_path / "z3" / "metrics.jsonl").read_text().splitlines())
             if "event" not in r]
    selecting = [r for r in steps if "stratified_overflow" in r]
    # 2 warm-up steps, then 4 selecting ones: 2 of 8 rows above the 0.75 quantile, 2 of the other 6 drawn
    # (weight 3), never an overflow
    assert len(selecting) == 4 and all(r["stratified_overflow"] == 0 for r in selecting)
    assert all(r["stratified_above"] == 0.25 for r in selecting)
    assert all(r["effective_rows"] == pytest.approx(0.8) for r in selecting)  # (2 + 2 x 3)^2 / (4 (2 + 2 x 9))
    assert any("vcas_var_sgd" in r for r in steps)
