"""Every use of aiohttp's private attributes, behind this one door.

The gateway leans on a few internals where aiohttp has no public way to do what it needs:

- ``Whole``: an answer known whole written in one transport write, with the head aiohttp's
  server would write for it, by the serializer it uses (``http_writer._serialize_headers``);
- ``OneWrite``: hold a response's headers back until its first body bytes, as aiohttp's own
  ``web.Response`` does (``StreamResponse._send_headers_immediately``);
- ``Relayed`` (and ``OneWrite``, ``Whole``): a relayed answer without ``Content-Type`` stays
  without one: aiohttp's ``StreamResponse._prepare_headers`` adds
  ``application/octet-stream`` to a body that has none, which would tell the client a type
  the upstream never claimed (and keep it from sniffing one, as RFC 9110 lets it);
- ``keep_raw_header_bytes``: header bytes outside UTF-8 (obs-text, e.g. a Latin-1 ``\xe9``)
  written out as they came in. aiohttp's parsers decode header bytes as UTF-8 with
  ``surrogateescape``, and its C serializer silently drops the surrogates, so ``caf\xe9``
  in an upstream's answer reached the client as ``caf``. The serializer aiohttp's server
  writes answers with (``http_writer._serialize_headers``) is wrapped: all-ASCII heads
  (nearly all) still take the C one; others are encoded with ``surrogateescape``, which gives
  back the bytes read. (The upstream client, ``upstream/client.py``, encodes its request heads
  the same way itself.)
- ``ParsingProtocol``, the base of the gateway's own client protocol (``server.Connection``):
  an aiohttp ``BaseProtocol`` (what aiohttp's ``StreamWriter``, ``StreamReader`` and C parser
  expect of a protocol) on aiohttp's request parser. It reads its ``_loop``, ``_parser`` and
  ``_buffer_paused``, sets ``_upgraded`` (which keeps ``pause_reading`` off the parser once
  a handshake's bytes follow), and holds the transport with ``_pause_reading_for_buffer`` /
  ``_resume_reading_for_buffer`` while the pipelined queue or a handshake's tail is full; of
  the parser it calls ``message_consumed`` and ``set_upgraded``.
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
from typing import Any, Final, Protocol

from aiohttp import (
    HttpVersion10,
    HttpVersion11,
    base_protocol,
    http_parser,
    http_writer,
    web,
    web_protocol,
)
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from multidict import CIMultiDict

# (class, attribute) pairs relied on above; checked by ``missing()``.
_SLOTS = (
    *(
        (base_protocol.BaseProtocol, name)
        for name in (
            "_loop",
            "_parser",
            "_upgraded",
            "_buffer_paused",
            "_pause_reading_for_buffer",
            "_resume_reading_for_buffer",
        )
    ),
    (http_parser.HttpRequestParser, "message_consumed"),
    (http_parser.HttpRequestParser, "set_upgraded"),
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


class ParsingProtocol(base_protocol.BaseProtocol):
    """A client connection's protocol on aiohttp's C request parser (llhttp), with the
    parser's limits given; ``server.Connection`` is one. Its bodies are ``StreamReader`` s
    that pause and resume reading through it (``BaseProtocol``), and never decompressed: a
    body goes upstream as the client sent it (aiohttp's server decompressed a gzip body and
    let the gateway forward the result still labelled gzip)."""

    __slots__ = ()

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        read_bufsize: int,
        max_line_size: int,
        max_field_size: int,
        max_headers: int,
        max_queued: int,
    ) -> None:
        parser = http_parser.HttpRequestParser(
            self,
            loop,
            read_bufsize,
            max_line_size=max_line_size,
            max_field_size=max_field_size,
            max_headers=max_headers,
            payload_exception=web_protocol.RequestPayloadError,
            auto_decompress=False,
            max_msg_queue_size=max_queued,
        )
        super().__init__(loop, parser)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def parse(self, data: bytes) -> tuple[Any, bool, bytes]:
        """The parser's ``feed_data``: the (message, body) pairs ``data`` completed, whether
        a handshake's bytes follow, and those bytes. Raises ``HttpProcessingError``."""
        parser = self._parser
        if parser is None:
            return (), False, b""
        messages, upgraded, tail = parser.feed_data(data)
        if upgraded:
            self._upgraded = True
        return messages, upgraded, tail

    def consumed(self) -> None:
        """A parsed request started: the parser may complete one more ahead of it."""
        parser = self._parser
        if parser is not None:
            parser.message_consumed()

    @property
    def upgraded(self) -> bool:
        """The last request was a handshake: what follows it is not HTTP (yet)."""
        return self._upgraded

    def http_again(self) -> None:
        """The handshake was refused: parse what follows as HTTP."""
        self._upgraded = False
        parser = self._parser
        if parser is not None:
            parser.set_upgraded(False)

    @property
    def reading_held(self) -> bool:
        return self._buffer_paused

    def hold_reading(self) -> None:
        """Stop reading the socket: a buffer of the connection's own is full."""
        self._pause_reading_for_buffer()

    def release_reading(self) -> None:
        self._resume_reading_for_buffer()


# The statuses whose answers have no body (aiohttp's set, RFC 9110): 1xx, 204, 304.
EMPTY_STATUS: Final = frozenset((204, 304, *range(100, 200)))


class Whole(web.StreamResponse):
    """An answer whose body is all known before it is sent (the gateway's own, and relayed
    ones that came whole with their head): status line, headers and body in one transport
    write (by the gateway's connections at the end of the loop's turn: ``server.py``,
    ``write_soon``), with none of the work of aiohttp's streaming ``prepare``/``write_eof``
    (a writer state machine, two passes over the headers, the body as a payload): measured,
    ~10 % of the CPU of a 404 the gateway answers itself; a few % of a small proxied GET's,
    within the noise of the benchmark's side-by-side runs.

    The head is what aiohttp's ``_prepare_headers`` makes of the same answer
    (``Content-Length``, ``Date``, ``Connection``, the version of the request line, no body
    for HEAD, 1xx, 204 and 304), but no ``Server`` of aiohttp's (the gateway's answers name
    their own) and no ``Content-Type`` it was not given (see ``Relayed``; the gateway's own
    answers with a body name theirs). It is written with the serializer
    aiohttp's server uses (``http_writer._serialize_headers``, which refuses CR and LF in
    values and keeps header bytes that are not UTF-8: ``keep_raw_header_bytes``). Its
    keep-alive decision is its own (``keep_alive``, ``force_close``); aiohttp's protocol
    reads it after the answer as it reads any response's."""

    __slots__ = ("_whole_body", "_whole_chunked", "_whole_keep", "_whole_sent")

    def __init__(
        self,
        *,
        status: int,
        headers: CIMultiDict[str] | dict[str, str],
        body: bytes | None = None,
        reason: str | None = None,
        chunked: bool = False,
    ) -> None:
        """``body``: None when there is none and its length is not known: a relayed answer
        to HEAD keeps the upstream's ``Content-Length``, if any (to another method, None is
        an empty body, ``Content-Length: 0``). ``chunked``: the body framed as one chunk and
        the last, not by a length (a relayed chunked answer that came whole, to an HTTP/1.1
        client: chunked as aiohttp's writer would send it, in one write)."""
        super().__init__(status=status, reason=reason, headers=headers)
        self._whole_body = body
        self._whole_chunked = chunked
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
            # The framing GET would get, for HEAD too.
            if self._whole_chunked:
                headers.popall("Content-Length", None)
                headers["Transfer-Encoding"] = "chunked"
                body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
            else:
                headers["Content-Length"] = str(len(body))
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
        # The gateway's connections write it at the end of the loop's turn (server.py,
        # ``write_soon``); another protocol (aiohttp's, in bench/lean_anchor.py) at once.
        write = getattr(request.protocol, "write_soon", None)
        (transport.write if write is None else write)(data)
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
    they came: no ``Content-Type`` of aiohttp's when the upstream sent none. A body of
    unknown length to an HTTP/1.0 client ends with the connection (there are no chunks in
    HTTP/1.0): aiohttp's writer frames it so, but keeps that decision to itself, and the
    ``keep_alive`` it reports after the answer is the request's, which left the connection
    open with the body's end unknowable."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if request.version != HttpVersion11 and self.content_length is None:
            self.force_close()
        return await super().prepare(request)

    async def _prepare_headers(self) -> None:
        typed = "Content-Type" in self.headers
        await super()._prepare_headers()
        if not typed:
            self.headers.popall("Content-Type", None)


class OneWrite(Relayed):
    """A relayed response of known length: its headers wait for the first body bytes (or
    the end), so a small answer goes out in one write instead of two."""

    _send_headers_immediately = False


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


# A head as the gateway writes it (its request heads to upstreams too): aiohttp's C serializer
# where the head is ASCII, the bytes as they came where it is not; ValueError for CR, LF and
# the other control bytes no header may hold.
serialize_head: Final = raw_serializer(http_writer._serialize_headers)


def keep_raw_header_bytes() -> None:
    """From now on (in this process), write header bytes the parsers read as they were read.
    Idempotent."""
    current: Any = http_writer._serialize_headers
    if not getattr(current, "keeps_raw_bytes", False):
        http_writer._serialize_headers = serialize_head  # type: ignore[assignment]


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
    return gone
