"""The gateway's own HTTP/1.1 client for upstreams: keep-alive pools of asyncio protocol
connections, responses parsed by llhttp (``httptools``, the parser uvicorn uses).

One ``Connection`` carries one exchange at a time: the request head (and a small body) in one
``write``, a streamed body with the transport's backpressure (``pause_writing``), the response
parsed as it arrives, its body handed to the reader chunk by chunk with ``pause_reading`` above
``HIGH_WATER``. What makes a connection unsafe to send another request on (a parse error, a
timeout, a body not read to its end, ``Connection: close``, a request not written whole, a HEAD
answer, any byte the upstream sends with no request waiting) closes it instead of pooling it,
so bytes an upstream sent beyond its answer never reach the next request. Pools are keyed by
address and TLS context and server name: a TLS target never gets a plain connection, nor one
made with another snapshot's context.

Framing, strict (llhttp's defaults, plus): ``Content-Length`` with ``Transfer-Encoding``,
differing lengths, a bad chunk, bare LF line ends, obs-fold, a head over ``MAX_HEAD`` bytes
(and as many bytes in a row of a body's chunk framing, extensions or trailers), a ``101`` to a
request that asked no upgrade: all ``upstream_invalid`` (502) before the head went to the
client, an aborted client connection after. ``1xx`` answers before the final one are
skipped.

Timeouts: ``connect`` bounds the TCP connect and the TLS handshake; ``response`` bounds every
wait for progress once the request head is written: the upstream taking request bytes or
sending response bytes (so it bounds the wait for the head and every pause in the body).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

import httptools
from multidict import CIMultiDict

from ..aiohttp_private import serialize_head
from ..dial import OutOfResources, open_connection
from ..errors import GatewayError, tls_reason, upstream_failure

if TYPE_CHECKING:
    from ..snapshot import Target
    from .body import ClientBody

HIGH_WATER: Final = 256 * 1024  # response bytes held for a slow client before pausing reads
MAX_HEAD: Final = 64 * 1024  # bytes of a response head (status line and headers)
MAX_HEADERS: Final = 256  # header lines in a response head
MAX_IDLE: Final = 512  # idle connections kept per target (more are closed)
SWEEP_EVERY: Final = 1.0  # seconds between closings of idle connections past their time
# A reused connection lost this soon after its request was written, with no answer begun,
# was closed or reset under the request (the upstream closed it idle, rebooted, a NAT forgot
# it): "stale", the pool's timing. Lost later, the upstream was working on the request (its
# worker died): a "disconnect", which counts against it and is retried only under ``retries``.
STALE_WINDOW: Final = 0.25
_BODYLESS_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})
_LAST_CHUNK: Final = b"0\r\n\r\n"
_VERSIONS: Final = frozenset({"1.1", "1.0"})
# A reason phrase is HTAB, SP, visible characters and obs-text (RFC 9112, 4).
_BAD_REASON: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search

# Where a connection is in its exchange.
_IDLE, _HEAD, _BODY, _DONE, _CLOSED = range(5)

PoolKey = tuple[str, int, ssl.SSLContext | None, str | None]


class BodyError(Exception):
    """The upstream failed after its response head: the body is cut short (the message says
    why)."""


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing (``httptools`` passes it on)."""

    def __init__(self, error: GatewayError | None) -> None:
        super().__init__()
        self.error = error


class Response:
    """One upstream response, its head parsed; its body read with ``read``. ``release``
    gives the connection back (to the pool if that is safe) and must follow every response;
    ``close`` closes it (a body that will not be read)."""

    __slots__ = (
        "_chunks",
        "_connection",
        "_done",
        "_error",
        "_size",
        "_waiter",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self, connection: Connection, status: int, reason: str, headers: CIMultiDict[str]
    ) -> None:
        self._connection = connection
        self.status = status
        self.reason = reason
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None  # llhttp checked it
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._error: BodyError | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def complete(self) -> bool:
        """The whole body is in (``read`` returns at once)."""
        return self._done and self._error is None

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); ``b""`` at
        the end. Raises ``BodyError`` when the upstream failed mid-body."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._size = 0
                self._connection.resume()
                return data
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def release(self) -> asyncio.Task[None] | None:
        """The exchange is over (see ``Connection.finish``); the request body's task, if it
        was still sending and is now cancelled: await it before anything else reads the
        client's body."""
        return self._connection.finish(self)

    def close(self) -> None:
        self._connection.abort()

    # -- what the connection feeds it --

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER:
            self._connection.pause()
        self._wake()

    def _end(self, error: BodyError | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connection(asyncio.Protocol):
    """One upstream connection: at most one exchange at a time (``start``)."""

    def __init__(self, pool: Pool, key: PoolKey) -> None:
        self._pool = pool
        self.key = key
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._state = _IDLE
        self.served = 0  # exchanges completed on it
        self.idle_since = 0.0
        self._reusable = True  # nothing yet makes another request on it unsafe
        self._head_only = False  # the request is a HEAD: the answer has no body
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        # Bytes read in the body since the last body bytes: chunk framing, extensions and
        # trailers, none of which the parser bounds (MAX_HEAD bounds them as it does a head).
        self._framing = 0
        self._received = False  # a byte of the answer arrived
        self._informational = False  # the message being parsed is a 1xx
        self._until_close = False  # the answer's body runs until the connection closes
        self._sent = False  # the request was written whole
        self._body_task: asyncio.Task[None] | None = None
        self._paused_reading = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._timeout = 0.0
        # One timer per connection, not per exchange: left armed when an exchange ends, it
        # fires at most once idle (and does nothing); a new exchange re-arms it only when
        # its deadline is nearer than the armed one (``_on_timer`` re-arms from progress).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._progress = 0.0  # loop time of the last progress (bytes in, or writes resumed)
        self._sent_at = 0.0  # loop time the request's last byte was written

    # -- asyncio's side --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass: no isinstance).
        self._transport = cast("asyncio.Transport", transport)

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        self._state = _CLOSED
        self._reusable = False
        self._stop_timer()
        self._pool.forget(self)
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_exception(ConnectionResetError("the upstream closed the connection"))
        if state == _HEAD:
            soon = not self._sent or self._loop.time() - self._sent_at <= STALE_WINDOW
            kind = "stale" if self.served and not self._received and soon else "disconnect"
            self._fail_head(upstream_failure(kind))
        elif state == _BODY:
            response = self._response
            if response is not None:
                if exc is None and self._until_close:
                    response._end()  # a body delimited by the connection's end
                else:
                    response._end(BodyError("the upstream closed the connection mid-body"))
        if self._body_task is not None:
            self._body_task.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._progress = self._loop.time()
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _CLOSED:
            return
        self._progress = self._loop.time()
        if state == _HEAD:
            self._received = True
            self._head_bytes += len(data)
        elif state == _BODY:
            self._framing += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            stop = exc.__context__
            if isinstance(stop, _Stop):
                if stop.error is not None:
                    self._fail(stop.error)
                return
            self._fail(upstream_failure("protocol"))
            return
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail(upstream_failure("protocol"))
            return
        state = self._state
        if (state == _HEAD and self._head_bytes > MAX_HEAD) or (
            state == _BODY and self._framing > MAX_HEAD
        ):
            self._fail(upstream_failure("protocol"))

    # -- llhttp's callbacks --

    def on_message_begin(self) -> None:
        if self._state != _HEAD:
            # Bytes past the end of the answer (or with no request waiting): never parsed
            # as the answer to a later request.
            raise _Stop(upstream_failure("protocol"))
        self._headers = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        if len(headers) > MAX_HEADERS:
            raise _Stop(upstream_failure("protocol"))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if not 100 <= status <= 599 or _BAD_REASON(self._reason) is not None:
            raise _Stop(upstream_failure("protocol"))
        if self._parser.get_http_version() not in _VERSIONS:
            raise _Stop(upstream_failure("protocol"))  # HTTP/2.0, 0.9...: not an HTTP/1.x answer
        if status < 200:
            if status == 101:  # the gateway asks no upgrade over this client
                raise _Stop(upstream_failure("protocol"))
            self._informational = True  # 100, 102, 103: the final answer follows
            return
        # llhttp refused obs-fold, bare LF, control bytes in values, differing lengths.
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
            for name, value in self._headers
        )
        codings = headers.getall("Transfer-Encoding", ())
        if codings and ",".join(codings).strip().lower() != "chunked":
            # The gateway decodes no transfer coding but chunked, and passes none on (the
            # header is hop-by-hop): a gzip one would reach the client as a garbled body.
            raise _Stop(upstream_failure("protocol"))
        if not self._parser.should_keep_alive():
            self._reusable = False
        elif (status == 204 and (codings or headers.get("Content-Length", "0") != "0")) or (
            status == 304 and codings
        ):
            # A 204 (or 304) has no body whatever it says, and llhttp reads none; but one
            # that announces a body may send it: arriving later, on a pooled connection, it
            # would be parsed as the next request's answer. (A 304's Content-Length is the
            # length of what it validates, RFC 9110 8.6: no body follows, it stays pooled.)
            self._reusable = False
        response = self._response = Response(self, status, self._reason.decode("latin-1"), headers)
        # Decided here, from the head as it came: the relay may change response.headers.
        self._until_close = response.content_length is None and not codings
        self._state = _BODY
        head = self._head
        if head is not None and not head.done():
            head.set_result(response)
        if self._head_only:
            # The parser would read the length a HEAD answer names as a body: stop it here,
            # and close the connection after (any body it sent goes with it).
            self._reusable = False
            self._state = _DONE
            response._end()
            raise _Stop(None)

    def on_body(self, body: bytes) -> None:
        self._framing = 0
        response = self._response
        if response is not None:
            response._feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._state = _DONE
        if self._response is not None:
            self._response._end()

    # -- the exchange --

    @property
    def usable(self) -> bool:
        transport = self._transport
        return (
            self._state == _IDLE
            and self._reusable
            and transport is not None
            and not transport.is_closing()
        )

    def start(
        self, head: bytes, body: bytes | ClientBody | None, *, chunked: bool, head_only: bool,
        timeout: float,
    ) -> asyncio.Future[Response]:  # fmt: skip
        """Write the request (``head`` and ``body``: bytes in the same write; a stream as it
        comes, chunked if ``chunked``); the future is the response, once its head is in.
        (Not a coroutine: one frame less on every resumption of the request's task.) A
        caller that stops waiting for it must ``abort``."""
        transport = self._transport
        assert transport is not None  # noqa: S101 - made connected by Pool.connect
        self._state = _HEAD
        self._head_only = head_only
        self._received = False
        self._informational = False
        self._head_bytes = 0
        self._framing = 0
        self._response = None
        future: asyncio.Future[Response] = self._loop.create_future()
        self._head = future
        self._timeout = timeout
        now = self._progress = self._loop.time()
        if self._timer is None or self._timer_at > now + timeout:
            self._arm(now + timeout)
        if body is None or isinstance(body, bytes):
            transport.write(head + body if body else head)
            self._sent, self._sent_at = True, now
        else:
            self._sent = False
            transport.write(head)  # at once: an upstream never waits on a silent client
            self._body_task = self._loop.create_task(self._stream(body, chunked))
        return future

    async def _stream(self, body: ClientBody, chunked: bool) -> None:
        transport = self._transport
        assert transport is not None  # noqa: S101 - set before the task starts
        try:
            async for chunk in body:
                if transport.is_closing():
                    return
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                # Progress: the response timeout counts from the last byte written, so an
                # upload longer than it leaves the upstream all of it to answer.
                self._progress = self._loop.time()
                if self._write_paused:
                    await self._drain()
            if chunked:
                transport.write(_LAST_CHUNK)
            self._progress = self._sent_at = self._loop.time()
            self._sent = True
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the client's fault (body.fault says which) or a reset
            # The request cannot be completed: the upstream must not take it as whole.
            self._fail(upstream_failure("io"))

    async def _drain(self) -> None:
        drained = self._drained = self._loop.create_future()
        try:
            await drained
        finally:
            self._drained = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._state not in (_HEAD, _BODY):
            return
        deadline = self._progress + self._timeout
        # Not the upstream's wait while the gateway holds it back: a client slow to read
        # the answer (reads paused), or slow to send its body (nothing to write).
        held_back = self._paused_reading or (not self._sent and not self._write_paused)
        if held_back or self._loop.time() < deadline:
            if held_back:
                deadline = self._loop.time() + self._timeout
            self._arm(deadline)
            return
        self._fail(upstream_failure("timeout"))

    def _arm(self, deadline: float) -> None:
        self._stop_timer()
        self._timer = self._loop.call_at(deadline, self._on_timer)
        self._timer_at = deadline

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail_head(self, error: GatewayError) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)

    def _fail(self, error: GatewayError) -> None:
        """End the exchange with ``error`` (before the head) or a cut body (after), and
        close the connection."""
        state = self._state
        if state == _HEAD:
            self._fail_head(error)
        elif state == _BODY and self._response is not None:
            self._response._end(BodyError(error.message))
        self.abort()

    def pause(self) -> None:
        if not self._paused_reading and self._transport is not None:
            self._paused_reading = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused_reading and self._transport is not None:
            self._paused_reading = False
            self._progress = self._loop.time()
            self._transport.resume_reading()

    def finish(self, response: Response) -> asyncio.Task[None] | None:
        """The exchange of ``response`` is over: pool the connection if it can take another
        request, else close it. Returns the request body's task if it had to be cancelled
        (an answer came before the whole body was sent)."""
        if response is not self._response:
            return None
        self._response = None
        task = self._body_task
        cancelled = None
        if task is not None:
            self._body_task = None
            if not task.done():
                task.cancel()
                cancelled = task
                self._reusable = False
        if (
            self._state == _DONE
            and self._reusable
            and self._sent
            and self._transport is not None
            and not self._transport.is_closing()
        ):
            self._state = _IDLE
            self.served += 1
            self._pool.put(self)
        else:
            self.abort()
        return cancelled

    def abort(self) -> None:
        """Close the connection at once, dropping whatever is still buffered to be sent."""
        self._reusable = False
        self._stop_timer()
        head = self._head
        if head is not None and not head.done():
            head.cancel()  # nobody waits for it any more: no "exception never retrieved"
        if self._state != _CLOSED:
            if self._state == _IDLE:
                self._state = _DONE  # not taken from the pool meanwhile
            transport = self._transport
            if transport is not None:
                transport.abort()

    def now(self) -> float:
        return self._loop.time()

    def idle_for(self) -> float:
        """Seconds since it went back to the pool."""
        return self._loop.time() - self.idle_since

    def close_idle(self) -> None:
        self._reusable = False
        if self._transport is not None:
            self._transport.close()


class Pool:
    """Idle upstream connections per ``PoolKey``, the most recently used first (so that
    the fewest stay warm); closed after ``keepalive_timeout`` idle seconds."""

    def __init__(self, keepalive_timeout: float) -> None:
        self._keepalive = keepalive_timeout
        self._idle: dict[PoolKey, list[Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @staticmethod
    def key(target: Target) -> PoolKey:
        tls = target.tls
        if tls is None:
            return (target.host, target.port, None, None)
        return (target.host, target.port, tls.context, tls.server_hostname)

    def take(self, target: Target) -> Connection | None:
        """An idle pooled connection to ``target``, the most recently used, if any."""
        idle = self._idle.get(self.key(target))
        while idle:
            connection = idle.pop()
            # The sweep closes connections past their time once a second; none is reused
            # meanwhile, so that the idle time stays below the upstream's own.
            fresh = connection.idle_for() < self._keepalive
            if fresh and connection.usable:
                return connection
            connection.abort()
        return None

    async def connect(self, target: Target, timeout: float) -> Connection:
        """A new connection to ``target`` (within ``timeout``). Raises ``GatewayError``
        (kind ``connect`` or ``connect_timeout``)."""
        key = self.key(target)
        tls = target.tls
        factory: Callable[[], Connection] = lambda: Connection(self, key)  # noqa: E731
        try:
            _, connection = await open_connection(
                factory, target.host, target.port, timeout,
                ssl=None if tls is None else tls.context,
                server_hostname=None if tls is None else tls.server_hostname,
            )  # fmt: skip
        except TimeoutError:
            raise upstream_failure("connect_timeout") from None
        except OutOfResources:
            raise upstream_failure("local") from None
        except OSError as exc:  # a TLS failure too (ssl's errors are OSErrors)
            raise upstream_failure("connect", tls_reason(exc)) from exc
        loop = asyncio.get_running_loop()
        if self._sweeper is None and not self._closed:
            self._sweeper = loop.call_later(SWEEP_EVERY, self._sweep)
        return connection

    def put(self, connection: Connection) -> None:
        if self._closed:
            connection.close_idle()
            return
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= MAX_IDLE:
            connection.close_idle()
            return
        connection.idle_since = connection.now()
        idle.append(connection)

    def drop_idle(self, target: Target) -> None:
        """Close every idle connection to ``target``."""
        for connection in self._idle.pop(self.key(target), ()):
            connection.close_idle()

    def forget(self, connection: Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        oldest = loop.time() - self._keepalive
        for key, idle in list(self._idle.items()):
            # The list is oldest first: close from its start while past their time.
            stale = 0
            while stale < len(idle) and idle[stale].idle_since <= oldest:
                stale += 1
            for connection in idle[:stale]:
                connection.close_idle()
            del idle[:stale]
            if not idle:
                del self._idle[key]
        self._sweeper = None if self._closed else loop.call_later(SWEEP_EVERY, self._sweep)

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for connection in idle:
                connection.close_idle()
        self._idle.clear()


def request_head(
    method: str, target: str, headers: CIMultiDict[str], body: bytes | ClientBody | None
) -> tuple[bytes, bool]:
    """The request's head as bytes (its framing headers set for ``body``), and whether the
    body is sent chunked. A header value holding CR, LF or another control byte is refused
    rather than written: it would split the head."""
    chunked = False
    if isinstance(body, bytes):
        headers["Content-Length"] = str(len(body))
    elif body is None:
        if method not in _BODYLESS_METHODS and "Content-Length" not in headers:
            headers["Content-Length"] = "0"
    elif "Content-Length" not in headers:
        headers["Transfer-Encoding"] = "chunked"
        chunked = True
    try:
        # The response heads' serializer (C for an ASCII head: ~1.5 us less than joining
        # lines here); bytes that are not UTF-8 go as they came.
        return serialize_head(f"{method} {target} HTTP/1.1", headers), chunked
    except ValueError:
        # Never from a client (its parser refuses them) nor a claim (auth/phase.py drops
        # control characters): the gateway's own failure if it happens.
        raise GatewayError(
            500, "internal_error", "a header for the upstream holds a control byte"
        ) from None
