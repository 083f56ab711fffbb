"""The one root of every error a user can cause, and its exit status.

Library code raises a ``SiftError`` subclass whose message says what is wrong, where, and how to fix it;
the `sift` entry points (launcher/cli.py, launcher/train.py) catch it once, print
``sift <command>: error: <message>`` and exit with ``exit_code``. Nothing below them calls ``SystemExit``.
"""

from __future__ import annotations


class SiftError(Exception):
    """A problem the user can fix (config, paths, data, versions, a diverged run)."""

    exit_code: int = 2
