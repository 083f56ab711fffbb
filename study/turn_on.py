"""When to turn it on: per data regime and model kind, which selecting arm beats vanilla at equal counted
FLOPs beyond the 95% interval (the one with the largest mean gain, when several do), what it costs and what
it gained; or "none" where no arm does. Read from finished studies' results.json (study/output.py), so
docs quote the output of a command and no number is written by hand:

    python -m study.turn_on benchmarks/results/study-regimes-flops-cpu \\
        benchmarks/results/study-gpt2-continue-flops-cpu

Each directory is a report directory: its results.json (a study on one dataset), or one results.json per
regime in its subdirectories (a regimes study). The candidates are every arm but the reference (vanilla)
and the control (random B of G); the gain is on the validation metric (the report's first), with the
held-out metrics and the difference to the control beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from study.spec import StudyError

FAMILY_NAMES = {"bert": "BERT", "gpt2": "GPT-2", "llama": "Llama"}


def row_label(res: dict[str, Any]) -> str:
    """"BERT noisy", "GPT-2 continuation" (a study without regimes that branches a warm-up run), "BERT"."""
    family = ((res.get("base_config") or {}).get("model") or {}).get("family", "bert")
    name = FAMILY_NAMES.get(family, family)
    if res.get("regime"):
        return f"{name} {res['regime']}"
    return f"{name} continuation" if (res.get("study") or {}).get("branch") else name


def reference_share(res: dict[str, Any]) -> float | None:
    """The reference job's FLOPs (its models' training and the sidecar's forwards) over vanilla's budget."""
    ref, budget = res.get("reference_model"), (res.get("budget") or {}).get("budget_flops")
    if not ref or not budget:
        return None
    flops = sum(r["flops"] for r in ref.get("references", [])) + ((ref.get("sidecar") or {}).get("flops") or 0.0)
    return flops / budget


def arm_cost(res: dict[str, Any], arm: str) -> dict[str, Any]:
    """The arm's counted FLOPs over vanilla's budget (under 1 by the rounding down of its steps), its steps
    and vanilla's, and, for a reducible arm on the study's reference, that reference's share of the budget
    ("own" when the arm names its own reference, whose cost the study did not measure)."""
    budget = res["budget"]
    a, vanilla = budget["arms"][arm], budget["arms"].get(res["study"].get("reference") or "vanilla")
    spent = a.get("flops_spent", a["steps"] * a["total"])  # results.json before flops_spent: no selection warm-up
    overrides = (res["study"].get("arm_overrides") or {}).get(arm, [])
    reducible = "sift.criterion=reducible" in overrides
    own = any(o.startswith("sift.reference=") for o in overrides)
    return {"flops_vs_vanilla": spent / budget["budget_flops"] if budget.get("budget_flops") else None,
            "steps": a["steps"], "vanilla_steps": vanilla["steps"] if vanilla else None,
            "reference": ("own" if own else reference_share(res)) if reducible else None}


def _ci(row: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: row[k] for k in ("mean", "lo", "hi", "n", "verdict") if k in row}


def turn_on_row(res: dict[str, Any]) -> dict[str, Any]:
    """One row of the table from a regime's (or a study's) results.json; ``status`` says why there is no
    verdict when there is none (a study at equal samples, no complete comparison)."""
    study = res.get("study") or {}
    ref, control = study.get("reference") or "vanilla", study.get("control")
    metrics = res.get("metrics") or ["val_mlm_acc"]
    out: dict[str, Any] = {"label": row_label(res), "metric": metrics[0],
                           "incomplete": len(res.get("incomplete_runs") or []), "method": None}
    if (res.get("budget") or {}).get("kind") != "flops":
        return {**out, "status": "no equal-compute comparison (the study ran at equal samples)"}
    at_end = [c for c in res.get("comparisons", []) if c["axis"] == "flops" and c["ref"] == ref]

    def find(arm: str, metric: str, against: str | None = ref) -> dict[str, Any] | None:
        return next((c for c in res.get("comparisons", []) if c["axis"] == "flops" and c["ref"] == against
                     and c["arm"] == arm and c["metric"] == metric and c.get("n")), None)

    main = [c for c in at_end if c["metric"] == metrics[0] and c["arm"] != control and c.get("n") and "mean" in c]
    if not main:
        return {**out, "status": "no complete comparison at equal counted FLOPs yet"}
    better = sorted((c for c in main if c["verdict"] == "better"), key=lambda c: -c["mean"])
    if not better:
        closest = max(main, key=lambda c: c["mean"])
        return {**out, "closest": {"arm": closest["arm"], **_ci(closest)}}
    pick = better[0]["arm"]
    return {**out, "method": pick, "also": [c["arm"] for c in better[1:]], "cost": arm_cost(res, pick),
            "gain": _ci(better[0]), "heldout": {m: _ci(find(pick, m)) for m in metrics[1:]},
            "vs_control": _ci(find(pick, metrics[0], control)) if control else None, "control": control}


def read_results(report: Path) -> list[dict[str, Any]]:
    """The results.json of a report directory, or of each regime's subdirectory (sorted by name)."""
    if (report / "results.json").is_file():
        return [json.loads((report / "results.json").read_text())]
    found = [json.loads(p.read_text()) for p in sorted(report.glob("*/results.json"))]
    if not found:
        raise StudyError(f"{report}: no results.json there or in its subdirectories (a `sift study` report directory)")
    return found


def main(argv: list[str] | None = None) -> int:
    from study.markdown import markdown_turn_on

    p = argparse.ArgumentParser(prog="python -m study.turn_on", description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", type=Path, help="`sift study` report directories")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    results = [res for d in args.reports for res in read_results(d)]
    labels = {k: v for res in results for k, v in (res.get("labels") or {}).items()}
    print(markdown_turn_on([turn_on_row(res) for res in results], labels))
    return 0


if __name__ == "__main__":
    from sift_common.errors import run_command

    sys.exit(run_command("study.turn_on", main, sys.argv[1:]))
