"""The method table and the one reader of a method spec (``none``, ``sift``, ``sift+vcas``, ...).

A leaf: it imports no method, so the run config can check a spec against the table (engine/methods/
__init__.py fills it, a plugin may add to it) without the methods importing the config back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

METHODS: dict[str, Callable[..., Any]] = {}
"""Name -> factory taking the run config and returning an engine.methods.Method."""


def method_names(spec: str) -> list[str]:
    """``"sift+vcas"`` -> ``["sift", "vcas"]``; ``"none"`` -> ``[]``."""
    return [] if spec == "none" else [n.strip() for n in spec.split("+")]


def selects(spec: str) -> bool:
    """Does one of the spec's methods select rows (draw G = B / keep, train on B)?"""
    return any(getattr(METHODS.get(n), "selects", False) for n in method_names(spec))


def check_method(spec: str, allowed: tuple[str, ...]) -> list[str]:
    """Every problem with a spec: unknown or repeated names, more than one selecting method."""
    names = method_names(spec)
    bad = [n for n in names if n not in allowed or n == "none"]
    if bad:
        return [f"method: {spec!r}: {', '.join(map(repr, bad))} not one of {', '.join(allowed)} "
                "(several may be joined with '+')"]
    if len(set(names)) != len(names):
        return [f"method: {spec!r} names a method twice"]
    selecting = [n for n in names if getattr(METHODS[n], "selects", False)]
    if len(selecting) > 1:
        return [f"method: {spec!r}: at most one method may select rows, got {', '.join(selecting)}"]
    return []
