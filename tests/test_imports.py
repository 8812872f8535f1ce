"""How src/trio_swap imports itself and others: no cycles, the layers, declared dependencies.

The graph is read from the source with ``ast``, not by importing it: an import
inside a function or under ``if TYPE_CHECKING:`` runs later or never, but it
still ties the two modules together, and a cycle hidden that way is still a
cycle (STYLE.md: move the shared type down a layer instead).

Edges: ``import a.b`` and ``from a.b import name`` go to ``a.b``; ``from a
import b`` goes to the module ``a.b`` when there is one (to ``a`` otherwise);
relative imports are resolved. A module's parent packages are not edges: every
submodule runs them, so counting them would make each package that re-exports
its submodules a cycle. They do count where a rule asks what importing a module
loads (:func:`loads`).
"""

from __future__ import annotations

import ast
import importlib.metadata
import operator
import re
import sys
import tomllib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pytest

import trio_swap

PACKAGE = "trio_swap"
SRC = Path(trio_swap.__file__).resolve().parent
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


# -- the scanner --------------------------------------------------------------------


@dataclass
class ImportGraph:
    #: Every module of the package by its dotted name (a package by its own name).
    modules: dict[str, Path] = field(default_factory=dict)
    #: Module -> the package's modules it imports (anywhere in the file).
    edges: dict[str, set[str]] = field(default_factory=dict)
    #: Module -> top-level names of the third-party packages it imports.
    external: dict[str, set[str]] = field(default_factory=dict)
    #: ``module: import`` for imports of the package that name no module in it.
    unresolved: list[str] = field(default_factory=list)


def scan(root: Path, package: str) -> ImportGraph:
    """The import graph of the package whose ``__init__.py`` is in ``root``."""
    graph = ImportGraph()
    for path in sorted(root.rglob("*.py")):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph.modules[name] = path
    for name in graph.modules:
        graph.edges[name] = set()
        graph.external[name] = set()
        _scan_module(graph, package, name)
    return graph


def _scan_module(graph: ImportGraph, package: str, name: str) -> None:
    path = graph.modules[name]
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                _add(graph, package, name, alias.name, ())
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = here.split(".")
                if node.level > len(base):
                    graph.unresolved.append(f"{name}: {'.' * node.level}{module}")
                    continue
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            _add(graph, package, name, module, [alias.name for alias in node.names])


def _add(graph: ImportGraph, package: str, name: str, module: str, names: Iterable[str]) -> None:
    """Record ``import module`` (no ``names``) or ``from module import names`` in ``name``."""
    if module != package and not module.startswith(package + "."):
        top = module.partition(".")[0]
        if top != "__future__" and top not in sys.stdlib_module_names:
            graph.external[name].add(top)
        return
    if module not in graph.modules:
        graph.unresolved.append(f"{name}: {module}")
        return
    targets = {f"{module}.{item}" for item in names}
    submodules = targets & graph.modules.keys()
    # ``from module import attribute`` (or ``*``, or a plain ``import module``) needs ``module``.
    if targets - submodules or not targets:
        submodules.add(module)
    graph.edges[name] |= submodules - {name}


def find_cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules."""
    reach = {start: _reachable(edges, start) for start in edges}
    cycles: list[list[str]] = []
    seen: set[str] = set()
    for start in sorted(edges):
        if start in seen or start not in reach[start]:
            continue
        group = {other for other in reach[start] if start in reach[other]}
        seen |= group
        path = _path(edges, start, partial(operator.eq, start), first_step=True)
        assert path is not None
        cycles.append(path)
    return cycles


def _reachable(edges: Mapping[str, Iterable[str]], start: str) -> set[str]:
    found: set[str] = set()
    todo = list(edges.get(start, ()))
    while todo:
        module = todo.pop()
        if module not in found:
            found.add(module)
            todo.extend(edges.get(module, ()))
    return found


def _path(
    edges: Mapping[str, Iterable[str]],
    start: str,
    goal: Callable[[str], bool],
    *,
    first_step: bool = False,
) -> list[str] | None:
    """The shortest import chain from ``start`` to a module ``goal`` accepts."""
    parents: dict[str, str | None] = {}
    queue: deque[str] = deque()
    if first_step:  # a cycle: start counts only once we come back to it
        for module in sorted(edges.get(start, ())):
            parents.setdefault(module, None)
            queue.append(module)
    else:
        parents[start] = None
        queue.append(start)
    while queue:
        module = queue.popleft()
        if goal(module):
            chain = [module]
            while (parent := parents[chain[-1]]) is not None:
                chain.append(parent)
            chain.reverse()
            return [start, *chain] if first_step else chain
        for target in sorted(edges.get(module, ())):
            if target not in parents:
                parents[target] = module
                queue.append(target)
    return None


def loads(graph: ImportGraph) -> dict[str, set[str]]:
    """The edges plus each module's parent packages: what importing a module runs."""
    edges = {name: set(targets) for name, targets in graph.edges.items()}
    for name in graph.modules:
        parent = name.rpartition(".")[0]
        if parent:
            edges[name].add(parent)
    return edges


def _render(cycle: list[str]) -> str:
    return " -> ".join(cycle)


# -- the package --------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return scan(SRC, PACKAGE)


def test_no_import_cycles(graph: ImportGraph) -> None:
    cycles = find_cycles(graph.edges)
    assert not cycles, "import cycles (lazy and TYPE_CHECKING imports count):\n" + "\n".join(
        _render(cycle) for cycle in cycles
    )


def test_every_import_of_the_package_names_one_of_its_modules(graph: ImportGraph) -> None:
    """A lazy import of a module that was moved or renamed fails only when it runs."""
    assert not graph.unresolved


class Rule(NamedTuple):
    #: Modules (and everything under them) the rule is about, without ``trio_swap.``.
    importers: tuple[str, ...]
    #: What they must not import (a module or package, and everything under it).
    forbidden: tuple[str, ...]
    why: str
    #: Exceptions to ``forbidden``.
    allowed: tuple[str, ...] = ()


#: What may import what. Bottom to top: ``config/`` (with ``errors``, ``reasons``,
#: ``_sync``); the pure decisions (``policy/``, ``scheduling/``); the runtime
#: (``upstream/``, ``router``, ``observe/``); ``http/``; the wiring (``reload``,
#: ``systemd``, ``server``, ``cli``). ``responder/`` stands apart.
RULES: tuple[Rule, ...] = (
    Rule(
        ("config",),
        (
            "policy",
            "scheduling",
            "upstream",
            "router",
            "observe",
            "http",
            "reload",
            "systemd",
            "server",
            "cli",
            "explain",
            "responder",
            "fit",
        ),
        "config/ is the bottom layer: every layer reads the config, it reads none of them",
    ),
    Rule(
        ("policy", "scheduling", "fit"),
        (
            "upstream",
            "router",
            "observe",
            "http",
            "reload",
            "systemd",
            "server",
            "cli",
            "responder",
        ),
        "the decisions are pure: their tests call them and assert on what they return",
    ),
    Rule(
        ("router", "upstream", "observe"),
        ("http", "reload", "server", "cli"),
        "the runtime sits below HTTP: requests reach the router through Router.acquire, "
        "and the HTTP layer taps observe/; neither reaches back up",
    ),
    Rule(
        ("http",),
        ("server", "cli"),
        "server.py wires the HTTP layer together; the HTTP layer never reaches back up",
    ),
    Rule(
        ("reload", "systemd"),
        ("http", "server", "cli"),
        "server.py hands them a callback (Reloader's switch_config) and plain data "
        "(status_line): they know nothing of the HTTP layer or of the server",
    ),
    Rule(
        ("responder",),
        ("",),
        "the fake upstream shares no code with the proxy it tests, "
        "so a bug cannot hide in both at once",
        allowed=("responder",),
    ),
)


def _under(module: str, prefix: str) -> bool:
    """``module`` is ``trio_swap.<prefix>`` or inside it (``""``: the whole package)."""
    full = f"{PACKAGE}.{prefix}" if prefix else PACKAGE
    return module == full or module.startswith(full + ".")


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: "+".join(rule.importers))
def test_layers(graph: ImportGraph, rule: Rule) -> None:
    broken = sorted(
        f"{module} imports {target}"
        for module, targets in graph.edges.items()
        if any(_under(module, prefix) for prefix in rule.importers)
        for target in targets
        if any(_under(target, prefix) for prefix in rule.forbidden)
        and not any(_under(target, prefix) for prefix in rule.allowed)
    )
    assert not broken, f"{rule.why}:\n" + "\n".join(broken)


#: Libraries that do I/O (or serve it), kept out of the layers below.
IO_LIBRARIES = ("trio", "quart", "quart_trio", "hypercorn", "httpx", "h11", "werkzeug")


@pytest.mark.parametrize(
    ("importers", "why"),
    [
        (("policy", "scheduling"), "the decisions are pure: no I/O, no clock, no tasks"),
        (("config",), "loading a config reads one file; it starts nothing and serves nothing"),
        (
            ("fit.ledger", "fit.oom"),
            "what fit decides with is data the router feeds; only fit.state does I/O",
        ),
    ],
    ids=["policy+scheduling", "config", "fit"],
)
def test_pure_layers_load_no_io_library(
    graph: ImportGraph, importers: tuple[str, ...], why: str
) -> None:
    """Counting what importing them loads: their imports, their imports' packages, and on."""
    edges = loads(graph)
    broken = []
    for module in sorted(graph.modules):
        if not any(_under(module, prefix) for prefix in importers):
            continue
        chain = _path(edges, module, lambda m: bool(graph.external[m] & set(IO_LIBRARIES)))
        if chain is not None:
            libraries = sorted(graph.external[chain[-1]] & set(IO_LIBRARIES))
            broken.append(f"{_render(chain)} imports {', '.join(libraries)}")
    assert not broken, f"{why}:\n" + "\n".join(broken)


def test_the_app_state_module_is_quart_free(graph: ImportGraph) -> None:
    """The route modules and the app factory share it, so it sits below Quart."""
    assert not graph.external[f"{PACKAGE}.http.state"] & {"quart", "quart_trio", "werkzeug"}


# -- dependencies -------------------------------------------------------------------


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def declared_dependencies(pyproject: Path) -> set[str]:
    """``[project] dependencies`` by normalized distribution name (markers ignored)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    names = set()
    for requirement in project["dependencies"]:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        assert match, requirement
        names.add(_normalize(match[1]))
    return names


def test_third_party_imports_are_exactly_the_declared_dependencies(graph: ImportGraph) -> None:
    """An import that works only because another package pulled its distribution in
    breaks when that package stops needing it; a declared package nothing imports
    is installed for nothing."""
    distributions = importlib.metadata.packages_distributions()
    imported: dict[str, set[str]] = {}  # distribution -> modules importing it
    not_installed = []
    for module, tops in graph.external.items():
        for top in tops:
            names = distributions.get(top)
            if not names:
                not_installed.append(f"{module} imports {top}")
            for name in names or ():
                imported.setdefault(_normalize(name), set()).add(module)
    assert not not_installed, "imports of nothing installed:\n" + "\n".join(sorted(not_installed))
    declared = declared_dependencies(PYPROJECT)
    undeclared = {
        name: sorted(modules) for name, modules in imported.items() if name not in declared
    }
    assert not undeclared, f"imported by src/ but not in pyproject's dependencies: {undeclared}"
    assert declared <= imported.keys(), (
        f"declared but imported nowhere in src/: {sorted(declared - imported.keys())}"
    )


# -- the scanner, on a package made to break every rule it must catch ----------------


def _write(root: Path, files: Mapping[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_scanner_sees_lazy_type_checking_relative_and_submodule_imports(
    tmp_path: Path,
) -> None:
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": "from pkg.a import A\n",
            "a.py": (
                "from __future__ import annotations\n"
                "from typing import TYPE_CHECKING\n"
                "import yaml\n"
                "if TYPE_CHECKING:\n"
                "    from pkg.b import B\n"
                "class A: ...\n"
            ),
            "b.py": "def later() -> None:\n    from . import c\n",  # lazy, `from . import module`
            "c.py": "from .sub import d\nimport json\n",
            "sub/__init__.py": "",
            "sub/d.py": "import pkg.a as a\nfrom ..a import A\nfrom .. import gone\n",
            "e.py": "from pkg import A\nimport pkg.sub\n",  # an attribute of the package
        },
    )
    graph = scan(tmp_path / "pkg", "pkg")
    assert graph.edges == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.c"},
        "pkg.c": {"pkg.sub.d"},
        "pkg.sub": set(),
        "pkg.sub.d": {"pkg.a", "pkg"},  # `from .. import gone`: an attribute, as far as we know
        "pkg.e": {"pkg", "pkg.sub"},
    }
    assert graph.external["pkg.a"] == {"yaml"}  # not __future__, typing or json
    assert graph.external["pkg.c"] == set()
    assert find_cycles(graph.edges) == [["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.sub.d", "pkg"]]
    assert graph.unresolved == []


def test_the_scanner_reports_imports_of_modules_that_do_not_exist(tmp_path: Path) -> None:
    _write(tmp_path / "pkg", {"__init__.py": "", "a.py": "def f():\n    import pkg.moved\n"})
    assert scan(tmp_path / "pkg", "pkg").unresolved == ["pkg.a: pkg.moved"]


def test_a_pure_layer_that_loads_trio_through_a_package_init_is_caught(tmp_path: Path) -> None:
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "pure.py": "from pkg.io.clock import now\n",
            "io/__init__.py": "from pkg.io.tasks import spawn\n",
            "io/clock.py": "def now() -> float: ...\n",
            "io/tasks.py": "import trio\n",
        },
    )
    graph = scan(tmp_path / "pkg", "pkg")
    assert _path(graph.edges, "pkg.pure", lambda m: "trio" in graph.external[m]) is None
    assert _path(loads(graph), "pkg.pure", lambda m: "trio" in graph.external[m]) == [
        "pkg.pure",
        "pkg.io.clock",
        "pkg.io",
        "pkg.io.tasks",
    ]
