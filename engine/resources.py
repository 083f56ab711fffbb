"""The configs that ship with the package (configs/*.yaml, ds_configs/*.json), found from anywhere.

A run config or DeepSpeed JSON is named by a path; a path that does not exist from the current
directory but names a shipped file (``demo-cpu``, ``demo-cpu.yaml``, ``configs/demo-cpu.yaml``;
``zero1.json``, ``ds_configs/zero1.json``) resolves to the installed copy, so `sift demo`, `sift train
--config demo-cpu` and the default ``deepspeed.config`` work outside a clone of the repository.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SUFFIX = {"configs": ".yaml", "ds_configs": ".json"}


def shipped(package: str) -> dict[str, Path]:
    """Stem -> path of every file the package ships (``configs`` or ``ds_configs``)."""
    root = Path(str(resources.files(package)))
    return {p.stem: p for p in sorted(root.glob(f"*{SUFFIX[package]}"))}


def resolve(name_or_path: str | Path, package: str) -> Path:
    """An existing path as given; else the shipped file it names; else the path unchanged (the reader
    then reports it missing, with the names that do exist)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if path.parent in (Path("."), Path(package)) and path.suffix in ("", SUFFIX[package]):
        found = shipped(package).get(path.stem)
        if found is not None:
            return found
    return path
