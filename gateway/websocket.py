"""WebSocket sessions: ``/ws/<service>/<channel>`` relayed to the service, frame by frame.

The upstream leg is opened *first* (``wsconnect.py``): only when the upstream has answered
101 does the client get its 101 (with the subprotocol the upstream chose), so a refusal
reaches the client as that plain HTTP status and nothing the client sent after its handshake
reaches any upstream. An upstream that cannot be reached at handshake time is skipped for the
next target. Then aiohttp lets go of the client's connection (``detach``) and the two
connections become a ``wssession.Session``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final, Protocol, cast

from aiohttp import web

from .errors import GatewayError, upstream_failure
from .failover import all_down
from .forward import HOP_BY_HOP, ClientGone, Origin, end_to_end, request_headers
from .wsconnect import (
    ConnectTimeout,
    Upgraded,
    UpstreamInvalid,
    UpstreamRefused,
    accept_key,
    head_bytes,
    open_upstream,
)
from .wssession import Session

if TYPE_CHECKING:
    from .app import Gateway
    from .pipeline import Exchange
    from .snapshot import Route, Target, WsPolicy

log = logging.getLogger("gateway.websocket")

HANDSHAKE_TIMEOUT: Final = 5.0  # for the upstream's 101, after the connection is made
_HANDSHAKE: Final = frozenset(
    {
        "content-length",  # 0 or absent (a handshake with a body is refused)
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
_NOT_PASSED_BACK: Final = HOP_BY_HOP | _HANDSHAKE | {"date", "server", "content-type"}


def is_upgrade(request: web.BaseRequest) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


class Detachable(Protocol):
    """The client connection's protocol (``app._Protocol``), which can let go of it."""

    def detach(self) -> tuple[asyncio.Transport, bytes] | None: ...


class Detached(web.StreamResponse):
    """What the handler returns once the connection belongs to a relay: aiohttp has written
    nothing for it and writes nothing more."""

    def __init__(self) -> None:
        super().__init__(status=101)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


async def relay(
    gw: Gateway, ex: Exchange, route: Route, policy: WsPolicy, path_qs: str
) -> web.StreamResponse:
    """Handle one WebSocket handshake for ``route`` and start relaying the session."""
    request = ex.request
    if not is_upgrade(request):
        raise GatewayError(
            426, "upgrade_required", "use a WebSocket handshake here",
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )  # fmt: skip
    if not web.WebSocketResponse().can_prepare(request).ok or _has_body(request):
        # Checked before any upstream. A body would be read by the upstream as its first
        # frames, or waited for: the two sides would disagree on where frames begin.
        raise GatewayError(400, "bad_handshake", "the WebSocket handshake is not valid")
    origin = request.headers.get("Origin", "").lower()
    if policy.origins is not None and origin not in policy.origins:
        raise GatewayError(403, "origin_not_allowed", "this origin may not open sessions here")
    _refuse_while_draining(gw)
    upstream = await _connect(gw, ex, route, path_qs)
    if gw.draining:  # it began stopping while the upstream answered: no session now
        upstream.transport.abort()
        _refuse_while_draining(gw)
    detached = None
    client = cast("Detachable", request.protocol)
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.write(_switching(request, upstream, ex.request_id))
        detached = client.detach()
    if detached is None:  # the client left while the upstream was answering
        upstream.transport.abort()
        raise ClientGone
    ex.status = 101
    session = Session(gw, route.service, policy, ex.request_id)
    transport, tail = detached
    session.start(transport, upstream, tail)
    ex.session = session
    return Detached()


def _has_body(request: web.BaseRequest) -> bool:
    headers = request.headers
    return "Transfer-Encoding" in headers or headers.get("Content-Length", "0") != "0"


def _refuse_while_draining(gw: Gateway) -> None:
    if gw.draining:
        raise GatewayError(
            503, "shutting_down", "the gateway is stopping; open the session again",
            headers={"Retry-After": "1"},
        )  # fmt: skip


def _switching(request: web.BaseRequest, upstream: Upgraded, request_id: str) -> bytes:
    """The client's 101, with the upstream's end-to-end headers (cookies, say)."""
    headers = end_to_end(upstream.headers, _NOT_PASSED_BACK)
    headers["X-Request-ID"] = request_id
    headers["Upgrade"] = "websocket"
    headers["Connection"] = "Upgrade"
    headers["Sec-WebSocket-Accept"] = accept_key(request.headers["Sec-WebSocket-Key"])
    if upstream.subprotocol:
        headers["Sec-WebSocket-Protocol"] = upstream.subprotocol
    return head_bytes("HTTP/1.1 101 Switching Protocols", headers.items())


async def _connect(gw: Gateway, ex: Exchange, route: Route, path_qs: str) -> Upgraded:
    """Open the upstream leg, trying the next target when one cannot be reached."""
    request = ex.request
    health = gw.health
    now = health.monotonic()
    tried: list[Target] = []
    failure: GatewayError | None = None
    origin = Origin(ex.client, ex.proto, ex.request_id)
    protocols = [
        p.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in value.split(",")
        if p.strip()
    ]
    for _ in range(route.retries + 1):
        target = gw.balancer.choose(route, lambda t: health.usable(t, now), tried)
        if target is None:
            break
        tried.append(target)
        ex.target = target
        headers = request_headers(request, target, origin, also_drop=_HANDSHAKE)
        try:
            async with asyncio.timeout(route.connect_timeout + HANDSHAKE_TIMEOUT):
                upstream = await open_upstream(
                    target.host,
                    target.port,
                    path_qs,
                    headers,
                    protocols,
                    connect_timeout=route.connect_timeout,
                )
        except UpstreamRefused as refused:
            if refused.status < 500:
                health.passed(target)
            else:
                health.failed(target, f"status {refused.status}", route.probe, route.ejection)
            raise GatewayError(
                refused.status if 400 <= refused.status <= 599 else 502,
                "upgrade_refused",
                f"the upstream answered {refused.status} instead of switching protocols",
            ) from None
        except UpstreamInvalid as invalid:
            health.failed(target, "invalid handshake", route.probe, route.ejection)
            log.warning("invalid upstream handshake: %s", invalid)
            raise upstream_failure("protocol") from None
        except (TimeoutError, OSError) as exc:
            failure = _connect_error(exc)
            health.failed(target, failure.code, route.probe, route.ejection)
            continue
        health.passed(target)
        if target.tier > 0:
            gw.metrics.failovers.labels(route.service, target.node).inc()
        return upstream
    if failure is None:
        raise all_down(gw, route)
    raise failure


def _connect_error(exc: TimeoutError | OSError) -> GatewayError:
    """What a failed upstream handshake was (``open_upstream``'s exceptions)."""
    if isinstance(exc, ConnectTimeout):
        return upstream_failure("connect_timeout")
    if isinstance(exc, TimeoutError):
        return upstream_failure("timeout")  # connected, but no 101 (or anything) in time
    if isinstance(exc, ConnectionRefusedError) or not isinstance(exc, ConnectionError):
        return upstream_failure("connect")
    return upstream_failure("disconnect")
