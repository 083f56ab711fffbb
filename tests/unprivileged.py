"""Run a command that obeys file permissions, for tests of permission problems.

Root ignores file modes, so as root the child drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its
capability bounding set before it starts: it stays uid 0, the owner of the test's files, but a directory
with mode 0555 is then read-only to it, as a root-owned directory is to the image's uid 1000. Anyone else
runs the command as themselves, to whom file modes apply anyway.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.common import REPO, base_env

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _obey_file_modes() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_unprivileged(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None,
                     timeout: float = 120) -> subprocess.CompletedProcess:
    """``argv`` (cwd ``cwd``) for which file modes hold; skips the test where that cannot be arranged."""
    run_env = base_env(env)
    kwargs = {"preexec_fn": _obey_file_modes} if os.geteuid() == 0 else {}
    check = "import os, tempfile; d = tempfile.mkdtemp(); os.chmod(d, 0o555); open(os.path.join(d, 'x'), 'w')"
    try:
        probe = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=run_env, capture_output=True, text=True,
                               timeout=60, **kwargs)
        problem = None if "PermissionError" in probe.stderr else f"a 0555 directory was writable: {probe.stderr[-200:]}"
    except (OSError, subprocess.SubprocessError) as e:  # e.g. no CAP_SETPCAP in this container
        problem = str(e)
    if problem is not None:
        pytest.skip(f"cannot run a command that obeys file modes here: {problem}")
    return subprocess.run(argv, cwd=cwd, env=run_env, capture_output=True, text=True, timeout=timeout, **kwargs)
