"""`sift study` end to end on generated data: a 2-arm x 2-seed grid of the tiny run, its report, and
resuming a study whose runs were partly lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.common import REPO, single_env
from tests.runs import TINY_RUN, evals

ARGS = ["--config", str(TINY_RUN), "--seeds", "0,1", "--arms", "vanilla,loss:1", "--targets", "0.02,0.9",
        "--keep-checkpoints"]


def study(out: Path, data: Path, *extra: str, timeout: float = 300,
          env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher.cli", "study", *ARGS, "--data", str(data), "--out", str(out), *extra]
    env = single_env(env_extra)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def events(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "study-log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def done(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study")
    result = study(out, tiny_data, "--parallel", "2")
    assert result.returncode == 0, result.stderr[-5000:]
    return out


def test_study_writes_table_json_curves_and_plots(done):
    report = done / "report"
    results = json.loads((report / "results.json").read_text())
    final = {r["arm"]: r for r in results["final"]}
    assert set(final) == {"vanilla", "loss-1"}
    assert all(r["seeds"] == 2 and set(r["per_seed"]) == {"0", "1"} for r in final.values())
    # equal back-propagated samples per arm: 20 steps x B = 4, although loss-1 draws G = 8 per step
    assert final["vanilla"]["backprop_samples"] == final["loss-1"]["backprop_samples"] == 80
    delta = final["loss-1"]["delta_vs_ref"]
    per_seed = final["loss-1"]["per_seed"]
    want = [per_seed[s] - final["vanilla"]["per_seed"][s] for s in ("0", "1")]
    assert delta["mean"] == pytest.approx(sum(want) / 2)
    # time to target: 0.02 is reached by every seed, 0.9 by none
    tt = {(r["target"], r["arm"]): r for r in results["time_to_target"]}
    assert tt[(0.02, "vanilla")]["backprop_samples"]["reached"] == 2
    assert 0 < tt[(0.02, "vanilla")]["backprop_samples"]["mean"] <= 80
    assert tt[(0.9, "loss-1")]["backprop_samples"]["reached"] == 0
    fid = results["fidelity"]
    assert [r["arm"] for r in fid] == ["loss-1"] and fid[0]["records"] > 0 and -1 <= fid[0]["spearman"] <= 1
    assert results["incomplete_runs"] == []
    md = (report / "report.md").read_text()
    assert "| loss-SIFT, exit 1 | 2 |" in md and "not reached (0/2 seeds)" in md
    for name in ("accuracy_vs_samples.png", "accuracy_vs_hours.png", "fidelity.png"):
        data = (report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, name
    for arm in ("vanilla", "loss-1"):
        for seed in (0, 1):
            curve = (report / "curves" / arm / f"seed{seed}.jsonl").read_text().splitlines()
            assert [json.loads(x)["step"] for x in curve if '"eval"' in x] == [10, 20]
    assert str(done) not in (report / "results.json").read_text()  # no machine paths in what gets committed
    ev = events(done)
    assert sorted(e["run"] for e in ev if e["action"] == "start") == sorted(
        f"{a}/seed{s}" for a in ("vanilla", "loss-1") for s in (0, 1))
    assert sum(e["action"] == "done" for e in ev) == 4


def test_interrupted_study_redoes_only_the_missing_work(done, tiny_data, tmp_path):
    out = tmp_path / "moved"  # a study directory can move: runs are matched by config and data hash
    shutil.copytree(done, out)
    finals = {k: evals(out / "runs" / k)[-1] for k in ("vanilla/seed1", "loss-1/seed0", "loss-1/seed1")}
    untouched = out / "runs" / "loss-1" / "seed1" / "summary.json"
    stamp = untouched.stat().st_mtime_ns
    shutil.rmtree(out / "runs" / "vanilla" / "seed1")  # lost entirely
    partial = out / "runs" / "loss-1" / "seed0"  # killed after the step-10 checkpoint
    (partial / "summary.json").unlink()
    shutil.rmtree(partial / "checkpoints" / "step00000020")
    before = len(events(out))

    result = study(out, tiny_data)
    assert result.returncode == 0, result.stderr[-5000:]
    new = {(e["run"], e["action"]): e for e in events(out)[before:]}
    assert set(new) == {("vanilla/seed0", "skip"), ("loss-1/seed1", "skip"), ("vanilla/seed1", "start"),
                        ("vanilla/seed1", "done"), ("loss-1/seed0", "resume"), ("loss-1/seed0", "done")}
    assert new[("loss-1/seed0", "resume")]["step"] == 10
    assert "resumed from" in (partial / "train.log").read_text()
    assert untouched.stat().st_mtime_ns == stamp
    # the redone work lands where it would have: a bitwise resume and a deterministic rerun
    assert evals(partial)[-1]["val_mlm_acc"] == finals["loss-1/seed0"]["val_mlm_acc"]
    assert evals(out / "runs" / "vanilla" / "seed1")[-1]["val_mlm_loss"] == finals["vanilla/seed1"]["val_mlm_loss"]
    results = json.loads((out / "report" / "results.json").read_text())
    assert results["incomplete_runs"] == [] and len(results["invocations"]) == 2


def test_a_changed_config_is_refused_not_mixed(done, tiny_data, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    result = study(out, tiny_data, "optim.lr=0.002")
    assert result.returncode == 2 and "made with another config" in result.stderr


def test_a_run_killed_mid_way_fails_the_study_and_resumes_on_rerun(done, tiny_data, tmp_path):
    one = ("--arms", "loss:1", "--seeds", "0,", "train.plugins=[tests.faults]")  # the fault injector, idle unless SIFT_FAULT
    killed = study(tmp_path, tiny_data, *one, env_extra={"SIFT_FAULT": "after_save:10"})
    assert killed.returncode == 1 and "1 run(s) failed: loss-1/seed0" in killed.stderr
    assert [e["action"] for e in events(tmp_path)] == ["start", "failed"]
    assert not (tmp_path / "report" / "results.json").read_text().count('"incomplete_runs": []')
    again = study(tmp_path, tiny_data, *one)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [(e["action"], e.get("step")) for e in events(tmp_path)][2:] == [("resume", 10), ("done", None)]
    want = evals(done / "runs" / "loss-1" / "seed0")[-1]["val_mlm_loss"]
    assert evals(tmp_path / "runs" / "loss-1" / "seed0")[-1]["val_mlm_loss"] == want
