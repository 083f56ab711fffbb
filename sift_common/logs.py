"""One logging set-up for every `sift` command."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_NAME = "sift"


def setup_logging(level: int | str = logging.INFO, *, rank: int = 0) -> None:
    """Timestamped lines on stderr; ranks other than 0 log warnings and errors only.

    Idempotent: one handler of ours on the root logger however many commands run in a process (`sift
    demo` runs prepare, then train); handlers others installed (pytest's log capture) stay.
    """
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    root = logging.getLogger()
    if not any(h.get_name() == _NAME for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_NAME)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(logging.WARNING, level))
