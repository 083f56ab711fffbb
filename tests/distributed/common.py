"""Run a command as N ranks on CPU (gloo), like DeepSpeed's DistributedExec: every rank gets
RANK/WORLD_SIZE/LOCAL_RANK and a fresh MASTER_PORT; a timeout fails the test instead of hanging it,
and a failure reports each rank's own output."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")


def single_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """``base_env`` for a plain single process (no launcher): no rank variables inherited from the
    caller, so the child finds rank 0 of 1 and picks its own port."""
    env = base_env(extra)
    for var in RANK_VARS:
        env.pop(var, None)
    return env


def run_ranks(argv: list[str], world: int, *, cwd: Path, timeout: float = 300,
              env: dict[str, str] | None = None, check: bool = True) -> list[subprocess.CompletedProcess]:
    """Start ``python argv...`` as ranks 0..world-1 and wait for all; returns each rank's result."""
    port = str(free_port())
    with contextlib.ExitStack() as stack:
        procs = []
        for rank in range(world):
            rank_env = base_env(env)
            rank_env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                             "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            log = stack.enter_context(tempfile.TemporaryFile("w+"))  # not in cwd: that is the repository
            procs.append((subprocess.Popen([sys.executable, *argv], cwd=cwd, env=rank_env, stdout=log,
                                           stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + timeout
        timed_out = False
        for p, _ in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        results = []
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.seek(0)
            results.append(subprocess.CompletedProcess(argv, p.returncode, log.read(), ""))
    if timed_out or (check and any(r.returncode != 0 for r in results)):
        report = "\n".join(
            f"--- rank {i} exit {r.returncode} ---\n{r.stdout[-4000:]}" for i, r in enumerate(results)
        )
        raise AssertionError(f"{f'timed out after {timeout}s' if timed_out else 'a rank failed'}:\n{report}")
    return results
