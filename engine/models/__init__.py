"""Model families behind one adapter protocol (engine/models/base.py).

``FAMILIES`` maps a family name (``model.family`` in the run config) to the module that implements it;
modules load on first use, so reading a config imports no model code. A family module provides:

- ``build(cfg: ModelConfig, data: DataFacts) -> SiftModel``: a new model (seed the global RNG first);
- ``from_state(state, spec) -> transformers.PreTrainedModel``: the stock Hugging Face model holding a
  checkpoint's weights, for `sift export` (``spec`` is the model's ``export_config()``).

A plugin (``train.plugins``) can add a family by adding an entry here.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from engine.models.errors import ModelError

if TYPE_CHECKING:
    from engine.config import ModelConfig
    from engine.models.base import DataFacts, SiftModel

FAMILIES: dict[str, str] = {"bert": "engine.models.bert", "gpt2": "engine.models.gpt2", "llama": "engine.models.llama"}


def family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ModelError(f"model.family {name!r} is not one of {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def build_model(cfg: ModelConfig, data: DataFacts) -> SiftModel:
    """A model of ``cfg.family`` sized for ``data``."""
    return family(cfg.family).build(cfg, data)
