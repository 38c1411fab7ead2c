"""The compiled, immutable form of a ``Config`` that requests read.

A request reads ``gateway.snapshot`` once and uses only that object, so a reload (one
assignment of a new snapshot) never changes a request half way through. Everything that is
the same for every request of a service (URLs, timeouts, prefixes) is computed here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import aiohttp

from .clients import TrustedProxies
from .config import NONE, Config, effective_timeouts
from .ratelimit import Zone, compile_zone


@dataclass(frozen=True, slots=True)
class Target:
    """One place a service runs. ``key`` identifies it across reloads (for health state)."""

    service: str
    node: str
    host: str
    port: int

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.service, self.node, self.host, self.port)

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    service: str
    http_prefix: str
    targets: tuple[Target, ...]
    connect_timeout: float
    client_timeout: aiohttp.ClientTimeout
    max_connections: int
    zone: Zone | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    routes: Mapping[str, Route]
    trusted: TrustedProxies


def compile_snapshot(config: Config) -> Snapshot:
    zones = {name: compile_zone(name, spec) for name, spec in config.rate_limits.items()}
    routes: dict[str, Route] = {}
    for name, service in config.services.items():
        zone_name = service.rate_limit or config.default_rate_limit or NONE
        connect, response = effective_timeouts(config, service)
        targets = tuple(
            Target(name, ref.node, config.nodes[ref.node].host, ref.port or service.port)
            for ref in service.nodes
        )
        routes[name] = Route(
            service=name,
            http_prefix=f"/{name}" if service.http_prefix is None else service.http_prefix,
            targets=targets,
            connect_timeout=connect,
            # sock_read starts once the request is sent and restarts with each read: it bounds
            # the wait for the response headers and every pause inside the response body.
            client_timeout=aiohttp.ClientTimeout(
                total=None,
                connect=None,
                sock_connect=connect,
                sock_read=response,
            ),
            max_connections=service.max_connections,
            zone=zones.get(zone_name),
        )
    return Snapshot(
        config=config,
        routes=MappingProxyType(routes),
        trusted=TrustedProxies(config.trusted_proxies),
    )
