"""A `sift train` plugin (``train.plugins=[benchmarks.step_clock]`` with ``SIFT_STEP_CLOCK=<file>``): the
wall time (``time.perf_counter``) at the end of every optimizer step, through the loop's ``step_end``
hook, written as a JSON list to the file at the run's final checkpoint. benchmarks/hf_side_by_side.py
takes the Trainer's times the same way, at its ``on_step_end`` callback.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from engine import hooks

_ends: list[float] = []


def _end(**_) -> None:
    _ends.append(time.perf_counter())


def _write(**_) -> None:
    Path(os.environ["SIFT_STEP_CLOCK"]).write_text(json.dumps(_ends))


hooks.on("step_end", _end)
hooks.on("checkpoint_complete", _write)
