"""The layering rules of the design (docs/architecture.md), as an executable check.

Every module of `distsgd/` is parsed with `ast` (nothing is imported), and every import it makes is
collected, lazy ones inside functions included, each with its line. The rules:

- `distsgd/algorithms/` never imports torch.distributed or a backend (`comm.torch`, `comm.sim`,
  `launch`, `runtime`): algorithms talk to `ctx.comm` only;
- `mixing.py` and `topology.py` import nothing from `comm` (nor torch.distributed): pure math;
- only `comm/torch/`, `launch.py`, `runtime.py` (and `distsgd/testing/`) touch torch.distributed;
- `evaluation.py` and `optimizer.py` reach the run through `Comm`: no `launch`, no backend;
- no import cycle inside the package;
- no module over 400 lines.

Which imports count. For the layering rules: every import, also those under
``if TYPE_CHECKING:`` (knowing a backend's type is knowing the backend). For the cycle check: every
import that runs, lazy ones included (a lazy import only hides a cycle until the function runs),
but not the ``TYPE_CHECKING`` ones: they never execute, and they are how a type annotation may
name a module that depends on this one. An edge goes to the module named (``from a.b import c``
goes to ``a.b.c`` when that is a module of the package, else to ``a.b``); the implicit import of
parent packages is not an edge, or every module would form a cycle with ``distsgd/__init__.py``.

Each failure names the module and the line of every offending import.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "distsgd"
MAX_LINES = 400

BACKENDS = ("distsgd.comm.torch", "distsgd.comm.sim", "distsgd.launch", "distsgd.runtime")
TORCH_DISTRIBUTED = "torch.distributed"
# Where torch.distributed may be imported: module names, or packages (prefix + ".").
DISTRIBUTED_ALLOWED = ("distsgd.comm.torch", "distsgd.launch", "distsgd.runtime", "distsgd.testing")


@dataclass(frozen=True)
class Import:
    """One import statement's target, as written in `module` at `line`."""

    module: str  # the importing module, dotted
    target: str  # the imported module, dotted and absolute (see `imports_of`)
    line: int
    type_checking: bool  # under `if TYPE_CHECKING:`: never runs
    how: str = "imports"  # or "uses": an attribute reached without an import (torch.distributed)

    def __str__(self) -> str:
        return f"{path_of(self.module)}:{self.line} {self.how} {self.target}"


# ---------------------------------------------------------------------------------- scanner
def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package: {dotted name: file}."""
    names = {}
    for file in sorted(package.rglob("*.py")):
        parts = list(file.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = file
    return names


MODULES = module_names()


def path_of(module: str) -> str:
    """The file of `module`, relative to the repository (a guess for one not in the package)."""
    file = MODULES.get(module)
    return str(file.relative_to(ROOT)) if file else module.replace(".", "/") + ".py"


def is_package(module: str, modules: Mapping[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, source: str, modules: Mapping[str, Path] = MODULES) -> list[Import]:
    """Every import in `source` (the module `module`), at any depth, resolved to absolute names."""
    tree = ast.parse(source)
    guarded: set[int] = set()  # ids of the nodes under `if TYPE_CHECKING:`
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for inner in node.body:
                guarded.update(id(n) for n in ast.walk(inner))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node.module, node.level, modules)
            # `from a import b` inside the package: the submodule a.b when there is one, else a
            # name in a. Outside it, a.b either way, so that `from torch import distributed` is
            # torch.distributed.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules
                       or base.partition(".")[0] not in _roots(modules) else base
                       for a in node.names]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and f"{node.value.id}.{node.attr}" == TORCH_DISTRIBUTED):
            # `import torch` then `torch.distributed.x`: no import names it, the use does.
            found.append(Import(module, TORCH_DISTRIBUTED, node.lineno, id(node) in guarded,
                                "uses"))
            continue
        else:
            continue
        typed = id(node) in guarded
        found += [Import(module, t, node.lineno, typed) for t in dict.fromkeys(targets)]
    return sorted(found, key=lambda i: (i.line, i.target))


def _roots(modules: Mapping[str, Path]) -> set[str]:
    return {m.partition(".")[0] for m in modules}


def _absolute(module: str, name: str | None, level: int, modules: Mapping[str, Path]) -> str:
    if level == 0:
        return name or ""
    # A relative import is relative to the package: the module itself if it is one.
    package = module if module in modules and is_package(module, modules) else module.rpartition(
        ".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{name}" if name else package


def all_imports(modules: Mapping[str, Path] = MODULES) -> list[Import]:
    return [i for m, f in modules.items() for i in imports_of(m, f.read_text(), modules)]


IMPORTS = all_imports()


def within(name: str, prefixes: Iterable[str]) -> bool:
    """`name` is one of `prefixes` or inside one of them (a submodule or a name in it)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def offending(where: Iterable[str], forbidden: Iterable[str]) -> list[Import]:
    """The imports made by modules under `where` of anything under `forbidden`."""
    where, forbidden = tuple(where), tuple(forbidden)
    return [i for i in IMPORTS if within(i.module, where) and within(i.target, forbidden)]


def explain(rule: str, found: list[Import]) -> str:
    return rule + ":\n  " + "\n  ".join(map(str, found))


# ------------------------------------------------------------------------------ cycle finder
def import_graph(imports: Iterable[Import]) -> dict[str, dict[str, int]]:
    """{module: {imported module of the package: first line}}, the imports that run only."""
    graph: dict[str, dict[str, int]] = {}
    for i in imports:
        if i.type_checking or i.target == i.module:
            continue
        if i.target in MODULES or i.target.split(".")[0] == i.module.split(".")[0]:
            graph.setdefault(i.module, {}).setdefault(i.target, i.line)
    return graph


def knots(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components that hold a cycle, each sorted (Tarjan's algorithm)."""
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    succ = {n: sorted(graph.get(n, ())) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:  # recursive: the package has a few dozen modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in succ[v]:
                found.append(sorted(component))

    for n in nodes:
        if n not in index:
            connect(n)
    return sorted(found)


def shortest_cycle(graph: Mapping[str, Iterable[str]], knot: list[str]) -> list[str]:
    """A shortest cycle through the knot's first module, as [a, b, ..., a] (breadth first): the
    imports a reader has to look at to cut it."""
    start, members = knot[0], set(knot)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier and start not in parent:
        reached = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w in members and w not in parent:
                    parent[w] = v
                    reached.append(w)
        frontier = reached
    path = [start]
    while path[-1] != start or len(path) == 1:
        path.append(parent[path[-1]])
    return path[::-1]


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One shortest cycle per knot of the graph; none when the imports point one way."""
    return [shortest_cycle(graph, k) for k in knots(graph)]


def describe_cycle(cycle: list[str], graph: Mapping[str, Mapping[str, int]]) -> str:
    return " -> ".join(
        f"{path_of(a)}:{graph[a][b]}" for a, b in itertools.pairwise(cycle)
    ) + f" -> {path_of(cycle[-1])}"


# ------------------------------------------------------------------------------------ rules
def test_algorithms_import_no_backend_and_no_torch_distributed() -> None:
    found = offending(["distsgd.algorithms"], [TORCH_DISTRIBUTED, *BACKENDS])
    assert not found, explain("algorithms/ talk to ctx.comm only, never to a backend", found)


def test_mixing_and_topology_import_nothing_from_comm() -> None:
    found = offending(["distsgd.mixing", "distsgd.topology"], ["distsgd.comm", TORCH_DISTRIBUTED])
    assert not found, explain("mixing.py and topology.py are pure: no comm", found)


def test_only_the_torch_backend_launch_and_runtime_touch_torch_distributed() -> None:
    found = [i for i in offending(["distsgd"], [TORCH_DISTRIBUTED])
             if not within(i.module, DISTRIBUTED_ALLOWED)]
    assert not found, explain(
        f"only {', '.join(DISTRIBUTED_ALLOWED)} may import torch.distributed", found)


def test_evaluation_and_optimizer_reach_the_run_through_comm() -> None:
    found = offending(["distsgd.evaluation", "distsgd.optimizer"],
                      ["distsgd.launch", "distsgd.comm.torch", "distsgd.comm.sim",
                       TORCH_DISTRIBUTED])
    assert not found, explain("evaluation.py and optimizer.py must not know the backend", found)


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph(IMPORTS)
    found = [(k, shortest_cycle(graph, k)) for k in knots(graph)]
    assert not found, "import cycles (module:line of each import):\n  " + "\n  ".join(
        describe_cycle(cycle, graph) + (f"\n    ({len(knot)} modules in this knot: "
                                        f"{', '.join(knot)})" if len(knot) > len(cycle) - 1 else "")
        for knot, cycle in found)


def test_no_module_over_400_lines() -> None:
    sizes = {path_of(m): len(f.read_text().splitlines()) for m, f in MODULES.items()}
    over = {p: n for p, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (one concept each): " + ", ".join(
        f"{p} ({n})" for p, n in over.items())


# ----------------------------------------------------------------- the checker's own tests
FAKE = {name: Path(f"/x/{name.replace('.', '/')}.py") for name in (
    "pkg", "pkg.a", "pkg.b", "pkg.c")} | {"pkg.sub": Path("/x/pkg/sub/__init__.py"),
                                          "pkg.sub.d": Path("/x/pkg/sub/d.py")}
FAKE["pkg"] = Path("/x/pkg/__init__.py")


def test_scanner_sees_lazy_relative_and_type_checking_imports() -> None:
    source = (
        "from __future__ import annotations\n"
        "import os.path\n"
        "from typing import TYPE_CHECKING\n"
        "from pkg import a, os\n"  # a is a module, os a name in pkg
        "from .. import c\n"
        "from ..sub import thing as e\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.sub import thing\n"
        "def f():\n"
        "    import torch.distributed as dist\n"
        "    class K:\n"
        "        from ..b import x\n"
        "    from torch import distributed\n"
        "    return torch.distributed.get_rank(), torch.cuda\n"
    )
    found = {(i.target, i.line, i.type_checking, i.how)
             for i in imports_of("pkg.sub.d", source, FAKE)}
    imports = "imports"
    assert found == {
        ("__future__.annotations", 1, False, imports), ("os.path", 2, False, imports),
        ("typing.TYPE_CHECKING", 3, False, imports), ("pkg.a", 4, False, imports),
        ("pkg", 4, False, imports), ("pkg.c", 5, False, imports), ("pkg.sub", 6, False, imports),
        ("pkg.sub", 8, True, imports), ("torch.distributed", 10, False, imports),
        ("pkg.b", 12, False, imports), ("torch.distributed", 13, False, imports),
        ("torch.distributed", 14, False, "uses"),
    }
    # in a package's __init__, `.` is the package itself
    assert [i.target for i in imports_of("pkg.sub", "from .d import y\n", FAKE)] == ["pkg.sub.d"]


def test_cycle_finder_reports_each_cycle_once_and_only_cycles() -> None:
    assert find_cycles({"a": ["b"], "b": ["c"], "c": []}) == []
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": ["a"]}) == [["a", "a"]]
    two = find_cycles({"a": ["b"], "b": ["a"], "x": ["y"], "y": ["z"], "z": ["y"]})
    assert two == [["a", "b", "a"], ["y", "z", "y"]]
    # A component with two loops through its smallest node: the shortest one is shown.
    assert find_cycles({"a": ["b", "d"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [
        ["a", "d", "a"]]


def test_a_lazy_import_cycle_fails_and_a_type_checking_one_does_not() -> None:
    lazy = [Import("distsgd.launch", "distsgd.comm.torch", 3, False),
            Import("distsgd.comm.torch", "distsgd.launch", 40, False)]
    graph = import_graph(lazy)
    assert find_cycles(graph) == [["distsgd.comm.torch", "distsgd.launch", "distsgd.comm.torch"]]
    assert describe_cycle(find_cycles(graph)[0], graph) == (
        "distsgd/comm/torch/__init__.py:40 -> distsgd/launch.py:3 -> "
        "distsgd/comm/torch/__init__.py")
    typed = [lazy[0], Import("distsgd.comm.torch", "distsgd.launch", 40, True)]
    assert find_cycles(import_graph(typed)) == []


def test_each_rule_names_what_breaks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = [
        Import("distsgd.algorithms.sgp", "distsgd.comm.torch", 7, False),
        Import("distsgd.algorithms.ps", "torch.distributed", 9, True),  # type-only still counts
        Import("distsgd.mixing", "distsgd.comm.base", 3, False),
        Import("distsgd.topology", "torch.distributed", 4, False),
        Import("distsgd.train", "torch.distributed", 5, False),
        Import("distsgd.evaluation", "distsgd.launch", 31, False),
        Import("distsgd.optimizer", "distsgd.comm.sim", 12, False),
    ]
    fine = [
        Import("distsgd.algorithms.sgp", "distsgd.comm.base", 8, False),
        Import("distsgd.algorithms.sgp", "distsgd.mixing", 9, False),
        Import("distsgd.comm.torch.comm", "torch.distributed", 5, False),
        Import("distsgd.launch", "torch.distributed", 5, False),
        Import("distsgd.evaluation", "distsgd.comm.base", 5, False),
        Import("distsgd.comm.simple", "torch.distributed", 1, False),  # not comm.sim's package
    ]
    monkeypatch.setitem(globals(), "IMPORTS", fine)
    for rule in (test_algorithms_import_no_backend_and_no_torch_distributed,
                 test_mixing_and_topology_import_nothing_from_comm,
                 test_evaluation_and_optimizer_reach_the_run_through_comm):
        rule()
    with pytest.raises(AssertionError, match="comm/simple"):  # not a listed package: caught
        test_only_the_torch_backend_launch_and_runtime_touch_torch_distributed()
    monkeypatch.setitem(globals(), "IMPORTS", fine[:-1] + bad)
    with pytest.raises(AssertionError, match=r"algorithms/sgp.py:7 imports distsgd.comm.torch"
                       r"(.|\n)*algorithms/ps/__init__.py:9 imports torch.distributed"):
        test_algorithms_import_no_backend_and_no_torch_distributed()
    with pytest.raises(AssertionError, match=r"mixing.py:3(.|\n)*topology.py:4"):
        test_mixing_and_topology_import_nothing_from_comm()
    with pytest.raises(AssertionError, match=r"train.py:5 imports torch.distributed"):
        test_only_the_torch_backend_launch_and_runtime_touch_torch_distributed()
    with pytest.raises(AssertionError, match=r"evaluation.py:31(.|\n)*optimizer.py:12"):
        test_evaluation_and_optimizer_reach_the_run_through_comm()


def test_the_line_count_rule_fails_on_a_long_module(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    long = tmp_path / "long.py"
    long.write_text("x = 1\n" * (MAX_LINES + 1))
    monkeypatch.setitem(globals(), "MODULES", {"distsgd.long": long})
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"long.py \(401\)"):
        test_no_module_over_400_lines()
