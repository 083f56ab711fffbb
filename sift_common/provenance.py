"""Where a measurement came from: git commit, machine, library versions, load, time.

Every benchmark and study result file embeds ``provenance(...)``, so a number can always be traced to
the code, the machine and the conditions it was measured under.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "deepspeed", "transformers", "tokenizers", "datasets", "pyarrow", "numpy")


def version(dist: str) -> str | None:
    """An installed distribution's version, read from its metadata (imports nothing)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    return {"python": platform.python_version(), **{n: version(n) for n in names}}


def git_commit(where: str | os.PathLike | None = None) -> str | None:
    """The commit checked out at ``where`` (default: this source tree), with "+dirty" for uncommitted
    changes to tracked files; None outside a git checkout (an installed wheel)."""
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return None


def proc_field(path: str, key: str) -> str | None:
    """The value of the first ``key: value`` line of a /proc file (None if absent or unreadable)."""
    with contextlib.suppress(OSError), open(path) as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith(key)), None)
    return None


def machine() -> dict[str, Any]:
    """CPU model, usable cores, memory, OS, and the GPUs torch sees (only if torch is already imported)."""
    mem_kb = (proc_field("/proc/meminfo", "MemTotal") or "0 kB").split()[0]
    info: dict[str, Any] = {
        "cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor() or None,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(int(mem_kb) / 2**20, 1) if mem_kb.isdigit() else None,
        "os": platform.platform(),
    }
    torch = __import__("sys").modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was (timings on a shared machine)."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def cpu_seconds(children: bool = True) -> float:
    """User + system CPU time of this process (and its reaped children): a cost measure that, unlike wall
    time, barely moves when other work shares the machine."""
    usage = [resource.RUSAGE_SELF] + ([resource.RUSAGE_CHILDREN] if children else [])
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, usage))


def provenance(command: str | None = None, *, where: str | os.PathLike | None = None) -> dict[str, Any]:
    """One dict for a result file: command, date (UTC), commit, machine, versions, load."""
    return {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(where),
        "machine": machine(),
        "versions": versions(),
        "load_average": load_average(),
    }
