"""One logging set-up for every `sift` command."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int | str = logging.INFO, *, rank: int = 0) -> None:
    """Timestamped lines on stderr; ranks other than 0 log warnings and errors only.

    Replaces handlers an earlier command in the same process installed (`sift demo` runs prepare, then
    train), so every command gets the same format.
    """
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    logging.basicConfig(level=level if rank == 0 else max(logging.WARNING, level), format=FORMAT, force=True)
