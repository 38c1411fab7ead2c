"""A relayed WebSocket session: two ``Leg`` protocols, one per connection, and the
``Session`` that ties them together (see ``handshake.py`` for the handshake).

Each leg reads frame headers (``frames.py``) and writes the frames to the other leg as they
came, byte for byte: no message reassembly, no task per session, a few hundred bytes of state.
Backpressure is the transports' own: when one leg's send buffer passes its high-water mark,
the other leg is not read until it drains.

Close frames are relayed with their codes and reasons (1005/1006/1015 never go on the wire)
and the peer's answer is relayed back; then both connections are closed. A leg that ends
without a close frame gets the other one closed: ``ws_upstream_gone_code`` (1011 by default)
to the client when the upstream died, 1001 to the upstream when the client vanished.

A leg that breaks the protocol (or sends too big a message) is owed a close frame with the
code (1002, 1009), but the other leg is told first and its frames keep flowing to the
offender until it answers: what the other side sent before it knew (an echo of the last good
message, say) arrives before the close, as it would on a direct connection. The counters and
the log line count what was written to the other side, not what was read.

Keepalive pings, dead peers, idle sessions and close handshakes that never finish are
``keepalive.py``'s.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .. import logs
from ..logs import REQUEST_ID
from .frames import (
    CLOSE,
    PING,
    PONG,
    Control,
    FrameReader,
    close_payload,
    control_frame,
    parse_close,
    reserved_bits,
)

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..snapshot import WsPolicy
    from .upstream import Upgraded

CLOSE_TIMEOUT: Final = 5.0  # for the peer's answer to a close frame
NORMAL: Final = 1000
GOING_AWAY: Final = 1001
PROTOCOL_ERROR: Final = 1002
UPSTREAM_GONE: Final = b"the upstream went away"  # the reason with ws_upstream_gone_code
# The payload of the gateway's own keepalive pings: their pongs are not passed on.
KEEPALIVE: Final = b"gw-keepalive-" + os.urandom(6).hex().encode()


def code_label(code: int | None) -> str:
    """A bounded metric label for a close code."""
    if code is None:
        return "none"
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


class Leg(asyncio.Protocol):
    """One side of a session: reads its frames and writes them to the other side."""

    __slots__ = (
        "close_code",
        "close_got",
        "close_sent",
        "counted",
        "is_client",
        "name",
        "owed",
        "paused",
        "paused_at",
        "peer",
        "pinged",
        "reader",
        "reported",
        "seen",
        "session",
        "transport",
    )

    def __init__(self, session: Session, is_client: bool, transport: asyncio.Transport) -> None:
        self.session = session
        self.is_client = is_client  # the client's leg, or the upstream's
        self.name = "client" if is_client else "upstream"
        self.peer: Leg = self  # the other leg, set once both exist
        self.transport: asyncio.Transport | None = transport
        # A client's frames are masked, an upstream's are not.
        self.reader = FrameReader(
            masked=is_client, max_message=session.policy.max_message, reserved=session.reserved
        )
        # What it sent that was written to the other leg, fixed once nothing more can be;
        # until then, what the reader passed (see ``delivered``).
        self.counted: tuple[int, int] | None = None
        self.owed = 0  # a violation's close code, sent once the other leg has had its say
        self.reported = (0, 0)  # messages and payload bytes already added to the counters
        self.seen = time.monotonic()  # when it last sent anything
        self.pinged = 0.0  # when the gateway's keepalive ping went out, unanswered so far
        self.close_got = False  # it sent a close frame
        self.close_code: int | None = None  # the code in it
        self.close_sent = False  # a close frame went out to it
        self.paused = False  # not read while the other leg's send buffer is full
        self.paused_at = 0.0  # since when (the keepalive sweep ends a peer that takes nothing)

    def data_received(self, data: bytes) -> None:
        self.seen = time.monotonic()
        session, peer = self.session, self.peer
        for event in self.reader.feed(data):
            if isinstance(event, bytes):
                peer.write(event)
            elif isinstance(event, Control):
                if event.opcode == PONG:
                    if event.payload != KEEPALIVE:  # the answer to the gateway's ping stays
                        peer.write(event.raw)
                else:
                    session.close_frame(self, event.payload)
            else:
                session.violation(self, event.code)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.close_sent and not transport.is_closing():
            transport.write(data)

    def send_control(self, opcode: int, payload: bytes) -> bool:
        """Write a frame of the gateway's own, if the stream to this leg is between frames."""
        if self.transport is None or self.close_sent or self.transport.is_closing():
            return False
        if self.peer.reader.mid_frame:
            return False
        self.transport.write(control_frame(opcode, payload, masked=not self.is_client))
        return True

    def send_close(self, code: int, reason: bytes = b"") -> None:
        if self.send_control(CLOSE, close_payload(code, reason)):
            self.close_sent = True
            self.peer.freeze()  # nothing more goes to this leg
        elif self.transport is not None:
            self.close_sent = True
            self.peer.freeze()
            self.transport.close()  # mid-frame: a close frame now would be read as payload
        self.session.closing()

    def freeze(self) -> None:
        """The other leg takes nothing more: what this one sent so far is what it got."""
        if self.counted is None:
            self.counted = self.reader.passed()

    def delivered(self) -> tuple[int, int]:
        """(messages, payload bytes) from this leg written to the other one."""
        return self.reader.passed() if self.counted is None else self.counted

    def ping(self) -> bool:
        return self.send_control(PING, KEEPALIVE)

    def pause_writing(self) -> None:
        self.peer.pause(True)

    def resume_writing(self) -> None:
        self.peer.pause(False)

    def pause(self, paused: bool) -> None:
        """Stop or start reading this leg (backpressure from the other one)."""
        if paused and not self.paused:
            self.paused_at = time.monotonic()
        self.paused = paused
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # a WebSocket has no half-close: the connection closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.peer.freeze()
        self.session.lost(self)


class Session:
    """One relayed session: both legs, what went through, and how it ended."""

    __slots__ = (
        "_ended",
        "_handover",
        "activity",
        "client",
        "close_code",
        "deadline",
        "ended_by",
        "gauges",
        "log_fields",
        "metrics",
        "open",
        "policy",
        "relayed",
        "request_id",
        "reserved",
        "service",
        "started",
        "upstream",
    )

    def __init__(
        self,
        metrics: Metrics,
        open_sessions: set[Session],
        *,
        service: str,
        policy: WsPolicy,
        request_id: str,
        client: asyncio.Transport,
        upstream: Upgraded,
        ended: Callable[[], None] = lambda: None,
    ) -> None:
        self.metrics = metrics
        self._ended = ended  # the client connection's: it stops counting against the caps
        self.open = open_sessions  # every open session of the gateway; this one while open
        self.request_id = request_id
        self.service = service
        self.policy = policy
        self.reserved = reserved_bits(upstream.extensions)  # what RSV bits frames may carry
        self.client = Leg(self, True, client)
        self.upstream = Leg(self, False, upstream.transport)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self._handover = (client, upstream)  # for start()
        self.started = time.monotonic()
        self.activity = self.started  # when a data frame last went either way (sweeps)
        self.relayed = 0  # data payload bytes both ways when ``activity`` was last set
        self.close_code: int | None = None  # the code that ended the session
        self.ended_by = ""  # client, upstream, idle, dead client, dead upstream, shutdown
        self.deadline = 0.0  # when closing: when the legs are cut if not closed by then
        self.log_fields: dict[str, object] | None = None  # the request line, at the end
        # active_connections and gateway_websocket_sessions of the service, held so that the
        # session decrements the very series it incremented (a reload may drop the service).
        self.gauges = (metrics.active_for(service), metrics.ws_sessions.of(service))

    @property
    def legs(self) -> tuple[Leg, Leg]:
        return self.client, self.upstream

    def start(self, client_tail: bytes, *, client_full: bool = False) -> None:
        """Relay from now on: the legs take over both connections. ``client_full``: the
        client's transport was past its high-water mark already (the 101, or answers before
        it, that the client has not taken): the upstream is not read until it drains, as if
        this leg had been told ``pause_writing`` (the transport tells it ``resume_writing``
        when it drains, and would never say pause first)."""
        client, upstream = self._handover
        client.set_protocol(self.client)
        upstream.transport.set_protocol(self.upstream)
        for gauge in self.gauges:
            gauge.inc()
        self.metrics.ws_opened.add((self.service,))
        self.open.add(self)
        if client_full:
            self.upstream.pause(True)
        if upstream.tail:
            # Frames that came with the 101: writing them may fill the client's buffer,
            # which pauses the upstream leg (pause_writing) before it was read at all.
            self.upstream.data_received(upstream.tail)
        if upstream.lost:  # it closed after its 101, before its leg was there to see it
            self.upstream.connection_lost(None)
        elif not self.upstream.paused:  # else resume_writing resumes it
            upstream.transport.resume_reading()
        if client_tail:
            self.client.data_received(client_tail)

    def ending(self, by: str, code: int | None) -> None:
        """Note who ended the session and how, unless that is already known."""
        if not self.ended_by:
            self.ended_by, self.close_code = by, code

    def closing(self) -> None:
        if not self.deadline:
            self.deadline = time.monotonic() + CLOSE_TIMEOUT

    def close_frame(self, leg: Leg, payload: bytes) -> None:
        """``leg`` sent a close frame: pass it on (or the answer back), then, once each leg
        has sent one and got one, close the connections."""
        parsed = parse_close(payload)
        if parsed is None:
            self.violation(leg, PROTOCOL_ERROR)
            return
        code, reason = parsed
        leg.close_got, leg.close_code = True, code
        self.ending(leg.name, code)
        peer = leg.peer
        if peer.owed:  # the offender's turn: everything the other leg sent has gone to it
            self._fail(peer)
        elif not peer.close_sent:
            peer.send_close(code or NORMAL, reason)  # parse_close let only sendable codes by
        self._settle()

    def violation(self, leg: Leg, code: int) -> None:
        """``leg`` broke the protocol (1002) or sent too big a message (1009). The other leg
        gets the code first and what it sends until its answer still goes to ``leg``; then
        ``leg`` gets its close frame and its connection is closed at once (RFC 6455 7.1.7: its
        answer, if any, is not read). Nothing is read from ``leg`` meanwhile (its reader is
        done)."""
        self.ending(leg.name, code)
        leg.owed = code
        peer = leg.peer
        if not peer.close_sent and not peer.owed:
            peer.send_close(code)  # (the answer, if its close was waiting for one)
        if peer.owed or peer.close_got or peer.transport is None:
            self._fail(leg)  # nothing more is coming from the other leg
            if peer.owed:
                self._fail(peer)
        self._settle()

    def _fail(self, leg: Leg) -> None:
        """Send ``leg`` the close frame its violation earned, and close its connection."""
        if not leg.close_sent:
            leg.send_close(leg.owed)
        if leg.transport is not None:
            leg.transport.close()  # after the close frame has been written

    def close_both(self, code: int) -> None:
        for leg in self.legs:
            if not leg.close_sent:
                leg.send_close(code)
        self._settle()

    def _settle(self) -> None:
        for leg in self.legs:
            if leg.close_sent and leg.close_got and leg.transport is not None:
                leg.transport.close()

    def lost(self, leg: Leg) -> None:
        """A connection closed: the other leg is told (if it is not closing already), and the
        session ends when both are closed."""
        peer = leg.peer
        peer.pause(False)  # it may have been paused while this leg's buffer was full
        if peer.owed:  # the other leg broke the protocol: this one had its say
            self._fail(peer)
        elif not leg.close_got:  # it ended without a close frame
            code = GOING_AWAY if leg.is_client else self.policy.upstream_gone_code
            self.ending(leg.name, code)
            if not peer.close_sent:  # its own code back if its close waits for an answer
                gone = b"" if leg.is_client else UPSTREAM_GONE
                peer.send_close(peer.close_code or code, b"" if peer.close_code else gone)
        self._settle()
        if peer.transport is None:
            self._finish()

    def cut(self) -> None:
        """Drop both connections at once (a close handshake that did not finish in time); an
        offender still owed its close frame gets it first, and its connection is closed (the
        next cut, if there is one, drops it)."""
        for leg in self.legs:
            if leg.transport is None:
                continue
            if leg.owed and not leg.close_sent:
                self._fail(leg)
            else:
                leg.transport.abort()

    def _finish(self) -> None:
        metrics = self.metrics
        self.open.discard(self)
        self.ending("gateway", GOING_AWAY)
        metrics.client_connections.dec()  # the client's connection, counted by server.Connection
        self._ended()
        for gauge in self.gauges:
            gauge.dec()
        metrics.ws_closed.add((self.service, code_label(self.close_code)))
        self.report()
        if self.log_fields is not None:
            self._log()

    def handshake_logged(self, fields: dict[str, object]) -> None:
        """The pipeline's request line: written when the session ends, with its summary."""
        self.log_fields = fields
        if self not in self.open:
            self._log()  # it has ended already

    def _log(self) -> None:
        fields = self.log_fields or {}
        self.log_fields = None
        client, upstream = self.client, self.upstream
        fields["duration_ms"] = round((time.monotonic() - self.started) * 1000, 2)
        (messages_up, bytes_up), (messages_down, bytes_down) = (
            client.delivered(),
            upstream.delivered(),
        )
        fields["websocket"] = {
            "messages_up": messages_up,
            "messages_down": messages_down,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "close_code": self.close_code,
            "ended_by": self.ended_by,
            "client_close_code": client.close_code,
            "upstream_close_code": upstream.close_code,
        }
        token = REQUEST_ID.set(self.request_id)  # this runs in a transport's callback
        try:
            logs.access("request", fields)
        finally:
            REQUEST_ID.reset(token)

    def report(self) -> None:
        """Add what was relayed since the last report to the counters (at scrapes and at the
        end: cheaper than two counter updates per message)."""
        # A direction is named by the leg it reads: "up" is what the client sent.
        metrics = self.metrics
        for leg, direction in ((self.client, "up"), (self.upstream, "down")):
            key = (self.service, direction)
            (now_messages, now_bytes), (sent_messages, sent_bytes) = leg.delivered(), leg.reported
            metrics.ws_messages.add(key, now_messages - sent_messages)
            metrics.ws_bytes.add(key, now_bytes - sent_bytes)
            leg.reported = (now_messages, now_bytes)


def close_all(sessions: set[Session], code: int = GOING_AWAY) -> None:
    """Send every open session's legs a close frame (at shutdown)."""
    for session in list(sessions):
        session.ending("shutdown", code)
        session.close_both(code)
