"""``Request``: one client request as the pipeline sees it, made by the gateway's HTTP server
(``server.py``) from what aiohttp's parser read.

It holds what the phases read and nothing else: the method, the raw target, the headers (a
read-only ``CIMultiDictProxy``), the version, the client's address and the scheme of the
listener, the body as a ``StreamReader``, and the connection's ``transport``, ``protocol``
and ``writer``. It is built once per request from fields of the connection and of the
parser's message, with no URL object, no cache and no per-request task of its own:
aiohttp's ``BaseRequest`` made all three (issue 17's measurements put aiohttp's server, its
request among it, at ~30 % of a small GET's CPU).

aiohttp's responses (``web.Response``, ``StreamResponse`` and the gateway's subclasses of it)
are still what the phases answer with. They read of a request only ``version``,
``keep_alive``, ``method``, ``headers``, ``task`` and ``_payload_writer`` (``_start``,
``_prepare_headers``, ``_write_headers`` in aiohttp 3.14), and await ``_prepare_hook``;
``Request`` has them, and ``for_aiohttp`` hands it to them (the suite's answers of every kind,
the gateway's own, ``web.Response`` from the endpoints and the streamed relays, go through it).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from aiohttp import HttpVersion11, web
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

if TYPE_CHECKING:
    from aiohttp import HttpVersion
    from aiohttp.http_writer import StreamWriter
    from multidict import CIMultiDictProxy


class Request:
    """One request. ``version`` may be set (``answer_in_http11``); the rest is as parsed."""

    __slots__ = (
        "_payload_writer",
        "content",
        "headers",
        "keep_alive",
        "method",
        "protocol",
        "raw_path",
        "remote",
        "scheme",
        "send_timed_out",
        "task",
        "transport",
        "upgrade",
        "version",
        "writer",
    )

    def __init__(  # noqa: PLR0917 - one per field, positional: built per request
        self,
        method: str,
        raw_path: str,
        headers: CIMultiDictProxy[str],
        version: HttpVersion,
        keep_alive: bool,
        upgrade: bool,
        content: StreamReader,
        protocol: Any,
        transport: asyncio.Transport | None,
        writer: StreamWriter,
        remote: str | None,
        scheme: str,
    ) -> None:
        self.method = method
        self.raw_path = raw_path  # the target as sent (decoded as UTF-8, surrogateescape)
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive  # what the request asked for (its version, Connection)
        self.upgrade = upgrade  # Connection: upgrade (with an Upgrade header)
        self.content = content  # EMPTY_PAYLOAD when there is no body
        self.protocol = protocol  # the connection (``server.Connection``)
        self.transport = transport
        self.writer = self._payload_writer = writer
        self.remote = remote  # the peer's address (None when the transport has none)
        self.scheme = scheme  # "https" on a TLS listener, else "http"
        self.send_timed_out = False  # the client took none of the answer for send_timeout
        self.task: asyncio.Task[None] | None = None

    @property
    def body_exists(self) -> bool:
        return self.content is not EMPTY_PAYLOAD

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return None if value is None else int(value)  # the parser checked it is digits

    @property
    def path(self) -> str:
        """The target's path, undecoded (aiohttp's responses name it in their repr)."""
        return self.raw_path.partition("?")[0]

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        """aiohttp's responses call it while they prepare (``on_response_prepare``): none."""


def expects_continue(request: Request) -> bool:
    """Whether the client waits for ``100 Continue`` before it sends its body (HTTP/1.1)."""
    return (
        request.version == HttpVersion11
        and request.headers.get("Expect", "").lower() == "100-continue"
    )


def answer_in_http11(request: Request) -> None:
    """Make the response to ``request`` start ``HTTP/1.1`` (and follow HTTP/1.1's rules for
    ``Connection``) whatever version the request line named (a 505 to ``HTTP/2.0``: aiohttp's
    responses echo the request's version)."""
    request.version = HttpVersion11


def for_aiohttp(request: Request) -> web.BaseRequest:
    """``request`` as aiohttp's responses' ``prepare`` is typed to take it: they read only
    what ``Request`` has (the module's docstring)."""
    return cast(web.BaseRequest, request)  # duck-typed: see above
