"""`sift bench` end to end on CPU: the cpu-tiny preset on a narrowed grid, as a subprocess (its own
process group and DeepSpeed state), checked field by field. No timing assertions: only sanity."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.common import REPO, single_env

# --exits 12 on the 2-layer model: clipped to exit 2.
EXPECTED = {"T64-vanilla", *(f"T64-{kind}-j2-{crit}" for kind in ("serial", "pipelined") for crit in ("loss", "entropy"))}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    argv = ["-m", "benchmarks.throughput", "--preset", "cpu-tiny", "--exits", "12", "--steps", "3",
            "--warmup", "1", "--out", str(out), "--name", "smoke"]
    env = single_env()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "smoke.json").read_text()), out


def test_every_variant_and_the_environment(bench):
    result, _ = bench
    assert {r["name"] for r in result["rows"]} == EXPECTED
    meta = result["meta"]
    for key in ("device", "torch", "deepspeed", "transformers", "python", "command", "date", "flop_formula"):
        assert meta[key], key
    assert "--preset cpu-tiny" in meta["command"]
    assert meta["settings"]["micro_batch"] == 8 and meta["peak_flops"] is None  # no MFU peak for a CPU


def test_rows_are_sane(bench):
    rows = bench[0]["rows"]
    vanilla = next(r for r in rows if r["variant"] == "vanilla")
    serial = {(r["exit_layer"], r["criterion"]): r for r in rows if r["variant"] == "serial"}
    for r in rows:
        st = r["step_time_s"]
        assert 0 < st["p10"] <= st["median"] <= st["p90"] and st["mean"] > 0
        assert r["steps"] == 3 and r["nonfinite_steps"] == 0 and math.isfinite(r["loss_mean"])
        assert r["backprop_seq_per_s"] == pytest.approx(r["B"] / st["median"])
        assert r["backprop_tokens_per_s"] == pytest.approx(r["backprop_seq_per_s"] * r["seq_len"])
        assert r["overhead_ratio"] == pytest.approx(r["backprop_seq_per_s"] / vanilla["backprop_seq_per_s"])
        assert set(r["phases_s"]) == {"data", "scoring", "forward", "backward", "optimizer"}
        assert all(r["phases_s"][k] > 0 for k in ("forward", "backward", "optimizer"))
        assert r["model_tflops"]["train"] > 0 and r["mfu"] == {"train": None, "with_scoring": None}
        assert r["peak_mem_bytes"] is None and r["peak_reserved_bytes"] is None  # CPU: no CUDA allocator
        if r["variant"] == "vanilla":
            assert r["G"] == r["B"] and r["scored_seq_per_s"] == 0 and r["phases_s"]["scoring"] == 0
            assert r["model_tflops"]["with_scoring"] == r["model_tflops"]["train"]
            assert r["overhead_ratio"] == 1 and r["overlap_efficiency"] is None
            continue
        assert r["G"] == 2 * r["B"]
        assert r["scored_seq_per_s"] == pytest.approx(2 * r["backprop_seq_per_s"])
        assert r["phases_s"]["scoring"] > 0
        assert r["model_tflops"]["with_scoring"] > r["model_tflops"]["train"]
        if r["variant"] == "serial":
            assert r["overlap_efficiency"] is None
        else:
            s = serial[(r["exit_layer"], r["criterion"])]
            saved = s["step_time_s"]["median"] - st["median"]
            assert r["overlap_efficiency"] == pytest.approx(saved / s["phases_s"]["scoring"])


def test_markdown_and_chart(bench):
    result, out = bench
    md = (out / "smoke.md").read_text()
    assert md.startswith("# Throughput: cpu-tiny") and "not GPU predictions" in md
    assert sum(line.startswith("| 64 |") for line in md.splitlines()) == len(result["rows"])
    png = (out / "smoke.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_a_decoder_grid_runs(tmp_path):
    """`sift bench --model llama-tiny`: causal-LM batches, exits given as L/4 and L/2 of the 4 blocks."""
    argv = ["-m", "benchmarks.throughput", "--model", "llama-tiny", "--seq-lens", "64", "--exits", "L/4,L/2",
            "--criteria", "entropy", "--variants", "vanilla,serial", "--steps", "2", "--warmup", "1", "--out",
            str(tmp_path), "--name", "decoder", "--no-chart", "sift.score_positions=16"]
    env = single_env()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "decoder.json").read_text())
    assert {r["name"] for r in result["rows"]} == {"T64-vanilla", "T64-serial-j1-entropy", "T64-serial-j2-entropy"}
    assert result["meta"]["settings"]["family"] == "llama" and "LM head 2hV" in result["meta"]["flop_formula"]
    j1 = next(r for r in result["rows"] if r["exit_layer"] == 1)
    flops = j1["flops_per_seq"]
    assert 0 < flops["scoring"] < flops["train"] / 3 and math.isfinite(j1["loss_mean"])
