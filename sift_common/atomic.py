"""Write a small text file so that readers see the old content or the new one, never a part."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Temporary file in the same directory, fsync, rename over ``path``, fsync the directory (so the
    rename itself survives a crash)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write that appears at ``path`` only once the block completes (temporary file in
    the same directory, fsync, rename, fsync the directory); an exception removes it and leaves ``path``
    as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames in directory ``path`` survive a crash (where the filesystem supports it)."""
    with contextlib.suppress(OSError):  # some filesystems cannot open or fsync a directory
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
