"""The schema of ``routes.yaml`` and ``load_config()``.

The frozen dataclasses below *are* the schema (see ``schema.py``): validation and the JSON
Schema export both read them. ``load_config`` returns a ``Config`` or raises ``ConfigError``
listing every problem with its YAML path; it never returns a half-valid config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml

from .schema import MinItems, Pattern, Problem, Range, doc, json_schema, load_yaml, validate

NAME_RE = r"[a-z0-9][a-z0-9_-]{0,62}"
Name = Annotated[str, Pattern(NAME_RE, "a name (lowercase letters, digits, '-', '_')")]
Port = Annotated[int, Range(min=1, max=65535)]
Seconds = Annotated[float, Range(gt=0, max=86400)]
Host = Annotated[
    str,
    Pattern(
        r"[A-Za-z0-9._-]+|\[?[0-9A-Fa-f:.]+\]?",
        "a host name or IP address (no scheme, port or path)",
    ),
]
# A path prefix: empty, or segments of unreserved/sub-delim characters, never "." or "..".
PREFIX_RE = r"(/(?!\.\.?(?:/|$))[A-Za-z0-9._~!$&'()*+,;=:@-]+)*"
Prefix = Annotated[str, Pattern(PREFIX_RE, "a path prefix like /search, or empty")]

# Names the gateway uses for itself in metric labels and logs.
RESERVED_SERVICE_NAMES = frozenset({"gateway", "unmatched"})


@dataclass(frozen=True)
class Listen:
    """Where the gateway accepts client connections."""

    host: str = doc("Address to listen on.", "0.0.0.0")  # noqa: S104 - a gateway listens publicly
    port: Port = doc("TCP port to listen on.", 8080)


@dataclass(frozen=True)
class Node:
    """A machine where services run."""

    host: Host = doc("Host name or IP address of the node.")


@dataclass(frozen=True)
class NodeRef:
    """One place a service runs: a node, optionally on a port other than the service's."""

    __shorthand__: ClassVar[str] = "node"
    node: Name = doc("Name of a node under `nodes`.")
    port: Port | None = doc("Port on that node; defaults to the service's port.", None)


@dataclass(frozen=True)
class Timeouts:
    """Upstream timeouts in seconds. Unset keys fall back to the top-level `timeouts`, then to
    the built-in defaults (connect 1, response 30)."""

    connect: Seconds | None = doc(
        "Time to get a connection to the upstream, including waiting for a free slot under "
        "`max_connections` (default 1).",
        None,
    )
    response: Seconds | None = doc(
        "Time to wait for the upstream's response headers after the request is sent, and the "
        "longest pause allowed while reading its body (default 30).",
        None,
    )


DEFAULT_TIMEOUTS = Timeouts(connect=1.0, response=30.0)


@dataclass(frozen=True)
class Service:
    """A service reachable as /api/<name>/... (and /ws/<name>/...)."""

    port: Port = doc("The service's port on its nodes.")
    nodes: Annotated[tuple[NodeRef, ...], MinItems(1)] = doc(
        "Nodes the service runs on, in order of preference."
    )
    http_prefix: Prefix | None = doc(
        "Path prefix on the upstream that replaces /api/<name>; default /<name>; "
        "empty strips the whole /api/<name>.",
        None,
    )
    timeouts: Timeouts = doc("Upstream timeouts for this service.", Timeouts())
    max_connections: Annotated[int, Range(min=1, max=100_000)] = doc(
        "Most requests in flight to this service at once (per gateway process); "
        "others wait up to the connect timeout, then get 503.",
        256,
    )


@dataclass(frozen=True)
class Config:
    """The DAARION gateway's routing table (routes.yaml)."""

    nodes: Mapping[Name, Node] = doc("Machines where services run, by name.")
    services: Mapping[Name, Service] = doc("Services by name: /api/<name>/... routes to them.")
    listen: Listen = doc("Where the gateway listens.", Listen())
    timeouts: Timeouts = doc("Default upstream timeouts for every service.", Timeouts())


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


def _first(*values: float | None) -> float:
    return next(v for v in values if v is not None)


def effective_timeouts(config: Config, service: Service) -> tuple[float, float]:
    """(connect, response) for a service: its own, else the top-level ones, else the defaults."""
    layers = (service.timeouts, config.timeouts, DEFAULT_TIMEOUTS)
    return _first(*(t.connect for t in layers)), _first(*(t.response for t in layers))


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [Problem("", f"cannot read the file: {exc}")]) from None
    return parse_config(text, source, env)


def parse_config(
    text: str, source: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    env = os.environ if env is None else env
    try:
        data, loader = load_yaml(text)
    except yaml.YAMLError as exc:
        line = None
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            line = mark.line + 1
        message = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [Problem("", f"invalid YAML: {message}", line)]) from None
    if data is None:
        raise ConfigError(source, [Problem("", "the file is empty")])
    config, conv = validate(Config, data, env, loader)
    problems = list(conv.problems) + [
        Problem(path, message, conv.path_lines.get(path)) for path, message in _semantic(data)
    ]
    if config is None or problems:
        problems.sort(key=lambda p: (p.line or 0, p.path))
        raise ConfigError(source, problems)
    return config


def _semantic(data: Any) -> list[tuple[str, str]]:
    """Cross-references the types cannot express, as (path, message) pairs.

    Works on the raw data, defensively, so that these problems are reported together with
    the type errors instead of only after those are fixed.
    """
    problems: list[tuple[str, str]] = []
    nodes = data.get("nodes") if isinstance(data, dict) else None
    services = data.get("services") if isinstance(data, dict) else None
    if not isinstance(services, dict):
        return problems
    known = sorted(nodes) if isinstance(nodes, dict) else []
    for name, service in services.items():
        base = f"services.{name}"
        if name in RESERVED_SERVICE_NAMES:
            problems.append((base, f"'{name}' is reserved for the gateway itself"))
        refs = service.get("nodes") if isinstance(service, dict) else None
        if not isinstance(refs, list):
            continue
        seen: set[tuple[str, Any]] = set()
        for i, ref in enumerate(refs):
            node = ref.get("node") if isinstance(ref, dict) else ref
            if not isinstance(node, str):
                continue
            if known and node not in known:
                problems.append(
                    (f"{base}.nodes[{i}]", f"unknown node '{node}' (known: {', '.join(known)})")
                )
            port = ref.get("port") if isinstance(ref, dict) else None
            target = (node, port or service.get("port"))
            if target in seen:
                problems.append((f"{base}.nodes[{i}]", f"{node}:{target[1]} is listed twice"))
            seen.add(target)
    return problems


def config_json_schema() -> dict[str, Any]:
    schema = json_schema(Config)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://daarion.city/schemas/gateway-routes.json",
        "title": "DAARION gateway routes.yaml",
        **schema,
    }
