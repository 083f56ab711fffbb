"""Checkpoints: DeepSpeed's files plus our state, complete-or-invisible, and verified before loading.

Layout under ``<out_dir>/checkpoints/``::

    step00000100/             DeepSpeed's model / ZeRO optimizer / scheduler files
        sift_rank00000.pt     per rank: torch RNG states (dropout), pending pipelined scores
        sift_state.json       written last by rank 0: counters, config, and a manifest of every
                              file with its size and SHA-256 -- the marker that the checkpoint is complete
    latest                    the newest complete tag, replaced atomically after sift_state.json
    diverged-step00000140/    the state a run aborted in (non-finite losses): same files, never
                              resumed, never ``latest``, never counted or pruned by ``keep_last``

A checkpoint killed mid-write has no sift_state.json (or files whose sizes disagree with it) and is
never picked as latest, whatever the ``latest`` file says. A checkpoint whose files no longer match
their SHA-256 is *corrupt*: ``find_latest`` skips it the same way, with a warning naming the file.

Trust: DeepSpeed loads its own files with ``torch.load(weights_only=False)`` (a pickle can run code),
so ``verify`` hashes every file against the manifest first; our per-rank files hold tensors only and
load with ``weights_only=True``. The manifest itself is not signed: resume and export only run
directories you trust, as with any pickle.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sift_common.atomic import atomic_write_text
from sift_common.errors import SiftError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""2: the manifest records size and SHA-256 of every file. 1 (sizes only) still resumes, with a warning."""
READABLE_VERSIONS = (1, 2)
STATE_FILE = "sift_state.json"
LATEST = "latest"
HASH = "sha256"
"""SHA-256, as the shards use: about 1.6 GB/s per core where the CPU has SHA instructions (recent x86,
Graviton), 0.4 GB/s where it has not (p4d's Cascade Lake, where BLAKE2b would do 0.74 GB/s): see
benchmarks/probes/integrity.py. The manifest names the algorithm per file, so it can change without a new format."""
DIVERGED_PREFIX = "diverged-"
_TAG = re.compile(r"^step(\d{8,})$")
_CHUNK = 8 << 20
_RANK_KEYS = {"torch_rng", "cuda_rng", "pending_scores"}


class CheckpointError(SiftError, RuntimeError):
    pass


class CorruptCheckpoint(CheckpointError):
    """A complete checkpoint whose content no longer matches its manifest."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def diverged_tag(step: int) -> str:
    """Where an aborted run saves the state it diverged in: a name ``find_latest`` never picks."""
    return DIVERGED_PREFIX + tag_for(step)


def rank_file(rank: int) -> str:
    return f"sift_rank{rank:05d}.pt"


def save_rank_state(root: Path, tag: str, rank: int, state: dict[str, Any]) -> None:
    """This rank's state: ``torch_rng`` (uint8 tensor), ``cuda_rng`` (uint8 tensor or None) and
    ``pending_scores`` ((G,) float tensor or None). Tensors and None only, so that it loads with
    ``weights_only=True``; written to a temporary name, fsynced, then renamed."""
    path = root / tag / rank_file(rank)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_rank_state(root: Path, tag: str, rank: int) -> dict[str, Any] | None:
    """The dict ``save_rank_state`` wrote, or None when this rank has none (a larger world size).

    Loaded with ``weights_only=True``: a file holding anything but tensors, None and plain containers
    (e.g. a pickle whose objects would run code) is refused with a ``CheckpointError``.
    """
    path = root / tag / rank_file(rank)
    if not path.is_file():
        return None  # resumed at a larger world size: this rank starts fresh RNG streams
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"checkpoint file {path} holds more than tensors (refused to unpickle it: {first}); it was "
            "not written by SIFT-Train, or was altered"
        ) from None
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {e.__class__.__name__}: {e}") from None
    if not isinstance(state, dict) or not state.keys() >= _RANK_KEYS or not isinstance(state["torch_rng"], torch.Tensor):
        raise CheckpointError(f"checkpoint file {path} is not a SIFT-Train rank state (keys {sorted(_RANK_KEYS)})")
    return state


# ---------------------------------------------------------------------------------------------- hashing


def file_digest(path: Path) -> str:
    """Hex SHA-256 of a file, streamed in 8 MiB blocks (hashlib releases the GIL: threads run in parallel)."""
    h = hashlib.new(HASH)
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _digests(paths: list[Path], threads: int | None = None) -> list[str]:
    if len(paths) <= 1:
        return [file_digest(p) for p in paths]
    threads = threads or min(len(paths), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4, 8)
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(file_digest, paths))


# ---------------------------------------------------------------------------------------------- writing


def mark_complete(root: Path, tag: str, state: dict[str, Any], keep_last: int) -> None:
    """Rank 0, after every rank has written its files: manifest + state, then the pointer, then pruning.

    A diverged tag (``diverged_tag``) gets its manifest only: no pointer, no pruning.
    """
    tag_dir = root / tag
    files = [p for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != STATE_FILE]
    digests = _digests(files)
    manifest = {
        str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, HASH: d} for p, d in zip(files, digests, strict=True)
    }
    record = {"format_version": FORMAT_VERSION, "tag": tag, "files": manifest, **state}
    atomic_write_text(tag_dir / STATE_FILE, json.dumps(record, indent=1))
    if not _TAG.match(tag):
        return
    atomic_write_text(root / LATEST, tag + "\n")
    # keep_last counts this checkpoint and older ones: tags after it were skipped by the resume that led
    # here (incomplete or corrupt) and are overwritten when this run reaches their step
    complete = [t for t in complete_tags(root) if _step(t) <= _step(tag)]
    for old in complete[:-keep_last]:
        shutil.rmtree(root / old, ignore_errors=True)
    for stale in _all_tags(root):  # incomplete leftovers older than the newest complete one
        if stale not in complete_tags(root) and _step(stale) < _step(tag):
            shutil.rmtree(root / stale, ignore_errors=True)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def kept(root: Path) -> str:
    """Where a resume would start, in a sentence (for messages)."""
    good = last_good(root)
    return (f"The last complete checkpoint, {root / good}, is intact (a resume starts there)." if good else
            "There is no complete checkpoint yet (a resume starts from scratch).")


def save_failure(root: Path, tag: str, error: BaseException | None) -> str:
    """The message of a failed save: its cause (a full disk named as such), the free space, what is kept."""
    chain, e = [], error
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    full = any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in chain) or any(
        s in str(x) for x in chain for s in ("No space left", "unexpected pos"))  # torch.save's short write
    if error is None:
        cause = "it failed on another rank (see that rank's message)"
    elif full:
        cause = "no space left on device"
    else:
        cause = f"{error.__class__.__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return (f"saving checkpoint {root / tag} failed: {cause} ({free_bytes(root)} bytes free on the file system of "
            f"{root}); its partial files were removed. {kept(root)} Free space (or move train.out_dir) and run the "
            "same command again.")


def size_of(root: Path, tag: str) -> int:
    """Bytes of a complete checkpoint's files, from its manifest."""
    _, manifest = _record(root, tag)
    return sum(int(v["bytes"]) for v in manifest.values()) + (root / tag / STATE_FILE).stat().st_size


# ---------------------------------------------------------------------------------------------- reading


def _step(tag: str) -> int:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else -1


def _all_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)), key=_step)


def _record(root: Path, tag: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The state record and its manifest as {name: {"bytes": n, "sha256": hex or absent}}; checks that
    the checkpoint is complete (every file present, at its recorded size) without reading the files."""
    tag_dir = root / tag
    state_path = tag_dir / STATE_FILE
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {tag_dir} does not exist")
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: no {STATE_FILE} (interrupted while saving?)")
    try:
        record = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {state_path} is unreadable: {e}") from None
    version = record.get("format_version") if isinstance(record, dict) else None
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {state_path} has format version {version}; this SIFT-Train reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    files = record.get("files", {})
    manifest = {n: {"bytes": v} if version == 1 else v for n, v in files.items()} if isinstance(files, dict) else None
    if manifest is None or not all(isinstance(v, dict) for v in manifest.values()):
        raise CheckpointError(f"checkpoint {state_path} has a malformed file list")
    for name, entry in manifest.items():
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} is missing {name}")
        if f.stat().st_size != entry.get("bytes"):
            raise CheckpointError(
                f"checkpoint file {f} has {f.stat().st_size} bytes, the manifest says {entry.get('bytes')} "
                "(truncated or altered)"
            )
    return record, manifest


# Checkpoints already hashed by this process, keyed on (size, mtime) of each file: find_latest and the
# loop's verify then read the files once, not twice.
_VERIFIED: dict[Path, tuple[tuple[Any, ...], dict[str, Any]]] = {}


def verify(root: Path, tag: str) -> dict[str, Any]:
    """The checkpoint's state record once every file is present, at its size, with its SHA-256.

    Raises ``CheckpointError`` naming the problem: ``CorruptCheckpoint`` when a file's content does not
    match the manifest. Call it before anything loads the files (DeepSpeed unpickles them).
    """
    record, manifest = _record(root, tag)
    tag_dir = root / tag
    names = sorted(manifest)
    key = tuple((n, (s := (tag_dir / n).stat()).st_size, s.st_mtime_ns) for n in [*names, STATE_FILE])
    cached = _VERIFIED.get(tag_dir)
    if cached is not None and cached[0] == key:
        return cached[1]
    if record["format_version"] == 1:
        log.warning("checkpoint %s has format version 1: its manifest carries no hashes, so corrupted "
                    "content cannot be detected (sizes are checked)", tag_dir)
    hashed = [n for n in names if HASH in manifest[n]]
    for name, digest in zip(hashed, _digests([tag_dir / n for n in hashed]), strict=True):
        if digest != manifest[name][HASH]:
            raise CorruptCheckpoint(
                f"checkpoint {tag_dir} is corrupt: {name} does not match its SHA-256 in {STATE_FILE} "
                "(altered or damaged on disk)"
            )
    _VERIFIED[tag_dir] = (key, record)
    return record


def complete_tags(root: Path) -> list[str]:
    """Tags with a complete manifest and every file at its size (content not hashed), oldest first."""
    out = []
    for tag in _all_tags(root):
        try:
            _record(root, tag)
        except CheckpointError:
            continue
        out.append(tag)
    return out


def find_latest(root: Path) -> str | None:
    """The newest complete, intact checkpoint: the ``latest`` pointer if it names one, else a scan.

    Every candidate is verified (``verify``: sizes and SHA-256); an incomplete or corrupt one is skipped
    with a warning saying which. None when there is nothing to resume (or only interrupted saves);
    CheckpointError when the checkpoints that were once complete are all damaged.
    """
    pointer = root / LATEST
    tried = set()
    if pointer.is_file():
        tag = pointer.read_text().strip()
        tried.add(tag)
        if not (root / tag).is_dir():
            log.warning("%s names %s, which does not exist under %s; looking for another complete checkpoint",
                        pointer, tag, root)
        else:
            try:
                verify(root, tag)
                return tag
            except CheckpointError as e:
                log.warning("%s; looking for an older complete checkpoint", e)
    for tag in reversed(complete_tags(root)):
        if tag in tried:
            continue
        try:
            verify(root, tag)
            return tag
        except CheckpointError as e:
            log.warning("%s; looking for an older complete checkpoint", e)
    damaged = [t for t in _all_tags(root) if (root / t / STATE_FILE).is_file()]
    if damaged:  # once complete, now unreadable: refuse to silently start over
        try:
            verify(root, damaged[-1])
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}; no other complete checkpoint under {root}. Restore it, or move {root} away to start over"
            ) from None
    return None


def last_good(root: Path) -> str | None:
    """The checkpoint a resume would start from (``find_latest``), or None; never raises (for messages)."""
    try:
        return find_latest(root)
    except CheckpointError:
        return None
