"""The compiled, immutable form of a ``Config`` that requests read.

A request reads ``gateway.snapshot`` once and uses only that object, so a reload (one
assignment of a new snapshot) never changes a request half way through. Everything that is
the same for every request of a service (URLs, timeouts, prefixes, policies) is computed here
once, with every default resolved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from .config import DEFAULT_LIMITS, DEFAULT_TIMEOUTS, NONE, Config, Service, service_settings
from .config.types import (
    Cors,
    RequestLimits,
    RouteRule,
    ServiceAuth,
    connection_limits,
    layered,
    service_limits,
    size,
)
from .edge.cors import Added, CorsPolicy, compile_cors, cors_of, security
from .edge.trusted import IDENTITY, Networks, TrustedProxies
from .ratelimit.zones import Zone, compile_zone
from .routetable import API, WS, Entry, RouteTable
from .upstream.tls import UpstreamTls, node_tls


@dataclass(frozen=True, slots=True)
class Target:
    """One place a service runs. ``key`` identifies it across reloads (for health state): a
    reload that changes only the node's ``tls`` keeps what is known of it, and its next check
    judges the new settings."""

    service: str
    node: str
    host: str
    port: int
    tier: int  # 0: the preferred nodes; 1, 2...: fallbacks in order
    # The node's TLS (one per node per snapshot); None: plain HTTP. Not compared: a target is
    # where a service runs, and its context is new at every reload.
    tls: UpstreamTls | None = field(default=None, compare=False)
    key: tuple[str, str, str, int] = field(init=False, compare=False)
    authority: str = field(init=False, compare=False)  # host:port, an IPv6 host in brackets
    origin: str = field(init=False, compare=False)  # http://host:port, or https://
    label: str = field(init=False, compare=False)  # "node host:port", for log lines

    def __post_init__(self) -> None:
        # Computed once here: requests read them on the hot path.
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        scheme = "http" if self.tls is None else "https"
        object.__setattr__(self, "key", (self.service, self.node, self.host, self.port))
        object.__setattr__(self, "authority", f"{host}:{self.port}")
        object.__setattr__(self, "origin", f"{scheme}://{host}:{self.port}")
        object.__setattr__(self, "label", f"{self.node} {self.host}:{self.port}")


@dataclass(frozen=True, slots=True)
class ProbePolicy:
    path: str
    interval: float
    unhealthy_interval: float  # while no target of the service is usable
    timeout: float
    rise: int
    fall: int
    enabled: bool


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    base: float
    max: float


@dataclass(frozen=True, slots=True)
class WsPolicy:
    """A WebSocket route's sessions. Origins: ``any_origin``; else those ``origins`` lists;
    else (None) the default: no Origin, the request's own, or one the route's CORS allows."""

    origins: frozenset[str] | None
    any_origin: bool
    max_message: int
    ping_interval: float
    idle_timeout: float | None
    extensions: bool  # the client's extension offer goes to the upstream
    upstream_gone_code: int  # to the client when the upstream's connection just ends


@dataclass(frozen=True, slots=True)
class BodyPolicy:
    """A request body's limits (``limits`` of the service, over the top level's)."""

    max_size: int  # bytes; 0: no limit
    timeout: float  # seconds between two reads


@dataclass(frozen=True, slots=True)
class EdgePolicy:
    """What one client connection may hold (top-level ``limits``)."""

    header_timeout: float
    header_buffer: int  # bytes of a whole request head
    keepalive_timeout: float
    send_timeout: float  # seconds a client may take none of its answer; 0: no limit
    per_client: int  # open connections per client address
    max_clients: int  # open client connections in all


@dataclass(frozen=True, slots=True)
class Exposure:
    """What the listeners serve beyond the routes: HSTS on HTTPS answers, the plain
    listener's redirect to HTTPS, and who reaches the admin endpoints (ACME's challenges are
    the running ACME client's: ``Shared.challenge``)."""

    hsts: str | None  # the Strict-Transport-Security value; None: not sent
    redirect: bool  # the plain listener answers 308 to https://
    redirect_port: int | None  # the port in those redirects (None: the bound one)
    admin: Networks  # client addresses that may reach /metrics and /gateway/*
    added: Added | None  # the security headers of every answer; None: none


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """Whether a route needs a token (``auth`` of the route, else of its service)."""

    required: bool  # else optional: no token passes anonymously
    providers: tuple[str, ...] | None  # None: every provider
    roles: frozenset[str] | None  # any of them is needed; None: none


@dataclass(frozen=True, slots=True)
class Route:
    """What a request on one route uses: the service's targets and the route's policies (the
    service's, with a route's own overrides)."""

    service: str
    tiers: tuple[tuple[Target, ...], ...]  # in order of preference
    connect_timeout: float
    response_timeout: float  # for the headers, and the longest pause inside the body
    max_connections: int
    zone: Zone | None
    probe: ProbePolicy
    ejection: EjectionPolicy
    retries: int
    ws: WsPolicy | None  # None: no WebSocket sessions
    body: BodyPolicy
    underscores_in_headers: bool  # forward header names with "_" (else dropped)
    cookie_path: bool  # rewrite Set-Cookie Path= from the route's to to its path
    auth: AuthPolicy | None  # None: no check
    cors: CorsPolicy | None  # None: the gateway adds no CORS (the upstream's pass through)
    added: Added | None  # without cors: what every answer gets (the security headers)
    targets: tuple[Target, ...] = field(init=False)  # every tier's, in order

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(t for tier in self.tiers for t in tier))


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    routes: Mapping[str, Route]  # by service: its own policies (health, slots, probes)
    table: RouteTable[Route]  # every public path, of every service
    trusted: TrustedProxies
    edge: EdgePolicy
    exposure: Exposure
    identity_strip: frozenset[str]  # identity header names removed from every request


def compile_snapshot(config: Config) -> Snapshot:
    zones = {name: compile_zone(name, spec) for name, spec in config.rate_limits.items()}
    tls = {name: node_tls(name, node) for name, node in config.nodes.items()}
    edge = _Edge(config)
    routes = {
        name: _route(config, name, service, zones, tls, edge=edge)
        for name, service in config.services.items()
    }
    entries = [
        entry
        for name, service in config.services.items()
        for entry in _entries(config, name, service, routes[name], zones, edge=edge)
    ]
    limits = connection_limits(config)
    return Snapshot(
        config=config,
        routes=MappingProxyType(routes),
        table=RouteTable(entries),
        trusted=TrustedProxies(config.trusted_proxies),
        edge=EdgePolicy(
            header_timeout=_set(limits.client_header_timeout),
            header_buffer=_size(limits.client_header_buffer),
            keepalive_timeout=_set(limits.keepalive_timeout),
            send_timeout=_set(limits.send_timeout),
            per_client=_set(limits.max_connections_per_client),
            max_clients=_set(limits.max_client_connections),
        ),
        exposure=_exposure(config, edge.added),
        identity_strip=IDENTITY
        | frozenset(
            name.lower().replace("_", "-")
            for name in (config.auth.identity_headers.values() if config.auth else ())
        ),
    )


class _Edge:
    """The headers every answer gets, and each distinct ``cors`` compiled once."""

    def __init__(self, config: Config) -> None:
        headers = config.security_headers
        defaults = security(
            ()
            if headers is None
            else (
                ("X-Content-Type-Options", headers.content_type_options),
                ("X-Frame-Options", headers.frame_options),
                ("Referrer-Policy", headers.referrer_policy),
            )
        )
        self.defaults = defaults
        self.added = Added(None, defaults) if defaults else None
        self.top = config.cors
        self._compiled: dict[Cors, CorsPolicy] = {}

    def cors(self, *layers: Cors | str | None) -> CorsPolicy | None:
        cors = cors_of(*layers, self.top)
        if cors is None:
            return None
        if cors not in self._compiled:
            self._compiled[cors] = compile_cors(cors, self.defaults)
        return self._compiled[cors]


def _exposure(config: Config, added: Added | None) -> Exposure:
    tls = config.tls if config.tls is not None and config.tls.enabled else None
    hsts = None
    if tls is not None and tls.hsts is not None:
        hsts = f"max-age={tls.hsts.max_age}"
        hsts += "; includeSubDomains" if tls.hsts.include_subdomains else ""
        hsts += "; preload" if tls.hsts.preload else ""
    return Exposure(
        hsts=hsts,
        redirect=tls is not None and tls.redirect_http,
        redirect_port=tls.public_port if tls is not None else None,
        admin=Networks(config.admin.allow),
        added=added,
    )


def _route(
    config: Config,
    name: str,
    service: Service,
    zones: dict[str, Zone],
    tls: dict[str, UpstreamTls | None],
    *,
    edge: _Edge,
) -> Route:
    timeouts, health, ejection, retries = service_settings(config, service)
    request = service_limits(config, service)
    connect, response = _set(timeouts.connect), _set(timeouts.response)
    tiers = tuple(
        tuple(
            Target(
                name,
                ref.node,
                config.nodes[ref.node].host,
                ref.port or service.port,
                tier,
                tls[ref.node],
            )
            for ref in (entry if isinstance(entry, tuple) else (entry,))
        )
        for tier, entry in enumerate(service.nodes)
    )
    zone_name = service.rate_limit or config.default_rate_limit or NONE
    return Route(
        service=name,
        tiers=tiers,
        connect_timeout=connect,
        response_timeout=response,
        max_connections=service.max_connections,
        zone=zones.get(zone_name),
        probe=ProbePolicy(
            path=_set(health.path),
            interval=_set(health.interval),
            unhealthy_interval=_set(health.unhealthy_interval),
            timeout=_set(health.timeout),
            rise=_set(health.rise),
            fall=_set(health.fall),
            enabled=_set(health.enabled),
        ),
        ejection=EjectionPolicy(base=_set(ejection.base), max=_set(ejection.max)),
        retries=retries,
        ws=_ws(service) if service.websocket or service.ws_prefix is not None else None,
        body=_body(request),
        underscores_in_headers=_set(request.underscores_in_headers),
        cookie_path=False,
        auth=_auth(service.auth),
        cors=edge.cors(service.cors),
        added=edge.added,
    )


def _entries(
    config: Config,
    name: str,
    service: Service,
    base: Route,
    zones: dict[str, Zone],
    *,
    edge: _Edge,
) -> list[Entry[Route]]:
    """The service's public paths: its ``routes``, or the two rules of a service without
    them (``/api/<name>`` to ``http_prefix``; ``/ws/<name>`` to ``ws_prefix``)."""
    if service.routes is None:
        http = f"/{name}" if service.http_prefix is None else service.http_prefix
        rules = [Entry(name, f"{API}{name}", http, False, None, None, False, base)]
        if base.ws is not None:
            ws = f"{WS}{name}" if service.ws_prefix is None else service.ws_prefix
            rules.append(Entry(name, f"{WS}{name}", ws, False, None, None, True, base))
        return rules
    return [
        Entry(
            rule.name or f"{name}#{i}",
            rule.path,
            rule.to,
            rule.exact,
            None if rule.methods is None else frozenset(rule.methods),
            None if rule.hosts is None else frozenset(rule.hosts),
            rule.websocket,
            _rule_route(config, service, rule, base, zones, edge=edge),
        )
        for i, rule in enumerate(service.routes)
    ]


def _rule_route(
    config: Config,
    service: Service,
    rule: RouteRule,
    base: Route,
    zones: dict[str, Zone],
    *,
    edge: _Edge,
) -> Route:
    """The service's policies with the rule's own over them."""
    timeouts = layered(rule.timeouts, service.timeouts, config.timeouts, DEFAULT_TIMEOUTS)
    request = layered(rule.limits, service.limits, config.limits, DEFAULT_LIMITS)
    zone_name = rule.rate_limit or service.rate_limit or config.default_rate_limit or NONE
    return dataclasses.replace(
        base,
        connect_timeout=_set(timeouts.connect),
        response_timeout=_set(timeouts.response),
        zone=zones.get(zone_name),
        retries=base.retries if rule.retries is None else rule.retries,
        ws=_ws(service, rule) if rule.websocket else None,
        body=_body(request),
        underscores_in_headers=_set(request.underscores_in_headers),
        cookie_path=rule.cookie_path,
        auth=base.auth if rule.auth is None else _auth(rule.auth),
        cors=edge.cors(rule.cors, service.cors),
    )


def _ws(service: Service, rule: RouteRule | None = None) -> WsPolicy:
    def pick(key: str) -> Any:
        own = getattr(rule, key) if rule is not None else None
        return getattr(service, key) if own is None else own

    origins = pick("ws_origins")
    return WsPolicy(
        origins=None if origins in (None, "any") else frozenset(o.lower() for o in origins),
        any_origin=origins == "any",
        max_message=pick("ws_max_message"),
        ping_interval=pick("ws_ping_interval"),
        idle_timeout=pick("ws_idle_timeout"),
        extensions=pick("ws_extensions"),
        upstream_gone_code=pick("ws_upstream_gone_code"),
    )


def _auth(auth: ServiceAuth | None) -> AuthPolicy | None:
    if auth is None or auth.mode == "none":
        return None
    return AuthPolicy(
        required=auth.mode == "required",
        providers=auth.providers,
        roles=None if auth.roles is None else frozenset(auth.roles),
    )


def _body(request: RequestLimits) -> BodyPolicy:
    return BodyPolicy(
        max_size=_size(request.client_max_body_size), timeout=_set(request.client_body_timeout)
    )


T = TypeVar("T")


def _size(value: int | str | None) -> int:
    if value is None:
        raise ValueError("a layered setting is unset")  # pragma: no cover - defaults set all
    return size(value)


def _set(value: T | None) -> T:
    """A field of a layered config object: ``service_settings`` leaves none unset."""
    if value is None:
        raise ValueError("a layered setting is unset")  # pragma: no cover - defaults set all
    return value
