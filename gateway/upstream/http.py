"""HTTP forwarding: the one seam between a routed request and an upstream.

``UpstreamClient`` is the HTTP client every upstream request goes through: the gateway's own
HTTP/1.1 client (``client.py``: keep-alive pools, llhttp parsing, no silent resend: the
failover loop decides every retry); health probes use aiohttp's. ``send()`` sends the
client's request to one target and returns once the response headers are in; ``relay()``
streams that response back. Bodies are streamed both ways with backpressure (only bodies small
enough to replay on a retry are read whole); hop-by-hop headers are dropped both ways;
forwarding headers are set (``headers.py``). A target on a node with ``tls`` is reached over
HTTPS with that node's context and name (``tls.py``). Failures before the upstream's headers
arrive become a ``GatewayError``; a failure after the response has started aborts the client
connection, so a truncated body never looks complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict

from ..aiohttp_private import EMPTY_STATUS, OneWrite, Relayed, Whole
from ..edge.cors import Added
from ..errors import (
    SERVER,
    ClientFault,
    ClientGone,
    GatewayError,
    UpstreamAborted,
)
from ..request import for_aiohttp
from ..snapshot import Target
from .body import Body, ClientBody
from .client import BodyError, Pool, Response, request_head
from .headers import HOP_BY_HOP, Forwarding, only_end_to_end, request_headers
from .redirects import Redirects

if TYPE_CHECKING:
    from ..request import Request


_MAY_POINT_HOME: Final = ("Location", "Content-Location", "Refresh", "Set-Cookie")
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


class UpstreamClient:
    """The upstream HTTP client, opened when the gateway starts and closed when it stops:
    requests go through the gateway's own HTTP/1.1 client (``client.py``), health probes
    through aiohttp's (``session``), off the hot path."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._pool: Pool | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream client is not open")
        return self._session

    def open(self, keepalive_timeout: float) -> None:
        """``keepalive_timeout``: seconds an idle pooled connection is kept (below the
        upstreams' own, so that they rarely close one the gateway is about to use)."""
        self._pool = Pool(keepalive_timeout)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=0, ttl_dns_cache=10, keepalive_timeout=keepalive_timeout
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            trust_env=False,
            raise_for_status=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._session is not None:
            await self._session.close()

    async def send(
        self,
        request: Request,
        *,
        target: Target,
        path_qs: str,
        body: Body,
        streamed: ClientBody | None,
        connect_timeout: float,
        response_timeout: float,
        forwarding: Forwarding,
        underscores: bool = False,
    ) -> Response:
        """Send the request to ``target``; return once the upstream's response headers are in.
        Raises ``GatewayError`` for an upstream failure (kind ``stale`` when a reused
        connection was closed under the request), ``ClientGone`` or ``ClientFault`` when the
        client (``streamed``, its body) was at fault. ``underscores``: forward header names
        holding ``_`` (else dropped)."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("the upstream client is not open")
        method = request.method
        headers = request_headers(request, target, forwarding, underscores=underscores)
        head, chunked = request_head(method, path_qs, headers, body)
        try:
            connection = pool.take(target) or await pool.connect(target, connect_timeout)
            answer = connection.start(
                head, body, chunked=chunked, head_only=method == "HEAD",
                timeout=response_timeout,
            )  # fmt: skip
            try:
                return await answer
            except BaseException:
                connection.abort()
                raise
        except GatewayError as failure:
            if streamed is not None and streamed.fault is not None:
                raise client_fault(streamed.fault) from failure
            if _client_gone(request):
                raise ClientGone from failure
            if failure.kind == "stale":
                # Its idle siblings most likely share its fate (the upstream restarted, a
                # NAT forgot them): the retry gets a new connection, not another of them.
                pool.drop_idle(target)
            raise


def client_fault(fault: GatewayError | ClientGone) -> ClientFault | ClientGone:
    return fault if isinstance(fault, ClientGone) else ClientFault(fault)


def response_headers(
    upstream: Response,
    request_id: str,
    extra: Mapping[str, str] | None,
    redirects: Redirects | None = None,
    added: Added | None = None,
) -> CIMultiDict[str]:
    """The client's answer's headers: the upstream's end-to-end ones, redirects made public,
    ``extra`` set over them, ``added`` (CORS, the security headers) applied."""
    headers = only_end_to_end(upstream.headers, HOP_BY_HOP)  # made for this answer alone: no copy
    if redirects is not None and any(name in headers for name in _MAY_POINT_HOME):
        redirects.apply(headers)
    if extra:
        headers.update(extra)
    if added is not None:
        added.apply(headers)
    headers["X-Request-ID"] = request_id
    if "Server" not in headers:
        headers["Server"] = SERVER
    return headers


async def relay(
    request: Request,
    upstream: Response,
    request_id: str,
    *,
    extra_headers: Mapping[str, str] | None,
    streamed: ClientBody | None,
    redirects: Redirects | None = None,
    added: Added | None = None,
    close: bool = False,
) -> web.StreamResponse:
    """Stream the upstream's response to the client (and release the upstream connection);
    ``close``: with ``Connection: close`` (the gateway is draining).
    An upstream that answered before the whole body was sent may still lose it to its client
    (``streamed``): ``UpstreamAborted.by_client`` then says so."""
    headers = response_headers(upstream, request_id, extra_headers, redirects, added)
    status, reason, length = upstream.status, upstream.reason, upstream.content_length
    no_body = request.method == "HEAD" or status in EMPTY_STATUS
    # All of a body of unknown length in (chunked, or up to a close that came), to an
    # HTTP/1.1 client: chunked again, in one write. (An HTTP/1.0 one gets it up to a close.)
    chunked = length is None and upstream.complete and request.version == HttpVersion11
    whole = no_body or (upstream.complete and length is not None) or chunked
    response: web.StreamResponse
    try:
        if whole:
            # No body, or all of it came with the head (``read`` returns it at once): the
            # answer in one write.
            body = None if no_body else await upstream.read()
            response = Whole(
                status=status, reason=reason, headers=headers, body=body,
                chunked=chunked,
            )  # fmt: skip
        else:
            # A body of known length follows its headers at once: both in one write. A body of
            # unknown length (a stream, server-sent events) may take long: its headers first.
            kind = OneWrite if length is not None else Relayed
            response = kind(status=status, reason=reason, headers=headers)
        if close:
            response.force_close()
        await response.prepare(for_aiohttp(request))
        if whole:
            return response
        while chunk := await upstream.read():
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
        if _client_gone(request):
            upstream.close()
            raise ClientGone from exc
        raise
    except BodyError as exc:
        # The upstream failed mid-body. Reset the client connection: closing it cleanly
        # would make a truncated body look complete to a client reading until EOF.
        upstream.close()
        reset(request)
        by_client = streamed is not None and streamed.fault is not None
        raise UpstreamAborted(response, by_client=by_client) from exc
    finally:
        sending = upstream.release()
        if sending is not None:
            # Answered before the body was all sent: the task reading it must be gone before
            # the connection drains the rest (one reader at a time).
            await asyncio.wait((sending,))
    return response


def reset(request: Request) -> None:
    """Close the client connection with a TCP reset (SO_LINGER 0), not a FIN."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def _client_gone(request: Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
