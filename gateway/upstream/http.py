"""HTTP forwarding: the one seam between a routed request and an upstream.

``UpstreamClient`` is the HTTP client every upstream request (and health probe) goes through:
aiohttp's ``ClientSession`` today, with keep-alive pools, no cookies, no decompression and no
silent resend. ``send()`` sends the client's request to one target and returns once the
response headers are in; ``relay()`` streams that response back. Bodies are streamed both ways
with backpressure (only bodies small enough to replay on a retry are read whole); hop-by-hop
headers are dropped both ways; forwarding headers are set (``headers.py``). Failures before
the upstream's headers arrive become a ``GatewayError``; a failure after the response has
started aborts the client connection, so a truncated body never looks complete.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
from collections.abc import Mapping
from typing import Final

import aiohttp
from aiohttp import StreamReader, web
from multidict import CIMultiDict
from yarl import URL

from ..aiohttp_private import OneWrite, without_resend
from ..errors import SERVER, ClientGone, UpstreamAborted, upstream_error
from ..snapshot import Target
from .headers import HOP_BY_HOP, Forwarding, end_to_end, request_headers

_NO_BODY_STATUS: Final = frozenset({204, 304})
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
UPSTREAM_KEEPALIVE: Final = 15.0  # seconds an idle pooled upstream connection is kept


class UpstreamClient:
    """The upstream HTTP client, opened when the gateway starts and closed when it stops."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream client is not open")
        return self._session

    def open(self) -> None:
        self._session = without_resend(  # the failover loop decides every retry
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0,  # bounded per service by Slots instead
                    limit_per_host=0,
                    ttl_dns_cache=10,
                    keepalive_timeout=UPSTREAM_KEEPALIVE,
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
        connect_timeout: float,
        response_timeout: float,
        forwarding: Forwarding,
    ) -> aiohttp.ClientResponse:
        """Send the request to ``target``; return once the upstream's response headers are in."""
        try:
            return await self.session.request(
                request.method,
                URL(target.origin + path_qs, encoded=True),
                headers=request_headers(request, target, forwarding),
                data=body,
                allow_redirects=False,
                timeout=_timeouts(connect_timeout, response_timeout),
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if _client_gone(request):
                raise ClientGone from exc
            raise upstream_error(exc) from exc


@functools.lru_cache(maxsize=256)
def _timeouts(connect: float, response: float) -> aiohttp.ClientTimeout:
    """aiohttp's form of a route's timeouts (routes share a few pairs: cached). ``sock_read``
    starts once the request is sent and restarts with each read: it bounds the wait for the
    response headers and every pause inside the response body."""
    return aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect, sock_read=response)


def response_headers(
    upstream: aiohttp.ClientResponse, request_id: str, extra: Mapping[str, str] | None
) -> CIMultiDict[str]:
    headers = end_to_end(upstream.headers, HOP_BY_HOP)
    if extra:
        headers.update(extra)
    headers["X-Request-ID"] = request_id
    if "Server" not in headers:
        headers["Server"] = SERVER
    return headers


Body = bytes | StreamReader | None


async def read_body(request: web.BaseRequest, buffer_up_to: int) -> Body:
    """The request body as the upstream call takes it: ``None`` without one; ``bytes`` when
    it is at most ``buffer_up_to`` bytes long (so it can be sent again on a retry); else the
    stream itself, passed through as it arrives."""
    if not request.body_exists:
        return None
    if request.version == aiohttp.HttpVersion11 and (
        request.headers.get("Expect", "").lower() == "100-continue"
    ):
        # The client waits for this before sending its body; the gateway answers it itself
        # (and drops Expect upstream) once it has decided to forward the request.
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0
    length = request.content_length
    if length is not None and length <= buffer_up_to:
        return await request.read()
    return request.content


async def relay(
    request: web.BaseRequest,
    upstream: aiohttp.ClientResponse,
    request_id: str,
    extra_headers: Mapping[str, str] | None,
) -> web.StreamResponse:
    """Stream the upstream's response to the client (and release the upstream connection)."""
    headers = response_headers(upstream, request_id, extra_headers)
    # A body of known length follows its headers at once: send both in one write. A body of
    # unknown length (a stream, server-sent events) may take long: its headers go out first.
    kind = OneWrite if upstream.content_length is not None else web.StreamResponse
    response = kind(status=upstream.status, reason=upstream.reason, headers=headers)
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
        raise UpstreamAborted(response) from exc
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
