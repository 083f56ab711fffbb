"""benchmarks/gpu/gpu_report.py on CPU: the environment report and the summary of a (fabricated) run directory."""

from __future__ import annotations

import json

from benchmarks.gpu import gpu_report
from tests.distributed.common import REPO


def test_environment_on_cpu_says_no_cuda_and_what_bert_layer_returns():
    env = gpu_report.environment()
    assert env["note"] == "no CUDA" and env["versions"]["torch"]
    assert env["bert_layer"]["returns"] == "Tensor" and env["bert_layer"]["first_tensor_shape"] == [2, 8, 64]


def test_summary_reads_every_stage_output(tmp_path):
    out = tmp_path
    (out / "rc.txt").write_text("env 0 20 3\ntrain-z2-killed killed 30 12\nbench-T512 124 70 70\n")
    (out / "bench").mkdir()
    result = json.loads((REPO / "benchmarks" / "results" / "throughput-cpu-tiny.json").read_text())
    for r in result["rows"]:  # pose as the T=512 grid, so the target table has something to judge
        r["name"] = r["name"].replace("T64", "T512")
    (out / "bench" / "throughput-gpu-base-T512.json").write_text(json.dumps(result))
    (out / "sync-audit.json").write_text(json.dumps({"device": "cuda", "variants": [
        {"name": "T512-vanilla", "steps": 3, "per_micro_step": {"flagged": 2.0, "explicit": 1.0},
         "flagged": [{"count": 6, "what": "called a synchronizing CUDA operation", "where": "engine/schedule.py:1"}],
         "explicit": [{"count": 3, "what": "torch.cuda.synchronize", "where": "x.py:1"}]}]}))
    (out / "pytest-gpu.xml").write_text('<testsuites><testsuite tests="8" failures="1" errors="0" skipped="0"/>'
                                        "</testsuites>")
    run = out / "train" / "z2"
    run.mkdir(parents=True)
    steps = [{"step": s, "loss": 7.0 - s / 10} for s in (5, 10, 15, 20, 25, 20, 25, 30)]  # killed at 25, resumed at 20
    run.joinpath("metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [*steps, {"event": "eval", "step": 30}]))

    text = gpu_report.summary(out)
    assert "| train-z2-killed | killed | 30 | 12 |" in text
    assert "GPU tests: 8 run, 1 failed, 0 errors, 0 skipped" in text
    assert "T512-vanilla: per micro-step 2 host reads flagged, 1 device-wide synchronize" in text
    assert "| T512-serial-j1-loss |" in text
    assert "training z2: steps 5..30 (8 records)" in text and "logged twice (redone after the kill): 20..25" in text
    targets = text.split("## Targets", 1)[1]
    lines = {line.split(" | ")[0]: line for line in targets.splitlines() if line.startswith("| ")}
    assert lines["| vanilla >= 1,300 bp seq/s"].endswith("| MISSED |")  # a 2-layer model on 2 CPU cores
    rows = {r["name"]: r for r in result["rows"]}
    for kind, bar in (("serial", 0.90), ("pipelined", 0.96)):
        ratio = rows[f"T512-{kind}-j1-loss"]["backprop_seq_per_s"] / rows["T512-vanilla"]["backprop_seq_per_s"]
        line = lines[f"| {kind} >= {bar:g} x vanilla"]
        assert line.endswith(f"| {ratio:.3f} | {'met' if ratio >= bar else 'MISSED'} |"), line
    assert lines["| pipelined peak <= 1.1 x serial"].endswith("| not measured |")  # no CUDA allocator on CPU
    assert lines["| T512-vanilla: no device-wide sync, <= 1 host read per log interval"].endswith("| MISSED |")


def test_summary_of_an_empty_directory(tmp_path):
    text = gpu_report.summary(tmp_path)
    assert "(no stages recorded)" in text and "GPU tests: no junit report" in text and "not measured" in text
