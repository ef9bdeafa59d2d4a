"""The house rules of grnn_engine/ and orchestrator/, read from the source with `ast`: the module import graph
has no circle, no module imports another module's `_private` name, and no source file is over 600 lines.

Every import counts, wherever it stands (a function-level or TYPE_CHECKING import still ties two modules
together), absolute or relative; `from x import y` where y is a submodule is an import of x.y, otherwise of
x. Importing a package's submodule does not count as importing the package's `__init__` (Python runs it,
but a package that imports its own submodules is how packages are built, not a circle). A private name is
one with a leading underscore that is not a dunder: `from m import _helper`, `m._helper` on a module bound
by an import, and a private name re-exported by your own package's `__init__` all count. A private
submodule (`pkg/_impl.py`) may be imported by its own package only.

The checker is tested on small synthetic packages below, so each rule is seen to fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grnn_engine", "orchestrator")
MAX_LINES = 600


# ---------------------------------------------------------------------------------------------- the checker


@dataclass
class Module:
    name: str  # dotted, e.g. orchestrator.spec.models; a package's __init__ is the package's name
    path: Path
    is_package: bool
    tree: ast.Module


@dataclass
class ImportGraph:
    modules: dict[str, Module]
    edges: dict[str, set[str]] = field(default_factory=dict)  # importer -> imported project modules
    private: list[str] = field(default_factory=list)  # "<file>:<line>: <what>" per private import


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def find_modules(root: Path, packages: Iterable[str]) -> dict[str, Module]:
    """Every .py file of the packages under root, by dotted module name."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join(parts)
            modules[name] = Module(name, path, is_package, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return modules


def _base_of(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative levels resolved against the importer's package)."""
    if node.level == 0:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if node.level > 1:
        package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def build_graph(root: Path, packages: Sequence[str] = PACKAGES) -> ImportGraph:
    """The import graph among the packages' modules, and every import of another module's private name."""
    modules = find_modules(root, packages)
    graph = ImportGraph(modules, {name: set() for name in modules})

    def where(module: Module, node: ast.AST) -> str:
        return f"{module.path.relative_to(root)}:{getattr(node, 'lineno', '?')}"

    for module in modules.values():
        bound: dict[str, str] = {}  # local name -> project module it is bound to by an import
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target and target not in modules:
                        target = _parent(target)
                    if target:
                        graph.edges[module.name].add(target)
                        # `import a.b` binds a; `import a.b as c` binds c to a.b
                        local = alias.asname or alias.name.split(".")[0]
                        bound[local] = alias.name if alias.asname else alias.name.split(".")[0]
                    if any(_is_private(part) for part in alias.name.split(".")) and target:
                        graph.private.append(f"{where(module, node)}: import {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                base = _base_of(module, node)
                if base not in modules:
                    continue  # not a project module (third-party, stdlib, __future__)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in modules:
                        graph.edges[module.name].add(submodule)
                        bound[alias.asname or alias.name] = submodule
                        own_package = _parent(module.name if not module.is_package else module.name + ".x")
                        if _is_private(alias.name) and own_package != base:
                            graph.private.append(f"{where(module, node)}: from {base} import {alias.name}")
                    else:
                        graph.edges[module.name].add(base)
                        if _is_private(alias.name):
                            graph.private.append(f"{where(module, node)}: from {base} import {alias.name}")
        for node in ast.walk(module.tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and _is_private(node.attr)
                and f"{bound[node.value.id]}.{node.attr}" not in modules
            ):
                graph.private.append(f"{where(module, node)}: {node.value.id}.{node.attr} ({bound[node.value.id]})")
    for name in graph.edges:
        graph.edges[name].discard(name)
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as [a, b, ..., a], or None when it is acyclic (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(edges):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(edges[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if not state.get(nxt) and nxt in edges:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges[nxt])))
    return None


def all_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each group of modules that import each other (each strongly connected component
    of two or more modules), so that a failure shows every circle at once, not only the first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graph is a few hundred modules at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:
        cycle = find_cycle({n: edges[n] & group for n in group})
        if cycle:
            cycles.append(cycle)
    return sorted(cycles)


def long_files(root: Path, packages: Sequence[str] = PACKAGES, limit: int = MAX_LINES) -> list[str]:
    """'<file>: <n> lines' for every source file over `limit` lines."""
    out = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > limit:
                out.append(f"{path.relative_to(root)}: {n} lines")
    return out


# ---------------------------------------------------------------------------------------------- the project


@pytest.fixture(scope="module")
def project() -> ImportGraph:
    return build_graph(ROOT)


def test_project_modules_are_found(project: ImportGraph) -> None:
    assert {"grnn_engine", "grnn_engine.trial", "grnn_engine.fl", "orchestrator.sweep"} <= set(project.modules)


def test_no_import_circle(project: ImportGraph) -> None:
    cycles = all_cycles(project.edges)
    assert cycles == [], "import circles:\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_no_private_imports(project: ImportGraph) -> None:
    assert project.private == [], "imports of another module's private names:\n" + "\n".join(project.private)


def test_no_source_file_over_600_lines() -> None:
    found = long_files(ROOT)
    assert found == [], f"source files over {MAX_LINES} lines:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------- the checker can fail


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_finds_a_circle_through_relative_and_submodule_imports(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",  # `from pkg import b`: an import of pkg.b
        "pkg/b.py": "def f():\n    from pkg.sub.c import g\n",  # a function-level import counts
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import x\n",
    })  # fmt: skip
    graph = build_graph(tmp_path, ["pkg"])
    assert graph.edges["pkg.a"] == {"pkg.b"} and graph.edges["pkg.sub.c"] == {"pkg.a"}
    assert find_cycle(graph.edges) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert all_cycles(graph.edges) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_checker_lists_every_circle(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import pkg.b\n", "pkg/b.py": "import pkg.a\n",  # one circle
        "pkg/c.py": "from pkg import d\n", "pkg/d.py": "from pkg.e import x\n", "pkg/e.py": "from . import c\n",
        "pkg/f.py": "import pkg.a\n",  # leads into a circle, is not in one
    })  # fmt: skip
    graph = build_graph(tmp_path, ["pkg"])
    assert all_cycles(graph.edges) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.d", "pkg.e", "pkg.c"]]


def test_checker_accepts_a_package_that_imports_its_submodules(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import A\nfrom pkg import b\n",
        "pkg/a.py": "from pkg.b import B\nimport os\n",
        "pkg/b.py": "B = 1\n",
    })  # fmt: skip
    graph = build_graph(tmp_path, ["pkg"])
    assert find_cycle(graph.edges) is None and all_cycles(graph.edges) == [] and graph.private == []


def test_checker_finds_a_module_that_imports_its_own_package(tmp_path: Path) -> None:
    _write(tmp_path, {"pkg/__init__.py": "from pkg.a import A\n", "pkg/a.py": "from pkg import B\nA = 1\n"})
    assert find_cycle(build_graph(tmp_path, ["pkg"]).edges) == ["pkg", "pkg.a", "pkg"]


def test_checker_finds_private_imports(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import _helper\n",  # re-exported private name: counts
        "pkg/a.py": "_helper = 1\n",
        "pkg/b.py": "from pkg import _helper\n",  # from your own package's __init__: counts too
        "pkg/c.py": "from pkg import a\nprint(a._helper)\n",  # attribute of an imported module
        "pkg/d.py": "from pkg import _impl\nfrom .a import __doc__\n",  # own private submodule, dunder: fine
        "pkg/_impl.py": "",
        "other/__init__.py": "from pkg import _impl\n",  # another package's private submodule
    })  # fmt: skip
    found = build_graph(tmp_path, ["pkg", "other"]).private
    assert sorted(f.split(": ", 1)[0] for f in found) == [
        "other/__init__.py:1", "pkg/__init__.py:1", "pkg/b.py:1", "pkg/c.py:2",
    ]  # fmt: skip


def test_checker_finds_long_files(tmp_path: Path) -> None:
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/short.py": "x = 1\n" * 600, "pkg/long.py": "x = 1\n" * 601})
    assert long_files(tmp_path, ["pkg"]) == [f"{Path('pkg/long.py')}: 601 lines"]
