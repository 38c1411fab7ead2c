"""The WebSocket phase: ``/ws/<service>/<channel>`` checked, the upstream's handshake made
through the failover loop, the client's 101, and the session handed over to the relay.

The upstream leg is opened *first* (``upstream.py``): only when the upstream has answered
101 does the client get its 101 (with the subprotocol the upstream chose), so a refusal
reaches the client as that plain HTTP status and nothing the client sent after its handshake
reaches any upstream. An upstream that cannot be reached at handshake time is skipped for the
next target, by the same rules and with the same back-off and metrics as an HTTP request (a
handshake is a GET without a body). Then aiohttp lets go of the client's connection
(``detach``) and the two connections become a ``session.Session``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import TYPE_CHECKING, Final, Protocol, cast

from aiohttp import web

from ..auth.phase import SUBPROTOCOL
from ..dial import OutOfResources
from ..edge.cors import same_origin
from ..errors import ClientGone, GatewayError, tls_reason, upstream_failure
from ..upstream.failover import Failed, attempt, first_target, status_kind
from ..upstream.headers import HOP_BY_HOP, Forwarding, end_to_end, request_headers
from .session import Session
from .upstream import (
    ConnectTimeout,
    Upgraded,
    UpstreamInvalid,
    UpstreamRefused,
    accept_key,
    accepted,
    head_bytes,
    open_upstream,
)

if TYPE_CHECKING:
    from ..context import Exchange, Shared
    from ..request import Request
    from ..snapshot import Route, Target, WsPolicy

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


def is_upgrade(request: Request) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


class Detachable(Protocol):
    """The client connection's protocol (``server.Connection``), which can let go of it."""

    def detach(self) -> tuple[asyncio.Transport, bytes, bool] | None: ...

    def relay_ended(self) -> None: ...


class Detached(web.StreamResponse):
    """What the handler returns once the connection belongs to a relay: aiohttp has written
    nothing for it and writes nothing more."""

    def __init__(self) -> None:
        super().__init__(status=101)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


async def open_session(
    shared: Shared, ex: Exchange, route: Route, path_qs: str
) -> web.StreamResponse:
    """Handle one WebSocket handshake for ``route`` (a WebSocket route: ``route.ws`` is set)
    and start relaying the session."""
    request = ex.request
    policy = route.ws
    if policy is None:  # pragma: no cover - the route table gives only WebSocket routes here
        raise GatewayError(404, "not_found", "this route accepts no WebSocket sessions")
    if not is_upgrade(request):
        raise GatewayError(
            426, "upgrade_required", "use a WebSocket handshake here",
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )  # fmt: skip
    if not _valid_handshake(request) or _has_body(request):
        # Checked before any upstream. A body would be read by the upstream as its first
        # frames, or waited for: the two sides would disagree on where frames begin.
        raise GatewayError(400, "bad_handshake", "the WebSocket handshake is not valid")
    if not _origin_allowed(ex, route, policy):
        raise GatewayError(403, "origin_not_allowed", "this origin may not open sessions here")
    _refuse_while_draining(shared)
    upstream = await _connect(shared, ex, route, path_qs)
    if shared.draining:  # it began stopping while the upstream answered: no session now
        upstream.transport.abort()
        _refuse_while_draining(shared)
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
    transport, tail, client_full = detached
    try:
        session = Session(
            shared.metrics, shared.sessions, service=route.service, policy=policy,
            request_id=ex.request_id, client=transport, upstream=upstream,
            ended=client.relay_ended,
        )  # fmt: skip
        session.start(tail, client_full=client_full)
    except BaseException:  # no session to end it: the connection stops counting now
        client.relay_ended()
        raise
    ex.session = session
    return Detached()


def _origin_allowed(ex: Exchange, route: Route, policy: WsPolicy) -> bool:
    """``ws_origins: any``; the listed origins; or by default: no Origin (not a browser), the
    request's own (its Host), or one the route's CORS allows."""
    if policy.any_origin:
        return True
    headers = ex.request.headers
    origin = headers.get("Origin")
    if policy.origins is not None:
        return origin is not None and origin.lower() in policy.origins
    return (
        origin is None
        or same_origin(origin, headers.get("Host"), ex.proto)
        # A CORS "*" says any page may read credential-less answers; a handshake carries
        # the visitor's cookies: it needs an origin the CORS section names.
        or (route.cors is not None and route.cors.allows(origin, named=True))
    )


def _valid_handshake(request: Request) -> bool:
    """RFC 6455 §4.2.1, as aiohttp's ``WebSocketResponse`` checks it: ``Upgrade: websocket``,
    ``Connection: upgrade``, a version the relay speaks (13; 8 and 7, its drafts, frame
    alike) and a key of 16 bytes in base64."""
    headers = request.headers
    if headers.get("Upgrade", "").lower().strip() != "websocket" or not request.upgrade:
        return False
    if headers.get("Sec-WebSocket-Version", "") not in {"13", "8", "7"}:
        return False
    key = headers.get("Sec-WebSocket-Key")
    try:
        return key is not None and len(base64.b64decode(key)) == 16
    except ValueError:  # not base64; or not ASCII (a header's obs-text)
        return False


def _has_body(request: Request) -> bool:
    headers = request.headers
    return "Transfer-Encoding" in headers or headers.get("Content-Length", "0") != "0"


def _refuse_while_draining(shared: Shared) -> None:
    if shared.draining:
        raise GatewayError(
            503, "shutting_down", "the gateway is stopping; open the session again",
            headers={"Retry-After": "1"},
        )  # fmt: skip


def _switching(request: Request, upstream: Upgraded, request_id: str) -> bytes:
    """The client's 101, with the upstream's end-to-end headers (cookies, say)."""
    headers = end_to_end(upstream.headers, _NOT_PASSED_BACK)
    headers["X-Request-ID"] = request_id
    headers["Upgrade"] = "websocket"
    headers["Connection"] = "Upgrade"
    headers["Sec-WebSocket-Accept"] = accept_key(request.headers["Sec-WebSocket-Key"])
    if upstream.subprotocol:
        headers["Sec-WebSocket-Protocol"] = upstream.subprotocol
    if upstream.extensions:  # as the upstream wrote it: its parameters are the client's too
        headers["Sec-WebSocket-Extensions"] = upstream.extensions
    return head_bytes("HTTP/1.1 101 Switching Protocols", headers.items())


async def _connect(shared: Shared, ex: Exchange, route: Route, path_qs: str) -> Upgraded:
    """Open the upstream leg through the failover loop."""
    request = ex.request
    first = first_target(shared, route)
    forwarding = Forwarding(
        ex.client, ex.proto, ex.request_id, ex.peer_trusted, ex.identity_headers,
        ex.snapshot.identity_strip, ex.trace.traceparent(), ex.trace.continued,
    )  # fmt: skip
    protocols = [
        p.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in value.split(",")
        if p.strip() and not (ex.token_subprotocol and _is_token(p))  # a token is no protocol
    ]
    # The client's offer as it came (ws_extensions: false strips it): the frames are relayed
    # untouched, so the client and the upstream agree on them as on a direct connection.
    extensions = accepted(request.headers) if route.ws is not None and route.ws.extensions else None

    async def send(target: Target) -> Upgraded | UpstreamRefused:
        headers = request_headers(
            request, target, forwarding, also_drop=_HANDSHAKE,
            underscores=route.underscores_in_headers,
        )  # fmt: skip
        try:
            async with asyncio.timeout(route.connect_timeout + HANDSHAKE_TIMEOUT):
                return await open_upstream(
                    target.host, target.port, path_qs, headers, protocols,
                    extensions=extensions, connect_timeout=route.connect_timeout, tls=target.tls,
                )  # fmt: skip
        except UpstreamRefused as refused:
            if refused.status < 500:
                return refused  # an answer, passed on to the client as it is
            raise Failed(
                status_kind(refused.status),
                f"status {refused.status}",
                _refusal(refused.status),
                answer=refused,
            ) from None
        except UpstreamInvalid as invalid:
            log.warning("invalid upstream handshake: %s", invalid)
            raise Failed("protocol", "invalid handshake", upstream_failure("protocol")) from None
        except (TimeoutError, OSError) as exc:
            raise Failed.of(_connect_error(exc)) from None

    answer, _ = await attempt(shared, ex, route, first, send, replayable=True)
    if isinstance(answer, UpstreamRefused):
        raise _refusal(answer.status)
    return answer


def _refusal(status: int) -> GatewayError:
    """The client's answer when the upstream refused to switch protocols."""
    return GatewayError(
        status if 400 <= status <= 599 else 502,
        "upgrade_refused",
        f"the upstream answered {status} instead of switching protocols",
    )


def _connect_error(exc: TimeoutError | OSError) -> GatewayError:
    """What a failed upstream handshake was (``open_upstream``'s exceptions)."""
    tls = tls_reason(exc)
    if tls is not None:  # the node's certificate, or the TLS handshake: never sent
        return upstream_failure("connect", tls)
    if isinstance(exc, OutOfResources):
        return upstream_failure("local")
    if isinstance(exc, ConnectTimeout):
        return upstream_failure("connect_timeout")
    if isinstance(exc, TimeoutError):
        return upstream_failure("timeout")  # connected, but no 101 (or anything) in time
    if isinstance(exc, ConnectionRefusedError) or not isinstance(exc, ConnectionError):
        return upstream_failure("connect")
    return upstream_failure("disconnect")


def _is_token(offered: str) -> bool:
    """A ``bearer.<token>`` offer (every one goes, not only the token checked: a second one
    would reach the service unchecked)."""
    return offered.strip().lower().startswith(SUBPROTOCOL)
