"""The one exception type for problems a user can cause with their data, paths or options.

Every message says *what* is wrong and *where* (file, line, shard, option) and, where it helps, how
to fix it. ``sift prepare`` prints it as ``sift prepare: error: ...`` and exits with status 2;
library callers (the engine) can catch it as a ``ValueError``.
"""

from __future__ import annotations

from sift_common.errors import SiftError


class DataError(SiftError, ValueError):
    """Bad input data, a bad or incomplete dataset directory, or options that do not fit the data."""
