"""The schema of ``routes.yaml`` and ``load_config()``.

The frozen dataclasses below *are* the schema (see ``schema.py``): validation and the JSON
Schema export both read them. ``load_config`` returns a ``Config`` or raises ``ConfigError``
listing every problem with its YAML path; it never returns a half-valid config.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml

from .schema import MinItems, Pattern, Problem, Range, doc, validate
from .schemajson import json_schema
from .yamlsource import load_yaml

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
NONE = "none"  # rate_limit: none / default_rate_limit: none
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster", "memory")
Rate = Annotated[str, Pattern(r"[1-9][0-9]{0,8}r/[sm]", "a rate like 10r/s or 30r/m")]
KeyPart = Annotated[
    str,
    Pattern(
        r"client_ip|service|user|header:[A-Za-z0-9!#$%&'*+.^_`|~-]+",
        "client_ip, service, user or header:<Name>",
    ),
]
Origin = Annotated[
    str,
    Pattern(
        r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|null", "an origin like https://app.daarion.city"
    ),
]
Cidr = Annotated[
    str, Pattern(r"[0-9A-Fa-f:.]+(/[0-9]{1,3})?", "an address or CIDR like 10.0.0.0/8")
]


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


DEFAULT_TIMEOUTS = Timeouts(connect=0.5, response=30.0)


@dataclass(frozen=True)
class HealthCheck:
    """Active health checks of each target. Unset keys fall back to the top-level `health`,
    then to the defaults (path /health, interval 5, timeout 1, rise 2, fall 3)."""

    path: (
        Annotated[str, Pattern(r"/[A-Za-z0-9._~!$&'()*+,;=:@/?%-]*", "a path like /health")] | None
    ) = doc("Path probed on each target (default /health; some services use /healthz).", None)
    interval: Seconds | None = doc("Seconds between probes of a target (default 5).", None)
    timeout: Seconds | None = doc("Seconds a probe may take (default 1).", None)
    rise: Annotated[int, Range(min=1, max=100)] | None = doc(
        "Consecutive passes that bring a target back (default 2).", None
    )
    fall: Annotated[int, Range(min=1, max=100)] | None = doc(
        "Consecutive failures, of probes or of real traffic, that take a target out (default 3).",
        None,
    )
    enabled: bool | None = doc("Probe at all (default true).", None)


DEFAULT_HEALTH = HealthCheck(
    path="/health", interval=5.0, timeout=1.0, rise=2, fall=3, enabled=True
)


@dataclass(frozen=True)
class Ejection:
    """How long real-traffic failures take a target out: ``base`` seconds the first time, a
    ``base`` more each time it repeats, at most ``max`` (defaults 5 and 60)."""

    base: Seconds | None = doc("Seconds out after the first ejection (default 5).", None)
    max: Seconds | None = doc("Longest ejection in seconds (default 60).", None)


DEFAULT_EJECTION = Ejection(base=5.0, max=60.0)
DEFAULT_RETRIES = 1
Retries = Annotated[int, Range(min=0, max=5)]


@dataclass(frozen=True)
class RateLimit:
    """A limit_req zone: nginx's leaky bucket, shared by every gateway through Redis."""

    rate: Rate = doc("Sustained rate: Nr/s or Nr/m.")
    burst: Annotated[int, Range(min=0, max=1_000_000)] = doc(
        "Requests allowed above the rate at once (nginx burst=).", 0
    )
    key: Annotated[tuple[KeyPart, ...], MinItems(1)] = doc(
        "What identifies a bucket: client_ip, service, user, header:<Name>. A zone without "
        "'service' is one bucket across every service that uses it.",
        ("client_ip",),
    )
    delay: Annotated[int, Range(min=0, max=1_000_000)] | None = doc(
        "Requests of the burst served at once; later ones are delayed to the rate, not "
        "refused (nginx delay=). Default: the whole burst (nodelay).",
        None,
    )
    dry_run: bool = doc("Count and log what would be refused, refuse nothing.", False)
    status: Annotated[int, Range(min=400, max=599)] = doc(
        "Status of a refusal (429; nginx answers 503).", 429
    )
    headers: bool = doc("Send RateLimit headers on allowed responses too.", True)


@dataclass(frozen=True)
class Redis:
    """Where rate-limit state is shared. Without this section limits are per process."""

    url: str = doc(
        "redis://, rediss://, unix://, redis+sentinel://host:port[,host:port]/<master>[/db], "
        "redis+cluster://host:port[,host:port], or memory:// for per-process limits.",
        "redis://127.0.0.1:6379/0",
    )
    timeout: Seconds = doc("Longest wait for any Redis call.", 0.05)
    on_error: Literal["local", "allow", "deny"] = doc(
        "While Redis fails: enforce the same limits per process (local), let everything "
        "through (allow) or refuse everything limited (deny).",
        "local",
    )
    prefix: str = doc("Prefix of the gateway's keys in Redis.", "daarion:rl:")


@dataclass(frozen=True)
class Service:
    """A service reachable as /api/<name>/... (and /ws/<name>/...)."""

    port: Port = doc("The service's port on its nodes.")
    nodes: Annotated[
        tuple[NodeRef | Annotated[tuple[NodeRef, ...], MinItems(1)], ...], MinItems(1)
    ] = doc(
        "Nodes the service runs on, in order of preference; a list inside the list is a "
        "tier of nodes that share the load round-robin."
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
    rate_limit: Name | None = doc(
        "A zone under rate_limits, or none; default: default_rate_limit.", None
    )
    websocket: bool = doc(
        "Accept WebSocket sessions on /ws/<name>/... (a ws_prefix implies it).", False
    )
    ws_prefix: Prefix | None = doc(
        "Path prefix on the upstream that replaces /ws/<name>; default /ws/<name>.", None
    )
    ws_origins: tuple[Origin, ...] | None = doc(
        "Origins allowed to open WebSocket sessions (e.g. https://app.daarion.city); default: any.",
        None,
    )
    ws_max_message: Annotated[int, Range(min=1, max=64 * 1024 * 1024)] = doc(
        "Largest WebSocket message in bytes; a bigger one closes the session with 1009.",
        1024 * 1024,
    )
    ws_ping_interval: Seconds = doc(
        "Seconds of silence after which the gateway pings each leg of a session; a peer that "
        "does not answer within half of it is taken as dead.",
        20.0,
    )
    ws_idle_timeout: Seconds | None = doc(
        "Close sessions without any message for this many seconds (default: never).", None
    )
    health: HealthCheck = doc("Active health checks for this service.", HealthCheck())
    retries: Retries | None = doc(
        "Extra attempts on another target when that is safe (default 1).", None
    )
    ejection: Ejection = doc("Passive ejection of failing targets.", Ejection())


@dataclass(frozen=True)
class Config:
    """The DAARION gateway's routing table (routes.yaml)."""

    nodes: Mapping[Name, Node] = doc("Machines where services run, by name.")
    services: Mapping[Name, Service] = doc("Services by name: /api/<name>/... routes to them.")
    listen: Listen = doc("Where the gateway listens.", Listen())
    timeouts: Timeouts = doc("Default upstream timeouts for every service.", Timeouts())
    redis: Redis | None = doc("Shared rate-limit state; absent: limits are per process.", None)
    rate_limits: Mapping[Name, RateLimit] = doc(
        "Rate-limit zones by name.", factory=lambda: MappingProxyType({})
    )
    default_rate_limit: Name | None = doc(
        "The zone for services that name none (none: no limit).", None
    )
    trusted_proxies: tuple[Cidr, ...] = doc(
        "Peers whose X-Forwarded-For is believed (CIDRs); empty: the peer is the client.", ()
    )
    health: HealthCheck = doc("Default health checks for every service.", HealthCheck())
    retries: Retries | None = doc("Default retries for every service.", None)
    ejection: Ejection = doc("Default passive ejection for every service.", Ejection())


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


L = TypeVar("L", Timeouts, HealthCheck, Ejection)


def layered(*layers: L) -> L:
    """Field by field, the first value that is set: a service's own, then the top level's,
    then the defaults (which set every field)."""
    values = {
        f.name: next((v for layer in layers if (v := getattr(layer, f.name)) is not None), None)
        for f in dataclasses.fields(layers[0])
    }
    return dataclasses.replace(layers[0], **values)


def service_settings(
    config: Config, service: Service
) -> tuple[Timeouts, HealthCheck, Ejection, int]:
    """A service's timeouts, health checks, ejection and retries, every field set."""
    retries = service.retries if service.retries is not None else config.retries
    return (
        layered(service.timeouts, config.timeouts, DEFAULT_TIMEOUTS),
        layered(service.health, config.health, DEFAULT_HEALTH),
        layered(service.ejection, config.ejection, DEFAULT_EJECTION),
        DEFAULT_RETRIES if retries is None else retries,
    )


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
    if not isinstance(data, dict):
        return []
    return [
        *_service_refs(data),
        *_zone_problems(data.get("rate_limits")),
        *_cidr_problems(data.get("trusted_proxies")),
        *_redis_problems(data.get("redis")),
    ]


def _service_refs(data: dict[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    services = data.get("services")
    nodes = data.get("nodes")
    zones = data.get("rate_limits")
    known = sorted(nodes) if isinstance(nodes, dict) else []
    zone_names = sorted(zones) if isinstance(zones, dict) else []
    default = data.get("default_rate_limit")
    if isinstance(default, str) and default != NONE and default not in zone_names:
        problems.append(("default_rate_limit", _unknown("rate limit", default, zone_names)))
    for name, service in services.items() if isinstance(services, dict) else ():
        base = f"services.{name}"
        if name in RESERVED_SERVICE_NAMES:
            problems.append((base, f"'{name}' is reserved for the gateway itself"))
        if not isinstance(service, dict):
            continue
        zone = service.get("rate_limit")
        if isinstance(zone, str) and zone != NONE and zone not in zone_names:
            problems.append((f"{base}.rate_limit", _unknown("rate limit", zone, zone_names)))
        seen: set[tuple[str, Any]] = set()
        for path, ref in _node_refs(f"{base}.nodes", service.get("nodes")):
            node = ref.get("node") if isinstance(ref, dict) else ref
            if not isinstance(node, str):
                continue
            if known and node not in known:
                problems.append((path, _unknown("node", node, known)))
            port = ref.get("port") if isinstance(ref, dict) else None
            target = (node, port or service.get("port"))
            if target in seen:
                problems.append((path, f"{node}:{target[1]} is listed twice"))
            seen.add(target)
    return problems


def _node_refs(base: str, refs: Any) -> list[tuple[str, Any]]:
    """(path, entry) of every node entry, tiers (lists inside the list) flattened."""
    out: list[tuple[str, Any]] = []
    for i, ref in enumerate(refs if isinstance(refs, list) else ()):
        if isinstance(ref, list):
            out += [(f"{base}[{i}][{j}]", inner) for j, inner in enumerate(ref)]
        else:
            out.append((f"{base}[{i}]", ref))
    return out


def _unknown(what: str, name: str, known: list[str]) -> str:
    return f"unknown {what} '{name}' (known: {', '.join(known) or 'none'})"


def _zone_problems(zones: Any) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for name, zone in zones.items() if isinstance(zones, dict) else ():
        if name == NONE:
            problems.append((f"rate_limits.{name}", "'none' means no limit; pick another name"))
        if not isinstance(zone, dict):
            continue
        delay, burst = zone.get("delay"), zone.get("burst", 0)
        if isinstance(delay, int) and isinstance(burst, int) and delay > burst:
            problems.append((f"rate_limits.{name}.delay", f"must not exceed burst ({burst})"))
    return problems


def _cidr_problems(cidrs: Any) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for i, cidr in enumerate(cidrs if isinstance(cidrs, list) else ()):
        if isinstance(cidr, str):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                problems.append((f"trusted_proxies[{i}]", str(exc)))
    return problems


def _redis_problems(redis: Any) -> list[tuple[str, str]]:
    url = redis.get("url") if isinstance(redis, dict) else None
    if isinstance(url, str) and "${" not in url:
        scheme = url.partition("://")[0]
        if scheme not in REDIS_SCHEMES:
            return [("redis.url", f"unknown scheme '{scheme}' (use {', '.join(REDIS_SCHEMES)})")]
    return []


def config_json_schema() -> dict[str, Any]:
    schema = json_schema(Config)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://daarion.city/schemas/gateway-routes.json",
        "title": "DAARION gateway routes.yaml",
        **schema,
    }
