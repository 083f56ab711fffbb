"""`sift bench`'s VCAS rows (benchmarks/vcas_rows.py): every variant is a valid run config with a unique
name, and the FLOPs-vs-wall table reads a result."""

from __future__ import annotations

from benchmarks import vcas_rows
from benchmarks.throughput import PRESETS, grid
from engine.config import load_config


def test_vcas_variants_are_valid_configs_with_unique_names():
    p = PRESETS["cpu-tiny"]
    variants = grid(p, ("vanilla", "vcas", "sift+vcas"), (False,), num_layers=2)
    names = [v.name for v in variants]
    assert len(names) == len(set(names)) == 1 + 10 + 2
    assert "T64-vcas-rho0.5-nu0.25" in names and "T64-vcas-adaptive" in names
    assert "T64-sift+vcas-j1-loss-adaptive" in names
    for v in variants:
        cfg = load_config(None, v.overrides(p, []))
        if v.kind == "vcas":
            assert cfg.effective_method == "vcas" and cfg.vcas.adaptive == (v.vcas is None)
        if v.kind == "sift+vcas":
            assert cfg.selecting and cfg.sift.exit_layer == 1


def test_flops_vs_wall_table():
    def row(name, variant, median, vcas=None):
        r = {"name": name, "variant": variant, "seq_len": 64, "compile": False, "step_time_s": {"median": median},
             "overhead_ratio": 0.1 / median}
        return r | ({"vcas": vcas} if vcas else {})

    result = {"rows": [row("T64-vanilla", "vanilla", 0.1),
                       row("T64-vcas-rho0.5-nu0.5", "vcas", 0.08, {"flops_ratio": 0.6}),
                       row("T64-vcas-adaptive", "vcas", 0.1, {"flops_ratio": 0.98, "calibration_s": 0.5})]}
    text = vcas_rows.markdown(result)
    assert "| T64-vcas-rho0.5-nu0.5 | 80.0 | 1.250 | 0.600 | 40.0% | 20.0% | – |" in text
    assert "| T64-vcas-adaptive | 100.0 | 1.000 | 0.980 | 2.0% | 0.0% | 0.50 |" in text


def test_vcas_backward_runs_end_to_end(tmp_path):
    """The forward+backward benchmark as a user runs it (its own process: it pins torch to one thread)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "benchmarks.probes.vcas_backward", "--preset", "tiny", "--seq-lens", "32",
                           "--micro-batch", "4", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "vcas_backward-cpu.json").read_text())
    assert result["meta"]["git_commit"] is None or len(result["meta"]["git_commit"]) >= 7
    variants = {r["variant"] for r in result["rows"]}
    assert "plain autograd" in variants and any(v.startswith("vcas rho 0.5") for v in variants)
    assert all(0 < r["flops_ratio"] <= 1 for r in result["rows"] if r["variant"].startswith("vcas"))
