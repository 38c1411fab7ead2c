"""The HTTP server the clients connect to: aiohttp's low-level ``web.Server`` with a protocol
class of the gateway's own.

Why ``web.Server`` and not ``web.Application``: the gateway has exactly one catch-all handler
(``pipeline.handle``), so the router and middleware chain would only add work on the hot
path; and owning the protocol class lets requests that the HTTP parser itself rejects get the
same JSON error body, request id and single log line as every other error, counts client
connections, and lets a WebSocket relay take a connection over (``detach``). The aiohttp
internals this needs are all in ``aiohttp_private.py``.

The protocol also keeps the connection limits of ``limits`` (``edge/connections.py`` holds the
table of all connections): a new connection over a cap is closed at once; a request head
(request line and headers together) over ``client_header_buffer`` gets 431 before the parser
holds more of it, and one not complete ``client_header_timeout`` after its first byte gets 408
(the table's sweep). Only bytes that can belong to a head are counted: not those of a body
being received, nor what follows a WebSocket handshake.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from . import logs
from .aiohttp_private import (
    answer_early,
    answer_in_http11,
    detach,
    hold_keepalive,
    last_payload,
    parsed,
    protocol_factory,
    queued,
    upgraded,
    waiting,
)
from .edge import strict
from .edge.connections import TERMINATOR, ConnectionTable, head_end
from .edge.trusted import canonical
from .errors import GatewayError, error_response
from .logs import REQUEST_ID, new_request_id
from .metrics import UNMATCHED, Metrics

log = logging.getLogger("gateway")

# Client-side limits, in the spirit of nginx's defaults. The two size limits differ by design:
# aiohttp's LineTooLong carries only the limit it hit, which tells 414 from 431.
MAX_REQUEST_LINE: Final = 8190
MAX_HEADER_FIELD: Final = 8192
SERVER_LIMITS: Final[dict[str, Any]] = {
    "keepalive_timeout": 75.0,  # idle keep-alive connections are closed after this (the
    # gateway passes limits.keepalive_timeout instead)
    "max_line_size": MAX_REQUEST_LINE,  # beyond it: 414
    "max_field_size": MAX_HEADER_FIELD,  # one header name or value; beyond it: 431
    "max_headers": 100,
    "lingering_time": 2.0,  # how long an unread request body is drained after an early answer
}

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Server(web.Server):
    """Makes ``Protocol`` connections that hand every request to ``handler``; ``table`` is
    the table of them all (caps, idle ones, unfinished heads)."""

    def __init__(
        self,
        handler: Handler,
        metrics: Metrics,
        connections: ConnectionTable,
        *,
        hsts: Callable[[], str | None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.metrics = metrics
        self.table = connections
        self.hsts = hsts  # the HTTPS listener's: its unparsable requests' answers get HSTS too
        self._make = protocol_factory(self, Protocol)

    def __call__(self) -> web.RequestHandler:
        return self._make()


class EarlyAnswer(Exception):
    """An answer given before the parser completed a head (431, 408): ``handle_error``'s."""

    def __init__(self, error: GatewayError, detail: str) -> None:
        super().__init__(detail)
        self.error = error


class Protocol(web.RequestHandler):
    """aiohttp's HTTP protocol, with the gateway's JSON answer for unparsable requests and
    the connection limits."""

    __slots__ = (
        "_edge_admitted",
        "_edge_body",
        "_edge_head",
        "_edge_held",
        "_edge_limit",
        "_edge_over",
        "_edge_tail",
        "_edge_upgraded",
        "_hsts",
        "_metrics",
        "_table",
    )

    def __init__(self, manager: Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._metrics = manager.metrics
        self._table = manager.table
        self._hsts = manager.hsts
        self._edge_admitted = False  # counted in the table (else closed at once, never served)
        self._edge_limit = sys.maxsize  # client_header_buffer (0: none), when admitted
        self._edge_head = 0  # bytes of the head arriving; 0: none begun
        self._edge_tail = b""  # the last bytes of it (its end may straddle two reads)
        self._edge_held: bytearray | None = None  # its header lines, until its end comes
        self._edge_body: StreamReader | None = None  # a body arriving: its bytes are no head's
        self._edge_upgraded = False  # a WebSocket handshake: what follows is no head
        self._edge_over = False  # answered early (431, 408): what comes is dropped

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = canonical(peer[0] if isinstance(peer, tuple) else None)
        if not self._table.admit(self, address):
            self._edge_over = True
            transport.close()  # before aiohttp hears of it: nothing runs for it
            return
        self._edge_admitted = True
        self._edge_limit = self._table.policy().header_buffer or sys.maxsize
        super().connection_made(transport)
        self._metrics.client_connections.inc()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._edge_admitted:
            return
        super().connection_lost(exc)
        self._metrics.client_connections.dec()
        self._table.release(self)

    def data_received(self, data: bytes) -> None:
        if self._edge_over:
            return
        body = self._edge_body
        if body is not None:
            if not body.is_eof():  # a body's bytes (a pipelined head after it: not counted)
                before = parsed(self)
                super().data_received(data)
                if parsed(self) != before:
                    self._edge_parsed(data, b"")
                elif body.is_eof():
                    self._edge_body = None
                return
            self._edge_body = None
        if self._edge_upgraded:
            if upgraded(self):
                super().data_received(data)
                return
            self._edge_upgraded = False  # the handshake was refused: HTTP again
        head = self._edge_head
        tail = self._edge_tail
        end = head_end(tail, data)
        if (head + end if end >= 0 else head + len(data)) > self._edge_limit:
            self._edge_answer(
                HEAD_TOO_LARGE, f"the head passed {self._edge_limit} bytes", linger=True
            )
            return
        if not data:  # aiohttp parsing again what it had paused on
            self._edge_feed(data, tail)
            return
        if not head:
            self._table.busy(self)
        held = self._edge_held
        if end >= 0:  # the head ends in this read: the parser gets all of it at once
            if held is not None:
                self._edge_held = None
                if held:
                    super().data_received(bytes(held))
            if self._edge_feed(data, tail):
                return
        elif held is not None:
            held += data  # header lines: held until the head is whole
        else:
            # The request line is parsed as it comes (a client that does not speak HTTP is
            # answered at once); what follows it is held. The parser keeps its header lines
            # as bytes and as text, twice the head; the gateway holds them once.
            line_end = data.find(b"\n") + 1
            if self._edge_feed(data[:line_end] if line_end else data, tail):
                return
            if line_end:
                self._edge_held = bytearray(data[line_end:])
        self._edge_head = head + len(data)
        self._edge_tail = data[-3:] if len(data) >= 3 else (tail + data)[-3:]
        if not head:  # the head spans reads: the header timeout runs
            self._table.head_started(self)
            hold_keepalive(self, self._table.policy().header_timeout + 1)

    def _edge_feed(self, data: bytes, tail: bytes) -> bool:
        """Give the parser ``data``; True when that completed a request (or an error)."""
        before = parsed(self)
        super().data_received(data)
        if parsed(self) == before:
            return False
        self._edge_parsed(data, tail)
        return True

    def _edge_parsed(self, data: bytes, tail: bytes) -> None:
        """The parser completed a head (or more) with ``data``."""
        if self._edge_head:
            self._table.head_done(self)
        self._edge_head, self._edge_tail = 0, b""
        if upgraded(self):
            self._edge_upgraded = True
            return
        payload = last_payload(self)
        if payload is None or payload is not EMPTY_PAYLOAD:
            if payload is not None and not payload.is_eof():
                self._edge_body = payload
            return  # a body ended in this read: what follows it is not measured
        # No body: what follows the last head in this read is the beginning of the next.
        last = data.rfind(TERMINATOR)
        rest = len(data) - (last + 4 if last >= 0 else max(head_end(tail, data), 0))
        if rest > 0:
            if rest > self._edge_limit:
                self._edge_answer(
                    HEAD_TOO_LARGE, f"the head passed {self._edge_limit} bytes", linger=True
                )
                return
            self._edge_head, self._edge_tail = rest, data[-3:]
            self._table.head_started(self)

    def _edge_answer(self, error: GatewayError, detail: str, *, linger: bool = False) -> None:
        """Answer ``error`` and close; ``linger``: the client is still sending (a head too
        large), so let it finish first (``Lingering``). A head that times out is closed at
        once: its client is slow on purpose, and gets no more time."""
        self._edge_over = True
        self._edge_held = None
        self._table.busy(self)
        self._table.head_done(self)
        transport = self.transport
        # TCP only: a TLS connection cannot half-close (it is closed at once, as before).
        if linger and transport is not None and transport.can_write_eof():
            # Duck-typed: aiohttp only calls the transport's methods, which Lingering passes on.
            self.transport = cast(
                asyncio.Transport, Lingering(transport, SERVER_LIMITS["lingering_time"])
            )
        answer_early(self, error.status, EarlyAnswer(error, detail))

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        done = await super().finish_response(request, resp, start_time)
        body = self._edge_body
        if (
            not self._edge_head
            and not self._edge_over
            and not self._edge_upgraded
            and (body is None or body.is_eof())
            and not queued(self)
        ):
            self._table.idle(self)
        return done

    # -- what the table asks of a connection (``edge.connections.Held``) -----------------

    def evict(self) -> None:
        self.force_close()

    def head_timed_out(self) -> bool:
        if self._edge_over or not waiting(self):
            return False
        self._edge_answer(HEAD_TIMEOUT, "the head did not complete in client_header_timeout")
        return True

    def detach(self) -> tuple[asyncio.Transport, bytes] | None:
        """Let go of the connection for a WebSocket relay, which takes the transport and what
        the client sent after its handshake. None when the client has gone already. (The
        relay's session decrements ``gateway_client_connections`` when it ends; the table
        forgets the connection now.)"""
        detached = detach(self)
        self._table.release(self)
        return detached

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; the connection is dropped")
        request_id = new_request_id()
        REQUEST_ID.set(request_id)
        err = _parse_error(status, exc)
        fields = {"status": err.status, "error": err.code, "client": request.remote}
        if err.status >= 500 and err.status not in strict.CLIENT_5XX:
            log.error("unhandled error", exc_info=exc, extra={"fields": fields})
        else:
            # A client that cannot speak HTTP (or TLS sent to a plain port): one line, no
            # traceback, only the first line of aiohttp's description.
            fields["detail"] = (message or str(exc or "")).strip().partition("\n")[0][:200]
            logs.access("bad request", fields)
        self._metrics.observe_request(UNMATCHED, UNMATCHED, "OTHER", err.status, 0.0)
        answer_in_http11(request)  # not aiohttp's HTTP/1.0; and so with Connection: close
        response = error_response(err, request_id)
        response.force_close()
        hsts = self._hsts() if self._hsts is not None else None
        if hsts is not None:
            response.headers["Strict-Transport-Security"] = hsts
        return response


class Lingering:
    """A client connection answered early (431, 408) while its client may still be sending:
    closing it at once would reset it (the kernel answers bytes that arrive for a closed
    socket with RST, and the client's kernel then drops the answer it has not read yet). Its
    ``close()`` ends the answer with a FIN instead and lets the client finish for up to
    ``seconds`` (what it sends is dropped), then closes: nginx's ``lingering_close``.
    Everything else is the transport's."""

    __slots__ = ("_ended", "_seconds", "_transport")

    def __init__(self, transport: asyncio.Transport, seconds: float) -> None:
        self._transport = transport
        self._seconds = seconds
        self._ended = False

    def close(self) -> None:
        transport = self._transport
        if self._ended or transport.is_closing():
            return
        self._ended = True
        transport.write_eof()  # after the answer: the client reads all of it, then EOF
        asyncio.get_running_loop().call_later(self._seconds, transport.close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


HEAD_TOO_LARGE: Final = GatewayError(
    431, "headers_too_large", "the request head is larger than the gateway accepts"
)
HEAD_TIMEOUT: Final = GatewayError(408, "header_timeout", "the request head took too long")


def _parse_error(status: int, exc: BaseException | None) -> GatewayError:
    if isinstance(exc, EarlyAnswer):
        return exc.error
    refused = strict.parse_error(exc)  # an HTTP version, a transfer coding, a header's bytes
    if refused is not None:
        return refused
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (MAX_REQUEST_LINE,):
            return GatewayError(414, "uri_too_long", "the request line is too long")
        return GatewayError(431, "headers_too_large", "a request header is too long")
    if isinstance(exc, BadHttpMessage) or status == 400:
        return GatewayError(400, "bad_request", "the request is not valid HTTP/1.1")
    if status == 504:
        return GatewayError(504, "timeout", "the request took too long")
    return GatewayError(500, "internal_error", "the gateway failed to handle the request")
