"""The installed packages import one way: each only from its own layer or below, with no cycle between
packages or between modules (the engine's config and its methods included). Every import that runs
counts, function-level ones included (a lazy import is still a dependency); imports under
``if TYPE_CHECKING:`` serve annotations only and do not."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.distributed.common import REPO

LAYERS = ["sift_common", "data_pipeline", "engine", "sift_hf", "study", "benchmarks", "launcher"]
"""Lowest first."""
PACKAGES = [p for p in LAYERS if (REPO / p / "__init__.py").exists()]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts if path.is_relative_to(REPO) else (path.stem,)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node, less the bodies of ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Absolute names of the modules ``path`` imports at run time (at any depth), relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            stem = ".".join([*base, *([node.module] if node.module else [])])
            # `from pkg import mod` depends on the module pkg.mod; `from mod import name` on mod
            subs = {f"{stem}.{a.name}" for a in node.names} & modules
            found.update(subs or {stem})
    return found


def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    files = {module_name(f): f for p in PACKAGES for f in (REPO / p).rglob("*.py")}
    return {mod: {m for m in imports_of(f, set(files)) if m in files} - {mod} for mod, f in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_packages_import_only_downward():
    rank = {p: i for i, p in enumerate(LAYERS)}
    upward = sorted(
        f"{mod} -> {dep}"
        for mod, deps in graph().items()
        for dep in deps
        if rank[dep.split(".")[0]] > rank[mod.split(".")[0]]
    )
    assert upward == [], "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_architecture_doc_draws_these_layers():
    """docs/architecture.md's arrow line names every layer, highest first, as the checks above enforce."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    arrows = next(line.split("->") for line in doc.splitlines() if line.strip().startswith("launcher ->"))
    assert [a.strip() for a in arrows] == LAYERS[::-1]


def test_no_cycle_between_packages():
    between = {}
    for mod, deps in graph().items():
        between.setdefault(mod.split(".")[0], set()).update(d.split(".")[0] for d in deps)
    assert cycles({p: d - {p} for p, d in between.items()}) == []


def test_no_cycle_between_modules():
    """Within a package too (e.g. engine/config.py <-> engine/methods/, study/cli.py <-> study/output.py)."""
    found = cycles(graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_walk_sees_lazy_imports_and_skips_type_only_ones(tmp_path):
    """The checker itself: a function-level import is found, so the tests above could fail."""
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import launcher.cli\n"
                 "def g():\n    from engine import ds\n")
    found = imports_of(f, {"engine", "engine.ds", "launcher.cli"})
    assert "engine.ds" in found and "launcher.cli" not in found
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
