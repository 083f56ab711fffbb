"""One run per output directory: its identity, checked at every start, and a lock held while it runs.

``<out_dir>/run.json`` records what a run is: the resolved config, the data's index hash, the tokenizer
hash, the world size and the code version. The first start writes it; every later start (a resume)
compares. ``MUTABLE`` keys are applied and logged; any other difference is refused with one message
that lists them all and the ways forward: ``--allow-change KEY`` (applied and recorded in the file's
``changes``; ``FIXED`` keys cannot change within a run at all), a new ``train.out_dir``, or
``sift train --branch-from CHECKPOINT`` to start a new run from a checkpoint on purpose.

``<out_dir>/run.lock`` is an advisory lock (``fcntl.flock``) held by rank 0 for the life of the run; the
kernel drops it when the process ends, however it ends (kill -9 included). It holds the holder's pid
and host, for the message a second run gets. Across hosts it holds where the file system supports
``flock`` (local disks, NFSv4, Lustre mounted with ``-o flock``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from engine import checkpoint as ckpt
from sift_common.atomic import atomic_write_text
from sift_common.errors import SiftError

log = logging.getLogger(__name__)

IDENTITY_FILE = "run.json"
LOCK_FILE = "run.lock"

MUTABLE = ("train.eval_every", "train.save_every", "train.keep_last", "train.log_every", "train.progress",
           "train.tensorboard", "train.plugins", "train.resume", "train.stop_signals", "train.check_free_space",
           "train.time_budget_s", "train.collective_timeout_s",
           "train.out_dir", "data.path", "data.num_workers", "data.pin_memory", "data.verify_checksums",
           "data.extra_eval", "deepspeed.dist_backend", "world_size", "code_version")
"""Keys a resume may change without asking (cadence, logging, where the data lives, runtime knobs; the
sampler continues at any world size and engine/reshard.py loads ZeRO checkpoints at another). Also
``train.steps`` when ``optim.schedule_steps`` fixes the schedule's horizon: the schedule is then the same."""

FIXED = ("model.", "train.micro_batch_size", "deepspeed.config", "deepspeed.zero_stage", "deepspeed.precision",
         "optim.betas", "optim.eps", "optim.weight_decay", "data.tokenizer_sha256")
"""Keys (or prefixes) a checkpoint cannot take another value of: the weights' shapes, the optimizer's
saved state, the pipelined scores' size. Changing them needs a new run."""


ALLOWED = "(--allow-change)"
"""Marks an applied change that the command asked for (a change of what is trained)."""


class RunIdentityError(SiftError):
    pass


class OutDirBusy(SiftError):
    def __init__(self, message: str, holder: str = "unknown"):
        super().__init__(message)
        self.holder = holder  # "pid N on host H, since ..."


# ---------------------------------------------------------------------------------------------- identity


def code_version() -> str:
    """The package version, and the git commit when running from a clone (``+dirty`` with local edits)."""
    try:
        version = metadata.version("sift-train")
    except metadata.PackageNotFoundError:
        version = "unknown"
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return version
    if head.returncode != 0:
        return version
    return f"{version} {head.stdout.strip()}{'+dirty' if dirty.stdout.strip() else ''}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "extra_eval":
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def identity(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What this run is: its config, its data and tokenizer hashes, its world size and code version."""
    index = Path(config["data"]["path"]) / "index.json"
    try:
        raw = index.read_bytes()
        tokenizer = json.loads(raw).get("tokenizer_sha256", "")
    except (OSError, ValueError):
        raw, tokenizer = b"", ""  # opening the data reports it, with its own message
    return {"config": config, "data": {"index_sha256": hashlib.sha256(raw).hexdigest(), "tokenizer_sha256": tokenizer},
            "world_size": world_size, "code_version": code_version()}


def _flat(ident: dict[str, Any]) -> dict[str, Any]:
    return {**flatten(ident.get("config", {})), **{f"data.{k}": v for k, v in ident.get("data", {}).items()},
            "world_size": ident.get("world_size"), "code_version": ident.get("code_version")}


def _is(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in names)


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (recorded, now) for every key that differs; keys one side lacks (an older record) are skipped."""
    a, b = _flat(old), _flat(new)
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


def judge(diff: dict[str, tuple[Any, Any]], new: dict[str, Any], allowed: set[str]) -> tuple[list[str], list[str]]:
    """(applied, refused) lines for each difference."""
    horizon = new["config"]["optim"]["schedule_steps"]
    applied, refused = [], []
    for key, (was, now) in diff.items():
        line = f"{key}: {was!r} -> {now!r}"
        same_schedule = key == "train.steps" and horizon is not None and "optim.schedule_steps" not in diff
        if same_schedule or _is(key, MUTABLE):
            applied.append(line)
        elif _is(key, FIXED):
            refused.append(f"{line} (cannot change within a run: the checkpoint's tensors or optimizer state "
                           "depend on it)")
        elif key in allowed:
            applied.append(f"{line} {ALLOWED}")
        elif key == "train.steps":
            refused.append(f"{line} (the learning-rate schedule's horizon is train.steps, so the rest of the "
                           f"schedule would be re-stretched: set optim.schedule_steps to the horizon the run should "
                           f"follow, from its start, or --allow-change train.steps)")
        else:
            refused.append(f"{line} (--allow-change {key} to apply it from the resumed step on)")
    return applied, refused


def refusal(out_dir: Path, refused: list[str]) -> str:
    return (f"train.out_dir {out_dir} holds a run whose settings differ from this one's ({out_dir / IDENTITY_FILE}):\n"
            + "".join(f"  {line}\n" for line in refused)
            + "Ways forward: resume with the recorded settings; --allow-change KEY (repeatable) where offered, to "
              "continue this run with the new values; a new train.out_dir for a new run; or `sift train "
              f"--branch-from {out_dir / 'checkpoints'}/<tag> train.out_dir=NEW ...` to start a new run from one "
              "of its checkpoints (e.g. a continuation with another method or seed).")


def legacy_identity(root: Path) -> dict[str, Any] | None:
    """For an out_dir written before run.json existed: the config and world size its newest checkpoint records."""
    tag = ckpt.last_good(root)
    if tag is None:
        return None
    record = json.loads((root / tag / ckpt.STATE_FILE).read_text())
    return {"config": record.get("config", {}), "world_size": record.get("world_size")}


def check(out_dir: Path, ident: dict[str, Any], allowed: set[str]) -> list[str]:
    """Compare ``ident`` with the run recorded in ``out_dir`` and record it; returns the applied changes
    (for the log) or raises RunIdentityError listing every refused one. Rank 0 only."""
    unknown = sorted(allowed - _flat(ident).keys())
    if unknown:
        raise RunIdentityError(f"--allow-change {', '.join(unknown)}: not a config key (e.g. optim.lr, train.seed)")
    path = out_dir / IDENTITY_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else None
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if recorded is None or "config" not in recorded:  # a first start, or the first of a branch
        old = legacy_identity(out_dir / "checkpoints") if recorded is None else None
        base = {"branched_from": recorded.get("branched_from")} if recorded else {}
        if old is None:
            atomic_write_text(path, json.dumps({**base, "created": now, **ident, "changes": []}, indent=1))
            return []
        recorded = {"created": None, **old, "changes": []}
    applied, refused = judge(differences(recorded, ident), ident, allowed)
    if refused:
        raise RunIdentityError(refusal(out_dir, refused))
    changes = recorded.get("changes", []) + ([{"at": now, "changes": applied}] if applied else [])
    atomic_write_text(path, json.dumps({**recorded, **ident, "changes": changes}, indent=1))
    return applied


def log_changes(applied: list[str]) -> None:
    """The applied changes ``check`` returns: a runtime knob's new value (``MUTABLE``: the demo's time budget
    on `sift train --config demo-cpu`, the code version after a pull) is news; an --allow-change is a
    warning, since what the run trains changed midway."""
    for line in applied:
        log.log(logging.WARNING if line.endswith(ALLOWED) else logging.INFO,
                "resumed with a changed setting (applied): %s", line)


def branch(out_dir: Path, source: Path) -> str:
    """Start ``out_dir`` as a new run from checkpoint ``source`` (a checkpoint directory, or a run
    directory: its latest): copy it, verified, and record where it came from. Returns the tag."""
    source = source.resolve()
    if (source / "checkpoints").is_dir():
        tag = ckpt.find_latest(source / "checkpoints")
        if tag is None:
            raise RunIdentityError(f"--branch-from {source}: the run holds no complete checkpoint")
        source = source / "checkpoints" / tag
    if (out_dir / IDENTITY_FILE).exists() or (out_dir / "checkpoints").exists():
        raise RunIdentityError(f"--branch-from starts a new run, but train.out_dir {out_dir} already holds one; "
                               "choose a new train.out_dir (or drop --branch-from to resume it)")
    ckpt.verify(source.parent, source.name)
    root = out_dir / "checkpoints"
    root.mkdir(parents=True)
    shutil.copytree(source, root / source.name)
    atomic_write_text(root / ckpt.LATEST, source.name + "\n")
    declare_branch(out_dir, source)
    log.info("branched %s from %s", out_dir, source)
    return source.name


def declare_branch(out_dir: Path, source: Path) -> None:
    """Mark ``out_dir``, whose checkpoints were copied from ``source``, as a new run: its first start
    records its own identity instead of comparing with the source's (the study's continuations use it)."""
    atomic_write_text(out_dir / IDENTITY_FILE, json.dumps({"branched_from": str(source)}, indent=1))


# ---------------------------------------------------------------------------------------------- lock


class RunLock:
    """``fcntl.flock`` on ``<out_dir>/run.lock`` until ``release`` (or the process's end)."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise OutDirBusy(f"train.out_dir {out_dir} is in use by a live run ({holder}); wait for it to end, "
                             "or give this run another train.out_dir", holder) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (removing it would race a new holder)
            self._fd = None
