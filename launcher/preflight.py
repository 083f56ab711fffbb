"""Checks `sift launch` makes before it starts anything on other hosts, so that a bad host costs one
clear line instead of ranks waiting on a rendezvous until a timeout.

- every remote host answers ssh (the deepspeed launcher's pdsh and mpirun reach the hosts that way),
  all hosts asked at once, each within `timeout_s`;
- no host is given more slots than it has GPUs (`nvidia-smi -L`, asked over the same ssh; a host
  without GPUs is not judged: CPU runs may start any number of ranks);
- nothing already accepts connections on the master's port (a previous run still running?).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from launcher.errors import LaunchError

SSH_TIMEOUT_S = 10
# One ssh per host: prove the login works, then count GPUs (0 where there is no nvidia-smi).
PROBE = "echo sift-ok; nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true"


def ssh_probe(host: str, timeout_s: float = SSH_TIMEOUT_S) -> tuple[int | None, str]:
    """(GPU count, "") if `host` answers ssh without a password, else (None, why)."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout_s)}", host, PROBE]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 5, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"no answer within {timeout_s + 5:g} s"
    except OSError as e:
        return None, f"cannot run ssh: {e.strerror or e}"
    lines = done.stdout.split()
    if done.returncode != 0 or "sift-ok" not in lines:
        why = (done.stderr.strip().splitlines() or [f"ssh exited with status {done.returncode}"])[-1]
        return None, why
    count = lines[-1]
    return (int(count) if count.isdigit() else 0), ""


def check_hosts(slots: Mapping[str, int], probe: Callable[[str], tuple[int | None, str]] = ssh_probe) -> None:
    """LaunchError listing every host that does not answer ssh or has fewer GPUs than its slots."""
    hosts = list(slots)
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        answers = dict(zip(hosts, pool.map(probe, hosts), strict=True))
    problems = []
    for host, (gpus, why) in answers.items():
        if gpus is None:
            problems.append(f"host {host} does not answer ssh ({why}): check that it is up and that `ssh {host}` "
                            f"works from here without a password, or leave it out of the host list")
        elif gpus and slots[host] > gpus:
            problems.append(f"host {host} is given {slots[host]} slots but has {gpus} GPUs (nvidia-smi -L): "
                            f"give it slots={gpus} or fewer")
    if problems:
        raise LaunchError("pre-flight check failed, nothing was started:\n  " + "\n  ".join(problems))


def check_port_free(host: str, port: int, timeout_s: float = 3.0) -> None:
    """LaunchError if something already accepts TCP connections at host:port (the master's store port)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError:
        return  # refused, unreachable or silent: nothing is listening that we can see
    raise LaunchError(f"port {port} on the master {host} is already in use (a previous run still running?): "
                      f"stop it, or pass --master-port with a free port")

