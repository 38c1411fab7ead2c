"""HTTP forwarding: the one seam between a routed request and an upstream.

``UpstreamClient`` is the HTTP client every upstream request (and health probe) goes through:
aiohttp's ``ClientSession`` today, with keep-alive pools, no cookies, no decompression and no
silent resend. ``send()`` sends the client's request to one target and returns once the
response headers are in; ``relay()`` streams that response back. Bodies are streamed both ways
with backpressure (only bodies small enough to replay on a retry are read whole); hop-by-hop
headers are dropped both ways; forwarding headers are set (``headers.py``). A target on a node
with ``tls`` is reached over HTTPS with that node's context and name (``tls.py``). Failures before
the upstream's headers arrive become a ``GatewayError``; a failure after the response has
started aborts the client connection, so a truncated body never looks complete.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
import weakref
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from multidict import CIMultiDict
from yarl import URL

from ..aiohttp_private import OneWrite, without_resend
from ..edge.cors import Added
from ..errors import (
    SERVER,
    ClientFault,
    ClientGone,
    GatewayError,
    UpstreamAborted,
    upstream_error,
    upstream_failure,
)
from ..snapshot import Target
from .body import Body, ClientBody
from .headers import HOP_BY_HOP, Forwarding, end_to_end, request_headers
from .redirects import Redirects

_NO_BODY_STATUS: Final = frozenset({204, 304})
_MAY_POINT_HOME: Final = ("Location", "Content-Location", "Refresh", "Set-Cookie")
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
# Whether the connection the current request got from the pool had served a request before
# (set by _Connector.connect in the request's own task).
_REUSED: ContextVar[bool] = ContextVar("reused", default=False)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, noting for each request whether its connection is a reused one:
    an upstream that closed a kept-alive connection just as a request was written on it is a
    stale connection, not a failing upstream."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._served: weakref.WeakSet[object] = weakref.WeakSet()

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        _REUSED.set(protocol in self._served)
        if protocol is not None:
            self._served.add(protocol)
        return connection


class UpstreamClient:
    """The upstream HTTP client, opened when the gateway starts and closed when it stops."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream client is not open")
        return self._session

    def open(self, keepalive_timeout: float) -> None:
        """``keepalive_timeout``: seconds an idle pooled connection is kept (below the
        upstreams' own, so that they rarely close one the gateway is about to use)."""
        self._session = without_resend(  # the failover loop decides every retry
            aiohttp.ClientSession(
                connector=_Connector(
                    limit=0,  # bounded per service by Slots instead
                    limit_per_host=0,
                    ttl_dns_cache=10,
                    keepalive_timeout=keepalive_timeout,
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,  # bodies pass through byte for byte
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                trust_env=False,
                raise_for_status=False,
                timeout=aiohttp.ClientTimeout(total=None),
            )
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(
        self,
        request: web.BaseRequest,
        *,
        target: Target,
        path_qs: str,
        body: Body,
        streamed: ClientBody | None,
        connect_timeout: float,
        response_timeout: float,
        forwarding: Forwarding,
        underscores: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send the request to ``target``; return once the upstream's response headers are in.
        Raises ``GatewayError`` for an upstream failure (kind ``stale`` when a reused
        connection was closed under the request), ``ClientGone`` or ``ClientFault`` when the
        client (``streamed``, its body) was at fault. ``underscores``: forward header names
        holding ``_`` (else dropped)."""
        tls = target.tls
        try:
            return await self.session.request(
                request.method,
                URL(target.origin + path_qs, encoded=True),
                headers=request_headers(request, target, forwarding, underscores=underscores),
                data=body,
                allow_redirects=False,
                timeout=_timeouts(connect_timeout, response_timeout),
                # The pool is keyed by these too: a TLS target never gets a plain connection,
                # nor one made with another snapshot's context.
                ssl=True if tls is None else tls.context,
                server_hostname=None if tls is None else tls.server_hostname,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if streamed is not None and streamed.fault is not None:
                raise client_fault(streamed.fault) from exc
            if _client_gone(request):
                raise ClientGone from exc
            failure = upstream_error(exc)
            if failure.kind == "disconnect" and _REUSED.get():
                raise upstream_failure("stale") from exc
            raise failure from exc


def client_fault(fault: GatewayError | ClientGone) -> ClientFault | ClientGone:
    return fault if isinstance(fault, ClientGone) else ClientFault(fault)


@functools.lru_cache(maxsize=256)
def _timeouts(connect: float, response: float) -> aiohttp.ClientTimeout:
    """aiohttp's form of a route's timeouts (routes share a few pairs: cached). ``sock_read``
    starts once the request is sent and restarts with each read: it bounds the wait for the
    response headers and every pause inside the response body."""
    return aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect, sock_read=response)


def response_headers(
    upstream: aiohttp.ClientResponse,
    request_id: str,
    extra: Mapping[str, str] | None,
    redirects: Redirects | None = None,
    added: Added | None = None,
) -> CIMultiDict[str]:
    """The client's answer's headers: the upstream's end-to-end ones, redirects made public,
    ``extra`` set over them, ``added`` (CORS, the security headers) applied."""
    headers = end_to_end(upstream.headers, HOP_BY_HOP)
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
    request: web.BaseRequest,
    upstream: aiohttp.ClientResponse,
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
    # A body of known length follows its headers at once: send both in one write. A body of
    # unknown length (a stream, server-sent events) may take long: its headers go out first.
    kind = OneWrite if upstream.content_length is not None else web.StreamResponse
    response = kind(status=upstream.status, reason=upstream.reason, headers=headers)
    if close:
        response.force_close()
    try:
        await response.prepare(request)
        if request.method != "HEAD" and upstream.status not in _NO_BODY_STATUS:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
        if _client_gone(request):
            upstream.close()
            raise ClientGone from exc
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        # The upstream failed mid-body. Reset the client connection: closing it cleanly
        # would make a truncated body look complete to a client reading until EOF.
        upstream.close()
        reset(request)
        by_client = streamed is not None and streamed.fault is not None
        raise UpstreamAborted(response, by_client=by_client) from exc
    finally:
        upstream.release()
    return response


def reset(request: web.BaseRequest) -> None:
    """Close the client connection with a TCP reset (SO_LINGER 0), not a FIN."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
