"""The gateway's own answers: ``/health``, ``/metrics`` and ``/gateway/...``; ACME's http-01
challenges; the plain listener's redirect to HTTPS.

The ``/gateway/`` prefix is reserved for the gateway itself. None of these is rate-limited.
``/health`` answers everyone on every listener (load balancers and Docker need it); the rest
answers the clients of ``admin.allow`` only (``admits``), on the admin listener when there is
one, and everyone else gets the 404 of an unknown path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import orjson
from aiohttp import web

from . import __version__, workers
from .context import ADMIN, Listener
from .errors import GatewayError, own_headers
from .metrics import GATEWAY
from .websocket.keepalive import report

if TYPE_CHECKING:
    from .context import Exchange, Shared
    from .request import Request
    from .snapshot import Exposure

Endpoint = Callable[["Shared", "Exchange"], Awaitable[web.StreamResponse]]


async def health(shared: Shared, ex: Exchange) -> web.StreamResponse:
    _only_get(ex.request)
    body = health_report(shared, admin=ex.snapshot.exposure.admin.holds(ex.client))
    status = 503 if body["status"] == "unhealthy" else 200
    return _json(body, ex.request_id, status)


async def metrics(shared: Shared, ex: Exchange) -> web.StreamResponse:
    """The scrape; one within ``metrics_cache`` seconds of the last one rendered in the same
    format gets that one's text (counters included), so that polling costs next to nothing."""
    request = ex.request
    _only_get(request)
    accept = request.headers.get("Accept")
    ttl = shared.snapshot.config.metrics_cache
    now = shared.clock()
    content_type = shared.metrics.scrape_format(accept)
    body = shared.metrics.scrapes.get(content_type, now, ttl) if ttl > 0 else None
    if body is None:
        refresh_metrics(shared)
        every = None
        if shared.worker is not None and shared.worker.peers:
            every = await workers.peer_samples(shared.worker.peers)
            every[shared.worker.index] = shared.metrics.families()
        body, content_type = shared.metrics.render(accept, every)
        if ttl > 0:
            shared.metrics.scrapes.put(content_type, now, body)
    headers = {**own_headers(ex.request_id), "Content-Type": content_type}
    return web.Response(body=body, headers=headers)


async def upstreams(shared: Shared, ex: Exchange) -> web.StreamResponse:
    _only_get(ex.request)
    return _json(upstreams_report(shared), ex.request_id)


ENDPOINTS: Final[dict[str, Endpoint]] = {
    "/health": health,
    "/metrics": metrics,
    "/gateway/upstreams": upstreams,
}


OWN_PREFIX: Final = "/gateway/"


NOT_FOUND: Final = GatewayError(404, "not_found", "no such service or endpoint")


async def not_found(shared: Shared, ex: Exchange) -> web.StreamResponse:
    raise NOT_FOUND


def admits(shared: Shared, exposure: Exposure, listener: Listener, client: str) -> bool:
    """Whether a client on this listener may reach /metrics and /gateway/*: while the admin
    listener runs (from start to stop: a reload that removes ``admin.listen`` needs the
    restart it warns of, not before), only there."""
    if shared.admin_listening and listener is not ADMIN:
        return False
    return exposure.admin.holds(client)


CHALLENGE_PREFIX: Final = "/.well-known/acme-challenge/"


def is_challenge(path: str) -> bool:
    return path.startswith(CHALLENGE_PREFIX)


def challenge(shared: Shared, path: str, request_id: str) -> web.StreamResponse:
    """ACME's http-01 (RFC 8555 section 8.3): the key authorization for a token, as text."""
    token = path.removeprefix(CHALLENGE_PREFIX)
    answer = shared.challenge(token) if shared.challenge is not None else None
    if answer is None:
        raise GatewayError(404, "not_found", "no such ACME challenge")
    headers = {**own_headers(request_id), "Content-Type": "application/octet-stream"}
    return web.Response(body=answer, headers=headers)


# A Host header the redirect may name: a DNS name (labels of letters, digits and '-'), an
# IPv4 address or a bracketed IPv6 one, with an optional port.
_HOST: Final = re.compile(
    r"(?P<name>(?=[^:]{1,253}(?::|$))[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]+\])"
    r"(?::[0-9]{1,5})?"
)


def to_https(shared: Shared, request: Request, port: int | None) -> GatewayError:
    """The plain listener's 308 to the same path and query over HTTPS. The host is the
    request's Host (without its port), which must be a host name or address: anything else
    gets 400, never a redirect to something that is not a host."""
    host = request.headers.get("Host", "")
    matched = _HOST.fullmatch(host)
    name = matched.group("name") if matched is not None else None
    if name is not None and name.startswith("["):
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            name = None
    if name is None:
        raise GatewayError(400, "bad_host", "the Host header is not a host name")
    port = port if port is not None else shared.https_port
    authority = name.rstrip(".").lower() + (f":{port}" if port not in (None, 443) else "")
    return GatewayError(
        308,
        "https_required",
        "use https",
        headers={"Location": f"https://{authority}{request.raw_path}"},
    )


def own(path: str) -> Endpoint | None:
    """The gateway's own endpoint for ``path``: /health, /metrics and everything under
    /gateway/ are the gateway's, whatever the routes say (an unknown one is 404)."""
    endpoint = ENDPOINTS.get(path)
    if endpoint is None and path.startswith(OWN_PREFIX):
        return not_found
    return endpoint


def refresh_metrics(shared: Shared) -> None:
    """Bring the metrics computed at scrape time up to date (health, session counters)."""
    shared.health.export(shared.snapshot.routes.values())
    report(shared.sessions)
    _export_jwks(shared)


def _export_jwks(shared: Shared) -> None:
    """``service_health{service="gateway",dependency="jwks:<provider>"}``: 1 while the
    provider's keys are fresh, 0 while its fetches fail (stale: its last keys still in use;
    disconnected: none yet, its tokens refused), as /health says; the series of providers
    no longer configured go."""
    metrics = shared.metrics
    states = shared.authenticator.state() if shared.authenticator is not None else {}
    wanted = {(GATEWAY, f"jwks:{name}") for name in states}
    metrics.remove_series(
        metrics.health,
        lambda labels: labels[0] == GATEWAY and labels[1].startswith("jwks:")
        and labels not in wanted,
    )  # fmt: skip
    for name, state in states.items():
        metrics.health.labels(GATEWAY, f"jwks:{name}").set(1 if state == "connected" else 0)


def health_report(shared: Shared, *, admin: bool = False) -> dict[str, object]:
    """The standards' /health body. ``healthy``: serving, nothing down; ``degraded``: serving,
    but a dependency or node is down, or a certificate is a placeholder or ends within a
    week; ``unhealthy``: cannot serve (shutting down). An ``admin`` client also sees each
    served certificate's days left."""
    services, nodes = shared.health.export(shared.snapshot.routes.values())
    dependencies = dict(services)
    if shared.limiter.state is not None:
        dependencies["redis"] = shared.limiter.state
    if shared.authenticator is not None:  # each JWKS: connected, stale (last keys kept), ...
        dependencies.update(
            {f"jwks:{name}": state for name, state in shared.authenticator.state().items()}
        )
    if shared.draining and not shared.handover:
        status = "unhealthy"
    elif (
        not {"disconnected", "stale"}.isdisjoint(dependencies.values())
        or "offline" in nodes.values()
        or (shared.certificates is not None and shared.certificates.degraded())
    ):
        status = "degraded"
    else:
        status = "healthy"
    report: dict[str, object] = {
        "status": status,
        "service": "gateway",
        "version": __version__,
        "uptime": int(shared.clock() - shared.started),
        "generation": shared.generation,
        "config_hash": shared.config_hash,
        "dependencies": dependencies,
        "nodes": nodes,
    }
    report.update(_draining(shared))
    if admin and shared.certificates is not None:
        report["certificates"] = shared.certificates.report()
        if shared.acme is not None:
            report["acme"] = {"state": shared.acme.state, "error": shared.acme.last_error}
    return report


def upstreams_report(shared: Shared) -> dict[str, object]:
    """Every service's targets in order of preference: state, why, since when."""
    _, nodes = shared.health.export(shared.snapshot.routes.values())
    services = {
        name: {
            "targets": [
                {
                    "node": t.node,
                    "url": t.origin,
                    "tier": t.tier,
                    **shared.health.describe(t),
                }
                for t in route.targets
            ],
            "health_check": route.probe.path if route.probe.enabled else None,
        }
        for name, route in shared.snapshot.routes.items()
    }
    report: dict[str, object] = {"services": services, "nodes": nodes}
    report.update(_draining(shared))
    return report


def _draining(shared: Shared) -> dict[str, object]:
    """``draining`` and ``drain_left`` (seconds until the listeners close) while stopping."""
    if not shared.draining:
        return {}
    left = max(0.0, round(shared.drain_ends - shared.clock(), 1))
    return {"draining": True, "drain_left": left, "handover": shared.handover}


def _json(body: object, request_id: str, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=own_headers(request_id),
    )


def _only_get(request: Request) -> None:
    if request.method not in ("GET", "HEAD"):
        raise GatewayError(405, "method_not_allowed", "use GET", headers={"Allow": "GET, HEAD"})
