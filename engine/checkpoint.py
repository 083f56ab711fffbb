"""Checkpoints: DeepSpeed's files plus our state, complete-or-invisible.

Layout under ``<out_dir>/checkpoints/``::

    step00000100/             DeepSpeed's model / ZeRO optimizer / scheduler files
        sift_rank00000.pt     per rank: torch RNG states (dropout), pending pipelined scores
        sift_state.json       written last by rank 0: counters, config, and a manifest of every
                              file with its size -- the marker that the checkpoint is complete
    latest                    the newest complete tag, replaced atomically after sift_state.json

A checkpoint killed mid-write has no sift_state.json (or files whose sizes disagree with it) and is
never picked as latest, whatever the ``latest`` file says.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from sift_common.atomic import atomic_write_text
from sift_common.errors import SiftError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "sift_state.json"
LATEST = "latest"
_TAG = re.compile(r"^step(\d{8,})$")


class CheckpointError(SiftError, RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_file(rank: int) -> str:
    return f"sift_rank{rank:05d}.pt"


def save_rank_state(root: Path, tag: str, rank: int, state: dict[str, Any]) -> None:
    path = root / tag / rank_file(rank)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def mark_complete(root: Path, tag: str, state: dict[str, Any], keep_last: int) -> None:
    """Rank 0, after every rank has written its files: manifest + state, then the pointer, then pruning."""
    tag_dir = root / tag
    manifest = {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != STATE_FILE
    }
    record = {"format_version": FORMAT_VERSION, "tag": tag, "files": manifest, **state}
    atomic_write_text(tag_dir / STATE_FILE, json.dumps(record, indent=1))
    atomic_write_text(root / LATEST, tag + "\n")
    for old in complete_tags(root)[:-keep_last]:
        shutil.rmtree(root / old, ignore_errors=True)
    for stale in _all_tags(root):  # incomplete leftovers older than the newest complete one
        if stale not in complete_tags(root) and _step(stale) < _step(tag):
            shutil.rmtree(root / stale, ignore_errors=True)


def _step(tag: str) -> int:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else -1


def _all_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)), key=_step)


def verify(root: Path, tag: str) -> dict[str, Any]:
    """The checkpoint's state record if it is complete; CheckpointError naming the problem otherwise."""
    tag_dir = root / tag
    state_path = tag_dir / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: no {STATE_FILE} (interrupted while saving?)")
    try:
        record = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {state_path} is unreadable: {e}") from None
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {state_path} has format version {version}; this SIFT-Train reads {FORMAT_VERSION}"
        )
    for name, size in record.get("files", {}).items():
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} is missing {name}")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint file {f} has {f.stat().st_size} bytes, the manifest says {size} (truncated or altered)"
            )
    return record


def complete_tags(root: Path) -> list[str]:
    out = []
    for tag in _all_tags(root):
        try:
            verify(root, tag)
        except CheckpointError:
            continue
        out.append(tag)
    return out


def find_latest(root: Path) -> str | None:
    """The newest complete checkpoint: the ``latest`` pointer if it names a complete one, else a scan.

    None when there is nothing to resume (or only interrupted saves); CheckpointError when the only
    checkpoints that were once complete are now damaged.
    """
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        try:
            verify(root, tag)
            return tag
        except CheckpointError as e:
            log.warning("%s; looking for an older complete checkpoint", e)
    tags = complete_tags(root)
    if tags:
        return tags[-1]
    damaged = [t for t in _all_tags(root) if (root / t / STATE_FILE).is_file()]
    if damaged:  # once complete, now unreadable: refuse to silently start over
        try:
            verify(root, damaged[-1])
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}; no other complete checkpoint under {root}. Restore it, or move {root} away to start over"
            ) from None
    return None


def load_rank_state(root: Path, tag: str, rank: int) -> dict[str, Any] | None:
    path = root / tag / rank_file(rank)
    if not path.is_file():
        return None  # resumed at a larger world size: this rank starts fresh RNG streams
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {e.__class__.__name__}: {e}") from None
