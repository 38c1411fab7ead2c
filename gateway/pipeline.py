"""``handle(request)``: the one place where a request's phases are put in order.

check target → own endpoint? → route → choose upstream → forward → (always) metrics + log.
Each phase either returns, or raises ``GatewayError`` which becomes the JSON answer here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from aiohttp import web

from . import routing
from .errors import GatewayError, error_response
from .forward import ClientGone, UpstreamAborted, forward
from .logs import REQUEST_ID, request_id_from
from .metrics import GATEWAY, UNMATCHED

if TYPE_CHECKING:
    from .app import Gateway
    from .snapshot import Route, Target

access_log = logging.getLogger("gateway.access")

CLIENT_CLOSED: Final = 499  # nginx's code for "client closed the request"
_MAX_LOGGED_PATH: Final = 512


@dataclass(slots=True)
class Exchange:
    """What is known about one request so far; read by the final log line and metrics."""

    request: web.BaseRequest
    request_id: str
    started: float
    service: str = UNMATCHED
    target: Target | None = None
    status: int = 0
    error: str | None = None


async def handle(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    ex = Exchange(request, request_id_from(request.headers.get("X-Request-ID")), gw.clock())
    REQUEST_ID.set(ex.request_id)  # each request runs in its own task: this stays per request
    try:
        response = await _phases(gw, ex)
    except GatewayError as err:
        ex.status, ex.error = err.status, err.code
        if err.kind and ex.service != UNMATCHED:
            gw.metrics.upstream_errors.labels(ex.service, err.kind).inc()
        return error_response(err, ex.request_id)
    except ClientGone:
        ex.status, ex.error = CLIENT_CLOSED, "client_closed"
        return web.Response(status=CLIENT_CLOSED)  # nobody will read it; aiohttp expects one
    except asyncio.CancelledError:
        ex.status, ex.error = CLIENT_CLOSED, "client_closed"
        raise
    except UpstreamAborted as aborted:
        # The status line went out; the connection is already reset. Returning the response
        # lets aiohttp notice the dead transport and drop the connection quietly.
        ex.status, ex.error = aborted.response.status, "upstream_aborted"
        gw.metrics.upstream_errors.labels(ex.service, "aborted").inc()
        return aborted.response
    else:
        ex.status = response.status
        return response
    finally:
        _finish(gw, ex)


async def _phases(gw: Gateway, ex: Exchange) -> web.StreamResponse:
    request = ex.request
    target = routing.check_target(request.raw_path)
    own = gw.endpoints.get(target.path)
    if own is not None:
        ex.service = GATEWAY
        return await own(request, ex.request_id)
    snapshot = gw.snapshot
    found = routing.match(target.path)
    route = snapshot.routes.get(found.service) if found is not None else None
    if found is None or route is None:
        raise GatewayError(404, "not_found", "no such service or endpoint")
    ex.service = route.service
    if found.kind == "ws":
        raise GatewayError(404, "not_found", "this service accepts no WebSocket sessions")
    return await _forward(
        gw, ex, route, routing.upstream_path(route.http_prefix, found.rest) + target.query
    )


async def _forward(gw: Gateway, ex: Exchange, route: Route, path_qs: str) -> web.StreamResponse:
    ex.target = upstream = route.targets[0]
    slots = gw.slots_for(route)
    gauge = gw.metrics.active.labels(route.service)
    await slots.acquire(route.connect_timeout)
    gauge.inc()
    try:
        response = await forward(
            gw.session,
            ex.request,
            target=upstream,
            path_qs=path_qs,
            timeout=route.client_timeout,
            request_id=ex.request_id,
        )
    except GatewayError as err:
        if err.kind in ("connect", "connect_timeout"):
            gw.health.record(upstream, ok=False, reason=err.code)
        raise
    finally:
        gauge.dec()
        slots.release()
    gw.health.record(upstream, ok=True, reason="answered")
    return response


def _finish(gw: Gateway, ex: Exchange) -> None:
    request = ex.request
    seconds = gw.clock() - ex.started
    status = ex.status or 500
    gw.metrics.observe_request(ex.service, request.method, status, seconds)
    fields: dict[str, object] = {
        "method": request.method,
        "path": request.raw_path.partition("?")[0][:_MAX_LOGGED_PATH],
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "client": request.remote,
        "route": ex.service,
    }
    if ex.target is not None:
        fields["upstream"] = f"{ex.target.node} {ex.target.host}:{ex.target.port}"
    if ex.error is not None:
        fields["error"] = ex.error
    access_log.info("request", extra={"fields": fields})
