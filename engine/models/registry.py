"""The family table: ``model.family`` name -> the module that implements it (engine/models/__init__.py).

A leaf, so that the run config checks a family name without importing the models that name its config.
A plugin adds a family by adding an entry (``engine.models.FAMILIES`` is this same dict).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from engine.models.errors import ModelError

FAMILIES: dict[str, str] = {"bert": "engine.models.bert", "gpt2": "engine.models.gpt2", "llama": "engine.models.llama"}


def family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ModelError(f"model.family {name!r} is not one of {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
