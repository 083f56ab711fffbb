"""Test-only fault injection, installed as a plugin: ``train.plugins=[tests.faults]`` with
``SIFT_FAULT=<point>:<step>`` in the environment.

Points: ``during_save`` (SIGKILL after DeepSpeed's files of the checkpoint at that step are written,
before it is complete), ``after_save`` (SIGKILL right after it is complete), ``poison_weights`` (from
that step on, every loss is NaN: the diverged-run path).
"""

from __future__ import annotations

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


hooks.on("checkpoint_files_written", _kill("during_save"))
hooks.on("checkpoint_complete", _kill("after_save"))
hooks.on("micro_step_start", _poison)
