"""Test-only plugin for the multinode tests (``train.plugins=[tests.multinode.probe]``).

With ``SIFT_PROBE_DIR`` set, every rank writes ``rank<R>.json`` there when it imports this: its
addresses, the master it was given and the settings that had to reach it, so a test can see where each
rank ran and what its launcher delivered. With ``SIFT_PAUSE_AT=<event>:<step>`` (a checkpoint event of
engine/hooks.py) every rank, when the loop fires that event at that step, writes ``paused-rank<R>`` and
waits (at most 120 s) for a file ``release`` in the probe directory: the test loses a host meanwhile, at a
known point of the run (``checkpoint_complete:3``: after the step-3 checkpoint; ``checkpoint_files_written:6``:
in the middle of the step-6 save, DeepSpeed's files written and the manifest that completes it not).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from engine import hooks
from launcher.dist_env import _interface_addresses

DIR = os.environ.get("SIFT_PROBE_DIR")
RANK = os.environ.get("RANK", "0")
REPORTED = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR", "FI_EFA_USE_HUGE_PAGE",
            "NCCL_SOCKET_IFNAME")

if DIR:
    Path(DIR, f"rank{RANK}.json").write_text(json.dumps({
        "rank": int(RANK), "addrs": [a for _, a in _interface_addresses() if not a.startswith("127.")],
        "env": {k: os.environ.get(k) for k in REPORTED}}))


def _pause(event: str, step: int) -> None:
    if DIR and f"{event}:{step}" == os.environ.get("SIFT_PAUSE_AT"):
        Path(DIR, f"paused-rank{RANK}").touch()
        deadline = time.monotonic() + 120
        while not Path(DIR, "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


for _event in ("checkpoint_files_written", "checkpoint_complete"):
    hooks.on(_event, lambda step, _event=_event, **_: _pause(_event, step))
