"""Helpers to run `sift train` in tests and read what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from tests.distributed.common import REPO, single_env

TINY_RUN = REPO / "tests" / "assets" / "tiny-run.yaml"
T = TypeVar("T")


def command(out_dir: Path, data: Path, *overrides: str, env: dict[str, str] | None = None) -> list[str]:
    """`python launcher/train.py --config tests/assets/tiny-run.yaml ...` as one process (options such as
    --allow-change may come among the overrides)."""
    cmd = [sys.executable, str(REPO / "launcher" / "train.py"), "--config", str(TINY_RUN),
           f"data.path={data}", f"train.out_dir={out_dir}", *overrides]
    if env and "SIFT_FAULT" in env:  # the fault injector is a plugin the run must load
        cmd.append("train.plugins=[tests.faults]")
    return cmd


def start(out_dir: Path, data: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``train`` in the background: the caller signals it and reads ``communicate()``."""
    return subprocess.Popen(command(out_dir, data, *overrides, env=env), cwd=REPO, env=single_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train(out_dir: Path, data: Path, *overrides: str, env: dict[str, str] | None = None,
          check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python launcher/train.py --config tests/assets/tiny-run.yaml ...` as one process."""
    cmd = command(out_dir, data, *overrides, env=env)
    result = subprocess.run(cmd, cwd=REPO, env=single_env(env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"sift train exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def concurrently(*calls: Callable[[], T]) -> list[T]:
    """Independent calls, two at a time, results in order (the first error is raised). A `train` run is one
    single-threaded process that spends most of its seconds importing, so two share the 2 cores well."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def losses(out_dir: Path) -> list[float]:
    """The per-step training loss (log_every = 1) in step order; a resumed run appends to the same file."""
    by_step = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "event" not in rec:
            by_step[rec["step"]] = rec["loss"]
    return [by_step[s] for s in sorted(by_step)]


def evals(out_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if r.get("event") == "eval"]
