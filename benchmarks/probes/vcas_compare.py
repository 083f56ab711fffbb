"""Does VCAS track vanilla's loss per step? A small CPU comparison with `sift train` (docs/vcas.md).

    sift prepare ../shared/corpus/english-reference.parquet --text-field text --seq-len 128 \\
        --vocab-size 8192 --val-fraction 0.02 --seed 0 --out runs/study-data/english-128
    python -m benchmarks.probes.vcas_compare --data runs/study-data/english-128 --out benchmarks/results/vcas-cpu \
        --runs runs/vcas-compare

Every arm trains the CPU study preset (configs/study-cpu.yaml: a 2-layer BERT at seq 128, B = 16) with the
same seed, two single-threaded runs at a time; a second vanilla seed gives the seed-to-seed spread the
differences are read against. Writes results.json (commands, commit, versions, machine load, CPU and
wall time, curves) and report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sift_common.provenance import git_commit, version
from study.jobs import child_env

ARMS: dict[str, list[str]] = {
    "vanilla": ["method=none"],
    "vanilla-seed1": ["method=none", "train.seed=1"],
    "vcas": ["method=vcas"],
    "vcas-F10": ["method=vcas", "vcas.calib_every=10"],
    "vcas-fixed-0.5": ["method=vcas", "vcas.adaptive=false", "vcas.rho=0.5", "vcas.nu=0.5"],
    "sift": ["method=sift", "sift.exit_layer=1"],
    "sift+vcas-F10": ["method=sift+vcas", "sift.exit_layer=1", "vcas.calib_every=10"],
}


def run_config(runs: Path) -> Path:
    """configs/study-cpu.yaml without its ``study`` section (what `sift train` reads), next to the runs."""
    import yaml

    from engine.resources import resolve

    tree = yaml.safe_load(resolve("study-cpu", "configs").read_text())
    tree.pop("study")
    path = runs / "study-cpu-run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def command(arm: str, data: Path, runs: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "launcher.train", "--config", str(runs / "study-cpu-run.yaml"), f"data.path={data}",
            f"train.out_dir={runs / arm}", f"train.steps={steps}", "train.log_every=10", "train.save_every=0",
            "train.resume=false", *ARMS[arm]]


def run_all(arms: list[str], data: Path, runs: Path, steps: int, parallel: int) -> dict[str, dict[str, Any]]:
    """Run the arms, ``parallel`` at a time; per arm: command, exit code, wall and CPU seconds."""
    env = child_env({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    pending, running, done = list(arms), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            arm = pending.pop(0)
            cmd = command(arm, data, runs, steps)
            with open(runs / f"{arm}.log", "w") as log:  # the child keeps its own descriptor
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[proc.pid] = (arm, cmd, time.time(), proc)  # referenced: subprocess must not reap it
        pid, status, usage = os.wait4(-1, 0)  # per-child CPU time, which Popen.wait does not give
        if pid not in running:
            continue
        arm, cmd, t0, _ = running.pop(pid)
        done[arm] = {"command": " ".join(cmd[1:]), "exit": os.waitstatus_to_exitcode(status),
                     "wall_s": time.time() - t0, "cpu_s": usage.ru_utime + usage.ru_stime}
    return done


def load() -> list[str] | None:
    """The 1, 5 and 15 minute load averages (Linux), for reading the timings."""
    path = Path("/proc/loadavg")
    return path.read_text().split()[:3] if path.is_file() else None


def read(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "event" not in r], [r for r in records if r.get("event") == "eval"]


def summarize(runs: Path, arms: list[str]) -> dict[str, dict[str, Any]]:
    curves = {arm: read(runs / arm) for arm in arms}
    base = {r["step"]: r["loss"] for r in curves["vanilla"][0]}
    summary = {}
    for arm, (steps, evals) in curves.items():
        gaps = [r["loss"] - base[r["step"]] for r in steps if r["step"] in base]
        last = steps[-1]
        summary[arm] = {
            "loss_last100": sum(r["loss"] for r in steps[-10:]) / len(steps[-10:]),
            "mean_abs_gap_to_vanilla": sum(map(abs, gaps)) / len(gaps),
            "mean_gap_to_vanilla": sum(gaps) / len(gaps),
            "final_val_mlm_loss": evals[-1]["val_mlm_loss"], "final_val_mlm_acc": evals[-1]["val_mlm_acc"],
            "flops_ratio_mean": (sum(r["vcas_flops"] for r in steps) / len(steps)) if "vcas_flops" in last else None,
            "final_rho": last.get("vcas_rho"), "final_nu": last.get("vcas_nu"), "final_s": last.get("vcas_s"),
            "curve": [[r["step"], r["loss"]] for r in steps],
            "val": [[e["step"], e["val_mlm_loss"], e["val_mlm_acc"]] for e in evals],
        }
    return summary


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = ["# VCAS vs vanilla on the CPU study preset", "",
             f"- command: `{m['command']}`; git commit {m['git_commit']}; {m['date']}",
             f"- versions: python {m['python']}, torch {m['torch']}, deepspeed {m['deepspeed']}, "
             f"transformers {m['transformers']}",
             f"- machine: {m['cpus']} cores shared with other work; load average {m['load_before']} before, "
             f"{m['load_after']} after; {m['parallel']} single-threaded runs at a time",
             f"- {m['steps']} steps of configs/study-cpu.yaml, seed 0 unless named; train loss logged every 10 steps",
             "", "Gap: the arm's logged training loss minus vanilla's (seed 0) at the same step, averaged over the "
             "logged steps. vanilla-seed1's gap is the seed-to-seed spread. FLOP ratio: VCAS's expected training "
             "FLOPs relative to exact training, averaged over the steps, calibration not included. "
             "CPU seconds count the whole process (start-up, evaluation).", "",
             "| arm | mean abs gap | mean gap | loss, last 100 steps | val MLM loss | val MLM acc | FLOP ratio | "
             "final rho / nu / s | wall s | CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, s in result["arms"].items():
        r = result["runs"][arm]
        ratios = "–" if s["final_rho"] is None else f"{s['final_rho']:.3f} / {s['final_nu']:.3f} / {s['final_s']:.2f}"
        flops = "–" if s["flops_ratio_mean"] is None else f"{s['flops_ratio_mean']:.3f}"
        lines.append(f"| {arm} | {s['mean_abs_gap_to_vanilla']:.4f} | {s['mean_gap_to_vanilla']:+.4f} | "
                     f"{s['loss_last100']:.4f} | {s['final_val_mlm_loss']:.4f} | {s['final_val_mlm_acc']:.4f} | "
                     f"{flops} | {ratios} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probes.vcas_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset (see the module docstring)")
    p.add_argument("--out", type=Path, required=True, help="where results.json and report.md go")
    p.add_argument("--runs", type=Path, default=Path("runs/vcas-compare"), help="the runs' output directories")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)} (vanilla is needed)")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if "vanilla" not in arms or any(a not in ARMS for a in arms):
        p.error(f"--arms: from {', '.join(ARMS)}, vanilla included")
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    import platform
    from datetime import datetime, timezone

    import torch

    meta = {"command": "python -m benchmarks.probes.vcas_compare " + " ".join(argv if argv is not None else sys.argv[1:]),
            "git_commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": version("deepspeed"),
            "transformers": version("transformers"), "cpus": os.cpu_count(), "steps": args.steps,
            "parallel": args.parallel, "load_before": load()}
    run_config(args.runs)
    runs = run_all(arms, args.data, args.runs, args.steps, args.parallel)
    meta["load_after"] = load()
    failed = [a for a, r in runs.items() if r["exit"] != 0]
    if failed:
        print(f"failed arms: {failed}; see {args.runs}/<arm>.log", file=sys.stderr)
        return 1
    result = {"meta": meta, "runs": runs, "arms": summarize(args.runs, arms)}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(result))
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
