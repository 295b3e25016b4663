"""Imports flow one way: the module import graph of ``src/vlaops`` (read with ast, every import counted,
those inside functions too) has no cycle, and ``vlaops.model`` may import ``vlaops.data`` but not the
other way round."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_graph(src: Path = SRC) -> dict[str, set[str]]:
    """{module: the vlaops modules it imports} for every module under ``src/vlaops``; ``from pkg import
    name`` counts as an import of ``pkg.name`` where that is a module, else of ``pkg``."""
    files = {}
    for path in sorted((src / "vlaops").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        files[name] = (path, name if is_package else name.rpartition(".")[0])
    graph: dict[str, set[str]] = {}
    for name, (path, package) in files.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package, up level - 1
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                imported |= {f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names}
        graph[name] = {m for m in imported if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every import cycle."""
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


def imports_between(graph: dict[str, set[str]], source: str, target: str) -> list[tuple[str, str]]:
    """(module, imported) pairs where a module of package ``source`` imports one of package ``target``."""
    return sorted(
        (m, d)
        for m, deps in graph.items()
        if m == source or m.startswith(source + ".")
        for d in deps
        if d == target or d.startswith(target + ".")
    )


def test_the_graph_is_read_from_the_source():
    """The walk sees the imports written in the code (so the tests below can fail)."""
    graph = module_graph()
    assert "vlaops.stages.train" in graph and "vlaops.io.calvin" in graph
    assert "vlaops.data.normalization" in graph["vlaops.model.runtime"]
    assert "vlaops.tracking" in graph["vlaops.stages.evaluate"]  # ``from vlaops import tracking``
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(module_graph()) == []


@pytest.mark.parametrize(("upper", "lower"), [("vlaops.model", "vlaops.data")])
def test_packages_import_one_way(upper, lower):
    graph = module_graph()
    assert imports_between(graph, upper, lower), f"{upper} no longer imports {lower}: the test checks nothing"
    assert imports_between(graph, lower, upper) == [], f"{lower} imports {upper}; move what it needs into {lower}"


def test_the_check_fails_on_a_cycle(tmp_path):
    """A cycle written into a copy of a package, and a lazy import inside a function, are both found."""
    pkg = tmp_path / "vlaops" / "io"
    pkg.mkdir(parents=True)
    (tmp_path / "vlaops" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from vlaops.io import b\n")
    (pkg / "b.py").write_text("def f():\n    from vlaops.io.a import x\n")
    assert cycles(module_graph(tmp_path)) == [["vlaops.io.a", "vlaops.io.b"]]
