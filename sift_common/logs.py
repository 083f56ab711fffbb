"""One logging set-up for every `sift` command."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_NAME = "sift"
OURS = frozenset({"sift", "bench", "engine", "data_pipeline", "launcher", "benchmarks", "study"})
"""Top-level logger names of this project: their INFO lines are shown. Other libraries' are not
(matplotlib announces its font cache, DeepSpeed and torch their set-up); their warnings are."""


class _Handler(logging.StreamHandler):
    """Writes through tqdm, which clears a progress bar on the terminal first and redraws it after, so
    the bar never overwrites the start of a log line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def _ours_or_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.partition(".")[0] in OURS


def setup_logging(level: int | str = logging.INFO, *, rank: int = 0) -> None:
    """Timestamped lines on stderr; ranks other than 0 log warnings and errors only.

    Idempotent: one handler of ours on the root logger however many commands run in a process (`sift
    demo` runs prepare, then train); handlers others installed (pytest's log capture) stay.
    """
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    root = logging.getLogger()
    if not any(h.get_name() == _NAME for h in root.handlers):
        handler = _Handler(sys.stderr)
        handler.set_name(_NAME)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_ours_or_warning)
        root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(logging.WARNING, level))
