"""The packages' import rules, as their docstrings state them: each layer imports only the ones
below it, `aquila.cluster` never imports `aquila.node`, storage never imports the HTTP layer,
and no two modules import each other, however indirectly (type-only imports count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Package (or top-level module) → what it may import besides itself.
CLUSTER_ORDER = ["model", "clock", "membership", "peers", "state", "replication", "movement"]
ALLOWED: dict[str, set[str]] = {
    f"cluster.{pkg}": {f"cluster.{lower}" for lower in CLUSTER_ORDER[:i]}
    for i, pkg in enumerate(CLUSTER_ORDER)
}
ALLOWED["cluster.service"] = {f"cluster.{p}" for p in CLUSTER_ORDER}
ALLOWED["cluster.admin"] = {"cluster.model"}
# The scale simulator runs the protocol code of every layer; no node code imports it.
ALLOWED["cluster.sim"] = {f"cluster.{p}" for p in CLUSTER_ORDER}
ALLOWED["node.storage"] = {"cluster.model", "cluster.clock", "node.blocking", "node.files"}
# The import command is a client: it talks HTTP to a node, as the admin commands do.
ALLOWED["node.importer"] = {"cluster.model", "cluster.admin"}
ALLOWED["node.http"] = {f"cluster.{p}" for p in CLUSTER_ORDER} | {
    "cluster.service", "node.config", "node.keys", "node.blocking", "node.metrics",
}


def modules() -> dict[str, Path]:
    out = {}
    for top in ("node", "cluster"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(path: Path) -> set[str]:
    """Every aquila module `path` imports (the module itself when the name is an attribute)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aquila."):
            base = node.module.removeprefix("aquila.")
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix("aquila.") for a in node.names
                         if a.name.startswith("aquila."))
    known = modules()
    return {n for n in names if n in known}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


MODULES = modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_what_its_layer_may(module: str) -> None:
    layer = layer_of(module)
    allowed = ALLOWED.get(layer)
    for imported in imports_of(MODULES[module]):
        target = layer_of(imported)
        if target == layer:
            continue
        if module.startswith("cluster."):
            assert not imported.startswith("node."), f"{module} imports {imported}"
        if allowed is not None:
            assert target in allowed, f"{module} ({layer}) may not import {imported}"


def test_no_import_cycles() -> None:
    graph = {m: imports_of(p) - {m} for m, p in MODULES.items()}
    # Packages import their own modules' names only through explicit submodules, so an edge
    # to a package (its __init__) is not a dependency on its modules.
    graph = {m: {d for d in deps if MODULES[d].name != "__init__.py"} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for pkg in sorted(p for p, path in MODULES.items() if path.name == "__init__.py"):
        doc = ast.get_docstring(ast.parse(MODULES[pkg].read_text()))
        assert doc, f"{pkg} has no docstring"
        if pkg not in ("cluster", "node"):
            assert "May import" in doc, f"{pkg}'s docstring does not say what it may import"
