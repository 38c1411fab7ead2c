"""The gateway's own endpoints: ``/health``, ``/metrics`` and ``/gateway/...``.

The ``/gateway/`` prefix is reserved for the gateway itself. None of these is rate-limited.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import orjson
from aiohttp import web

from . import __version__, workers
from .errors import GatewayError, own_headers
from .websocket.keepalive import report

if TYPE_CHECKING:
    from .context import Shared

Endpoint = Callable[["Shared", web.BaseRequest, str], Awaitable[web.StreamResponse]]


async def health(shared: Shared, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
    _only_get(request)
    body = health_report(shared)
    status = 503 if body["status"] == "unhealthy" else 200
    return _json(body, request_id, status)


async def metrics(shared: Shared, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
    """The scrape; one within ``metrics_cache`` seconds of the last one rendered in the same
    format gets that one's text (counters included), so that polling costs next to nothing."""
    _only_get(request)
    accept = request.headers.get("Accept")
    ttl = shared.snapshot.config.metrics_cache
    now = shared.clock()
    content_type = shared.metrics.scrape_format(accept)
    body = shared.metrics.scrapes.get(content_type, now, ttl) if ttl > 0 else None
    if body is None:
        refresh_metrics(shared)
        every = None
        if shared.worker is not None:
            every = await workers.peer_samples(shared.worker.peers)
            every[shared.worker.index] = shared.metrics.families()
        body, content_type = shared.metrics.render(accept, every)
        if ttl > 0:
            shared.metrics.scrapes.put(content_type, now, body)
    headers = {**own_headers(request_id), "Content-Type": content_type}
    return web.Response(body=body, headers=headers)


async def upstreams(
    shared: Shared, request: web.BaseRequest, request_id: str
) -> web.StreamResponse:
    _only_get(request)
    return _json(upstreams_report(shared), request_id)


ENDPOINTS: Final[dict[str, Endpoint]] = {
    "/health": health,
    "/metrics": metrics,
    "/gateway/upstreams": upstreams,
}


OWN_PREFIX: Final = "/gateway/"


async def not_found(
    shared: Shared, request: web.BaseRequest, request_id: str
) -> web.StreamResponse:
    raise GatewayError(404, "not_found", "no such service or endpoint")


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


def health_report(shared: Shared) -> dict[str, object]:
    """The standards' /health body. ``healthy``: serving, nothing down; ``degraded``: serving,
    but a dependency or node is down; ``unhealthy``: cannot serve (shutting down)."""
    services, nodes = shared.health.export(shared.snapshot.routes.values())
    dependencies = dict(services)
    if shared.limiter.state is not None:
        dependencies["redis"] = shared.limiter.state
    if shared.draining:
        status = "unhealthy"
    elif "disconnected" in dependencies.values() or "offline" in nodes.values():
        status = "degraded"
    else:
        status = "healthy"
    return {
        "status": status,
        "service": "gateway",
        "version": __version__,
        "uptime": int(shared.clock() - shared.started),
        "dependencies": dependencies,
        "nodes": nodes,
    }


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
    return {"services": services, "nodes": nodes}


def _json(body: object, request_id: str, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=own_headers(request_id),
    )


def _only_get(request: web.BaseRequest) -> None:
    if request.method not in ("GET", "HEAD"):
        raise GatewayError(405, "method_not_allowed", "use GET", headers={"Allow": "GET, HEAD"})
