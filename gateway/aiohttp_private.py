"""Every use of aiohttp's private attributes, behind this one door.

The gateway leans on a few internals where aiohttp has no public way to do what it needs:

- ``detach``: let go of a client connection after the gateway wrote a WebSocket 101 itself,
  so that a relay of two small protocols can own the transport (``RequestHandler``'s
  ``_message_tail``, ``_force_close``, ``_keepalive_handle``, ``_manager``, ``_buffer_paused``);
- ``protocol_factory``: build the server's connections from a ``RequestHandler`` subclass
  (``web.Server``'s ``_loop`` and ``_kwargs``);
- ``Whole``: an answer known whole written in one transport write, with the head aiohttp's
  server would write for it, by the serializer it uses (``http_writer._serialize_headers``);
- ``OneWrite``: hold a response's headers back until its first body bytes, as aiohttp's own
  ``web.Response`` does (``StreamResponse._send_headers_immediately``);
- ``Relayed`` (and ``OneWrite``, ``Whole``): a relayed answer without ``Content-Type`` stays
  without one: aiohttp's ``StreamResponse._prepare_headers`` adds
  ``application/octet-stream`` to a body that has none, which would tell the client a type
  the upstream never claimed (and keep it from sniffing one, as RFC 9110 lets it);
- ``answer_in_http11``: write a response's status line as HTTP/1.1 whatever version its
  request named (a 505 to ``HTTP/2.0``; aiohttp echoes the request's version), by setting the
  request's cached ``version`` (``BaseRequest._cache``, where ``reify`` keeps it);
- ``keep_raw_header_bytes``: header bytes outside UTF-8 (obs-text, e.g. a Latin-1 ``\xe9``)
  written out as they came in. aiohttp's parsers decode header bytes as UTF-8 with
  ``surrogateescape``, and its C serializer silently drops the surrogates, so ``caf\xe9``
  in an upstream's answer reached the client as ``caf``. The serializer aiohttp's server
  writes answers with (``http_writer._serialize_headers``) is wrapped: all-ASCII heads
  (nearly all) still take the C one; others are encoded with ``surrogateescape``, which gives
  back the bytes read. (The upstream client, ``upstream/client.py``, encodes its request heads
  the same way itself.)
- the request-head limits (``server.Protocol``, ``edge/connections.py``): ``parsed`` and
  ``last_payload`` tell when the parser completed a head and whether a body follows
  (``RequestHandler``'s ``_request_count``, ``_messages``), ``upgraded`` that what follows is
  no more HTTP (``BaseProtocol._upgraded``), ``waiting`` that no request is being handled
  (``_waiter``), ``hold_keepalive`` keeps aiohttp's idle close off a head that is still
  arriving (``_next_keepalive_close_time``, on ``BaseProtocol._loop``'s clock), and
  ``answer_early`` queues an answer (431, 408) as aiohttp queues its own for a head its parser
  rejects (``web_protocol._ErrInfo``).
- ``site_server``: a site's listening server (``BaseSite._server``), so that a stop can serve
  the connections its accept queue holds;
- ``HeldSite``: a site on an inherited listening socket, served by a server the gateway
  makes (``edge/accept.py``'s, which accepts in batches and times TLS handshakes out, which
  aiohttp's sites do not): its ``start`` is ``SockSite.start`` with that server, and sets
  what ``BaseSite`` reads (``_runner``, ``_ssl_context``, ``_server``).

The build is locked (``requirements/``), so an aiohttp upgrade is deliberate; ``missing()``
lists what of the above an installed aiohttp no longer has, and a unit test fails with that
list, instead of the gateway failing at run time.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

from aiohttp import HttpVersion10, HttpVersion11, base_protocol, http_writer, web, web_protocol
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict

H = TypeVar("H", bound=web.RequestHandler)

# (class, attribute) pairs relied on above; checked by ``missing()``.
_SLOTS = (
    (web.RequestHandler, "_message_tail"),
    (web.RequestHandler, "_force_close"),
    (web.RequestHandler, "_keepalive_handle"),
    (web.RequestHandler, "_manager"),
    (base_protocol.BaseProtocol, "_buffer_paused"),
    (web.BaseRequest, "_cache"),
    (web.RequestHandler, "_request_count"),
    (web.RequestHandler, "_messages"),
    (web.RequestHandler, "_waiter"),
    (web.RequestHandler, "_next_keepalive_close_time"),
    (base_protocol.BaseProtocol, "_upgraded"),
    (base_protocol.BaseProtocol, "_loop"),
    *((web.BaseSite, name) for name in ("_runner", "_ssl_context", "_server")),
)


def site_server(site: web.BaseSite) -> asyncio.AbstractServer | None:
    """A started site's listening server (``BaseSite._server``), for the stop that serves the
    connections its accept queue holds."""
    return site._server


class Serve(Protocol):
    """What makes the server of a ``HeldSite``: ``edge.accept.Acceptor``."""

    def __call__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        *,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float | None,
    ) -> asyncio.AbstractServer: ...


class HeldSite(web.BaseSite):
    """A site on a listening socket made elsewhere (the supervisor's, inherited: see
    ``lifecycle/listeners.py``), served by ``serve``'s server, with a TLS handshake timeout
    of its own where it has a TLS context (aiohttp's sites leave asyncio's 60 s): a client
    that connects and does not finish its handshake in time is closed. Its ``start`` is
    ``SockSite.start`` with that server; it sets what ``BaseSite`` reads (``_runner``,
    ``_ssl_context``, ``_server``; no backlog: the socket listens already)."""

    __slots__ = ("_handshake_timeout", "_name", "_serve", "_sock")

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
        serve: Serve,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._sock = sock
        self._serve = serve
        self._handshake_timeout = handshake_timeout
        host, port = sock.getsockname()[:2]
        scheme = "https" if ssl_context is not None else "http"
        self._name = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        self._server = self._serve(
            self._sock,
            server,
            ssl_context=self._ssl_context,
            handshake_timeout=self._handshake_timeout if self._ssl_context else None,
        )
        await self._server.start_serving()


def protocol_factory(server: web.Server, cls: Callable[..., H]) -> Callable[[], H]:
    """What ``web.Server.__call__`` does, with ``cls`` in place of ``RequestHandler``."""

    def make() -> H:
        return cls(server, loop=server._loop, **server._kwargs)

    return make


def detach(protocol: web.RequestHandler) -> tuple[asyncio.Transport, bytes] | None:
    """Make aiohttp let go of ``protocol``'s connection and return it with what the client
    sent after its request: aiohttp stops reading it, forgets it and never closes it. None
    when the client has gone already."""
    transport = protocol.transport
    if transport is None or transport.is_closing():
        return None
    tail, protocol._message_tail = protocol._message_tail, b""
    protocol._force_close = True  # start() leaves its loop without closing the transport
    protocol.transport = None
    if protocol._keepalive_handle is not None:
        protocol._keepalive_handle.cancel()
        protocol._keepalive_handle = None
    if protocol._manager is not None:
        protocol._manager.connection_lost(protocol, None)  # not among the server's connections
    if protocol._buffer_paused:
        transport.resume_reading()
    return transport, tail


def parsed(protocol: web.RequestHandler) -> int:
    """How many requests the parser has completed on this connection (it counts each head
    as it completes, before the request is handled)."""
    return protocol._request_count


def last_payload(protocol: web.RequestHandler) -> StreamReader | None:
    """The body of the request parsed last, while it waits to be handled (right after the
    parser completed its head): at EOF already when there is none."""
    messages = protocol._messages
    return messages[-1][1] if messages else None


def queued(protocol: web.RequestHandler) -> int:
    """Requests parsed and not yet being handled (pipelined)."""
    return len(protocol._messages)


def upgraded(protocol: web.RequestHandler) -> bool:
    """The parser saw an upgrade (a WebSocket handshake): what follows is not HTTP."""
    return protocol._upgraded


def waiting(protocol: web.RequestHandler) -> bool:
    """The connection waits for its next request: none is being handled, none is queued
    (aiohttp's own test for an idle connection)."""
    waiter = protocol._waiter
    return waiter is not None and not waiter.done()


def hold_keepalive(protocol: web.RequestHandler, seconds: float) -> None:
    """Keep aiohttp's idle close (keepalive_timeout) off the connection for ``seconds`` from
    now: a head is arriving, and the header timeout is what ends it."""
    until = protocol._loop.time() + seconds
    # (its timer, when it fires early, re-arms itself for this time)
    protocol._next_keepalive_close_time = max(protocol._next_keepalive_close_time, until)


def answer_early(protocol: web.RequestHandler, status: int, exc: BaseException) -> None:
    """Queue an error for the connection as aiohttp queues one for a head its parser rejects:
    the protocol's ``handle_error(request, status, exc)`` answers it, in turn after any
    request parsed before, and the connection closes after that answer."""
    error = web_protocol._ErrInfo(status=status, exc=exc, message=str(exc))
    protocol._request_count += 1
    protocol._messages.append((error, EMPTY_PAYLOAD))
    waiter = protocol._waiter
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


# The statuses whose answers have no body (aiohttp's set, RFC 9110): 1xx, 204, 304.
EMPTY_STATUS: Final = frozenset((204, 304, *range(100, 200)))


class Whole(web.StreamResponse):
    """An answer whose body is all known before it is sent (the gateway's own, and relayed
    ones that came whole with their head): status line, headers and body in one transport
    write, with none of the work of aiohttp's streaming ``prepare``/``write_eof`` (a writer
    state machine, two passes over the headers, the body as a payload): measured, ~10 % of
    the CPU of a 404 the gateway answers itself; a few % of a small proxied GET's, within
    the noise of the benchmark's side-by-side runs.

    The head is what aiohttp's ``_prepare_headers`` makes of the same answer
    (``Content-Length``, ``Date``, ``Connection``, the version of the request line, no body
    for HEAD, 1xx, 204 and 304), but no ``Server`` of aiohttp's (the gateway's answers name
    their own) and no ``Content-Type`` it was not given (see ``Relayed``; the gateway's own
    answers with a body name theirs). It is written with the serializer
    aiohttp's server uses (``http_writer._serialize_headers``, which refuses CR and LF in
    values and keeps header bytes that are not UTF-8: ``keep_raw_header_bytes``). Its
    keep-alive decision is its own (``keep_alive``, ``force_close``); aiohttp's protocol
    reads it after the answer as it reads any response's."""

    __slots__ = ("_whole_body", "_whole_keep", "_whole_sent")

    def __init__(
        self,
        *,
        status: int,
        headers: CIMultiDict[str] | dict[str, str],
        body: bytes | None = None,
        reason: str | None = None,
    ) -> None:
        """``body``: None when there is none and its length is not known: a relayed answer
        to HEAD keeps the upstream's ``Content-Length``, if any (to another method, None is
        an empty body, ``Content-Length: 0``)."""
        super().__init__(status=status, reason=reason, headers=headers)
        self._whole_body = body
        self._whole_keep: bool | None = None
        self._whole_sent = False

    @property
    def prepared(self) -> bool:
        return self._whole_sent

    @property
    def keep_alive(self) -> bool | None:
        return self._whole_keep

    def force_close(self) -> None:
        self._whole_keep = False

    async def prepare(self, request: web.BaseRequest) -> None:
        if self._whole_sent:
            return
        self._whole_sent = True
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        method, status, body = request.method, self.status, self._whole_body
        keep = self._whole_keep
        if keep is None:
            keep = self._whole_keep = request.keep_alive
        version = request.version
        headers = self.headers
        if body is None and method != "HEAD":
            body = b""  # framed, never left to the connection's end
        if status in EMPTY_STATUS:
            body = None
            headers.popall("Content-Length", None)
            headers.popall("Transfer-Encoding", None)
        elif body is not None:
            headers["Content-Length"] = str(len(body))  # for HEAD too: what GET would get
            if method == "HEAD":
                body = None
        elif method == "HEAD":
            headers.popall("Transfer-Encoding", None)
        if "Date" not in headers:
            headers["Date"] = rfc822_formatted_time()
        if "Connection" not in headers:
            if keep:
                if version == HttpVersion10:
                    headers["Connection"] = "keep-alive"
            elif version == HttpVersion11:
                headers["Connection"] = "close"
        status_line = f"HTTP/{version[0]}.{version[1]} {status} {self.reason}"
        head = http_writer._serialize_headers(status_line, headers)
        data = head + body if body else head
        transport.write(data)
        # Counted as aiohttp's writer counts what it sends: an error raised after this answer
        # went out must drop the connection (``handle_error``), never write a second answer.
        request.writer.output_size += len(data)
        # As aiohttp's write_eof: while the client does not take what it was sent, the next
        # request on the connection waits (else a client that pipelines requests and reads
        # nothing would make the gateway hold every answer).
        await request.writer.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if not self._whole_sent or data:
            raise RuntimeError("a Whole answer is written by prepare(), all at once")


class Relayed(web.StreamResponse):
    """A relayed answer streamed through aiohttp's writer, with the upstream's headers as
    they came: no ``Content-Type`` of aiohttp's when the upstream sent none."""

    async def _prepare_headers(self) -> None:
        typed = "Content-Type" in self.headers
        await super()._prepare_headers()
        if not typed:
            self.headers.popall("Content-Type", None)


class OneWrite(Relayed):
    """A relayed response of known length: its headers wait for the first body bytes (or
    the end), so a small answer goes out in one write instead of two."""

    _send_headers_immediately = False


def answer_in_http11(request: web.BaseRequest) -> None:
    """Make the response to ``request`` start ``HTTP/1.1`` (and follow HTTP/1.1's rules for
    ``Connection``) whatever version the request line named."""
    request._cache["version"] = HttpVersion11


# The control bytes no header may hold (RFC 9110 §5.5), as aiohttp's own serializers refuse.
_FORBIDDEN: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
Serializer = Callable[[str, CIMultiDict[str]], bytes]


def raw_serializer(fast: Serializer) -> Serializer:
    """A head serializer that keeps the bytes that are not UTF-8; ``fast`` (aiohttp's C one)
    still writes the heads that are all ASCII."""

    def serialize(status_line: str, headers: CIMultiDict[str]) -> bytes:
        if status_line.isascii() and all(map(str.isascii, headers.values())):
            return fast(status_line, headers)
        lines = [status_line, *(f"{name}: {value}" for name, value in headers.items())]
        for line in lines:
            if _FORBIDDEN.search(line) is not None:
                raise ValueError("Forbidden control character detected in headers.")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    serialize.keeps_raw_bytes = True  # type: ignore[attr-defined]
    return serialize


def keep_raw_header_bytes() -> None:
    """From now on (in this process), write header bytes the parsers read as they were read.
    Idempotent."""
    current: Any = http_writer._serialize_headers
    if not getattr(current, "keeps_raw_bytes", False):
        http_writer._serialize_headers = raw_serializer(current)  # type: ignore[assignment]


def missing() -> list[str]:
    """The private attributes above that this aiohttp does not have ("Class.attribute")."""
    gone = []
    for cls, name in _SLOTS:
        # Instance attributes: in __slots__, or (ClientSession) in the ATTRS it allows.
        slots = {s for klass in cls.__mro__ for s in getattr(klass, "__slots__", ())}
        slots |= getattr(cls, "ATTRS", frozenset())
        if name not in slots and not hasattr(cls, name):
            gone.append(f"{cls.__name__}.{name}")
    if not callable(getattr(http_writer, "_serialize_headers", None)):
        gone.append("http_writer._serialize_headers")
    for name in ("_send_headers_immediately", "_prepare_headers"):
        if name not in vars(web.StreamResponse):
            gone.append(f"StreamResponse.{name}")
    if not _err_info_fits():
        gone.append("web_protocol._ErrInfo")
    loop = asyncio.new_event_loop()
    try:
        server = web.Server(_never_called, loop=loop)
        gone += [f"Server.{name}" for name in ("_loop", "_kwargs") if not hasattr(server, name)]
    finally:
        loop.close()
    return gone


def _err_info_fits() -> bool:
    """aiohttp's queued parser error still exists, with the fields ``answer_early`` sets."""
    cls = getattr(web_protocol, "_ErrInfo", None)
    try:
        cls(status=400, exc=ValueError(), message="")  # type: ignore[misc]
    except TypeError:
        return False
    return True


async def _never_called(request: web.BaseRequest) -> web.StreamResponse:
    raise NotImplementedError  # pragma: no cover - missing() only builds a Server
