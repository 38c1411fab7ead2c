"""The WebSocket handshake with an upstream, on a connection of our own (RFC 6455 section 4).

The gateway opens the TCP connection, sends the upgrade request and reads the response head;
on 101 it checks ``Sec-WebSocket-Accept``, the subprotocol and the extensions (only ones
the client offered; the offer goes up as the client sent it), stops reading and hands the
connection (and any frames that came with the head) to the relay. Everything else is an
``UpstreamRefused`` (another status) or an ``UpstreamInvalid`` (a 101 that is not a valid
WebSocket answer). Also the client side's 101, which the gateway writes itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

from multidict import CIMultiDict, MultiMapping

from ..dial import open_connection
from .frames import extension_names

if TYPE_CHECKING:
    from ..upstream.tls import UpstreamTls

MAX_HEAD: Final = 16 * 1024  # the response head, as aiohttp's default line and field limits
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.1 (\d{3})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_FIELD: Final = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*"
)


class UpstreamRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"the upstream answered {status} instead of switching protocols")
        self.status = status


class UpstreamInvalid(Exception):
    """A response head that is not HTTP, or a 101 that is not a valid WebSocket answer."""


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324 - RFC 6455 fixes SHA-1 here


def head_bytes(first_line: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """An HTTP head. Header values come from a parser that split on CRLF and refused control
    characters, so none can end a line early."""
    lines = [first_line, *(f"{name}: {value}" for name, value in headers), "", ""]
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


@dataclass(slots=True)
class Upgraded:
    """An upstream connection that has switched to WebSocket; reading is paused."""

    transport: asyncio.Transport
    subprotocol: str | None
    extensions: str | None  # the 101's Sec-WebSocket-Extensions, as it came
    headers: CIMultiDict[str]  # the 101's headers
    tail: bytes  # frames that came with the head
    handshake: _Handshake

    @property
    def lost(self) -> bool:
        """Whether the upstream closed the connection after its 101."""
        return self.handshake.lost


class _Handshake(asyncio.Protocol):
    """Reads one response head, then pauses the transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head: asyncio.Future[bytes] = loop.create_future()
        self.buffer = b""
        self.lost = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self.head.done():
            self.buffer += data  # read before the pause took effect: frames for the relay
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end > MAX_HEAD or (end < 0 and len(self.buffer) > MAX_HEAD):
            self._pause()
            self.head.set_exception(UpstreamInvalid("response head too long"))
            return
        if end < 0:
            return
        self._pause()
        self.head.set_result(self.buffer[:end])
        self.buffer = self.buffer[end + 4 :]

    def _pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.head.done():
            self.head.set_exception(
                exc
                or ConnectionResetError("the upstream closed the connection during the handshake")
            )


def parse_head(head: bytes) -> tuple[int, CIMultiDict[str]]:
    lines = head.split(b"\r\n")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise UpstreamInvalid("not an HTTP/1.1 status line")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        field = _FIELD.fullmatch(line)
        if field is None:
            raise UpstreamInvalid("malformed header line")
        headers.add(field[1].decode("ascii"), field[2].decode("utf-8", "surrogateescape"))
    return int(status[1]), headers


def _switched(head: bytes, key: str, offer: str | None) -> CIMultiDict[str]:
    """The headers of a valid 101 answer to the handshake with ``key`` and the extensions
    ``offer``."""
    status, answer = parse_head(head)
    if status != 101:
        raise UpstreamRefused(status)
    if answer.get("Upgrade", "").lower() != "websocket":
        raise UpstreamInvalid("101 without Upgrade: websocket")
    connection = {t.strip().lower() for v in answer.getall("Connection", ()) for t in v.split(",")}
    if "upgrade" not in connection:
        raise UpstreamInvalid("101 without Connection: Upgrade")
    if answer.get("Sec-WebSocket-Accept") != accept_key(key):
        raise UpstreamInvalid("wrong Sec-WebSocket-Accept")
    offered = set(extension_names(offer))
    if any(name not in offered for name in extension_names(accepted(answer))):
        raise UpstreamInvalid("an extension the client did not offer")
    return answer


def accepted(headers: MultiMapping[str]) -> str | None:
    """The extensions a handshake header set names, its lines joined (None: none)."""
    values = headers.getall("Sec-WebSocket-Extensions", ())
    return ", ".join(values) if values else None


async def open_upstream(
    host: str,
    port: int,
    path_qs: str,
    headers: CIMultiDict[str],
    protocols: list[str],
    *,
    extensions: str | None = None,
    connect_timeout: float,
    tls: UpstreamTls | None = None,
) -> Upgraded:
    """Connect (over TLS with ``tls``: WSS) and shake hands, offering the ``extensions`` (a
    ``Sec-WebSocket-Extensions`` value); raises OSError (connect;
    ``ssl.SSLError`` when TLS failed), TimeoutError (connect, TLS handshake included, as
    ``ConnectTimeout``), ``UpstreamRefused`` or ``UpstreamInvalid``. The caller bounds the
    whole handshake's time; the connection is closed on any failure or cancellation."""
    loop = asyncio.get_running_loop()
    try:
        transport, handshake = await open_connection(
            lambda: _Handshake(loop),
            host,
            port,
            connect_timeout,
            ssl=None if tls is None else tls.context,
            server_hostname=None if tls is None else tls.server_hostname,
        )
    except TimeoutError:
        raise ConnectTimeout from None
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        sent = [
            *headers.items(),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
        ]
        if protocols:
            sent.append(("Sec-WebSocket-Protocol", ", ".join(protocols)))
        if extensions:
            sent.append(("Sec-WebSocket-Extensions", extensions))
        transport.write(head_bytes(f"GET {path_qs} HTTP/1.1", sent))
        answer = _switched(await handshake.head, key, extensions)
        chosen = answer.get("Sec-WebSocket-Protocol")
        if chosen is not None and chosen not in protocols:
            raise UpstreamInvalid("a subprotocol the client did not offer")  # noqa: TRY301 - the except closes the connection for every failure alike
    except BaseException:
        transport.abort()
        raise
    tail, handshake.buffer = handshake.buffer, b""
    return Upgraded(transport, chosen, accepted(answer), answer, tail, handshake)


class ConnectTimeout(TimeoutError):
    """The upstream did not accept the connection within ``connect_timeout``."""
