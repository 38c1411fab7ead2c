"""The gateway's own endpoints: ``/health``, ``/metrics`` and ``/gateway/...``.

The ``/gateway/`` prefix is reserved for the gateway itself. None of these is rate-limited.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from . import __version__, workers, wskeepalive
from .errors import GatewayError, own_headers

if TYPE_CHECKING:
    from .app import Gateway

Endpoint = Callable[[web.BaseRequest, str], Awaitable[web.StreamResponse]]


def table(gw: Gateway) -> dict[str, Endpoint]:
    async def health(request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        _only_get(request)
        body = health_report(gw)
        status = 503 if body["status"] == "unhealthy" else 200
        return _json(body, request_id, status)

    async def metrics(request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        _only_get(request)
        refresh_metrics(gw)
        every = None
        if gw.worker is not None:
            every = await workers.peer_samples(gw.worker.peers)
            every[gw.worker.index] = gw.metrics.families()
        body, content_type = gw.metrics.render(request.headers.get("Accept"), every)
        headers = {**own_headers(request_id), "Content-Type": content_type}
        return web.Response(body=body, headers=headers)

    async def upstreams(request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        _only_get(request)
        return _json(upstreams_report(gw), request_id)

    return {"/health": health, "/metrics": metrics, "/gateway/upstreams": upstreams}


def refresh_metrics(gw: Gateway) -> None:
    """Bring the metrics computed at scrape time up to date (health, session counters)."""
    gw.health.export(gw.snapshot.routes.values())
    wskeepalive.report(gw)


def health_report(gw: Gateway) -> dict[str, object]:
    """The standards' /health body. ``healthy``: serving, nothing down; ``degraded``: serving,
    but a dependency or node is down; ``unhealthy``: cannot serve (shutting down)."""
    services, nodes = gw.health.export(gw.snapshot.routes.values())
    dependencies = dict(services)
    if gw.limiter.state is not None:
        dependencies["redis"] = gw.limiter.state
    if gw.draining:
        status = "unhealthy"
    elif "disconnected" in dependencies.values() or "offline" in nodes.values():
        status = "degraded"
    else:
        status = "healthy"
    return {
        "status": status,
        "service": "gateway",
        "version": __version__,
        "uptime": int(gw.clock() - gw.started),
        "dependencies": dependencies,
        "nodes": nodes,
    }


def upstreams_report(gw: Gateway) -> dict[str, object]:
    """Every service's targets in order of preference: state, why, since when."""
    _, nodes = gw.health.export(gw.snapshot.routes.values())
    services = {
        name: {
            "targets": [
                {
                    "node": t.node,
                    "url": t.origin,
                    "tier": t.tier,
                    **gw.health.describe(t),
                }
                for t in route.targets
            ],
            "health_check": route.probe.path if route.probe.enabled else None,
        }
        for name, route in gw.snapshot.routes.items()
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
