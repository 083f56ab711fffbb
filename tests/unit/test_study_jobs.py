"""The study's job runner pieces: the CPU-time trace and the job states (runs themselves: tests/e2e)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from study.jobs import (
    CPU_FILE,
    PROBE_FILE,
    CpuTrace,
    RunPlan,
    probe_missing,
    process_cpu_seconds,
    read_cpu_trace,
    run_state,
)
from study.spec import VANILLA

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")


def append(path: Path, *records: dict, tail: str = "") -> None:
    with path.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_cpu_trace_follows_new_records_and_continues_after_a_resume(tmp_path):
    own = process_cpu_seconds(os.getpid())
    assert own is not None and own > 0
    metrics = tmp_path / "metrics.jsonl"
    append(metrics, {"step": 5, "loss": 1.0})  # written before this invocation: not traced again
    trace = CpuTrace(tmp_path, os.getpid(), resume_step=0)
    append(metrics, {"step": 10, "loss": 1.0}, {"event": "eval", "step": 10, "val_mlm_acc": 0.1},
           tail='{"step": 15, "lo')  # a half-written line waits for the next poll
    trace.poll()
    got = read_cpu_trace(tmp_path)
    assert set(got) == {("train", 10), ("eval", 10)} and got[("eval", 10)]["cpu_s"] >= own
    with metrics.open("a") as f:
        f.write('ss": 0.5}\n')
    trace.poll()
    assert ("train", 15) in read_cpu_trace(tmp_path)

    # resumed from the step-10 checkpoint by a new process: its CPU counts on from the value at step 10
    at_10 = read_cpu_trace(tmp_path)[("eval", 10)]["cpu_s"]
    resumed = CpuTrace(tmp_path, os.getpid(), resume_step=10)
    assert resumed.base == at_10
    append(metrics, {"step": 15, "loss": 0.4})
    resumed.poll()
    assert read_cpu_trace(tmp_path)[("train", 15)]["cpu_s"] >= at_10 + own
    assert len((tmp_path / CPU_FILE).read_text().splitlines()) == 4  # the re-logged step 15 supersedes the first


def test_run_state_waits_for_the_probe(tmp_path):
    plan = RunPlan(VANILLA, 0, tmp_path, {"train": {"steps": 20}}, probe=["--run", str(tmp_path)])
    assert run_state(plan) == ("new", 0)
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 20}))
    assert run_state(plan) == ("probe", 20)
    (tmp_path / PROBE_FILE).write_text("{}")
    assert run_state(plan) == ("done", 20)
    # a probe.json made before a selection was added to the plan (a later version's study): probe again
    plan.probe = ["--run", str(tmp_path), "--select", "loss:1", "--select", "stratified-loss:1@q=0.75"]
    (tmp_path / PROBE_FILE).write_text(json.dumps({"step": 20, "kept": {"loss:1": {}}}))
    assert run_state(plan) == ("probe", 20) and probe_missing(plan) == ["stratified-loss:1@q=0.75"]
    plan.probe = []
    (tmp_path / PROBE_FILE).unlink()
    assert run_state(plan) == ("done", 20)
