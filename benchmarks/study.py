"""`sift study`: a reproducible time-to-accuracy study of SIFT against vanilla and random selection.

    sift study --preset cpu                                  # the CPU grid (prepares its data if needed)
    sift study --preset cpu --data DIR --out runs/study-cpu  # on any shards made by `sift prepare`
    sift study --config configs/study-gpu.yaml --parallel 1 --seeds 0,1,2
    sift study --preset cpu --arms vanilla,random,entropy:1 train.steps=300   # a smaller grid
    sift study --preset cpu --report-only                    # redo the tables and plots from the runs

One base run config, several arms (vanilla: B rows per step; random: keep a random B of G = B / keep, the
control; loss- and entropy-SIFT at exits 1, 2, L/2 and L), several seeds; every run shares the shards,
the validation split, the evaluation schedule and the step count, so every arm back-propagates the same
number of samples. Each run is one `launcher/train.py` process writing to <out>/runs/<arm>/seed<k>/.

Resumable: a finished run (summary.json at the last step) is skipped, an interrupted one continues from
its latest checkpoint, a missing one starts; a run whose config or data changed since it was made is
refused rather than mixed in. The report (<out>/report/ or --report DIR) holds results.json, report.md,
per-run curves and the PNG figures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the project importable without installing it
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from benchmarks.study_spec import Arm, StudyError, StudySpec, build_spec  # noqa: E402
from engine.config import ConfigError, load_config, to_dict  # noqa: E402

PRESETS = {"cpu": REPO / "configs" / "study-cpu.yaml", "gpu": REPO / "configs" / "study-gpu.yaml",
           "gpt2-cpu": REPO / "configs" / "study-gpt2-cpu.yaml"}
MARKER = "study-run.json"  # in each run directory: the config and data it was made with
log = logging.getLogger("sift.study")


@dataclass(slots=True)
class RunPlan:
    arm: Arm
    seed: int
    dir: Path
    config: dict[str, Any]  # the resolved run config (engine.config.to_dict)

    @property
    def key(self) -> str:
        return f"{self.arm.name}/seed{self.seed}"

    @property
    def steps(self) -> int:
        return int(self.config["train"]["steps"])


# ----------------------------------------------------------------------------- planning


def data_fingerprint(data: Path) -> dict[str, Any]:
    """What identifies the shards: the hash of index.json (which holds every shard's SHA-256)."""
    raw = (data / "index.json").read_bytes()
    index = json.loads(raw)
    return {"index_sha256": hashlib.sha256(raw).hexdigest(), "seq_len": index.get("seq_len"),
            "vocab_size": index.get("vocab_size"), "objective": index.get("objective"),
            "rows": {k: v.get("rows") for k, v in index.get("splits", {}).items()}}


def plan_runs(spec: StudySpec, out: Path, data: Path) -> list[RunPlan]:
    """Every (arm, seed) run, seed-major (an interrupted study has whole seeds), each config validated."""
    plans, problems = [], []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.yaml"
        base.write_text(yaml.safe_dump(spec.base, sort_keys=False))
        for seed in spec.seeds:
            for arm in spec.arms:
                run_dir = out / "runs" / arm.name / f"seed{seed}"
                overrides = [*spec.overrides, f"data.path={data}", *arm.overrides(), f"train.seed={seed}",
                             f"train.out_dir={run_dir}"]
                try:
                    cfg = load_config(base, overrides)
                except ConfigError as e:
                    problems.append(f"arm {arm.name}: " + "; ".join(e.problems))
                    continue
                plans.append(RunPlan(arm, seed, run_dir, to_dict(cfg)))
    if problems:
        unique = list(dict.fromkeys(problems))
        raise StudyError(f"{spec.source}: the run config is not usable:\n  " + "\n  ".join(unique))
    return plans


def run_state(plan: RunPlan) -> tuple[str, int]:
    """("done", steps) | ("partial", step of the latest complete checkpoint) | ("new", 0)."""
    from engine import checkpoint as ckpt

    summary = plan.dir / "summary.json"
    if summary.is_file():
        with contextlib.suppress(ValueError, OSError):
            if json.loads(summary.read_text()).get("steps") == plan.steps:
                return "done", plan.steps
    try:
        tag = ckpt.find_latest(plan.dir / "checkpoints") if (plan.dir / "checkpoints").is_dir() else None
    except ckpt.CheckpointError:  # damaged: the run itself refuses, with the engine's explanation
        return "partial", -1
    if tag is not None:
        return "partial", int(tag.removeprefix("step"))
    return "new", 0


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run config without what cannot change its result: its locations (a study directory or its data
    may move; the data's identity is checked through the hash of its index.json instead) and, for
    vanilla, the selection settings it never reads (so a vanilla run can be shared between studies that
    differ only in those)."""
    out = json.loads(json.dumps(config))
    out.get("data", {}).pop("path", None)
    out.get("train", {}).pop("out_dir", None)
    if out.get("sift", {}).get("policy") == "none":
        out["sift"] = {"policy": "none"}
    return out


def check_marker(plan: RunPlan, data_id: dict[str, Any]) -> None:
    """Refuse to continue or reuse a run made with another config or other data."""
    marker = plan.dir / MARKER
    if not marker.is_file():
        return
    try:
        made = json.loads(marker.read_text())
    except (ValueError, OSError):
        raise StudyError(f"{marker} is unreadable; delete {plan.dir} to redo that run") from None
    same_config = comparable(made.get("config") or {}) == comparable(plan.config)
    if not same_config or made.get("data", {}).get("index_sha256") != data_id["index_sha256"]:
        what = "config" if not same_config else "data (index.json differs)"
        raise StudyError(f"{plan.dir} was made with another {what}; use another --out, or delete that "
                         "directory to redo the run")


def write_marker(plan: RunPlan, data_id: dict[str, Any]) -> None:
    plan.dir.mkdir(parents=True, exist_ok=True)
    (plan.dir / MARKER).write_text(json.dumps({"arm": plan.arm.name, "seed": plan.seed, "config": plan.config,
                                               "data": data_id}, indent=1))


# ----------------------------------------------------------------------------- data


def ensure_data(spec: StudySpec, data: Path) -> None:
    """A prepared dataset at ``data``; made with the study's prepare recipe when it has one."""
    if (data / "index.json").is_file():
        return
    if spec.prepare is None:
        raise StudyError(f"no prepared dataset at {data} (index.json missing): make one with "
                         f"`sift prepare INPUTS --out {data} --seq-len 128 ...`, or pass --data DIR")
    inputs = [str(p if p.is_absolute() else REPO / p) for p in map(Path, spec.prepare.inputs)]
    missing = [i for i, p in zip(spec.prepare.inputs, inputs) if not Path(p).exists()]
    if missing:
        raise StudyError(f"the study prepares its data from {', '.join(missing)} (relative to the repository), "
                         f"which is not there; pass --data DIR with shards made by `sift prepare`")
    if data.exists() and any(data.iterdir()):
        raise StudyError(f"{data} exists but holds no complete dataset (no index.json); remove it or pass --data")
    cmd = [sys.executable, "-m", "data_pipeline.prepare", *inputs, "--out", str(data), *spec.prepare.args]
    log.info("preparing the data: %s", shlex.join(cmd))
    if subprocess.run(cmd, cwd=REPO, env=child_env({})).returncode != 0:
        raise StudyError(f"`sift prepare` failed; see its message above ({shlex.join(cmd)})")


# ----------------------------------------------------------------------------- running


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(var, None)  # each run is its own one-process world (launcher/train.py picks a port)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


def slot_envs(parallel: int) -> list[dict[str, str]]:
    """Per concurrent slot: a GPU of its own where there are GPUs, else a fair share of the CPU threads."""
    accelerator = os.environ.get("DS_ACCELERATOR", "")
    gpus: list[str] = []
    if accelerator != "cpu":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = [g for g in visible.split(",") if g.strip()]
        else:
            import torch

            gpus = [str(i) for i in range(torch.cuda.device_count())]
    if gpus:
        if parallel > len(gpus):
            log.warning("--parallel %d > %d GPU(s): runs share GPUs, so their wall clocks are not comparable",
                        parallel, len(gpus))
        return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(parallel)]
    if parallel == 1:
        return [{}]
    threads = max(1, len(os.sched_getaffinity(0)) // parallel)  # oversubscribed OpenMP threads thrash
    return [{"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} for _ in range(parallel)]


class EventLog:
    """<out>/study-log.jsonl: what each invocation did to each run (skip, start, resume, done, failed)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **record: Any) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def execute(plans: list[RunPlan], *, parallel: int, events: EventLog, keep_checkpoints: bool,
            env: dict[str, str]) -> dict[str, int]:
    """Run what is not done yet, up to ``parallel`` at a time; returns {run key: exit code} of those run."""
    todo: list[tuple[RunPlan, str, int]] = []
    for plan in plans:
        state, step = run_state(plan)
        if state == "done":
            events.write(run=plan.key, action="skip", step=step)
            log.info("%-28s done, skipped", plan.key)
        else:
            todo.append((plan, state, step))
    slots = slot_envs(parallel)
    free = list(range(len(slots)))
    running: dict[int, tuple[subprocess.Popen, RunPlan, float, Any]] = {}
    codes: dict[str, int] = {}

    def start(plan: RunPlan, state: str, step: int) -> None:
        slot = free.pop(0)
        plan.dir.mkdir(parents=True, exist_ok=True)
        logf = (plan.dir / "train.log").open("a")
        action = "resume" if state == "partial" else "start"
        logf.write(f"\n=== sift study: {action} {plan.key} at step {step} ({datetime.now().isoformat()}) ===\n")
        logf.flush()
        # Written at every start: the study (or its data) may have moved since the run was made.
        (plan.dir / "config.yaml").write_text(yaml.safe_dump(plan.config, sort_keys=False))
        cmd = [sys.executable, str(REPO / "launcher" / "train.py"), "--config", str(plan.dir / "config.yaml")]
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env({**slots[slot], **env}), stdout=logf,
                                stderr=subprocess.STDOUT)
        running[slot] = (proc, plan, time.time(), logf)
        events.write(run=plan.key, action=action, step=step, pid=proc.pid, slot=slot)
        log.info("%-28s %s%s", plan.key, action, f" from step {step}" if step else "")

    def reap(slot: int) -> None:
        proc, plan, t0, logf = running.pop(slot)
        logf.close()
        free.append(slot)
        rc = proc.returncode
        codes[plan.key] = rc
        seconds = time.time() - t0
        if rc == 0 and run_state(plan)[0] == "done":
            events.write(run=plan.key, action="done", seconds=round(seconds, 1))
            log.info("%-28s done in %.0f s", plan.key, seconds)
            if not keep_checkpoints:
                shutil.rmtree(plan.dir / "checkpoints", ignore_errors=True)
        else:
            events.write(run=plan.key, action="failed", rc=rc, seconds=round(seconds, 1))
            log.error("%-28s failed (exit %s); see %s", plan.key, rc, plan.dir / "train.log")

    try:
        while todo or running:
            while todo and free:
                start(*todo.pop(0))
            time.sleep(0.2)
            for slot in [s for s, (p, *_) in running.items() if p.poll() is not None]:
                reap(slot)
    except KeyboardInterrupt:  # stop the children too; a rerun resumes them from their checkpoints
        for proc, plan, _, logf in running.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            proc.wait()
            logf.close()
            events.write(run=plan.key, action="interrupted")
        raise
    return codes


# ----------------------------------------------------------------------------- provenance


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": len(os.sched_getaffinity(0))}
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        info["memory_gib"] = round(next(int(ln.split()[1]) for ln in lines if ln.startswith("MemTotal")) / 2**20, 1)
    versions = {}
    for mod in ("torch", "deepspeed", "transformers", "numpy", "matplotlib"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    info["versions"] = versions
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def git_commit() -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return None


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sift study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arms: vanilla, random, loss:J, entropy:J (J = a layer, L or L/2), or default.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="a study preset under configs/ (default: cpu)")
    src.add_argument("--config", help="a study YAML (a run config plus a `study:` section) or a plain run config")
    p.add_argument("--name", help="the study's name in reports and the default --out (default: from the file)")
    p.add_argument("--data", help="prepared shards (a `sift prepare` output directory); overrides data.path")
    p.add_argument("--out", help="study directory (runs, logs; default: runs/<study name>)")
    p.add_argument("--report", help="where the report goes (default: <out>/report)")
    p.add_argument("--seeds", help="a count (3 means 0,1,2) or a list (0,1,2; a single seed: 5,)")
    p.add_argument("--arms", help="comma-separated arms, e.g. vanilla,random,loss:1,entropy:L/2 (default: the grid)")
    p.add_argument("--targets", help="validation accuracies for time-to-target, e.g. 0.30,0.35, or auto")
    p.add_argument("--parallel", type=int, help="runs at a time (default 1; on CPU the cores are shared out)")
    p.add_argument("--report-only", action="store_true", help="do not train: report on the runs there are")
    p.add_argument("--dry-run", action="store_true", help="print the plan (arms, seeds, run states) and exit")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' checkpoints")
    p.add_argument("overrides", nargs="*", help="run-config overrides for every arm, e.g. train.steps=300")
    return p.parse_args(argv)


def resolve_paths(args: argparse.Namespace, spec: StudySpec) -> tuple[Path, Path, Path]:
    data = Path(args.data) if args.data else Path(spec.base.get("data", {}).get("path", ""))
    out = Path(args.out) if args.out else Path("runs") / spec.name
    report = Path(args.report) if args.report else out / "report"
    return data.resolve(), out.resolve(), report.resolve()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = Path(args.config) if args.config else PRESETS[args.preset or "cpu"]
    try:
        spec = build_spec(source, seeds=args.seeds, arms=args.arms, targets=args.targets,
                          parallel=args.parallel, overrides=args.overrides)
        spec.name = args.name or spec.name
        data, out, report_dir = resolve_paths(args, spec)
        if not args.report_only and not args.dry_run:
            ensure_data(spec, data)
        elif not (data / "index.json").is_file() and not args.report_only:
            log.warning("no prepared dataset at %s yet", data)
        data_id = data_fingerprint(data) if (data / "index.json").is_file() else {"index_sha256": None}
        plans = plan_runs(spec, out, data)
        if not args.report_only:
            for plan in plans:
                check_marker(plan, data_id)
    except StudyError as e:
        print(f"sift study: error: {e}", file=sys.stderr)
        return 2

    if args.dry_run:
        print(f"study {spec.name}: {len(spec.arms)} arms x {len(spec.seeds)} seeds = {len(plans)} runs "
              f"({plans[0].steps} steps each) -> {out}")
        for plan in plans:
            state, step = run_state(plan)
            print(f"  {plan.key:<28} {state}{f' (step {step})' if state == 'partial' else ''}  "
                  f"{' '.join(plan.arm.overrides())}")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    record = write_study_record(out, spec, data, data_id, argv, invocation=not args.report_only)
    codes: dict[str, int] = {}
    if not args.report_only:
        for plan in plans:  # each was checked against its marker above
            if not (plan.dir / MARKER).is_file():
                write_marker(plan, data_id)
        events = EventLog(out / "study-log.jsonl")
        t0, load0 = time.time(), load_average()
        signal.signal(signal.SIGTERM, _interrupt)  # a killed study stops its runs too, resumably
        try:
            codes = execute(plans, parallel=spec.parallel, events=events, keep_checkpoints=args.keep_checkpoints,
                            env={})
        except KeyboardInterrupt:
            print("sift study: interrupted; rerun the same command to continue", file=sys.stderr)
            return 130
        record["invocations"][-1].update({"seconds": round(time.time() - t0, 1), "load_before": load0,
                                          "load_after": load_average(), "ran": codes})
        (out / "study.json").write_text(json.dumps(record, indent=1))

    from benchmarks.study_output import write_report

    summary = write_report(report_dir, spec, plans, record)
    print(summary)
    failed = sorted(k for k, rc in codes.items() if rc != 0)
    if failed:
        print(f"sift study: {len(failed)} run(s) failed: {', '.join(failed)}; their train.log says why; "
              "rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def write_study_record(out: Path, spec: StudySpec, data: Path, data_id: dict[str, Any], argv: list[str], *,
                       invocation: bool = True) -> dict[str, Any]:
    """<out>/study.json: the spec, the data and one entry per training invocation (command, machine,
    versions); a report-only invocation adds none."""
    path = out / "study.json"
    record: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(ValueError, OSError):
            record = json.loads(path.read_text())
    record.update({
        "name": spec.name, "source": _repo_relative(Path(spec.source)), "seeds": spec.seeds,
        "arms": [a.name for a in spec.arms], "num_layers": spec.num_layers, "targets": spec.targets,
        "parallel": spec.parallel, "base": spec.base, "overrides": [portable_arg(o) for o in spec.overrides],
        "data": {"path": data.name, **data_id},
    })
    record.setdefault("invocations", [])
    if invocation:
        record["invocations"].append({
            "command": shlex.join(["sift", "study", *map(portable_arg, argv)]),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "machine": machine_info(),
        })
    path.write_text(json.dumps(record, indent=1))
    return record


def portable_arg(arg: str) -> str:
    """A command-line argument without machine-specific directories: paths inside the repository become
    relative to it, other absolute paths keep only their last component (`.../english-128`)."""
    key, sep, value = arg.rpartition("=") if "=" in arg and not arg.startswith("/") else ("", "", arg)
    if not value.startswith("/"):
        return arg
    path = Path(value)
    with contextlib.suppress(ValueError):
        return f"{key}{sep}{path.resolve().relative_to(REPO)}"
    return f"{key}{sep}.../{path.name}"


def _repo_relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(REPO))
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
