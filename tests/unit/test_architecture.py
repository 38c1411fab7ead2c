"""The import graph of ``gateway/``, read from the source with ``ast``: every import counts,
at module level, under ``if TYPE_CHECKING:`` or inside a function. A package's ``__init__``
is the package itself (``from . import __version__`` in ``metrics.py`` depends on
``gateway``); ``from .x import y`` depends on ``x.y`` when that is a module, else on ``x``.

Checked: no cycle; only ``cli`` (and the demo, the other program that runs a gateway) imports
``app``; ``context`` imports no phase; and the rule of each room, as ARCHITECTURE.md and the
packages' docstrings write it.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from ..helpers import gateway_modules

PHASES = frozenset({
    "gateway.pipeline",
    "gateway.upstream.forward",
    "gateway.upstream.failover",
    "gateway.websocket.handshake",
    "gateway.ratelimit.phase",
    "gateway.endpoints",
    "gateway.app",
})  # fmt: skip


@dataclass(frozen=True)
class Import:
    target: str  # a module of the gateway, or the top-level name of another distribution
    line: int
    eager: bool  # run when the module is imported: module level, not under TYPE_CHECKING


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(
    module: str, source: str, known: Iterable[str], *, is_package: bool = False
) -> list[Import]:
    """What ``module`` (whose source is ``source``; an ``__init__.py`` if ``is_package``)
    imports, resolved to the names of ``known`` modules."""
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, eager: bool) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for statement in node.body:
                visit(statement, eager=False)
            for statement in node.orelse:
                visit(statement, eager)
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            eager = False  # runs when called, not when imported
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(resolve_absolute(alias.name, known), node.lineno, eager))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source_module = ".".join(base + ([node.module] if node.module else []))
            else:
                source_module = node.module or ""
            for alias in node.names:
                name = f"{source_module}.{alias.name}"
                target = name if name in known else resolve_absolute(source_module, known)
                found.append(Import(target, node.lineno, eager))
        for child in ast.iter_child_nodes(node):
            visit(child, eager)

    visit(ast.parse(source), eager=True)
    return found


def resolve_absolute(name: str, known: set[str]) -> str:
    """A gateway module as such (its longest known prefix); another distribution by its
    top-level name."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        if ".".join(parts[:cut]) in known:
            return ".".join(parts[:cut])
    return parts[0]


@functools.cache
def graph() -> dict[str, tuple[Import, ...]]:
    modules = gateway_modules()
    return {
        module: tuple(
            imports_of(
                module,
                path.read_text(encoding="utf-8"),
                modules,
                is_package=path.name == "__init__.py",
            )
        )
        for module, path in modules.items()
    }


def gateway_edges(module: str) -> set[str]:
    return {i.target for i in graph()[module] if i.target.startswith("gateway")} - {module}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges`` (as a path back to its start), or None."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := dfs(node)) is not None:
            return cycle
    return None


def test_the_graph_is_read_as_documented() -> None:
    """The reader itself, on imports whose resolution is known."""
    edges = graph()
    assert "gateway" in gateway_edges("gateway.metrics")  # from . import __version__
    context = {(i.target, i.eager) for i in edges["gateway.context"]}
    assert ("gateway.metrics", True) in context  # from .metrics import UNMATCHED
    assert ("gateway.metrics", False) in context  # from .metrics import Metrics, for types
    assert ("gateway.upstream.health", True) not in context  # under TYPE_CHECKING only
    assert ("gateway.upstream.health", False) in context
    cli = {(i.target, i.eager) for i in edges["gateway.cli"]}
    assert ("gateway.lifecycle.supervisor", False) in cli  # inside _serve()
    assert ("gateway.config", True) in cli
    assert "gateway.upstream.failover" in gateway_edges("gateway.upstream.forward")
    assert "gateway.websocket.frames" in gateway_edges("gateway.websocket.session")  # from .frames
    assert gateway_edges("gateway.config") == {"gateway.config.load", "gateway.config.types"}


def test_find_cycle_reports_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
    found = imports_of("gateway.a", source, {"gateway", "gateway.a", "gateway.b"})
    assert found == [Import("typing", 1, True), Import("gateway.b", 3, False)]


def test_no_import_cycle_among_the_gateways_modules() -> None:
    cycle = find_cycle({module: gateway_edges(module) for module in graph()})
    assert cycle is None, "import cycle (TYPE_CHECKING and function-local imports count): " + (
        " -> ".join(cycle or [])
    )


def test_nothing_but_a_worker_imports_the_app() -> None:
    importers = sorted(m for m in graph() if "gateway.app" in gateway_edges(m))
    # A worker runs one Gateway; the demo runs one in front of its stand-ins.
    assert importers == ["gateway.demo.stack", "gateway.lifecycle.worker"]


def reachable(module: str) -> set[str]:
    """Every module (of the gateway, or another distribution's top level) that importing
    ``module`` may import, at once or later."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for found in graph().get(current, ()):
            if found.target not in seen:
                seen.add(found.target)
                todo.append(found.target)
    return seen


def test_the_supervisor_runs_no_gateway_code() -> None:
    """It outlives every worker's code (a restart replaces it only after a preflight): it
    stays small, and importing it loads no request code and no aiohttp."""
    loaded = reachable("gateway.lifecycle.supervisor")
    assert "gateway.app" not in loaded
    assert "aiohttp" not in loaded
    assert "gateway.pipeline" not in loaded


def test_the_context_imports_no_phase() -> None:
    held = gateway_edges("gateway.context")
    assert held & PHASES == set()
    # "its imports are the types of the things it holds, and none of those modules imports it"
    assert sorted(m for m in held if "gateway.context" in gateway_edges(m)) == []


def room(module: str) -> str:
    """``gateway.upstream.http`` -> ``gateway.upstream``; top-level modules are their own."""
    parts = module.split(".")
    return ".".join(parts[:2])


# (room, what no module in it may import: other modules, or rooms by prefix)
NEVER = [
    ("gateway.config", "every other room but the certs leaf", None),
    ("gateway.certs", "every other room", None),  # the leaves
    ("gateway.errors", "every other room", None),
    ("gateway.logs", "every other room", None),
    ("gateway.metrics", "every other room", None),
    ("gateway.ratelimit", "app, pipeline, upstream, websocket",
     {"gateway.app", "gateway.pipeline", "gateway.upstream", "gateway.websocket"}),
    ("gateway.upstream", "app, pipeline, another room's phase",
     {"gateway.app", "gateway.pipeline", "gateway.websocket.handshake", "gateway.ratelimit.phase",
      "gateway.endpoints"}),
    ("gateway.websocket", "app, pipeline", {"gateway.app", "gateway.pipeline"}),
    ("gateway.edge", "a phase", PHASES | {"gateway.upstream", "gateway.websocket"}),
    ("gateway.snapshot", "a phase", PHASES),
    ("gateway.auth", "any room but config, context (the phase) and the leaves", None),
    ("gateway.tracing", "any room but config and the leaves", None),
]  # fmt: skip


# What a room that may import no other room may import all the same: config checks the
# certificate files a config names with the certs leaf; auth reads the config's types.
LEAVES_FOR = {
    "gateway.config": ("gateway.certs",),
    # errors answers with aiohttp_private's Whole; that module imports nothing of the gateway.
    "gateway.errors": ("gateway.aiohttp_private",),
    "gateway.auth": (
        "gateway.config",
        "gateway.certs",
        "gateway.logs",
        "gateway.errors",
        "gateway.metrics",
        "gateway.context",
        "gateway.snapshot",
    ),  # context, snapshot: the phase's types (phase.py), as ratelimit/phase.py has them
    "gateway.tracing": ("gateway.config", "gateway.logs", "gateway.errors", "gateway.metrics"),
}


@pytest.mark.parametrize(("owner", "rule", "forbidden"), NEVER, ids=[r[0] for r in NEVER])
def test_each_rooms_rule(owner: str, rule: str, forbidden: set[str] | None) -> None:
    broken = {}
    for module in graph():
        if room(module) != owner:
            continue
        edges = gateway_edges(module)
        if forbidden is None:  # a leaf or config: its own modules and the package only
            allowed = {owner, "gateway", *LEAVES_FOR.get(owner, ())}
            bad = {e for e in edges if room(e) not in allowed}
        else:
            bad = {e for e in edges if any(e == f or e.startswith(f + ".") for f in forbidden)}
        if bad:
            broken[module] = sorted(bad)
    assert broken == {}, f"{owner} may not import {rule}: {broken}"


def eager_closure(start: str) -> set[str]:
    """Everything importing ``start`` runs: its eager imports, transitively (the gateway's
    modules and other distributions' top-level names). A module's packages run first."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module not in graph():
            continue  # another distribution
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        todo += [*parents, *(i.target for i in graph()[module] if i.eager)]
    return seen


def test_the_cli_loads_only_the_config_until_a_command_needs_more() -> None:
    loaded = eager_closure("gateway.cli")
    gateway = {m for m in loaded if m.startswith("gateway")}
    assert gateway <= {"gateway", "gateway.cli", "gateway.commands", "gateway.certs"} | {
        m for m in graph() if room(m) == "gateway.config"
    }, sorted(gateway)
    assert loaded.isdisjoint({"aiohttp", "prometheus_client", "redis", "uvloop"}), sorted(loaded)


def test_the_frame_reader_and_the_decisions_are_pure() -> None:
    """No I/O library in the modules that the docs call pure or free of I/O."""
    io = {"aiohttp", "asyncio", "socket", "redis", "ssl"}
    for module in (
        "gateway.websocket.frames",
        "gateway.upstream.balancer",
        "gateway.routing",
        "gateway.auth.tokens",
        "gateway.auth.cache",
        "gateway.tracing.context",
    ):
        direct = {i.target for i in graph()[module] if not i.target.startswith("gateway")}
        assert direct.isdisjoint(io), (module, sorted(direct & io))
    assert "aiohttp" not in eager_closure("gateway.snapshot")  # "no aiohttp"


def test_only_the_exporter_imports_opentelemetry_and_only_when_tracing_is_on() -> None:
    """The SDK is loaded by ``tracing/export.py`` alone, which nothing imports eagerly (the
    app imports it when ``tracing`` is configured): with tracing off no SDK code runs."""
    users = {
        m for m, imports in graph().items() if any(i.target == "opentelemetry" for i in imports)
    }
    assert users == {"gateway.tracing.export"}
    eager = {
        m
        for m, imports in graph().items()
        for i in imports
        if i.eager and i.target == "gateway.tracing.export"
    }
    assert eager == set()
    assert "opentelemetry" not in eager_closure("gateway.pipeline")
