"""Model families behind one adapter protocol (engine/models/base.py).

``FAMILIES`` maps a family name (``model.family`` in the run config) to the module that implements it;
modules load on first use, so reading a config imports no model code. A family module provides:

- ``build(cfg: ModelConfig, data: DataFacts) -> SiftModel``: a new model (seed the global RNG first);
- ``from_state(state, spec) -> transformers.PreTrainedModel``: the stock Hugging Face model holding a
  checkpoint's weights, for `sift export` (``spec`` is the model's ``export_config()``).

A plugin (``train.plugins``) can add a family by adding an entry here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.models.registry import FAMILIES, family

if TYPE_CHECKING:
    from engine.config import ModelConfig
    from engine.models.base import DataFacts, SiftModel

__all__ = ["FAMILIES", "build_model", "family"]


def build_model(cfg: ModelConfig, data: DataFacts) -> SiftModel:
    """A model of ``cfg.family`` sized for ``data``."""
    return family(cfg.family).build(cfg, data)
