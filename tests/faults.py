"""Test-only fault injection, installed as a plugin: ``train.plugins=[tests.faults]`` with
``SIFT_FAULT=<point>:<step>`` in the environment.

Points: ``during_save`` (SIGKILL after DeepSpeed's files of the checkpoint at that step are written,
before it is complete), ``after_save`` (SIGKILL right after it is complete), ``poison_weights`` (from
that step on, every loss is NaN: the diverged-run path), ``sigterm`` (SIGTERM to itself before that step's
first micro-step, and again while each later checkpoint is written: a second signal during the save; only
rank ``SIFT_FAULT_RANK`` when set),
``enospc`` (the checkpoint of that step meets a full disk: each ``torch.save`` into it writes a few bytes,
then fails with ENOSPC, as a write to a full file system does).
"""

from __future__ import annotations

import errno
import os
import signal

import torch

from engine import hooks

POINT, _, STEP = os.environ.get("SIFT_FAULT", "").partition(":")


def _at(point: str, step: int) -> bool:
    return point == POINT and str(step) == STEP


def _kill(point: str):
    def hook(step: int, **_) -> None:
        if _at(point, step):
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def _poison(step: int, model: torch.nn.Module, **_) -> None:
    if _at("poison_weights", step):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))


_signalled = []


def _sigterm(step: int, **_) -> None:
    mine = os.environ.get("SIFT_FAULT_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")
    if _at("sigterm", step) and mine and not _signalled:
        _signalled.append(step)
        os.kill(os.getpid(), signal.SIGTERM)


def _sigterm_again(**_) -> None:
    if _signalled:
        os.kill(os.getpid(), signal.SIGTERM)


_save = torch.save


def _full_disk_save(obj, f, *args, **kwargs):
    name = str(getattr(f, "name", f))
    if POINT == "enospc" and f"step{int(STEP):08d}" in name:
        with open(name, "ab") as out:
            out.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    return _save(obj, f, *args, **kwargs)


torch.save = _full_disk_save
hooks.on("checkpoint_files_written", _kill("during_save"))
hooks.on("checkpoint_files_written", _sigterm_again)
hooks.on("micro_step_start", _sigterm)
hooks.on("checkpoint_complete", _kill("after_save"))
hooks.on("micro_step_start", _poison)
