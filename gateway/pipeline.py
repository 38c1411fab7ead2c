"""``handle(request)``: the one place where a request's phases are put in order.

check target → own endpoint? → route → rate limit → choose upstream → forward, and always
metrics + the log line at the end.
Each phase either returns, or raises ``GatewayError`` which becomes the JSON answer here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from aiohttp import web

from . import failover, logs, routing, websocket, wssession
from .errors import GatewayError, error_response
from .forward import ClientGone, UpstreamAborted
from .logs import REQUEST_ID, request_id_from
from .metrics import GATEWAY, UNMATCHED
from .ratelimit import bucket_key

if TYPE_CHECKING:
    from .app import Gateway
    from .snapshot import Route, Snapshot, Target

CLIENT_CLOSED: Final = 499  # nginx's code for "client closed the request"
_MAX_LOGGED_PATH: Final = 512


@dataclass(slots=True)
class Exchange:
    """What is known about one request so far; read by the final log line and metrics."""

    request: web.BaseRequest
    snapshot: Snapshot  # read once: a reload never changes a request half way through
    request_id: str
    started: float
    client: str  # the client address (the peer, or what trusted proxies report)
    proto: str  # http or https, as the client used it
    service: str = UNMATCHED
    user: str | None = None  # the authenticated subject, once auth exists
    target: Target | None = None
    status: int = 0
    error: str | None = None
    rate_limit: str | None = None  # "delayed" or "dry_run" when the limiter had a say
    log_fields: dict[str, object] = field(default_factory=dict)  # more for the log line
    session: wssession.Session | None = None  # a WebSocket session, which logs at its end


async def handle(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    snapshot = gw.snapshot
    headers = request.headers
    client = snapshot.trusted.client(request.remote, headers.getall("X-Forwarded-For", []))
    proto = snapshot.trusted.proto(request.remote, headers.get("X-Forwarded-Proto"), request.scheme)
    request_id = request_id_from(headers.get("X-Request-ID"))
    ex = Exchange(request, snapshot, request_id, gw.clock(), client, proto)
    REQUEST_ID.set(request_id)  # each request runs in its own task: this stays per request
    try:
        response = await _phases(gw, ex)
    except GatewayError as err:
        ex.status, ex.error = err.status, err.code
        if err.kind and ex.service != UNMATCHED:
            gw.metrics.upstream_errors.labels(ex.service, err.kind).inc()
        response = error_response(err, ex.request_id)
        if websocket.is_upgrade(request):
            # Whatever the client sent after a refused handshake is not HTTP: do not read on.
            response.force_close()
        return response
    except ClientGone:
        ex.status, ex.error = CLIENT_CLOSED, "client_closed"
        return web.Response(status=CLIENT_CLOSED)  # nobody will read it; aiohttp expects one
    except asyncio.CancelledError:
        if not ex.status:  # a WebSocket session that ran to its end keeps its 101
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
    found = routing.match(target.path)
    route = ex.snapshot.routes.get(found.service) if found is not None else None
    if found is None or route is None:
        raise GatewayError(404, "not_found", "no such service or endpoint")
    ex.service = route.service
    if found.kind == "ws":
        policy = route.ws
        if policy is None:
            raise GatewayError(404, "not_found", "this service accepts no WebSocket sessions")
        path_qs = routing.upstream_path(policy.prefix, found.rest) + target.query
        await _limit(gw, ex, route)  # a handshake counts toward the rate limit
        return await websocket.relay(gw, ex, route, policy, path_qs)
    path_qs = routing.upstream_path(route.http_prefix, found.rest) + target.query
    limit_headers = await _limit(gw, ex, route)
    return await failover.exchange(gw, ex, route, path_qs, limit_headers)


async def _limit(gw: Gateway, ex: Exchange, route: Route) -> dict[str, str] | None:
    """The rate-limit phase: refuse (raise), delay, or let through; returns headers to add."""
    zone = route.zone
    if zone is None:
        return None
    parts = tuple(_key_part(part, ex, route) for part in zone.key)
    if not any(parts):
        return None  # as in nginx: a request whose key is empty is not limited
    decision = await gw.limiter.decide(zone, bucket_key(zone, parts))
    if not decision.allowed and not zone.dry_run:
        gw.metrics.count_limit(zone.name, "rejected")
        refusal = {
            "RateLimit-Policy": zone.policy,
            "RateLimit": decision.header(zone),
            "Retry-After": str(decision.retry_after(zone)),
        }
        raise GatewayError(
            zone.status, "rate_limited", "too many requests; retry later", headers=refusal
        )
    if not decision.allowed:
        gw.metrics.count_limit(zone.name, "dry_run_rejected")
        ex.rate_limit = "dry_run"
    elif delay := decision.delay_seconds(zone):
        gw.metrics.count_limit(zone.name, "delayed")
        ex.rate_limit = "delayed"
        await asyncio.sleep(delay)
    else:
        gw.metrics.count_limit(zone.name, "allowed")
    if not zone.headers:
        return None  # built only when sent: this runs on every limited request
    return {"RateLimit-Policy": zone.policy, "RateLimit": decision.header(zone)}


def _key_part(part: str, ex: Exchange, route: Route) -> str:
    if part == "client_ip":
        return ex.client
    if part == "service":
        return route.service
    if part == "user":
        return ex.user or f"ip:{ex.client}"  # anonymous requests: limited per address
    return ex.request.headers.get(part.removeprefix("header:"), "")


def _finish(gw: Gateway, ex: Exchange) -> None:
    request = ex.request
    seconds = gw.clock() - ex.started
    status = ex.status or 500
    gw.metrics.observe_request(ex.service, request.method, status, seconds)
    if not logs.access_enabled():
        return
    fields: dict[str, object] = {
        "method": request.method,
        "path": request.raw_path.partition("?")[0][:_MAX_LOGGED_PATH],
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "client": ex.client,
        "route": ex.service,
    }
    if ex.target is not None:
        fields["upstream"] = ex.target.label
    if ex.error is not None:
        fields["error"] = ex.error
    if ex.rate_limit is not None:
        fields["rate_limit"] = ex.rate_limit
    if ex.log_fields:
        fields.update(ex.log_fields)
    if ex.session is not None:
        ex.session.handshake_logged(fields)
    else:
        logs.access("request", fields)
