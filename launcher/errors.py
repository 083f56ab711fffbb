"""The one error type launcher code raises for problems a user can fix."""

from __future__ import annotations

from sift_common.errors import SiftError


class LaunchError(SiftError, ValueError):
    """A launch problem the user can fix: the message says what, where, and how.

    A ValueError so callers that already guard config errors catch it too; `sift launch` turns it
    into `sift launch: error: ...` and exit status 2 instead of a traceback.
    """
