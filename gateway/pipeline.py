"""``handle(shared, request)``: the one place where a request's phases are put in order.

    strict HTTP: the version, the transfer coding (edge/strict.py)
    → check the target (routing.check_target)
    → an ACME challenge? (endpoints.challenge)
    → the gateway's own endpoint? (endpoints.py; /metrics and /gateway/* for admin clients
      only, and on the admin listener only when there is one)
    → on the plain listener with TLS on: 308 to https:// (endpoints.to_https)
    → the route (routetable.RouteTable, compiled per snapshot: the longest matching path);
      a CORS preflight is answered here, for the route its request would take (edge/cors.py)
    → rate limit (ratelimit/phase.py) and authentication, when the route has auth
      (auth/phase.py): the limit first, as nginx's limit_req comes before its access checks,
      unless the route's zone is keyed by user (the token's subject); a refused token then
      counts in its address's bucket
    → a WebSocket handshake (websocket/handshake.py) or an HTTP exchange (upstream/forward.py),
      both choosing and failing over targets with upstream/failover.py
    and always, in ``finally``: metrics and the request's log line.

Each phase either returns, or raises ``GatewayError``, which becomes the JSON answer here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from aiohttp import web

from . import endpoints, logs, routetable, routing
from .aiohttp_private import Whole
from .auth.phase import authenticate
from .context import ADMIN, HTTP, Exchange, Listener
from .edge import cors, strict
from .errors import (
    ClientFault,
    ClientGone,
    GatewayError,
    UpstreamAborted,
    error_response,
    own_headers,
)
from .logs import REQUEST_ID, request_id_from
from .metrics import GATEWAY, UNMATCHED, method_label
from .ratelimit.phase import limit
from .tracing.context import TRACEPARENT, TRACESTATE, Trace, incoming
from .upstream.forward import forward
from .websocket.handshake import is_upgrade, open_session

if TYPE_CHECKING:
    from .context import Shared
    from .request import Request
    from .snapshot import Route
    from .tracing.export import Tracer

log = logging.getLogger(__name__)

CLIENT_CLOSED: Final = 499  # nginx's code for "client closed the request"
_MAX_LOGGED_PATH: Final = 512


STS: Final = "Strict-Transport-Security"


async def handle(shared: Shared, listener: Listener, request: Request) -> web.StreamResponse:
    snapshot = shared.snapshot
    headers = request.headers
    client = snapshot.trusted.client(request.remote, headers.getall("X-Forwarded-For", []))
    proto = snapshot.trusted.proto(request.remote, headers.get("X-Forwarded-Proto"), request.scheme)
    request_id = request_id_from(headers.get("X-Request-ID"))
    ex = Exchange(request, listener, snapshot, request_id, shared.clock(), client, proto)
    if snapshot.trusted:  # its X-Forwarded-* are kept (and extended); anyone else's removed
        ex.peer_trusted = snapshot.trusted.holds(request.remote or "")
    parent = incoming(headers.getall(TRACEPARENT, ()))
    tracer = shared.tracer
    ex.trace = (
        Trace.of(parent)
        if tracer is None
        else tracer.start(parent, ex.peer_trusted, headers.getall(TRACESTATE, ()))
    )
    REQUEST_ID.set(request_id)  # each request runs in its own task: this stays per request
    try:
        response = await _phases(shared, ex)
    except GatewayError as err:
        ex.status, ex.error = err.status, err.code
        if err.kind and ex.service != UNMATCHED:
            shared.metrics.upstream_errors.add((ex.service, err.kind))
        response = error_response(err, ex.request_id)
        if err.close or is_upgrade(request):
            # An unread body, or whatever a client sent after a refused handshake, is not
            # HTTP: do not read on.
            response.force_close()
        return _secured(ex, response, shared.draining)
    except ClientFault as fault:
        # The client broke a limit while its body was being forwarded: its answer, and the
        # upstream exchange is over (never counted against the upstream).
        ex.status, ex.error = fault.error.status, fault.error.code
        response = error_response(fault.error, ex.request_id)
        response.force_close()
        return _secured(ex, response, shared.draining)
    except ClientGone:
        ex.status, ex.error = CLIENT_CLOSED, "client_closed"
        return web.Response(status=CLIENT_CLOSED)  # nobody will read it; aiohttp expects one
    except asyncio.CancelledError:
        if not ex.status:  # a WebSocket session that ran to its end keeps its 101
            ex.status = CLIENT_CLOSED
            ex.error = "send_timeout" if request.send_timed_out else "client_closed"
        raise
    except UpstreamAborted as aborted:
        # The status line went out; the connection is already reset. Returning the response
        # lets aiohttp notice the dead transport and drop the connection quietly.
        if aborted.by_client:
            ex.status, ex.error = aborted.response.status, "client_aborted"
        else:
            ex.status, ex.error = aborted.response.status, "upstream_aborted"
            shared.metrics.upstream_errors.add((ex.service, "aborted"))
        return aborted.response
    else:
        ex.status = response.status
        return _secured(ex, response, shared.draining)
    finally:
        try:
            _finish(shared, ex)
        except Exception:  # a fault in the line or the metrics: logged, the answer kept
            log.exception("the request's log line or metrics failed")


async def _phases(shared: Shared, ex: Exchange) -> web.StreamResponse:
    request = ex.request
    strict.check(request)
    target = routing.check_target(request.raw_path)
    exposure = ex.snapshot.exposure
    listener = ex.listener
    # The running ACME client's challenges (a reload that turns ACME off or on changes that
    # at the restart it needs, with the client: not before, or its renewals would fail).
    if (
        shared.challenge is not None
        and listener is not ADMIN
        and endpoints.is_challenge(target.path)
    ):
        ex.service = ex.route = GATEWAY
        return endpoints.challenge(shared, target.path, ex.request_id)
    own = endpoints.own(target.path)
    if own is not None:
        ex.service = ex.route = GATEWAY
        if own is not endpoints.health and not endpoints.admits(
            shared, exposure, listener, ex.client
        ):
            own = endpoints.not_found  # the same answer as for an unknown path
        return await own(shared, ex)
    if listener is ADMIN:
        raise endpoints.NOT_FOUND
    # (Not a request a trusted proxy says came over HTTPS: it ended TLS itself.)
    if (
        listener is HTTP
        and exposure.redirect
        and shared.https_port is not None
        and ex.proto != "https"
    ):
        raise endpoints.to_https(shared, request, exposure.redirect_port)
    table = ex.snapshot.table
    host = routetable.request_host(request.headers.get("Host")) if table.by_host else ""
    if request.method == "OPTIONS" and cors.is_preflight(request.headers):
        preflight = _preflight(ex, table, target.path, host)
        if preflight is not None:
            return preflight
    found = table.match(target.path, request.method, host)
    if ";" in target.path and _rerouted(table, target.path, request.method, host, found):
        raise routing.bad_path("the path's ;parameters would take it to another route")
    if not isinstance(found, routetable.Found):
        raise _unrouted(found, target.query)
    entry = found.entry
    route = entry.policy
    ex.service, ex.route = route.service, entry.id
    ex.added = (
        route.added if route.cors is None else route.cors.added(request.headers.get("Origin"))
    )
    query = target.query
    if route.auth is None:
        limit_headers = await limit(shared, ex, route)
    elif route.zone is not None and "user" not in route.zone.key:
        # nginx's order (limit_req before access checks): a client over its limit is refused
        # before its token's signature is checked, and a bad token counts like any request.
        limit_headers = await limit(shared, ex, route)
        query = authenticate(shared, ex, route.auth, query, entry.websocket)
    else:  # a zone per user needs the user; a refused token counts as anonymous (its address)
        try:
            query = authenticate(shared, ex, route.auth, query, entry.websocket)
        except GatewayError:
            await limit(shared, ex, route)  # its 429, when over; else the auth's refusal
            raise
        limit_headers = await limit(shared, ex, route)
    # (401 and 403 carry the CORS headers: ex.added)
    path_qs = routing.upstream_path(entry.to, found.rest) + query
    if entry.websocket:  # a handshake counts toward the rate limit (above)
        return await open_session(shared, ex, route, path_qs)
    if listener.tls and exposure.hsts is not None:  # the relay sends the head itself
        limit_headers = {**(limit_headers or {}), STS: exposure.hsts}
    return await forward(shared, ex, entry, path_qs, limit_headers)


def _secured(ex: Exchange, response: web.StreamResponse, draining: bool) -> web.StreamResponse:
    """HSTS on an answer over HTTPS (RFC 6797: never over plain HTTP), the gateway's own
    ones included, and CORS's and the security headers (``Exchange.added``); while the
    gateway drains, ``Connection: close``. A relayed answer, sent already, had them from the
    relay."""
    if response.prepared:
        return response
    if draining:
        response.force_close()
    exposure = ex.snapshot.exposure
    if exposure.hsts is not None and ex.listener.tls:
        response.headers[STS] = exposure.hsts
    added = ex.added if ex.added is not None else exposure.added
    if added is not None:
        added.apply(response.headers)
    return response


def _preflight(
    ex: Exchange, table: routetable.RouteTable[Route], path: str, host: str
) -> web.StreamResponse | None:
    """A CORS preflight, for the route the request it announces would take: answered (204)
    or refused (403) here, before auth and rate limits, never forwarded. None when that
    route has no CORS: the OPTIONS is then a request like any other."""
    headers = ex.request.headers
    found = table.match(path, cors.requested_method(headers), host)
    if not isinstance(found, routetable.Found) or (policy := found.entry.policy.cors) is None:
        return None
    ex.service, ex.route = found.entry.policy.service, found.entry.id
    answer = policy.preflight(headers["Origin"], headers)
    if isinstance(answer, cors.Refused):
        ex.added = policy.refused  # its Vary: Origin too, as every answer of a CORS route
        raise GatewayError(403, "cors_refused", answer.message)
    return Whole(status=204, headers={**own_headers(ex.request_id), **answer})


def _rerouted(
    table: routetable.RouteTable[Route],
    path: str,
    method: str,
    host: str,
    found: routetable.Found[Route] | routetable.Elsewhere | routetable.WrongMethod | None,
) -> bool:
    """Whether ``path``, routed to ``found``, would take another route without its
    ``;parameters``: a server that strips them (Tomcat, Jetty, Spring read ``/admin;x/y`` as
    ``/admin/y``) would serve what the other route guards (its auth, its limits)."""
    if not isinstance(found, routetable.Found):
        return False  # (nothing is forwarded)
    other = table.match(routing.without_parameters(path), method, host)
    if isinstance(other, routetable.Found):
        return other.entry is not found.entry
    return isinstance(other, routetable.Elsewhere)  # a guarded prefix without its slash


def _unrouted(
    found: routetable.Elsewhere | routetable.WrongMethod | None, query: str
) -> GatewayError:
    if isinstance(found, routetable.WrongMethod):
        allowed = ", ".join(sorted(found.allowed | ({"HEAD"} if "GET" in found.allowed else set())))
        return GatewayError(
            405, "method_not_allowed", "this path takes other methods", headers={"Allow": allowed}
        )
    if isinstance(found, routetable.Elsewhere):  # nginx's answer for a prefix without its "/"
        return GatewayError(
            301, "moved", "the path ends with a slash", headers={"Location": found.path + query}
        )
    return GatewayError(404, "not_found", "no such service or endpoint")


def _finish(shared: Shared, ex: Exchange) -> None:
    request = ex.request
    seconds = shared.clock() - ex.started
    status = ex.status or 500
    shared.metrics.observe_request(ex.service, ex.route, request.method, status, seconds)
    if ex.trace.span is not None and shared.tracer is not None:
        _end_span(shared.tracer, ex, status)
    if not logs.access_enabled():
        return
    fields: dict[str, object] = {
        "method": request.method,
        "path": _logged_path(request.raw_path),
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "client": ex.client,
        "route": ex.route,
        "trace_id": ex.trace.trace_id,
    }
    if ex.target is not None:
        fields["upstream"] = ex.target.label
    if ex.error is not None:
        fields["error"] = ex.error
    if ex.rate_limit is not None:
        fields["rate_limit"] = ex.rate_limit
    if ex.user is not None:
        fields["user"] = ex.user  # the subject, never the token
    if ex.log_fields:
        fields.update(ex.log_fields)
    if ex.session is not None:
        ex.session.handshake_logged(fields)
    else:
        logs.access("request", fields)


def _logged_path(target: str) -> str:
    """The target as logged: no query, and for the absolute and authority forms (refused:
    ``http://user:pw@host/x``, ``user:pw@host:443``) no credentials. A path (``/u/@me``)
    is as it came."""
    path = target.partition("?")[0]
    if "@" in path and not path.startswith("/"):
        scheme, sep, rest = path.partition("://")
        if not sep:  # the authority form
            scheme, rest = "", path
        authority, slash, tail = rest.partition("/")
        path = f"{scheme}{sep}{authority.rpartition('@')[2]}{slash}{tail}"
    return path[:_MAX_LOGGED_PATH]


def _end_span(tracer: Tracer, ex: Exchange, status: int) -> None:
    """A sampled request's span: named by method and route, as OpenTelemetry's HTTP server
    spans are (never by the raw path, which would make every span name unique)."""
    request = ex.request
    # A method outside the known ones is _OTHER, as OpenTelemetry's conventions have it (a
    # client's made-up methods must not name spans), and kept as http.request.method_original.
    method = method_label(request.method)
    method = "_OTHER" if method == "OTHER" else method
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.path": _logged_path(request.raw_path),
        "http.response.status_code": status,
        "client.address": ex.client,
        "daarion.service": ex.service,
        "daarion.route": ex.route,
        "daarion.request_id": ex.request_id,
        "daarion.listener": ex.listener.name,
    }
    if ex.target is not None:
        attributes["daarion.upstream.node"] = ex.target.node
        attributes["daarion.upstream.target"] = ex.target.label
        attributes["server.address"] = ex.target.host
        attributes["server.port"] = ex.target.port
    if ex.error is not None:
        attributes["error.type"] = ex.error
    if ex.session is not None:
        attributes["daarion.websocket"] = 1
    if method == "_OTHER":
        attributes["http.request.method_original"] = request.method[:32]
    tracer.finish(ex.trace, f"{method} {ex.route}", status, attributes)
