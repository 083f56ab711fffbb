"""benchmarks/probes/sync_audit.py: its bookkeeping (with the CUDA hooks faked), and a CPU run-through."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import torch

from benchmarks.probes import sync_audit
from tests.distributed.common import REPO, single_env


def a_schedule_step() -> None:
    warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)  # as sync debug mode warns
    warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
    torch.cuda.synchronize()


def test_recording_counts_flagged_operations_and_synchronize_calls_with_their_callers(monkeypatch):
    modes, calls = [], []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a))
    fake_sync = torch.cuda.synchronize
    with sync_audit.recording_syncs() as (flagged, explicit):
        a_schedule_step()
        a_schedule_step()
    assert modes == ["warn", 0] and len(calls) == 2 and torch.cuda.synchronize is fake_sync
    # one entry per call site (the two calls above differ in their caller's line), each naming its frames
    assert sum(flagged.values()) == 2 and len(flagged) == 2
    for what, at in flagged:
        assert what == "called a synchronizing CUDA operation"
        assert at.startswith("tests/unit/test_sync_audit.py:") and "a_schedule_step" in at
    assert sum(explicit.values()) == 2
    assert all(what == "torch.cuda.synchronize" and "a_schedule_step" in at for what, at in explicit)


def test_cpu_run_through_reports_no_cuda(tmp_path):
    out = tmp_path / "audit.json"
    env = single_env()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.probes.sync_audit", "--preset", "cpu-tiny", "--warmup", "1",
                           "--steps", "1", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    assert [v["name"] for v in report["variants"]] == ["T64-vanilla", "T64-pipelined-j1-loss"]
    assert all("no CUDA" in v["note"] for v in report["variants"]) and "no CUDA" in proc.stdout
