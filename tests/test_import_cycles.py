"""No import cycles between Loupe's modules, and no private names imported across modules.

The import graph is read from the source with ``ast`` (nothing is imported): an edge for every
``import`` / ``from ... import`` of a Loupe module, at module level or inside a function (a lazy
import only hides a cycle until the call), except imports under ``if TYPE_CHECKING:``. A cycle
means two modules cannot be understood, tested or changed one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("governance", "workers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
            if "migrations" not in path.parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool):
    """``(imported module, [names])`` for every import outside ``if TYPE_CHECKING`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, [alias.name for alias in node.names]


def import_graph() -> tuple[nx.DiGraph, list[str]]:
    """The graph of Loupe's modules, and every private name one module imports from another."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    private: list[str] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target, names in _imports(tree, module, path.name == "__init__.py"):
            for name in names or [None]:
                submodule = f"{target}.{name}" if name else None
                if submodule in modules:
                    graph.add_edge(module, submodule)
                elif target in modules:
                    if target != module:
                        graph.add_edge(module, target)
                    if name and name.startswith("_") and not name.startswith("__"):
                        private.append(f"{module} imports {target}.{name}")
    # A package's __init__ re-exporting its own submodules is not a cycle of meaning.
    for module in list(graph):
        for target in list(graph.successors(module)):
            if module in modules and modules[module].name == "__init__.py" and target.startswith(module + "."):
                graph.remove_edge(module, target)
    return graph, private


def test_no_import_cycles():
    graph, _ = import_graph()
    cycles = [sorted(component) for component in nx.strongly_connected_components(graph) if len(component) > 1]
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    _, private = import_graph()
    assert private == []


def test_the_probe_library_imports_neither_django_nor_celery_nor_its_consumers():
    for module, path in _modules().items():
        if not module.startswith("workers.probes"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for target, _ in _imports(tree, module, path.name == "__init__.py"):
            root = target.split(".")[0]
            assert root not in ("django", "celery", "rest_framework", "governance"), f"{module} imports {target}"
            assert not target.startswith("workers.tasks") and target != "workers.celery", f"{module} imports {target}"


def test_the_graph_sees_a_new_cycle(tmp_path, monkeypatch):
    """The check itself: two modules importing each other, one lazily, form a cycle."""
    package = tmp_path / "governance"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from governance import b\n")
    (package / "b.py").write_text("def f():\n    from governance.a import g\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from governance import a\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGES"]), "PACKAGES", ("governance",))
    graph, _ = import_graph()
    assert [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1] == [["governance.a",
                                                                                          "governance.b"]]
    assert not graph.has_edge("governance.c", "governance.a")
