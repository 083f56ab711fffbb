"""Stale build locks in torch's extension cache, found before DeepSpeed waits on one forever.

DeepSpeed JIT-builds ops (on CPU: its shared-memory collective, at ``init_distributed``) through
``torch.utils.cpp_extension``, which takes ``<cache>/<op>/lock`` by creating it, holds it open while
ninja runs, and removes it after. A process killed mid-build leaves the file; every later start then
polls for it to vanish, silently, forever. A lock no process on this host holds open, older than a
build takes, is such a leftover.

torch's default cache is shared by every Python environment of the user and keyed only by the Python
and CUDA versions, so environments with other DeepSpeed installs (a second clone's venv) rebuild the op
in turn, a minute or more each time; each environment gets a cache of its own (``use_environment_cache``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path

from sift_common.errors import SiftError

log = logging.getLogger(__name__)

QUIET_S = 120.0
"""A build writes its objects and ninja's log as it goes; a lock no process on this host holds, in a
directory where nothing changed for this long, is left over (a build on another host sharing the
directory still writes there)."""


class StaleBuildLock(SiftError):
    pass


def environment_cache() -> Path:
    """This Python environment's own extension cache, under torch's default root (~/.cache/torch_extensions)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root()) / f"sift-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}"


def use_environment_cache() -> None:
    """Build ops into ``environment_cache()`` unless TORCH_EXTENSIONS_DIR names a cache already."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(environment_cache())


def extensions_root() -> Path:
    """The cache torch builds into: $TORCH_EXTENSIONS_DIR (engine/ds.py sets it), holding one folder per op."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def open_paths() -> set[str] | None:
    """Files some process on this host holds open (from /proc), or None where /proc is not readable."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    held = set()
    for pid in proc.iterdir():
        if not pid.name.isdigit():
            continue
        try:
            for fd in (pid / "fd").iterdir():
                held.add(os.readlink(fd))
        except OSError:  # gone meanwhile, or another user's
            continue
    return held


def _newest_change(directory: Path) -> float:
    return max((p.stat().st_mtime for p in directory.iterdir() if p.is_file()), default=0.0)


def check(root: Path | None = None, quiet_s: float = QUIET_S, poll_s: float = 2.0) -> None:
    """Return once no op's lock in the extension cache this process builds into is left over (none, or a
    build holds it); raise ``StaleBuildLock`` naming the file otherwise. Waits (saying so) while an unheld
    lock's build directory still changes: then another host may be building. Other caches under the
    same root (other environments') are not this run's business."""
    root = root or extensions_root()
    locks = [p for p in root.glob("*/lock") if p.is_file()] if root.is_dir() else []
    for lock in locks:
        warned = False
        while True:
            held = open_paths()
            if not lock.exists():
                break
            if held is not None and str(lock.resolve()) in held:
                log.warning("DeepSpeed's op is being built in %s by another process; waiting for its lock %s",
                            lock.parent, lock)
                break
            quiet = time.time() - _newest_change(lock.parent)
            if quiet > quiet_s:
                raise StaleBuildLock(
                    f"stale build lock {lock}: no process on this host holds it and nothing in {lock.parent} changed "
                    f"for {quiet:.0f} s, so a process was killed while building DeepSpeed's op there, and every start "
                    f"would wait for it forever. Remove it (`rm {lock}`; the next start rebuilds the op in about a "
                    "minute)")
            if not warned:
                log.warning("build lock %s is held by no process on this host; waiting while %s still changes (another "
                            "host building?), at most %.0f s more", lock, lock.parent, quiet_s - quiet)
                warned = True
            time.sleep(poll_s)
