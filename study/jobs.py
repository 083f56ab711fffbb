"""Running a study's jobs: training runs (warm-up, start evaluation, arms) as processes, with dependencies,
N at a time, each followed by its probe; resumable from the state on disk.

A job is one process in its own directory: `launcher/train.py`, or, for a job with a probe,
`study/probe.py --train` (training, then the probe on its final checkpoint, in one process).
Its state is read from disk alone: ``done`` (summary.json at its last step, and probe.json when it needs
a probe), ``probe`` (trained, not yet probed: a probe-only process), ``partial`` (a complete checkpoint
to resume from) or ``new``. A continuation (an arm's run
or a start evaluation) begins with a copy of the warm-up run's checkpoint (``branch_from``), so the
engine resumes it like any interrupted run.

While a run trains, ``CpuTrace`` follows its metrics.jsonl and writes, for every record, the process
CPU time (user + system, all threads, read from /proc) and the 1-minute load average to cputime.jsonl:
on a shared machine CPU time is the fairer clock, and the load says how shared it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("sift.study")
PROBE_FILE = "probe.json"
CPU_FILE = "cputime.jsonl"
REFERENCE_FILE = "reference.json"  # the reference job's cost record (launcher/reference.py)
BRANCH_FILE = "branch.json"  # in a continuation: the branch point (step, samples, hours of the warm-up run)


@dataclass(slots=True)
class RunPlan:
    arm: Any  # spec.Arm
    seed: int
    dir: Path
    config: dict[str, Any]  # the resolved run config (engine.config.to_dict)
    kind: str = "run"  # run | warm | start
    regime: str = ""
    deps: list[str] = field(default_factory=list)  # keys of jobs that must be done first
    branch: Path | None = None  # the warm-up run's directory this run continues from
    probe: list[str] = field(default_factory=list)  # `python -m study.probe` arguments; [] = none
    command: list[str] = field(default_factory=list)  # kind "reference": the `sift reference` process
    flops: Any = None  # study.budget flops: the arm's counted FLOPs per step (budget.StepFlops)

    @property
    def key(self) -> str:
        name = {"warm": "warm", "reference": "reference", "start": f"start/seed{self.seed}"}.get(self.kind, f"{self.arm.name}/seed{self.seed}")
        return f"{self.regime}/{name}" if self.regime else name

    @property
    def steps(self) -> int:
        return int(self.config["train"]["steps"])


# ----------------------------------------------------------------------------- state on disk


def run_state(plan: RunPlan) -> tuple[str, int]:
    """("done", steps) | ("probe", steps) | ("partial", step of the latest complete checkpoint) | ("new", 0)."""
    from engine import checkpoint as ckpt

    if plan.kind == "reference":  # `sift reference` writes reference.json last; a rerun resumes its runs
        return ("done", plan.steps) if (plan.dir / REFERENCE_FILE).is_file() else ("new", 0)
    summary = plan.dir / "summary.json"
    if summary.is_file():
        with contextlib.suppress(ValueError, OSError):
            if json.loads(summary.read_text()).get("steps") == plan.steps:
                return ("probe" if probe_missing(plan) else "done"), plan.steps
    try:
        tag = ckpt.find_latest(plan.dir / "checkpoints") if (plan.dir / "checkpoints").is_dir() else None
    except ckpt.CheckpointError:  # damaged: the run itself refuses, with the engine's explanation
        return "partial", -1
    if tag is not None:
        return "partial", int(tag.removeprefix("step"))
    return "new", 0


def probe_missing(plan: RunPlan) -> list[str]:
    """The selections of the plan's probe (``--select KEY``) that its probe.json does not hold yet (all of
    them when there is no readable probe.json)."""
    if not plan.probe:
        return []
    wanted = [plan.probe[i + 1] for i, a in enumerate(plan.probe[:-1]) if a == "--select"]
    try:
        held = json.loads((plan.dir / PROBE_FILE).read_text()).get("kept", {})
    except (ValueError, OSError, AttributeError):
        return wanted or [PROBE_FILE]
    return [s for s in wanted if s not in held]


def warm_tag(warm_dir: Path) -> str:
    from engine import checkpoint as ckpt

    tag = ckpt.find_latest(warm_dir / "checkpoints") if (warm_dir / "checkpoints").is_dir() else None
    if tag is None:
        raise RuntimeError(f"the warm-up run {warm_dir} has no complete checkpoint")
    return tag


def branch_from(warm_dir: Path, run_dir: Path, seed: int) -> str:
    """Start ``run_dir`` as a continuation of the warm-up run: copy its latest checkpoint into
    run_dir/checkpoints and mark it complete there, with the dropout RNG state re-seeded from ``seed``
    (so that a seed also draws its own dropout masks; data order, masks and random selection follow
    train.seed already), and write branch.json. Returns the tag. The engine then resumes it like an
    interrupted run."""
    import torch

    from engine import checkpoint as ckpt
    from engine import identity

    tag = warm_tag(warm_dir)
    src, root = warm_dir / "checkpoints" / tag, run_dir / "checkpoints"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    shutil.copytree(src, root / tag)
    record = json.loads((root / tag / ckpt.STATE_FILE).read_text())
    if record.get("world_size") != 1:
        raise RuntimeError(f"the warm-up checkpoint {src} was saved by {record.get('world_size')} ranks; a study "
                           "run is one process")
    state = ckpt.load_rank_state(root, tag, 0)
    if state is None or "torch_rng" not in state:
        raise RuntimeError(f"{src} holds no per-rank torch_rng state to re-seed (has the engine's checkpoint "
                           "format changed? see engine/checkpoint.py)")
    state["torch_rng"] = torch.Generator().manual_seed(dropout_seed(seed)).get_state()
    ckpt.save_rank_state(root, tag, 0, state)
    kept = {k: v for k, v in record.items() if k not in ("format_version", "tag", "files")}
    ckpt.mark_complete(root, tag, kept, keep_last=1)  # the manifest now lists the re-seeded file
    point = {k: record.get(k) for k in ("step", "backprop_samples", "consumed_samples", "hours")}
    (run_dir / BRANCH_FILE).write_text(json.dumps({"tag": tag, **point, "dropout_seed": dropout_seed(seed)}) + "\n")
    identity.declare_branch(run_dir, src)  # a new run with its own settings (method, seed), not a resume of warm
    return tag


def dropout_seed(seed: int) -> int:
    """The continuation's dropout seed for study seed ``seed`` (the engine's own formula for rank 0)."""
    return seed * 1_000_003 + 1


# ----------------------------------------------------------------------------- CPU time


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (all its threads), from /proc; None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def read_cpu_trace(run_dir: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(event, step) -> {"cpu_s", "load1", ...} with event "train" or "eval"; the last record per key wins
    (a resumed run re-logs the steps after its checkpoint)."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    path = run_dir / CPU_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                rec = json.loads(line)
                out[(str(rec["event"]), int(rec["step"]))] = rec
    return out


class CpuTrace:
    """Appends {"step", "event", "cpu_s", "load1"} to run_dir/cputime.jsonl for every new record the run
    writes to metrics.jsonl. cpu_s counts from the branch point (or from the run's start): on a resume
    from step k it continues from the value recorded at step k, so lost work is not counted twice."""

    def __init__(self, run_dir: Path, pid: int, resume_step: int):
        self.dir, self.pid = run_dir, pid
        self.metrics = run_dir / "metrics.jsonl"
        self.offset_bytes = self.metrics.stat().st_size if self.metrics.is_file() else 0
        # the last record at or before the checkpoint: at its step the eval record comes after the train one
        earlier = [(s, e == "eval", r["cpu_s"]) for (e, s), r in read_cpu_trace(run_dir).items() if s <= resume_step]
        self.base = max(earlier)[2] if earlier else 0.0
        self._partial = b""

    def poll(self) -> None:
        if not self.metrics.is_file():
            return
        with self.metrics.open("rb") as f:
            f.seek(self.offset_bytes)
            chunk = f.read()
        if not chunk:
            return
        self.offset_bytes += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next poll
        cpu = process_cpu_seconds(self.pid)
        if cpu is None:
            return
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if "step" in rec:
                    out.append({"step": rec["step"], "event": rec.get("event", "train"),
                                "cpu_s": round(self.base + cpu, 3), "load1": load})
        if out:
            with (self.dir / CPU_FILE).open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in out))


# ----------------------------------------------------------------------------- running


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(var, None)  # each run is its own one-process world (launcher/train.py picks a port)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")  # (engine/ds.py gives the runs this environment's op cache)
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


@dataclass(slots=True)
class _Running:
    proc: subprocess.Popen
    plan: RunPlan
    phase: str  # train | probe
    t0: float
    logf: Any
    trace: CpuTrace | None


def execute(plans: list[RunPlan], *, parallel: int, events: EventLog, keep_checkpoints: bool,
            env: dict[str, str]) -> dict[str, int]:
    """Run what is not done yet, up to ``parallel`` processes at a time, each job after its dependencies
    and in plan order otherwise; returns {job key: exit code} of the jobs run (0 when done)."""
    todo: list[RunPlan] = []
    done: set[str] = set()
    for plan in plans:
        state, step = run_state(plan)
        if state == "done":
            events.write(run=plan.key, action="skip", step=step)
            log.info("%-36s done, skipped", plan.key)
            done.add(plan.key)
        else:
            todo.append(plan)
    slots = slot_envs(parallel)
    free = list(range(len(slots)))
    running: dict[int, _Running] = {}
    codes: dict[str, int] = {}
    failed: set[str] = set()

    def start(plan: RunPlan) -> None:
        slot = free.pop(0)
        state, step = run_state(plan)
        plan.dir.mkdir(parents=True, exist_ok=True)
        logf = (plan.dir / "train.log").open("a")
        if state == "probe":
            cmd, phase, action = [sys.executable, "-m", "study.probe", *plan.probe], "probe", "probe"
        else:
            if state == "new" and plan.branch is not None:
                try:
                    tag = branch_from(plan.branch, plan.dir, plan.seed)
                except (RuntimeError, OSError) as e:  # e.g. the warm-up's checkpoints were deleted
                    free.append(slot)
                    logf.close()
                    failed.add(plan.key)
                    codes[plan.key] = -1
                    events.write(run=plan.key, action="failed", phase="branch", error=str(e))
                    log.error("%-36s cannot branch: %s", plan.key, e)
                    return
                events.write(run=plan.key, action="branch", tag=tag)
                state, step = run_state(plan)
            action = "resume" if state == "partial" else "start"
            # Written at every start: the study (or its data) may have moved since the run was made.
            config = plan.dir / "config.yaml"
            config.write_text(yaml.safe_dump(plan.config, sort_keys=False))
            cmd = (plan.command if plan.command
                   else [sys.executable, "-m", "study.probe", "--train", str(config), *plan.probe] if plan.probe
                   else [sys.executable, "-m", "launcher.train", "--config", str(config)])
            phase = "train"
        logf.write(f"\n=== sift study: {action} {plan.key} at step {step} ({datetime.now().isoformat()}) ===\n")
        logf.flush()
        proc = subprocess.Popen(cmd, env=child_env({**slots[slot], **env}), stdout=logf,
                                stderr=subprocess.STDOUT)
        trace = CpuTrace(plan.dir, proc.pid, step) if phase == "train" and not plan.command else None
        running[slot] = _Running(proc, plan, phase, time.time(), logf, trace)
        events.write(run=plan.key, action=action, step=step, pid=proc.pid, slot=slot)
        log.info("%-36s %s%s", plan.key, action, f" from step {step}" if step and phase == "train" else "")

    def reap(slot: int) -> None:
        r = running.pop(slot)
        if r.trace is not None:
            r.trace.poll()
        r.logf.close()
        free.append(slot)
        rc, plan = r.proc.returncode, r.plan
        seconds = round(time.time() - r.t0, 1)
        state = run_state(plan)[0]
        codes[plan.key] = rc
        if rc == 0 and state == "done":
            events.write(run=plan.key, action="done", seconds=seconds)
            log.info("%-36s done in %.0f s", plan.key, seconds)
            done.add(plan.key)
            # every continuation copies the warm one; reducible arms load the reference's
            if not keep_checkpoints and plan.kind not in ("warm", "reference"):
                shutil.rmtree(plan.dir / "checkpoints", ignore_errors=True)
        else:
            failed.add(plan.key)
            events.write(run=plan.key, action="failed", phase=r.phase, rc=rc, seconds=seconds)
            log.error("%-36s %s failed (exit %s); see %s", plan.key, r.phase, rc, plan.dir / "train.log")

    def ready(plan: RunPlan) -> bool:
        return all(d in done for d in plan.deps)

    try:
        while todo or running:
            for plan in [p for p in todo if any(d in failed for d in p.deps)]:
                todo.remove(plan)
                failed.add(plan.key)
                codes[plan.key] = -1
                events.write(run=plan.key, action="blocked", by=[d for d in plan.deps if d in failed])
                log.error("%-36s not run: %s failed", plan.key, ", ".join(d for d in plan.deps if d in failed))
            while free and (nxt := next((p for p in todo if ready(p)), None)) is not None:
                todo.remove(nxt)
                start(nxt)
            if not running and todo:  # nothing can start: dependencies outside this plan are not done
                for plan in todo:
                    codes[plan.key] = -1
                    events.write(run=plan.key, action="blocked", by=plan.deps)
                break
            time.sleep(0.2)
            for r in running.values():
                if r.trace is not None:
                    r.trace.poll()
            for slot in [s for s, r in running.items() if r.proc.poll() is not None]:
                reap(slot)
    except KeyboardInterrupt:  # stop the children too; a rerun resumes them from their checkpoints
        for r in running.values():
            with contextlib.suppress(ProcessLookupError):
                r.proc.send_signal(signal.SIGTERM)
            r.proc.wait()
            r.logf.close()
            events.write(run=r.plan.key, action="interrupted")
        raise
    return codes
