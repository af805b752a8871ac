"""The import graph of the pyproxy package: no cycles, and no import hidden in a function
unless it is lazy on purpose and says why (`# lazy: reason`).

Every module under pyproxy/ (and the folders pyproject maps into the pyproxy namespace) is
parsed with `ast`, never imported, so a cycle is found even where the order of imports
happens to keep it from failing at run time.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAZY = "# lazy:"


def _package_dirs() -> dict[str, Path]:
    """pyproxy and every pyproxy.* folder pyproject.toml maps from elsewhere (filters/, native/ ...)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {package: ROOT / folder for package, folder in mapping.items()}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the installed namespace."""
    modules: dict[str, Path] = {}
    dirs = _package_dirs()
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("").parts
            if any(part.startswith(".") or part == "__pycache__" for part in relative):
                continue
            # A subfolder mapped on its own (pyproxy/io) is listed under its own package.
            if len(relative) > 1 and f"{package}.{relative[0]}" in dirs:
                continue
            parts = [package, *relative]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


class Import:
    """One import statement's target module, where it stands and whether it runs at import time."""

    def __init__(self, module: str, target: str, line: int, in_function: bool, lazy: bool):
        self.module, self.target, self.line = module, target, line
        self.in_function, self.lazy = in_function, lazy

    def where(self) -> str:
        return f"{MODULES[self.module].relative_to(ROOT)}:{self.line}"


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The pyproxy modules one statement loads (`from pkg import mod` names the submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")
            if not MODULES[module].name == "__init__.py":
                base = base[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" for alias in node.names]
        names = [name if name in MODULES else prefix for name in names]
    for name in names:
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in MODULES and name != module:
            yield name


def _is_lazy(lines: list[str], node: ast.stmt) -> bool:
    """`# lazy:` on the statement's lines, or in the comment right above its run of imports."""
    if any(LAZY in lines[i - 1] for i in range(node.lineno, (node.end_lineno or node.lineno) + 1)):
        return True
    i = node.lineno - 2
    while i >= 0 and lines[i].lstrip().startswith(("from ", "import ", "#")):
        if lines[i].lstrip().startswith("#") and LAZY in lines[i]:
            return True
        i -= 1
    return False


def _imports(module: str) -> Iterator[Import]:
    text = MODULES[module].read_text(encoding="utf-8")
    lines = text.splitlines()

    def walk(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                lazy = in_function and _is_lazy(lines, child)
                for target in _targets(module, child):
                    yield Import(module, target, child.lineno, in_function, lazy)
            # `if TYPE_CHECKING:` imports count too: a loop of types is a loop of concerns.
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            yield from walk(child, inner)

    yield from walk(ast.parse(text, str(MODULES[module])), False)


IMPORTS = [imp for module in MODULES for imp in _imports(module)]


def _cycles(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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
                found.append(_path_through(sorted(component), edges))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _path_through(component: list[str], edges: dict[str, dict[str, Import]]) -> list[str]:
    """One loop inside the component, from its first module back to itself, to name it."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges.get(v, {})):
            if w == start:
                return paths[v] + [start]
            if w in members and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component


def test_the_graph_sees_the_package() -> None:
    assert "pyproxy.http.exchange" in MODULES and "pyproxy.filters.lua" in MODULES
    assert any(imp.target == "pyproxy.codec.http1" for imp in IMPORTS)


def test_no_import_cycles() -> None:
    edges: dict[str, dict[str, Import]] = {}
    for imp in IMPORTS:
        edges.setdefault(imp.module, {}).setdefault(imp.target, imp)
    described = [
        " -> ".join(
            f"{a} ({edges[a][b].where()})" if b in edges.get(a, {}) else a
            for a, b in zip(cycle, cycle[1:] + [""], strict=True)
        )
        for cycle in _cycles(edges)
    ]
    assert not described, "import cycles:\n" + "\n".join(described)


def test_function_level_imports_say_why_they_are_lazy() -> None:
    """The proxy core (pyproxy/); the tools mapped beside it (bench, capture) load their
    subcommands on demand throughout and are held to the no-cycle rule only."""
    core = ROOT / "pyproxy"
    hidden = sorted(
        {
            f"{imp.where()}: {imp.module} imports {imp.target} inside a function without {LAZY!r}"
            for imp in IMPORTS
            if imp.in_function and not imp.lazy and MODULES[imp.module].is_relative_to(core)
        }
    )
    assert not hidden, "\n".join(hidden)


def test_cycle_finder_names_a_loop() -> None:
    a = Import("pyproxy.config", "pyproxy.stats", 1, False, False)
    b = Import("pyproxy.stats", "pyproxy.config", 2, False, False)
    assert _cycles(
        {"pyproxy.config": {"pyproxy.stats": a}, "pyproxy.stats": {"pyproxy.config": b}}
    ) == [["pyproxy.config", "pyproxy.stats", "pyproxy.config"]]
