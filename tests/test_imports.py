"""The package's import graph: acyclic, with the layering the README's layout describes.

The graph is read from the source (``ast``), so it sees every import, including
those inside functions (a lazy import that would close a cycle hides the cycle; it
does not remove it). Imports under ``if TYPE_CHECKING:`` never run and are left out.
Importing ``a.b.c`` from outside package ``a.b`` also runs ``a/b/__init__.py``, so
that is an edge too; the root package's ``__init__`` is the public façade and may
import anything, so only an explicit import of the root itself counts as an edge to it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "hybridpeft"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is_package) for every module of the package."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imported(name: str, path: Path, is_package: bool, tree: ast.AST | None = None) -> list[tuple[str, ast.AST]]:
    """(module of the package that ``name`` imports, the import node), in-package imports only."""
    here = name if is_package else name.rpartition(".")[0]
    out = []
    for node in _runtime_nodes(tree or ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node) for alias in node.names if alias.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # "from pkg import submodule" imports the submodule
                sub = f"{source}.{alias.name}"
                out.append((sub if sub in MODULES else source, node))
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, (path, is_package) in MODULES.items():
        for target, _ in _imported(name, path, is_package):
            if target not in MODULES or target == name:
                continue
            graph[name].add(target)
            parts = target.split(".")
            for depth in range(2, len(parts)):  # packages entered from outside run their __init__
                package = ".".join(parts[:depth])
                if not (name == package or name.startswith(package + ".")):
                    graph[name].add(package)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_the_package():
    graph = import_graph()
    assert {"hybridpeft.api", "hybridpeft.inject", "hybridpeft.adapters.hybrid"} <= set(graph)
    assert "hybridpeft.adapters.base" in graph["hybridpeft.adapters.hybrid"]
    assert "hybridpeft.adapters" in graph["hybridpeft.inject"]  # the registry, in adapters/__init__


def test_cycle_finder_finds_a_cycle_through_a_package_init():
    graph = {"p": {"p.a"}, "p.a": {"q"}, "q": {"p"}, "r": set()}
    assert cycles(graph) == [["p", "p.a", "q"]]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_api_dispatches_per_step_work_without_knowing_adapter_types():
    """Per-step work goes through each adapter class's hook, so ``api`` needs no concrete adapter."""
    concrete = {f"hybridpeft.adapters.{m}" for m in ("lora", "lora_ga", "boft", "unitary", "hybrid", "full")}
    assert not import_graph()["hybridpeft.api"] & concrete


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_in_package_import_is_guarded_by_except_import_error(name):
    """An in-package module is always there: a fallback for its absence is dead code."""
    path, is_package = MODULES[name]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        guarded = any(h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers)
        if not guarded:
            continue
        body = ast.Module(body=node.body, type_ignores=[])
        inner = [target for target, _ in _imported(name, path, is_package, body)]
        assert not inner, f"{name}: `except ImportError` around an import of {inner} (line {node.lineno})"
