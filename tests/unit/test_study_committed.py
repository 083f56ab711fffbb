"""A committed study's tables come back from what is committed: `sift study --report-only`, with no runs
at hand, rewrites report.md from the study's compact results.json."""

from __future__ import annotations

import shutil

from study.cli import main
from tests.distributed.common import REPO

STUDY = REPO / "benchmarks" / "results" / "study-gpt2-cpu"


def test_report_only_rebuilds_a_committed_study_from_its_results_json(tmp_path):
    report = tmp_path / "report"
    shutil.copytree(STUDY, report, ignore=shutil.ignore_patterns("report.md"))  # results.json and figures
    committed = (STUDY / "report.md").read_text()
    code = main(["--preset", "gpt2-cpu", "--seeds", "5", "--report-only", "--out", str(tmp_path / "out"),
                 "--report", str(report)])
    assert code == 0
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained: the tables came from results.json
    rebuilt = (report / "report.md").read_text()
    assert rebuilt.splitlines() == committed.splitlines()
    assert "## Verdict" in rebuilt and "| loss-SIFT, exit 1 |" in rebuilt
