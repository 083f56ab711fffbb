"""The README's main command, `sift demo`, end to end at a few steps: corpus, prepare, train, export."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.distributed.common import REPO, single_env


def sift(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = single_env()
    result = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"sift {args[0]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_demo_runs_and_its_printed_export_command_works(tmp_path):
    out = tmp_path / "demo"
    steps = ["train.steps=12", "train.log_every=4", "train.eval_every=12", "train.save_every=12",
             "train.eval_samples=64", "sift.warmup_steps=4", "sift.fidelity_every=4"]
    first = sift("demo", "--out", str(out), *steps)
    assert (out / "data" / "index.json").is_file()
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert summary["steps"] == 12 and 0 <= summary["final_eval"]["val_mlm_acc"] <= 1
    # the one-screen summary: what was trained, accuracy against the baseline, selection, the plot
    text = first.stdout[first.stdout.index("sift demo: summary"):]
    assert len(text.splitlines()) <= 20 and "sift export" in text
    assert f"{summary['final_eval']['val_mlm_acc']:.3f} (step 12)" in text and "most frequent masked token" in text
    assert "kept rows scored" in text and "Spearman" in text  # selection from step 4, fidelity every 4
    assert (out / "train" / "demo.png").read_bytes()[:4] == b"\x89PNG" and str(out / "train" / "demo.png") in text

    again = sift("demo", "--out", str(out), *steps)  # prepared data are reused; the finished run is kept
    assert "using the prepared data" in again.stdout

    sift("export", str(out / "train"), "--out", str(out / "hf"))
    assert (out / "hf" / "config.json").is_file()
