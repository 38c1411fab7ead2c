"""The HTTP server the clients connect to: a protocol of the gateway's own per connection
(``Connection``), aiohttp's C parser (llhttp) for the request heads and bodies, and aiohttp's
``web.Server`` only as the registry its runner and sites stop.

Why its own: aiohttp's server (``RequestHandler``) was ~30 % of a small GET's CPU (issue 17,
``bench/lean_anchor``): per request it wakes the connection's task, starts a task for the
handler and wakes the first again, and makes a ``BaseRequest`` with a URL and a cache. Here
the parser's message starts one task per request at once, which runs ``pipeline.handle`` on a
``request.Request`` and writes its answer; the connection waits for nothing between requests.
What aiohttp's server did that the gateway relies on is kept, each in one place below:

- requests answered in the order they came (pipelining): a request parsed while another is
  handled waits in ``_queue``; past ``MAX_QUEUED`` the connection stops reading;
- idle keep-alive connections closed after ``keepalive_timeout`` (one timer per connection,
  moved forward, not re-made, per request; read at every answer, so a reload's new value
  holds from each connection's next answer on);
- an answer's keep-alive decision (its ``keep_alive``: the request's version and
  ``Connection``, the response's ``force_close()``), and an unread body drained for up to
  ``drain_time`` before the next request; a connection that closes with its client perhaps
  still sending (a body unread, a refused head) closes lingering (``Lingering``);
- a client that goes away cancels its request's task (aiohttp's ``handler_cancellation``),
  and a body being read raises ``ConnectionResetError``;
- a WebSocket handshake the relay takes over (``detach``), and one it refuses: what came
  after it is parsed as HTTP again;
- a stop (``web.ServerRunner.cleanup``): idle connections closed at once, requests in flight
  given ``shutdown_timeout``, then cancelled.

One thing aiohttp's server did not do: an answer written whole (``Whole``, every small relayed
answer and the gateway's own) goes out at the end of the event loop's turn, with the other
connections' answers of that turn (``write_soon``), not in the middle of it. Each write to a
client whose process sleeps wakes it, on another CPU through an interrupt (on a VM, an exit to
the hypervisor); answers written back to back wake it once. Measured on issue 17's bench:
11-12 % less CPU per small GET, the kernel's part 21 -> 14 us; the wait is the rest of the
loop's turn, work that was ready anyway. The bytes are handed to the transport before anything
else is done with the connection (the next request started, the connection closed or
detached).

Requests that the parser rejects get the same JSON error body, request id and single log line
as every other error (``handle_error``), and client connections are counted.

The connection also keeps the limits of ``limits`` (``edge/connections.py`` holds the table of
all connections): a new connection over a cap is closed at once; a request head (request line
and headers together) over ``client_header_buffer`` gets 431 before the parser holds more of
it, and one not complete ``client_header_timeout`` after its first byte gets 408 (the table's
sweep). Only bytes that can belong to a head are counted: not those of a body being received,
nor what follows a WebSocket handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.tcp_helpers import tcp_keepalive
from aiohttp.web_protocol import PayloadAccessError, RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from . import logs
from .aiohttp_private import ParsingProtocol
from .edge import strict
from .edge.connections import TERMINATOR, ConnectionTable, head_end
from .edge.trusted import canonical
from .errors import GatewayError, error_response
from .logs import REQUEST_ID, new_request_id
from .metrics import UNMATCHED, Metrics
from .request import Request, answer_in_http11, expects_continue, for_aiohttp

log = logging.getLogger("gateway")

# Client-side limits, in the spirit of nginx's defaults. The two size limits differ by design:
# aiohttp's LineTooLong carries only the limit it hit, which tells 414 from 431.
MAX_REQUEST_LINE: Final = 8190
MAX_HEADER_FIELD: Final = 8192
MAX_HEADERS: Final = 100
DRAIN_TIME: Final = 2.0  # how long an unread body is drained to keep the connection alive
# A connection closed with its client perhaps still sending (an answer before its body, a head
# too large): nginx's lingering_close, with its defaults. What arrives is read and dropped
# while it keeps coming (a pause over LINGERING_TIMEOUT ends it), for LINGERING_TIME at most.
LINGERING_TIME: Final = 30.0
LINGERING_TIMEOUT: Final = 5.0
MAX_QUEUED: Final = 32  # pipelined requests parsed ahead (aiohttp's MAX_MSG_QUEUE_SIZE)
READ_BUFSIZE: Final = 2**16  # a body's buffer before reading pauses; what follows a handshake
STOP_CANCEL_GRACE: Final = 1.0  # a request cancelled at a stop gets this long to unwind

# The parser stops when MAX_QUEUED requests it completed have not started (it holds the rest
# of what it was given), counting, within one read, the one that then starts at once: the
# socket is not read while the queue is at this length.
_FULL: Final = MAX_QUEUED - 1
Handler = Callable[[Request], Awaitable[web.StreamResponse]]
_NO_HEADERS: Final = CIMultiDictProxy(CIMultiDict[str]())
_GONE: Final = PayloadAccessError()  # a body read after its request was answered


class Server(web.Server):
    """Makes ``Connection`` s that hand every request to ``handler``; ``table`` is the table
    of them all (caps, idle ones, unfinished heads). For ``web.ServerRunner`` and the sites,
    it is aiohttp's low-level server: they call it for protocols, ``pre_shutdown`` and
    ``shutdown`` at a stop."""

    def __init__(
        self,
        handler: Handler,
        metrics: Metrics,
        connections: ConnectionTable,
        *,
        hsts: Callable[[], str | None] | None = None,
        keepalive_timeout: Callable[[], float] = lambda: 75.0,
        drain_time: float = DRAIN_TIME,
        lingering: tuple[float, float] = (LINGERING_TIME, LINGERING_TIMEOUT),
    ) -> None:
        super().__init__(_never_called)
        self.handler = handler
        self.metrics = metrics
        self.table = connections
        self.hsts = hsts  # the HTTPS listener's: its unparsable requests' answers get HSTS too
        self.keepalive_timeout = keepalive_timeout  # the snapshot's: a reload changes it
        self.drain_time = drain_time
        self.lingering = lingering  # (at most, without data)
        self.live: dict[Connection, None] = {}  # open, or with a request still running
        self._outgoing: list[Connection] = []  # answers to write at the end of this turn

    def write_soon(self, conn: Connection) -> None:
        """``conn`` holds an answer: write it with the others at the end of this turn."""
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._write_all)
        self._outgoing.append(conn)

    def _write_all(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        for conn in outgoing:
            try:
                conn.flush()
            except Exception:  # one connection's failure must not hold the others' answers
                log.exception("client connection failed")
                if conn.transport is not None:
                    conn.transport.abort()

    def __call__(self) -> Connection:  # type: ignore[override]  # its own protocol, not a RequestHandler
        return Connection(self)

    def forget(self, conn: Connection) -> None:
        """``conn`` is closed, or taken over: a stop no longer waits for it (once its request,
        if one runs, has ended)."""
        task = conn.task
        if task is None or task.done():
            self.live.pop(conn, None)
        else:
            task.add_done_callback(lambda _: self.live.pop(conn, None))

    def pre_shutdown(self) -> None:
        for conn in list(self.live):
            conn.close()

    async def shutdown(self, timeout: float | None = None) -> None:
        await asyncio.gather(*(conn.shutdown(timeout) for conn in list(self.live)))
        self.live.clear()


class EarlyAnswer(Exception):
    """An answer given before the parser completed a head (431, 408): ``handle_error``'s."""

    def __init__(self, error: GatewayError, detail: str) -> None:
        super().__init__(detail)
        self.error = error


class Refused:
    """A head the parser refused, or one answered early, in the queue as a request is."""

    __slots__ = ("exc", "status")

    def __init__(self, status: int, exc: BaseException) -> None:
        self.status = status
        self.exc = exc


Queued = tuple[Any, StreamReader]  # (the parser's message, or a Refused; its body)


class Connection(ParsingProtocol):
    """One client connection: parses its requests, runs each in a task of its own, writes
    the answers in order, and keeps the connection limits."""

    __slots__ = (
        "_admitted",
        "_body",
        "_close_at",
        "_closing",
        "_detached",
        "_head",
        "_head_waiter",
        "_held",
        "_keepalive",
        "_limit",
        "_lingering",
        "_out",
        "_over",
        "_queue",
        "_remote",
        "_scheme",
        "_send_timer",
        "_server",
        "_table",
        "_tail",
        "_upgrade_tail",
        "request",
        "task",
    )

    def __init__(self, server: Server) -> None:
        super().__init__(
            asyncio.get_running_loop(),
            read_bufsize=READ_BUFSIZE,
            max_line_size=MAX_REQUEST_LINE,
            max_field_size=MAX_HEADER_FIELD,
            max_headers=MAX_HEADERS,
            max_queued=MAX_QUEUED,
        )
        self._server = server
        self._table = server.table
        self._admitted = False  # counted in the table (else closed at once, never served)
        self._limit = sys.maxsize  # client_header_buffer (0: none), when admitted
        self._head = 0  # bytes of the head arriving; 0: none begun
        self._tail = b""  # the last bytes of it (its end may straddle two reads)
        self._held: bytearray | None = None  # its header lines, until its end comes
        self._body: StreamReader | None = None  # a body arriving: its bytes are no head's
        self._upgrade_tail = b""  # what came after a WebSocket handshake, for the relay
        self._over = False  # answered early (431, 408) or refused: what comes is dropped
        self._lingering: Lingering | None = None  # its transport, once closing lingering
        self._closing = False  # no request after the one running: close after its answer
        self._detached = False  # a WebSocket relay took the transport
        self._out: bytes | None = None  # an answer written at the end of the turn (write_soon)
        self._queue: deque[Queued] = deque()
        self._keepalive: asyncio.TimerHandle | None = None
        self._close_at = 0.0  # when an idle connection is closed (the timer may fire early)
        self._send_timer: asyncio.TimerHandle | None = None  # while the client takes nothing
        self._head_waiter: asyncio.Future[None] | None = None  # a stop waiting for a head
        self._remote: str | None = None
        self._scheme = "http"
        self.request: Request | None = None  # the one being handled
        self.task: asyncio.Task[None] | None = None  # its task

    # -- the connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        remote = str(peer[0]) if isinstance(peer, (tuple, list)) else None
        if not self._table.admit(self, canonical(remote)):
            self._over = True
            transport.close()  # before anything runs for it
            return
        self._admitted = True
        self._limit = self._table.policy().header_buffer or sys.maxsize
        super().connection_made(transport)
        tcp_keepalive(cast(asyncio.Transport, transport))
        self._remote = remote
        if transport.get_extra_info("sslcontext") is not None:
            self._scheme = "https"
        self._server.live[self] = None
        self._server.metrics.client_connections.inc()
        self._idle_from_now()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted or self._detached:
            return
        self._over = True
        self._out = None
        if self._lingering is not None:
            self._lingering.lost()
        super().connection_lost(exc)
        self._server.metrics.client_connections.dec()
        self._table.release(self)
        self._server.forget(self)
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self._stop_send_timer()
        self._head_done()
        request = self.request
        if request is not None and not request.content.is_eof():
            request.content.set_exception(ConnectionResetError("Connection lost"))
        for _, payload in self._queue:
            if not payload.is_eof():
                payload.set_exception(ConnectionResetError("Connection lost"))
        self._queue.clear()
        task = self.task
        if task is not None and not task.done():
            task.cancel()  # the client left: its request stops (aiohttp's handler_cancellation)

    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark for the client: from now on the
        client has ``send_timeout`` to take enough of it (nginx's ``send_timeout``), else
        the connection is closed. A client that never reads would otherwise hold its
        request, and the upstream connection and service slot behind it, forever."""
        super().pause_writing()
        seconds = self._table.policy().send_timeout
        if seconds > 0 and self._send_timer is None and not self._detached:
            self._send_timer = self.loop.call_later(seconds, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_send_timer()

    def _stop_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is None or self._detached:
            return
        request = self.request
        if request is not None:
            request.send_timed_out = True  # its access line says so
        else:  # answers written whole, waiting for a client that does not read them
            logs.access(
                "client connection closed: it took no answer bytes for send_timeout",
                {"error": "send_timeout", "client": self._remote},
            )
        transport.abort()  # close() would wait for the buffer to be taken: never

    def eof_received(self) -> None:
        """The client closed its side: the transport closes (asyncio's default)."""

    def close(self) -> None:
        """No request after the one being handled, if any; an idle connection closes now.
        One whose next head is arriving is left to ``shutdown``, which serves its request
        if the head completes in time."""
        if self.task is None and not self._queue and self._head_arriving():
            return
        self._closing = True
        if self.task is None and not self._queue:
            self.force_close()

    def _head_arriving(self) -> bool:
        return bool(self._head) and not self._over and self.transport is not None

    def _head_done(self) -> None:
        """The head ``shutdown`` waits for completed (or the client left)."""
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def write_soon(self, data: bytes) -> None:
        """Write ``data`` (a whole answer) at the end of this turn of the loop, with the other
        connections' answers (see the module's docstring), or before anything else is done
        with the connection."""
        if self._out is None:
            self._out = data
            self._server.write_soon(self)
        else:
            self._out += data

    def flush(self) -> None:
        """Hand what ``write_soon`` holds to the transport."""
        data = self._out
        if data is None:
            return
        self._out = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def force_close(self) -> None:
        self.flush()
        transport = self.transport
        if transport is not None:
            self.transport = None
            transport.close()

    async def shutdown(self, timeout: float | None) -> None:
        """The stop's last step: the request in flight gets ``timeout`` to end, then it is
        cancelled; the connection closes. A head that was arriving (its client wrote during
        ``drain_delay``) gets the same ``timeout`` to complete, and its request is served
        (with ``Connection: close``: the gateway is draining)."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        deadline = self.loop.time() + (timeout or 0.0)
        if self.task is None and self._head_arriving():
            waiter = self._head_waiter = self.loop.create_future()
            try:
                await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                pass
            finally:
                self._head_waiter = None
        self._closing = True
        task = self.task
        if task is not None and not task.done():
            left = None if timeout is None else max(0.0, deadline - self.loop.time())
            done, _ = await asyncio.wait({task}, timeout=left)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=STOP_CANCEL_GRACE)
        self.force_close()
        if self._lingering is not None:  # its answer went out: the client may still be reading
            # Bounded by one pause of a lingering close too: a client trickling its body
            # (or sending nothing) does not hold the stop for all of shutdown_timeout.
            left = max(0.0, deadline - self.loop.time())
            await self._lingering.ended(min(left, self._server.lingering[1]))

    # -- bytes in ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._over:
            if self._lingering is not None:
                self._lingering.arrived()
            return
        body = self._body
        if body is not None:
            if not body.is_eof():  # a body's bytes (a pipelined head after it: not counted)
                payload = self._feed(data)
                if payload is not None:
                    self._parsed(data, b"", payload)
                elif body.is_eof():
                    self._body = None
                return
            self._body = None
        if self.upgraded:
            if data:
                self._upgrade_tail += data
                if len(self._upgrade_tail) >= READ_BUFSIZE and not self.reading_held:
                    self.hold_reading()
            return
        head = self._head
        tail = self._tail
        end = head_end(tail, data)
        if (head + end if end >= 0 else head + len(data)) > self._limit:
            self._answer_early(HEAD_TOO_LARGE, f"the head passed {self._limit} bytes", linger=True)
            return
        if not data:  # parsing again what the parser had paused on
            payload = self._feed(data)
            if payload is not None:
                self._parsed(data, tail, payload)
            return
        if not head:
            self._table.busy(self)
        held = self._held
        if end >= 0:  # the head ends in this read: the parser gets all of it at once
            if held is not None:
                self._held = None
                if held:
                    self._feed(bytes(held))  # header lines: no head ends in them
            if self._over:
                return
            payload = self._feed(data)
            if payload is not None:
                self._parsed(data, tail, payload)
                return
        elif held is not None:
            held += data  # header lines: held until the head is whole
        elif not self._head_begins(data):
            return
        self._head = head + len(data)
        self._tail = data[-3:] if len(data) >= 3 else (tail + data)[-3:]
        if not head:  # the head spans reads: the header timeout runs
            self._table.head_started(self)

    def _head_begins(self, data: bytes) -> bool:
        """The first part of a head that does not end in this read; False when the parser
        refused it. The request line is parsed as it comes (a client that does not speak
        HTTP is answered at once); what follows it is held: the parser keeps header lines as
        bytes and as text, twice the head, the connection holds them once. With no limit on
        the whole head, the parser takes it all as it comes: its own limits (a line's length,
        100 fields) hold it to about 800 KiB."""
        if self._limit == sys.maxsize:
            self._feed(data)
            return not self._over
        line_end = data.find(b"\n") + 1
        self._feed(data[:line_end] if line_end else data)  # no head ends in it
        if self._over:
            return False
        if line_end:
            self._held = bytearray(data[line_end:])
        return True

    def _feed(self, data: bytes) -> StreamReader | None:
        """Give the parser ``data``; the body of the last head that completed (None: none
        did; a head it refused has none)."""
        try:
            messages, upgraded, tail = self.parse(data)
        except HttpProcessingError as exc:
            self._over = True  # the parser is done with this connection
            self._held = None
            self._close_lingering()  # the client may be sending still (endless fields)
            body = self._body
            if body is not None and not body.is_eof():
                # A body's framing broke in a later read (a bad chunk): its reader learns
                # it now, as the parser tells it when the error is in the body's first read.
                body.set_exception(RequestPayloadError(exc.message))
            self._enqueue(Refused(400, exc), EMPTY_PAYLOAD)
            return EMPTY_PAYLOAD
        last = None
        # A read bigger than the limit may hold a whole head over it after the first head's
        # end (what data_received measures) or after a body: each head is measured then.
        measure = len(data) > self._limit
        for message, payload in messages:
            if measure and _head_size(message) > self._limit:
                self._answer_early(
                    HEAD_TOO_LARGE, f"the head passed {self._limit} bytes", linger=True
                )
                return EMPTY_PAYLOAD
            self._enqueue(message, payload)
            last = payload
        if upgraded:
            self._upgrade_tail += tail
        return last

    def _parsed(self, data: bytes, tail: bytes, payload: StreamReader) -> None:
        """The parser completed a head (or more) with ``data``; ``payload``: the last one's
        body."""
        if self._head:
            self._table.head_done(self)
        self._head, self._tail = 0, b""
        if self.upgraded or self._over:
            return
        if payload is not EMPTY_PAYLOAD:
            if not payload.is_eof():
                self._body = payload
            return  # a body ended in this read: what follows it is not measured
        # No body: what follows the last head in this read is the beginning of the next.
        last = data.rfind(TERMINATOR)
        rest = len(data) - (last + 4 if last >= 0 else max(head_end(tail, data), 0))
        if rest > 0:
            if rest > self._limit:
                self._answer_early(
                    HEAD_TOO_LARGE, f"the head passed {self._limit} bytes", linger=True
                )
                return
            self._head, self._tail = rest, data[-3:]
            self._table.head_started(self)

    def _bodiless(self) -> bool:
        """No request waiting in the queue has a body."""
        return all(payload is EMPTY_PAYLOAD for _, payload in self._queue)

    def _answer_early(self, error: GatewayError, detail: str, *, linger: bool = False) -> None:
        """Answer ``error`` (after any request parsed before) and close; ``linger``: the
        client is still sending (a head too large), so let it finish first (``Lingering``).
        A head that times out is closed at once: its client is slow on purpose, and gets no
        more time."""
        self._over = True
        self._held = None
        self._table.busy(self)
        self._table.head_done(self)
        if linger:
            self._close_lingering()
        self._enqueue(Refused(error.status, EarlyAnswer(error, detail)), EMPTY_PAYLOAD)

    def _close_lingering(self) -> None:
        """Close the connection, once answered, as ``Lingering`` does."""
        transport = self.transport
        # TCP only: a TLS connection cannot half-close (it is closed at once, as before).
        if (
            transport is not None
            and not isinstance(transport, Lingering)
            and transport.can_write_eof()
        ):
            # Duck-typed: the connection only calls the transport's methods, which Lingering
            # passes on.
            lingering = self._lingering = Lingering(transport, *self._server.lingering)
            self.transport = cast(asyncio.Transport, lingering)

    # -- requests ----------------------------------------------------------------------------

    def _enqueue(self, message: Any, payload: StreamReader) -> None:
        if self.task is None and not self._queue:
            self._start(message, payload)
            return
        self._queue.append((message, payload))
        # A queued request with a body: nothing more is read until it starts (its body, and
        # what follows, wait in the kernel, as nginx's do), or every request pipelined
        # behind a slow one would hold its body in memory (31 of them, 4 MB a connection).
        if (len(self._queue) >= _FULL or payload is not EMPTY_PAYLOAD) and not self.reading_held:
            self.hold_reading()

    def _start(self, message: Any, payload: StreamReader) -> None:
        if self._closing:
            return
        self.flush()  # the answer before: the next one may be written straight to the transport
        if not isinstance(message, Refused):
            self.consumed()
        self.task = self.loop.create_task(self._serve(message, payload))
        self._head_done()

    async def _serve(self, message: Any, payload: StreamReader) -> None:
        """One request, from its message to its answer written; then the next, if queued."""
        try:
            keep = await self._one(message, payload)
            self.task = None
            if not keep or self._closing or self.transport is None:
                if not self._detached:
                    self.force_close()
                return
            self._next()
        except Exception:
            log.exception("client connection failed")
            self.force_close()

    async def _one(self, message: Any, payload: StreamReader) -> bool:
        """Handle ``message``; whether the connection may serve another request."""
        writer = StreamWriter(self, self.loop)
        if isinstance(message, Refused):
            request = Request(
                "GET", "/", _NO_HEADERS, HttpVersion11, False, False, payload,
                self, self.transport, writer, self._remote, self._scheme,
            )  # fmt: skip
        else:
            keep_alive = not message.should_close
            if message.upgrade and not self.upgraded:
                # An upgrade the parser does not switch to (h2c, TLS/1.0: not WebSocket, not
                # CONNECT): it drops what follows this request in its read, so the connection
                # ends with this answer, and no request parsed after it is served. (Its own
                # body, arriving later, is still read.)
                keep_alive = False
                self._closing = True
            request = Request(
                message.method, message.path, message.headers, message.version,
                keep_alive, message.upgrade, payload,
                self, self.transport, writer, self._remote, self._scheme,
            )  # fmt: skip
        request.task = self.task
        self.request = request
        try:
            keep = await self._answer(request, message)
        finally:
            self.request = None
        if not payload.is_eof():
            if keep:
                keep = await self._linger(payload)
            if not keep and not self._detached:
                # Its client may be sending the body still: closed at once, the connection
                # would be reset, and the answer it has not read yet lost with it.
                self._over = True
                self._close_lingering()
        if payload is not EMPTY_PAYLOAD:
            payload.set_exception(_GONE)
        return keep and not self._detached

    def _next(self) -> None:
        """After an answer on a connection kept alive: a handshake the gateway refused has
        what came after it parsed as HTTP; the next request queued starts; else idle."""
        if self.upgraded:
            self.http_again()
            tail, self._upgrade_tail = self._upgrade_tail, b""
            if self.reading_held and not self._queue:
                self.release_reading()
            if tail:
                self.data_received(tail)
            if self.task is not None:  # it held a request, which runs now
                return
        if self._queue:
            message, payload = self._queue.popleft()
            self._start(message, payload)
            if self.reading_held and len(self._queue) <= MAX_QUEUED // 2 and self._bodiless():
                # What the parser held back while the queue was full first; the socket is
                # read again only if that left room (else more would arrive that the paused
                # parser cannot take, and count as one endless head) and no request waiting
                # has a body. (Only the last one parsed can still need bytes of its body, and
                # it is the last to start: none is left waiting for bytes never read.)
                self.data_received(b"")
                if len(self._queue) < _FULL and self._bodiless():
                    self.release_reading()
            return
        if not self._head and self._body is None and not self._over:
            self._table.idle(self)
        self._idle_from_now()

    async def _answer(self, request: Request, message: Any) -> bool:
        """Run the handler and write its answer; whether the connection may serve another."""
        try:
            if isinstance(message, Refused):
                response = self.handle_error(request, message.status, message.exc)
            else:
                try:
                    response = await self._server.handler(request)
                except asyncio.CancelledError:
                    raise
                except TimeoutError:
                    response = self.handle_error(request, 504)
                except Exception as exc:  # noqa: BLE001 - every error is answered, and logged
                    response = self.handle_error(request, 500, exc)
                payload = request.content
                if (
                    payload is not EMPTY_PAYLOAD
                    and not payload.total_bytes
                    and not payload.is_eof()
                    and expects_continue(request)
                ):
                    # Refused before its 100 Continue: the client sends no body, and would
                    # send its next request where the body was due (read as the body).
                    response.force_close()
            await response.prepare(for_aiohttp(request))
            await response.write_eof()
        except ConnectionError:  # the client left, or an error came after the answer began
            return False
        return bool(response.keep_alive)

    async def _linger(self, payload: StreamReader) -> bool:
        """An answer went out before its body was read: drain it for up to ``drain_time``
        (the client may be sending it still); whether it ended."""
        seconds = self._server.drain_time
        if seconds <= 0:
            return False
        try:
            async with asyncio.timeout(seconds):
                while not payload.is_eof():
                    await payload.readany()
        except (
            TimeoutError,
            ConnectionError,
            RequestPayloadError,
            PayloadAccessError,
            BadHttpMessage,
        ):
            return False
        return True

    # -- idle keep-alive ---------------------------------------------------------------------

    def _idle_from_now(self) -> None:
        self._close_at = self.loop.time() + self._server.keepalive_timeout()
        keepalive = self._keepalive
        if keepalive is None or keepalive.when() > self._close_at:  # none, or a longer one's
            if keepalive is not None:
                keepalive.cancel()
            self._keepalive = self.loop.call_at(self._close_at, self._idle_timer)

    def _idle_timer(self) -> None:
        self._keepalive = None
        if self.transport is None or self._detached:
            return
        if self.loop.time() < self._close_at:  # a request came since: not idle as long
            self._keepalive = self.loop.call_at(self._close_at, self._idle_timer)
            return
        if self.task is None and not self._queue and not self._head and self._body is None:
            self.force_close()
        # else: busy; the timer is set again after its answer (a head arriving: the table's
        # header timeout ends it if it never completes)

    # -- what the table asks of a connection (``edge.connections.Held``) -----------------

    def evict(self) -> None:
        self.force_close()

    def head_timed_out(self) -> bool:
        if self._over or self.task is not None or self._queue:
            return False
        self._answer_early(HEAD_TIMEOUT, "the head did not complete in client_header_timeout")
        return True

    def detach(self) -> tuple[asyncio.Transport, bytes, bool] | None:
        """Let go of the connection for a WebSocket relay, which takes the transport, what
        the client sent after its handshake, and whether the transport holds more than its
        high-water mark for the client (it then calls its new protocol's ``resume_writing``
        when that drains, never ``pause_writing`` first). None when the client has gone
        already. (The relay's session decrements ``gateway_client_connections`` when it ends,
        and calls ``relay_ended``: until then the connection counts against the caps.)"""
        self.flush()
        transport = self.transport
        if transport is None or transport.is_closing():
            return None
        tail, self._upgrade_tail = self._upgrade_tail, b""
        self._detached = True
        self.transport = None
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self._stop_send_timer()
        self._table.relayed(self)  # counted until the session ends (relay_ended)
        self._server.forget(self)
        if self.reading_held:
            transport.resume_reading()
        return transport, tail, self.writing_paused

    def relay_ended(self) -> None:
        """The WebSocket session this connection was detached for has ended."""
        self._table.release(self)

    def handle_error(
        self, request: Request, status: int = 500, exc: BaseException | None = None
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
            # traceback, only the first line of the parser's description.
            said = exc.message if isinstance(exc, HttpProcessingError) else exc
            fields["detail"] = str(said or "").strip().partition("\n")[0][:200]
            logs.access("bad request", fields)
        self._server.metrics.observe_request(UNMATCHED, UNMATCHED, "OTHER", err.status, 0.0)
        answer_in_http11(request)  # not HTTP/1.0; and so with Connection: close
        response = error_response(err, request_id)
        response.force_close()
        hsts = self._server.hsts() if self._server.hsts is not None else None
        if hsts is not None:
            response.headers["Strict-Transport-Security"] = hsts
        return response


async def _never_called(request: web.BaseRequest) -> web.StreamResponse:
    raise NotImplementedError  # pragma: no cover - the connections call Server.handler


class Lingering:
    """A client connection answered early (an answer before its body was read, a 431, a 408)
    while its client may still be sending: closing it at once would reset it (the kernel
    answers bytes that arrive for a closed socket with RST, and the client's kernel then drops
    the answer it has not read yet). Its ``close()`` ends the answer with a FIN instead and
    reads what the client still sends (dropped: the connection is ``_over``) while it keeps
    coming, up to ``idle`` seconds between reads and ``total`` seconds in all, then closes:
    nginx's ``lingering_close`` (``lingering_time`` 30 s, ``lingering_timeout`` 5 s).
    Everything else is the transport's."""

    __slots__ = ("_ended", "_gone", "_idle", "_seen", "_total", "_transport", "_until")

    def __init__(self, transport: asyncio.Transport, total: float, idle: float) -> None:
        self._transport = transport
        self._total = total
        self._idle = idle
        self._ended = False
        self._seen = self._until = 0.0
        self._gone: asyncio.Future[None] | None = None  # once closing lingering: its end

    def close(self) -> None:
        transport = self._transport
        if self._ended or transport.is_closing():
            return
        self._ended = True
        transport.write_eof()  # after the answer: the client reads all of it, then EOF
        # Read on, also what flow control had paused (a body nobody consumed any more).
        with contextlib.suppress(RuntimeError, NotImplementedError, AttributeError):
            transport.resume_reading()
        loop = asyncio.get_running_loop()
        self._gone = loop.create_future()
        self._seen = now = loop.time()
        self._until = now + self._total
        loop.call_at(min(now + self._idle, self._until), self._check)

    def arrived(self) -> None:
        """The client sent more (dropped): it is still sending."""
        if self._ended:
            self._seen = asyncio.get_running_loop().time()

    def lost(self) -> None:
        """The connection is closed (by the client, or at the end of the lingering)."""
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    async def ended(self, seconds: float) -> None:
        """A stop's wait: the lingering gets ``seconds`` (the stop's time left, one pause at
        most) to end, then the connection closes."""
        if self._gone is not None:
            await asyncio.wait((self._gone,), timeout=seconds)
        self._transport.close()

    def _check(self) -> None:
        transport = self._transport
        if transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._until or now - self._seen >= self._idle:
            transport.close()
            return
        loop.call_at(min(self._seen + self._idle, self._until), self._check)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


HEAD_TOO_LARGE: Final = GatewayError(
    431, "headers_too_large", "the request head is larger than the gateway accepts"
)
HEAD_TIMEOUT: Final = GatewayError(408, "header_timeout", "the request head took too long")


def _head_size(message: Any) -> int:
    """The bytes of ``message``'s head as the parser holds it (the request line, each field
    as ``name: value`` and its CRLF, the empty line); whitespace around values aside, what
    the client sent."""
    size = len(message.method) + len(message.path) + 14
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 4
    return size


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
    if isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers"):
        return GatewayError(431, "headers_too_large", f"more than {MAX_HEADERS} request headers")
    if isinstance(exc, BadHttpMessage) or status == 400:
        return GatewayError(400, "bad_request", "the request is not valid HTTP/1.1")
    if status == 504:
        return GatewayError(504, "timeout", "the request took too long")
    return GatewayError(500, "internal_error", "the gateway failed to handle the request")
