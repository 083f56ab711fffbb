"""Fixtures of the multinode tests: one 2-host cluster for the session, and the helpers that launch on it.

Where the cluster cannot be made (not root, no `ip netns`, no sshd or pdsh) every test here skips with
a reason naming what is missing; `pytest -ra` (the project's default) prints it in the summary.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.common import REPO
from tests.multinode.cluster import Cluster, missing

# DeepSpeed JIT-builds a CPU op into torch's extension cache at init, under a lock file; a rank killed
# while it holds that lock (as these tests kill hosts) would leave every later start on this machine
# waiting forever. So these ranks use a cache of their own, built once here before any rank starts.
EXTENSIONS = Path.home() / ".cache" / "torch_extensions" / f"sift-multinode-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}"
STALE_LOCK_S = 1800


@pytest.fixture(scope="session")
def cluster():
    reason = missing()
    if reason:
        pytest.skip(f"multinode: {reason}")
    _build_extensions()
    with Cluster(2) as c:
        yield c


def _build_extensions() -> None:
    for lock in EXTENSIONS.glob("*/lock"):  # left by a process killed mid-build long ago
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(EXTENSIONS)}
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   env=env, check=True, capture_output=True, timeout=900)


def launch_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    """The launching shell: a CPU run, this checkout on PYTHONPATH, the cluster's ssh first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "OMPI_", "SLURM_", "GLOO_"))}
    env.update(PATH=os.pathsep.join([cluster.path_dir, str(Path(sys.executable).parent), os.environ["PATH"]]),
               PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=str(EXTENSIONS), **extra)
    return env


def start(cluster: Cluster, host: int, argv: list[str], work: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`argv` run on `host` from directory `work`, output to `log`."""
    with open(log, "w") as out:
        return cluster.popen(host, argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(cluster: Cluster, procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[int]:
    """Wait for every process; past `timeout`, kill both hosts' processes (sshd restarted) and fail."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for i in range(cluster.n):
            cluster.kill_host(i)
            cluster.restart_sshd(i)
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
        pytest.fail(f"still running after {timeout:g} s:\n{tails}")
