"""`sift bench` writes its JSON and markdown tables even when the chart cannot be drawn; the side by side
with the Hugging Face Trainer takes its ratios within each round."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import hf_side_by_side as sbs
from benchmarks.throughput import finish
from sift_common.provenance import provenance

RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "throughput-cpu-tiny.json"


def test_tables_survive_a_failing_chart(tmp_path, monkeypatch, capsys):
    result = json.loads(RESULT.read_text())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert finish(result, tmp_path, "run", chart=True) == 0
    assert json.loads((tmp_path / "run.json").read_text())["rows"] == result["rows"]
    md = (tmp_path / "run.md").read_text()
    assert sum(line.startswith("| 64 |") for line in md.splitlines()) == len(result["rows"])
    assert not (tmp_path / "run.png").exists()
    out = capsys.readouterr().out
    assert md in out and "no chart: ModuleNotFoundError" in out


def test_chart_when_the_plotting_stack_works(tmp_path, capsys):
    assert finish(json.loads(RESULT.read_text()), tmp_path, "run", chart=True) == 0
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")
    assert "no chart" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- benchmarks/hf_side_by_side.py

def test_side_by_side_ratios_are_taken_within_each_round():
    # each round's step time per arm (s); the plain Trainer drifts 1 -> 2 -> 4 s over the rounds
    steps = [{"hf-vanilla": 1.0, "hf-sift": 1.5, "sift-vanilla": 0.9, "sift-sift": 2.0},
             {"hf-vanilla": 2.0, "hf-sift": 3.0, "sift-vanilla": 2.4, "sift-sift": 2.0},
             {"hf-vanilla": 4.0, "hf-sift": 6.0, "sift-vanilla": 2.0, "sift-sift": 6.0}]
    # one warm-up interval of 100 s, then three around the round's step time (median: the step time)
    rounds = [{arm: [100.0, 0.9 * s[arm], s[arm], 1.1 * s[arm]] for arm in sbs.rotated(list(sbs.ARMS), r)}
              for r, s in enumerate(steps)]
    assert [list(r) for r in rounds][1] == ["hf-sift", "sift-vanilla", "sift-sift", "hf-vanilla"]
    arms = sbs.summarise(rounds, warmup=1)
    assert list(arms) == list(sbs.ARMS)
    sv, ss = arms["sift-vanilla"], arms["sift-sift"]
    # within rounds: 0.9, 1.2, 0.5 (pooled medians would give 2.0 / 2.0 = 1.0)
    assert sv["step_time_ratio"]["median"] == pytest.approx(0.9)
    assert (sv["step_time_ratio"]["min"], sv["step_time_ratio"]["max"]) == pytest.approx((0.5, 1.2))
    assert sv["step_s"]["median"] == pytest.approx(2.0) and sv["step_s"]["rounds"] == pytest.approx([0.9, 2.4, 2.0])
    assert ss["backprop_rows_per_s_ratio"]["rounds"] == pytest.approx([0.5, 1.0, 1 / 1.5])
    assert ss["backprop_rows_per_s_ratio"]["median"] == pytest.approx(1 / 1.5)
    assert ss["backprop_rows_per_s"]["median"] == pytest.approx(sbs.B * sbs.GA / 2.0)
    assert arms["hf-sift"]["step_time_ratio"]["rounds"] == pytest.approx([1.5] * 3)
    assert arms["hf-vanilla"]["steps_timed"] == 3

    result = {"arms": arms, "rounds": rounds, "load_before": [1.0, 1.0, 1.0], "accelerate": "1.0",
              "settings": {"model": "small", "steps": 5, "warmup": 1, "repeats": 3}, "provenance": provenance("cmd")}
    rows = {line.split(" | ")[0][2:]: line for line in sbs.markdown(result).splitlines() if line.startswith("| ")}
    assert "| 2.0000 | 0.90 [0.50-1.20] | 8.0 | 1.11 [0.83-2.00] |" in rows["sift-vanilla"]
    assert set(rows) == {"arm", *sbs.ARMS}


def test_side_by_side_rotation_puts_every_arm_in_every_place():
    orders = [sbs.rotated(list("abcd"), r) for r in range(4)]
    assert all(sorted(o[i] for o in orders) == list("abcd") for i in range(4))
    assert sbs.rotated(list("abcd"), 5) == list("bcda")


def test_side_by_side_refuses_too_few_steps_before_running(tmp_path):
    with pytest.raises(SystemExit):
        sbs.main(["--steps", "5", "--warmup", "4", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
