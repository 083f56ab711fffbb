"""Committed studies' tables come back from what is committed: `sift study --report-only`, with no runs
at hand, rewrites report.md (and verdict.md across regimes) from each study's compact results.json, with
the --name/--seeds/--arms it was made with (its presets have moved on since). The studies whose
results.json predates that form say how to regenerate them in a README.md beside it."""

from __future__ import annotations

import shutil

import pytest

from study.cli import main
from study.spec import StudyError
from tests.distributed.common import REPO

RESULTS = REPO / "benchmarks" / "results"
REGIMES = ("clean", "redundant", "noisy")

# folder: (the arguments that rebuild it, the files it rebuilds); the commands docs/study.md gives
COMMITTED = {
    "study-gpt2-cpu": (["--preset", "gpt2-cpu", "--seeds", "5"], ["report.md"]),
    "study-gpt2-continue-cpu": (["--preset", "gpt2-continue-cpu", "--name", "study-gpt2-continue-cpu", "--seeds", "3",
                                 "--arms", "vanilla,random,loss:1,entropy:1,loss:L/2,entropy:L/2"], ["report.md"]),
    "study-gpt2-continue-flops-cpu": (["--preset", "gpt2-continue-cpu"], ["report.md"]),
    "study-regimes-cpu": (["--preset", "regimes-cpu", "--name", "study-regimes-cpu", "--arms",
                           "vanilla,random,loss:1,entropy:1,loss:L/2,entropy:L/2,vcas,sift+vcas"],
                          [*(f"{r}/report.md" for r in REGIMES), "verdict.md"]),
    "study-regimes-flops-cpu": (["--preset", "regimes-cpu", "--regimes", "clean,noisy"],
                                ["clean/report.md", "noisy/report.md", "verdict.md"]),
}
HISTORICAL = ("study-cpu", "study-cpu-demo-corpus")  # results.json without paired comparisons


def rebuild(tmp_path, folder: str, args: list[str], tables: list[str]) -> tuple[int, dict[str, str]]:
    report = tmp_path / "report"
    shutil.copytree(RESULTS / folder, report, ignore=shutil.ignore_patterns("report.md", "verdict.md"))
    code = main([*args, "--report-only", "--out", str(tmp_path / "out"), "--report", str(report)])
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained: the tables came from results.json
    return code, {t: (report / t).read_text() for t in tables}


@pytest.mark.parametrize("folder", sorted(COMMITTED))
def test_report_only_rebuilds_a_committed_study_from_its_results_json(tmp_path, folder):
    args, tables = COMMITTED[folder]
    code, rebuilt = rebuild(tmp_path, folder, args, tables)
    assert code == 0
    for table in tables:
        assert rebuilt[table].splitlines() == (RESULTS / folder / table).read_text().splitlines(), table
    assert "## Verdict" in rebuilt[tables[0]] and "| loss-SIFT, exit 1 |" in rebuilt[tables[0]]


def test_every_committed_study_is_rebuilt_here_or_says_how_to_regenerate_it():
    studies = {p.name for p in RESULTS.glob("study-*") if p.is_dir()}
    assert studies == set(COMMITTED) | set(HISTORICAL)
    for folder in HISTORICAL:
        readme = (RESULTS / folder / "README.md").read_text()
        assert "cannot be rebuilt from this folder" in readme and "sift study --preset cpu" in readme


@pytest.mark.parametrize("folder", HISTORICAL)
def test_an_older_results_json_is_refused_by_name(tmp_path, folder):
    with pytest.raises(StudyError, match="predates the compact form"):
        rebuild(tmp_path, folder, ["--preset", "cpu"], [])
    assert not (tmp_path / "report" / "report.md").exists()


def test_a_study_made_with_other_arms_is_not_overwritten_under_a_moved_preset(tmp_path):
    """The regimes preset now names issue 25's grid: rendering the committed 8-arm study under it would
    relabel its tables, so it stops and says which flags match."""
    with pytest.raises(StudyError, match=r"was made with name study-regimes-cpu .*arms \['vanilla'"):
        rebuild(tmp_path, "study-regimes-cpu", ["--preset", "regimes-cpu"], [])
    assert not any((tmp_path / "report").rglob("*.md"))
