"""The dependency rules of ARCHITECTURE.md, checked on the real import graph.

The graph is read from the source (every import statement, function-local ones included,
relative ones resolved), so an import that only runs when a function is called counts as
much as one at the top of a file. The runtime checks below also catch what the source
cannot show: a third-party package that loads torch on import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "openrl"
WORKERS = ("trainer", "sampler", "rewarder", "gateway")
# What light code (the bus, the gateway, rewarders, the scoring client) never imports, anywhere:
# the model stack, and the tinker SDK, whose package imports torch.
HEAVY = ("torch", "transformers", "peft", "vllm", "tinker")
LIGHT = ("bus", "gateway", "rewarder", "client.py")


def _module(path: Path) -> str:
    """openrl/gateway/app.py -> openrl.gateway.app; openrl/bus/__init__.py -> openrl.bus."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    """Every module of openrl, by dotted name."""
    return {_module(p): p for p in ROOT.rglob("*.py")}


def _is_function(node: ast.AST) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))


def _import_nodes(tree: ast.AST, top_level: bool):
    """The import statements under `tree`; with `top_level`, only those that run on import
    (not inside a function)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if not (top_level and _is_function(node)):
            yield from _import_nodes(node, top_level)


def _imports(path: Path, top_level: bool = False) -> set[str]:
    """The absolute names the module at `path` imports."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    return _imports_of(path.read_text(), package, top_level)


def _imports_of(source: str, package: str, top_level: bool = False) -> set[str]:
    """The absolute names `source`, a module of `package`, imports (relative imports resolved):
    for `from X import a`, X.a where that is a module of openrl, else X."""
    names = set()
    for node in _import_nodes(ast.parse(source), top_level):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
            continue
        base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
        module = ".".join([*base, *([node.module] if node.module else [])])
        for alias in node.names:
            names.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in _modules() else module)
    return names


def _openrl(name: str) -> str | None:
    """The module of openrl that importing `name` runs (its longest prefix that is one)."""
    parts = name.split(".")
    return next((m for i in range(len(parts), 0, -1) if (m := ".".join(parts[:i])) in _modules()), None)


@cache
def _graph(top_level: bool = False) -> dict[str, frozenset[str]]:
    """Module -> the modules of openrl it imports."""
    return {m: frozenset(filter(None, map(_openrl, _imports(p, top_level)))) - {m} for m, p in _modules().items()}


def _reach(start: str, top_level: bool = False) -> dict[str, list[str]]:
    """Every module of openrl that `start` imports, straight or through others, with the chain
    of imports that gets there."""
    seen = {start: [start]}
    todo = [start]
    while todo:
        m = todo.pop()
        for n in sorted(_graph(top_level)[m]):
            if n not in seen:
                seen[n] = [*seen[m], n]
                todo.append(n)
    return seen


def _heavy_imports(root: str, top_level: bool = False) -> list[str]:
    """What of HEAVY the code `root` reaches imports, each with the chain to it."""
    found = []
    for m, chain in _reach(root, top_level).items():
        for name in sorted(_imports(_modules()[m], top_level)):
            if name.split(".")[0] in HEAVY:
                found.append(" -> ".join([*chain, name]))
    return found


def _cycle(graph: dict[str, frozenset[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None when it has none."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once every import below it is
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return [*path[path.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = "done"
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


@pytest.mark.parametrize("package", ["bus", *WORKERS])
def test_packages_import_only_what_they_may(package):
    for path in (ROOT / package).rglob("*.py"):
        for name in _imports(path):
            if not name.startswith("openrl"):
                continue
            if package == "bus":
                assert name.startswith("openrl.bus"), f"{path}: bus imports {name}"
            for other in WORKERS:
                if other != package:
                    assert not name.startswith(f"openrl.{other}"), f"{path}: {package} imports {name}"


def test_no_import_cycle_in_openrl():
    """Function-local imports included: one that only dodges a circle is still a circle."""
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_cycles():
    assert _cycle({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": frozenset({"b", "c"}), "b": frozenset({"c"}), "c": frozenset()}) is None


def test_imports_are_read_whole_and_resolved():
    """What the checks here stand on: function-local and relative imports are in the graph."""
    source = "from . import http\nfrom ..bus.client import Bus\nfrom .. import metrics\nimport msgspec\ndef f():\n    import torch\n"
    assert _imports_of(source, "openrl.gateway") == {"openrl.gateway.http", "openrl.bus.client", "openrl.metrics", "msgspec", "torch"}
    assert _imports_of(source, "openrl.gateway", top_level=True) == {"openrl.gateway.http", "openrl.bus.client", "openrl.metrics", "msgspec"}
    assert {"openrl.gateway.service", "openrl.gateway.http", "openrl.metrics"} <= _graph()["openrl.gateway.app"]


@pytest.mark.parametrize("part", LIGHT)
def test_light_code_never_imports_torch_anywhere(part):
    """bus, gateway, rewarder and the scoring client, and everything of openrl they import:
    no import of the model stack, not even inside a function."""
    roots = [_module(p) for p in sorted((ROOT / part).rglob("*.py"))] if (ROOT / part).is_dir() else [_module(ROOT / part)]
    found = sorted({chain for root in roots for chain in _heavy_imports(root)})
    assert not found, "\n".join(found)


def test_the_cli_loads_no_torch_on_import():
    """`openrl` starts light: torch only inside the commands that run models."""
    found = _heavy_imports("openrl.cli", top_level=True)
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "module",
    [
        "openrl.bus.client", "openrl.bus.server", "openrl.gateway.app", "openrl.gateway.scoring", "openrl.cli", "openrl.client",
        "openrl.rewarder", "openrl.rewarder.service", "openrl.rewarder.pool", "openrl.rewarder.child", "openrl.rewarder.builtin",
    ],
)  # fmt: skip
def test_light_processes_never_load_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'transformers', 'peft', 'vllm') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"{module} loads {out.stdout.strip()} {out.stderr[-2000:]}"


def test_the_scoring_client_needs_only_the_bus_errors():
    """openrl.client runs on a laptop next to the tinker SDK: no worker package, no nats."""
    names = {n for n in _imports(ROOT / "client.py") if n.startswith("openrl")}
    assert names <= {"openrl.bus.errors"}, names
    code = "import sys, openrl.client; bad = [m for m in ('nats', 'torch', 'aiohttp', 'structlog') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"openrl.client loads {out.stdout.strip()} {out.stderr[-2000:]}"


# The recipes and the demo are clients: they drive a running stack through the tinker SDK and
# openrl.client, as a user's script would. Of openrl they may use the client side, and the
# built-in rewards (pure functions of strings, which a recipe shares with the reward that
# scores it); never the bus, the gateway or a worker's internals.
CLIENTS = ("recipes", "demo.py")
# The default model (its tokenizer's words, its chat prompts) is neutral ground: a module of its
# own outside the worker packages, which clients and workers both use.
CLIENT_MAY_IMPORT = (
    "openrl.client", "openrl.demo", "openrl.recipes", "openrl.bus.errors", "openrl.rewarder.builtin", "openrl.default_model",
)  # fmt: skip
# Known breaks of that rule. A new break fails; so does one listed here that is gone, until it
# is struck from the list.
CLIENT_BREAKS_TODAY: set[tuple[str, str]] = set()


def test_recipes_and_the_demo_are_clients():
    paths = [p for part in CLIENTS for p in sorted((ROOT / part).rglob("*.py") if (ROOT / part).is_dir() else [ROOT / part])]
    assert len(paths) > 2, paths
    breaks = {
        (str(p.relative_to(ROOT.parent)), name)
        for p in paths
        for name in _imports(p)
        if name.split(".")[0] == "openrl" and not any(name == ok or name.startswith(ok + ".") for ok in CLIENT_MAY_IMPORT)
    }
    assert breaks - CLIENT_BREAKS_TODAY == set(), f"clients import server internals: {sorted(breaks - CLIENT_BREAKS_TODAY)}"
    assert CLIENT_BREAKS_TODAY - breaks == set(), f"fixed: strike from CLIENT_BREAKS_TODAY: {sorted(CLIENT_BREAKS_TODAY - breaks)}"
