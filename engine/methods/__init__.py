"""Training methods by name (``method`` in the run config): ``none`` (vanilla), ``sift``, ``vcas``, and
combinations joined with ``+`` (``sift+vcas``). A plugin (``train.plugins``) may register more."""

from __future__ import annotations

from collections.abc import Callable

from engine.config import RunConfig
from engine.methods.base import Method, MethodStack, MicroContext, RunContext
from engine.methods.sift import Sift
from engine.methods.vcas import Vcas

METHODS: dict[str, Callable[[RunConfig], Method]] = {"sift": Sift, "vcas": Vcas}
"""Name -> factory taking the run config."""

__all__ = ["METHODS", "Method", "MethodStack", "MicroContext", "RunContext", "build_methods", "method_names"]


def method_names(spec: str) -> list[str]:
    """``"sift+vcas"`` -> ``["sift", "vcas"]``; ``"none"`` -> ``[]``."""
    return [] if spec == "none" else [n.strip() for n in spec.split("+")]


def build_methods(cfg: RunConfig) -> MethodStack:
    return MethodStack([METHODS[name](cfg) for name in method_names(cfg.effective_method)],
                       cfg.train.micro_batch_size)
