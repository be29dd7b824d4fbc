"""mdt imports one way: no cycle between its modules, none between its packages.

A package is the first folder under mdt/ (`mdt.models.io` -> models) or a top-level module (`mdt.cli` -> cli);
`mdt/__init__.py` is left out of the package graph. Imports anywhere in a file count (inside functions too),
except those under `if TYPE_CHECKING:`. Self-contained (ast only), so CI needs nothing outside the checkout.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(root: Path, package: str = "mdt") -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root/package (a package's name is its __init__)."""
    mods = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imported(path: Path, name: str, mods: dict[str, Path]) -> set[str]:
    """The modules of `mods` that the file imports, TYPE_CHECKING blocks excepted."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(sub) for sub in ast.walk(node)}
    # The package a relative import starts from: a package's __init__ is inside itself.
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return {m for m in found if m in mods and m != name}


def import_graph(root: Path, package: str = "mdt") -> dict[str, set[str]]:
    mods = _modules(root, package)
    return {name: _imported(path, name, mods) for name, path in mods.items()}


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    def pkg(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else parts[0]

    top = {m for m in graph if "." not in m}
    out: dict[str, set[str]] = {}
    for module, deps in graph.items():
        if module in top:
            continue
        for dep in deps:
            if dep not in top and pkg(dep) != pkg(module):
                out.setdefault(pkg(module), set()).add(pkg(dep))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_module_imports_back() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 50, "the walk found too few modules of mdt/"
    assert cycles(graph) == [], "modules of mdt/ import each other in a cycle; move the shared part below both"


def test_no_package_imports_back() -> None:
    assert cycles(package_graph(import_graph(ROOT))) == [], (
        "packages of mdt/ import each other in a cycle; move the shared part below both")


def test_the_check_sees_a_cycle_through_a_function_but_not_through_type_checking(tmp_path: Path) -> None:
    (tmp_path / "mdt" / "low").mkdir(parents=True)
    (tmp_path / "mdt" / "__init__.py").write_text("")
    (tmp_path / "mdt" / "low" / "__init__.py").write_text("from .leaf import x\n")
    (tmp_path / "mdt" / "low" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mdt.high import y\nx = 1\n")
    (tmp_path / "mdt" / "high.py").write_text("from mdt.low import x\ny = x\n")
    graph = import_graph(tmp_path)
    assert graph["mdt.low"] == {"mdt.low.leaf"} and graph["mdt.high"] == {"mdt.low"}
    assert cycles(graph) == [] and cycles(package_graph(graph)) == []

    (tmp_path / "mdt" / "low" / "leaf.py").write_text("x = 1\n\ndef f():\n    from mdt.high import y\n    return y\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["mdt.high", "mdt.low", "mdt.low.leaf"]]
    assert cycles(package_graph(graph)) == [["high", "low"]]
