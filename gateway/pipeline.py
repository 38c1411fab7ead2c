"""``handle(shared, request)``: the one place where a request's phases are put in order.

    strict HTTP: the version, the transfer coding (edge/strict.py)
    → check the target (routing.check_target)
    → the gateway's own endpoint? (endpoints.py)
    → route to a service (routing.match)
    → rate limit (ratelimit/phase.py)
    → a WebSocket handshake (websocket/handshake.py) or an HTTP exchange (upstream/forward.py),
      both choosing and failing over targets with upstream/failover.py
    and always, in ``finally``: metrics and the request's log line.

Each phase either returns, or raises ``GatewayError``, which becomes the JSON answer here.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from aiohttp import web

from . import endpoints, logs, routing
from .context import Exchange
from .edge import strict
from .errors import ClientFault, ClientGone, GatewayError, UpstreamAborted, error_response
from .logs import REQUEST_ID, request_id_from
from .metrics import GATEWAY, UNMATCHED
from .ratelimit.phase import limit
from .upstream.forward import forward
from .websocket.handshake import is_upgrade, open_session

if TYPE_CHECKING:
    from .context import Shared

CLIENT_CLOSED: Final = 499  # nginx's code for "client closed the request"
_MAX_LOGGED_PATH: Final = 512


async def handle(shared: Shared, request: web.BaseRequest) -> web.StreamResponse:
    snapshot = shared.snapshot
    headers = request.headers
    client = snapshot.trusted.client(request.remote, headers.getall("X-Forwarded-For", []))
    proto = snapshot.trusted.proto(request.remote, headers.get("X-Forwarded-Proto"), request.scheme)
    request_id = request_id_from(headers.get("X-Request-ID"))
    ex = Exchange(request, snapshot, request_id, shared.clock(), client, proto)
    REQUEST_ID.set(request_id)  # each request runs in its own task: this stays per request
    try:
        response = await _phases(shared, ex)
    except GatewayError as err:
        ex.status, ex.error = err.status, err.code
        if err.kind and ex.service != UNMATCHED:
            shared.metrics.upstream_errors.labels(ex.service, err.kind).inc()
        response = error_response(err, ex.request_id)
        if err.close or is_upgrade(request):
            # An unread body, or whatever a client sent after a refused handshake, is not
            # HTTP: do not read on.
            response.force_close()
        return response
    except ClientFault as fault:
        # The client broke a limit while its body was being forwarded: its answer, and the
        # upstream exchange is over (never counted against the upstream).
        ex.status, ex.error = fault.error.status, fault.error.code
        response = error_response(fault.error, ex.request_id)
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
        if aborted.by_client:
            ex.status, ex.error = aborted.response.status, "client_aborted"
        else:
            ex.status, ex.error = aborted.response.status, "upstream_aborted"
            shared.metrics.upstream_errors.labels(ex.service, "aborted").inc()
        return aborted.response
    else:
        ex.status = response.status
        return response
    finally:
        _finish(shared, ex)


async def _phases(shared: Shared, ex: Exchange) -> web.StreamResponse:
    request = ex.request
    strict.check(request)
    target = routing.check_target(request.raw_path)
    own = endpoints.ENDPOINTS.get(target.path)
    if own is not None:
        ex.service = GATEWAY
        return await own(shared, request, ex.request_id)
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
        await limit(shared, ex, route)  # a handshake counts toward the rate limit
        return await open_session(shared, ex, route, policy, path_qs)
    path_qs = routing.upstream_path(route.http_prefix, found.rest) + target.query
    limit_headers = await limit(shared, ex, route)
    return await forward(shared, ex, route, path_qs, limit_headers)


def _finish(shared: Shared, ex: Exchange) -> None:
    request = ex.request
    seconds = shared.clock() - ex.started
    status = ex.status or 500
    shared.metrics.observe_request(ex.service, request.method, status, seconds)
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
