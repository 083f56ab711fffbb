"""A test-only plugin (``train.plugins=[tests.plugin_record]`` with ``SIFT_RECORD=<file>``): records what a
one-process `sift train` back-propagated and its weights at every optimizer step, so that a test can replay
the run in another loop (tests/e2e/test_hf_parity.py). Through the loop's hooks only (engine/hooks.py).

The file, rewritten at every checkpoint: ``{"kept": [(draw, [sample ids])], "weights": {step: state}}``,
``kept`` one entry per training forward, ``weights[s]`` the model's state after s optimizer steps.
"""

from __future__ import annotations

import os

import torch

from engine import hooks

_record: dict = {"kept": [], "weights": {}}
_seen: dict = {}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _kept(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    if module.training:  # the training forward (the evaluator's runs in eval mode)
        _record["kept"].append((_seen["draw"], kwargs["sample_ids"].tolist()))


def _start(step: int, draw: int, model: torch.nn.Module, **_) -> None:
    if "model" not in _seen:
        _seen["model"] = model
        model.register_forward_pre_hook(_kept, with_kwargs=True)
    _seen["draw"] = draw
    _record["weights"].setdefault(step, _state(model))  # the first micro-step of a window: before its step


def _saved(step: int, **_) -> None:
    _record["weights"][step] = _state(_seen["model"])
    torch.save(_record, os.environ["SIFT_RECORD"])


hooks.on("micro_step_start", _start)
hooks.on("checkpoint_complete", _saved)
