"""WebSocket sessions: ``/ws/<service>/<channel>`` relayed to the service, frame by frame.

The upstream leg is opened *first*: only when the upstream has answered 101 does the client
get its 101 (with the subprotocol the upstream chose), so a refusal reaches the client as
that plain HTTP status and nothing the client sent after its handshake reaches any upstream.
An upstream that cannot be reached at handshake time is skipped for the next target.

Then two pumps relay frames in order, byte for byte (text stays undecoded), pings and pongs
with their payloads. Each pump awaits the other leg's send before it reads again, so a slow
reader slows the writer: a session buffers at most a message plus the socket buffers.
Close frames are relayed with their codes and reasons; 1005/1006/1015 never go on the wire.
When the upstream dies the client gets 1014 at once; when the client vanishes the upstream
gets 1001. Keepalive pings, dead peers and idle sessions are ``wskeepalive.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from .errors import GatewayError, upstream_error
from .failover import all_down
from .forward import HOP_BY_HOP, Origin, end_to_end, request_headers

if TYPE_CHECKING:
    from .app import Gateway
    from .metrics import Metrics
    from .pipeline import Exchange
    from .snapshot import Route, Target, WsPolicy

log = logging.getLogger("gateway.websocket")

HANDSHAKE_TIMEOUT: Final = 5.0  # for the upstream's 101, after the connection is made
CLOSE_TIMEOUT: Final = 5.0  # for the peer's answer to a close frame
GOING_AWAY: Final = 1001
MESSAGE_TOO_BIG: Final = 1009
BAD_GATEWAY: Final = 1014
NOT_ON_THE_WIRE: Final = frozenset({1005, 1006, 1015})
_HANDSHAKE: Final = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
_DATA: Final = (WSMsgType.TEXT, WSMsgType.BINARY)
# The payload of the gateway's own keepalive pings: their pongs are not passed on.
KEEPALIVE: Final = b"gw-keepalive-" + os.urandom(6).hex().encode()


def is_upgrade(request: web.BaseRequest) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def wire_code(code: int | None, fallback: int) -> int:
    """A close code that may be sent: 1005/1006/1015 (and nonsense) become ``fallback``."""
    if code is None or code in NOT_ON_THE_WIRE or not 1000 <= code <= 4999:
        return fallback
    return code


def code_label(code: int | None) -> str:
    """A bounded metric label for a close code."""
    if code is None:
        return "none"
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


CLIENT, UPSTREAM = 0, 1  # the legs; a direction is named by the leg it reads: up reads CLIENT


@dataclass(slots=True, eq=False)  # identity: sessions live in a set
class Session:
    """One relayed session: both legs, what went through, and how it ended."""

    service: str
    policy: WsPolicy
    legs: tuple[
        web.WebSocketResponse[Literal[False]], aiohttp.ClientWebSocketResponse[Literal[False]]
    ]
    messages: list[int] = field(default_factory=lambda: [0, 0])  # by the leg they came from
    sizes: list[int] = field(default_factory=lambda: [0, 0])
    reported: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # to Prometheus so far
    seen: list[float] = field(default_factory=lambda: [time.monotonic()] * 2)  # last frame in
    pinged: list[float] = field(default_factory=lambda: [0.0, 0.0])  # keepalive ping out since
    last_activity: float = field(default_factory=time.monotonic)  # last data message
    close_code: int | None = None  # the code that ended the session (first close frame)
    ended_by: str = ""  # client, upstream, idle, dead client, dead upstream, shutdown

    def ending(self, by: str, code: int | None) -> None:
        """Note who ended the session and how, unless that is already known."""
        if not self.ended_by:
            self.ended_by, self.close_code = by, code

    def report(self, metrics: Metrics) -> None:
        """Add what was relayed since the last report to the counters (at scrapes and at the
        end: cheaper than two counter updates per message)."""
        counters = (
            metrics.ws_counters(self.service, "up"),
            metrics.ws_counters(self.service, "down"),
        )
        for leg in (CLIENT, UPSTREAM):
            messages, sizes = self.messages[leg], self.sizes[leg]
            counters[leg][0].inc(messages - self.reported[leg])
            counters[leg][1].inc(sizes - self.reported[leg + 2])
            self.reported[leg], self.reported[leg + 2] = messages, sizes


async def relay(
    gw: Gateway, ex: Exchange, route: Route, policy: WsPolicy, path_qs: str
) -> web.StreamResponse:
    """Handle one WebSocket handshake for ``route`` and relay the session until it ends."""
    request = ex.request
    if not is_upgrade(request):
        raise GatewayError(
            426, "upgrade_required", "use a WebSocket handshake here",
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )  # fmt: skip
    if not web.WebSocketResponse().can_prepare(request).ok:  # checked before any upstream
        raise GatewayError(400, "bad_handshake", "the WebSocket handshake is not valid")
    origin = request.headers.get("Origin", "").lower()
    if policy.origins is not None and origin not in policy.origins:
        raise GatewayError(403, "origin_not_allowed", "this origin may not open sessions here")
    upstream = await _connect(gw, ex, route, policy, path_qs)
    client: web.WebSocketResponse[Literal[False]] = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoclose=False,
        autoping=False,
        max_msg_size=policy.max_message,
        compress=False,  # frames pass through as they are: no inflating and deflating again
        timeout=CLOSE_TIMEOUT,
        decode_text=False,
    )
    _pass_headers(upstream, client, ex.request_id)
    try:
        await client.prepare(request)
    except BaseException:  # the client left (or was cancelled) before its 101 went out
        await upstream.close(code=GOING_AWAY)
        raise
    ex.status = 101
    session = Session(route.service, policy, (client, upstream))
    try:
        await _run(gw, session)
    finally:
        ex.log_fields.update(_summary(session))
    return client


async def _connect(
    gw: Gateway, ex: Exchange, route: Route, policy: WsPolicy, path_qs: str
) -> aiohttp.ClientWebSocketResponse[Literal[False]]:
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
                upstream = await gw.session.ws_connect(
                    URL(target.origin.replace("http", "ws", 1) + path_qs, encoded=True),
                    protocols=protocols,
                    headers=headers,
                    autoclose=False,
                    autoping=False,
                    max_msg_size=policy.max_message,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                    decode_text=False,
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status < 500:
                health.passed(target)
            else:
                health.failed(target, f"status {exc.status}", route.probe, route.ejection)
            raise GatewayError(
                exc.status if 400 <= exc.status <= 599 else 502,
                "upgrade_refused",
                f"the upstream answered {exc.status} instead of switching protocols",
            ) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            failure = upstream_error(exc)
            health.failed(target, failure.code, route.probe, route.ejection)
            continue
        health.passed(target)
        if target.tier > 0:
            gw.metrics.failovers.labels(route.service, target.node).inc()
        return upstream
    if failure is None:
        raise all_down(gw, route)
    raise failure


def _pass_headers(
    upstream: aiohttp.ClientWebSocketResponse[Literal[False]],
    client: web.WebSocketResponse[Literal[False]],
    request_id: str,
) -> None:
    """The upstream handshake's end-to-end headers (cookies, say) go to the client."""
    response = upstream._response
    headers: CIMultiDict[str] = end_to_end(response.headers, HOP_BY_HOP | _HANDSHAKE)
    for name in ("Date", "Server", "Content-Length", "Content-Type"):
        headers.popall(name, None)
    client.headers.extend(headers)
    client.headers["X-Request-ID"] = request_id


async def _run(gw: Gateway, session: Session) -> None:
    """Relay both ways until either side ends the session, then count it.

    The client-to-upstream pump is a task of its own; the other runs in the handler. When the
    client's connection closes, aiohttp cancels the handler: the session then waits for the
    other pump, which is finishing the upstream leg, before it leaves.
    """
    metrics = gw.metrics
    metrics.active_for(session.service).inc()
    metrics.ws_sessions.labels(session.service).inc()
    metrics.ws_opened.labels(session.service).inc()
    gw.websockets.add(session)
    up = asyncio.get_running_loop().create_task(_pump(session, CLIENT))
    try:
        await _pump(session, UPSTREAM)
        await up
    except asyncio.CancelledError:
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(up), CLOSE_TIMEOUT * 2)
        raise
    finally:
        # The bookkeeping first, with no await before it: aiohttp may cancel the handler
        # again, which would interrupt this block at its first await.
        up.cancel()
        gw.websockets.discard(session)
        session.ending("gateway", GOING_AWAY)
        metrics.active_for(session.service).dec()
        metrics.ws_sessions.labels(session.service).dec()
        metrics.ws_closed.labels(session.service, code_label(session.close_code)).inc()
        session.report(metrics)
        await asyncio.shield(close_both(session, GOING_AWAY))  # goes on if cancelled again


async def _pump(session: Session, source_leg: int) -> None:
    """Frames from one leg to the other, in order, until that leg closes or fails."""
    source: Any = session.legs[source_leg]
    sink: Any = session.legs[1 - source_leg]
    seen, messages, sizes = session.seen, session.messages, session.sizes
    while True:
        msg = await source.receive()
        kind = msg.type
        seen[source_leg] = now = time.monotonic()
        if kind in _DATA:
            data = msg.data
            session.last_activity = now
            messages[source_leg] += 1
            sizes[source_leg] += len(data)
            await sink.send_frame(data, kind)
        elif kind is WSMsgType.PING:
            await sink.ping(msg.data)
        elif kind is WSMsgType.PONG:
            if msg.data != KEEPALIVE:  # the answer to the gateway's own ping stays here
                await sink.pong(msg.data)
        elif kind is WSMsgType.CLOSE:
            await _relay_close(session, source_leg, msg.data, msg.extra)
            return
        elif kind is WSMsgType.CLOSING:
            return  # the other side is closing this leg: it finishes the session
        else:  # CLOSED or ERROR: this leg is gone
            await _leg_failed(session, source_leg, msg.data)
            return


async def _relay_close(session: Session, source_leg: int, code: int, reason: str | None) -> None:
    """One side sent a close frame: pass it on, then answer it with the other side's reply."""
    sender: Any = session.legs[source_leg]
    receiver: Any = session.legs[1 - source_leg]
    session.ending("client" if source_leg == CLIENT else "upstream", code)
    message = (reason or "").encode()[:123]  # a close frame's reason fits in 123 bytes
    await receiver.close(code=wire_code(code, 1000), message=message)
    reply = receiver.close_code
    await sender.close(code=wire_code(reply, wire_code(code, 1000)))


async def _leg_failed(session: Session, source_leg: int, error: object) -> None:
    """A leg ended without a close frame, or with a protocol error (such as 1009, a message
    over the size limit, which aiohttp has already answered on that leg)."""
    by = "client" if source_leg == CLIENT else "upstream"
    if getattr(error, "code", None) == MESSAGE_TOO_BIG:
        code = MESSAGE_TOO_BIG
    elif source_leg == UPSTREAM:
        code = BAD_GATEWAY  # the upstream died: tell the client at once
    else:
        code = GOING_AWAY  # the client went away
    session.ending(by, code)
    await close_both(session, code)


async def close_both(session: Session, code: int, first: int = CLIENT) -> None:
    """Close both legs with ``code``, ``first`` first (the one still listening, say)."""
    for leg in (session.legs[first], session.legs[1 - first]):
        if not leg.closed:
            with contextlib.suppress(Exception):
                await leg.close(code=code)


def _summary(session: Session) -> dict[str, object]:
    """What the session's log line says about it (its request line, written at its end)."""
    client, upstream = session.legs
    return {
        "websocket": {
            "messages_up": session.messages[CLIENT],
            "messages_down": session.messages[UPSTREAM],
            "bytes_up": session.sizes[CLIENT],
            "bytes_down": session.sizes[UPSTREAM],
            "close_code": session.close_code,
            "ended_by": session.ended_by,
            "client_close_code": client.close_code,
            "upstream_close_code": upstream.close_code,
        }
    }
