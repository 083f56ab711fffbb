"""`sift bench` writes its JSON and markdown tables even when the chart cannot be drawn."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.throughput import finish

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
