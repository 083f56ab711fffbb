"""Training methods by name (``method`` in the run config): ``none`` (vanilla), ``sift``, ``vcas``, and
combinations joined with ``+`` (``sift+vcas``). A plugin (``train.plugins``) may register more."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.methods.base import Method, MethodStack, MicroContext, RunContext, TrainShape
from engine.methods.registry import METHODS, method_names
from engine.methods.sift import Sift
from engine.methods.vcas import Vcas

if TYPE_CHECKING:
    from engine.config import RunConfig

METHODS.update(sift=Sift, vcas=Vcas)

__all__ = ["METHODS", "Method", "MethodStack", "MicroContext", "RunContext", "TrainShape", "build_methods",
           "method_names"]


def build_methods(cfg: RunConfig) -> MethodStack:
    return MethodStack([METHODS[name](cfg) for name in method_names(cfg.effective_method)],
                       cfg.train.micro_batch_size)
