"""The one root of every error a user can cause, and its exit status.

Library code raises a ``SiftError`` subclass whose message says what is wrong, where, and how to fix it;
the entry points catch it once (``run_command``: the `sift` command in launcher/cli.py, and the few
modules that also run as scripts), print ``sift <command>: error: <message>`` and exit with
``exit_code``. Nothing below them calls ``SystemExit``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class SiftError(Exception):
    """A problem the user can fix (config, paths, data, versions, a diverged run)."""

    exit_code: int = 2


def run_command(prog: str, main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run an entry point's ``main(argv)``; a ``SiftError`` becomes one line on stderr and its exit status."""
    try:
        return int(main(argv) or 0)
    except SiftError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
