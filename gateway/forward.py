"""HTTP forwarding: the one seam between a routed request and an upstream.

``send()`` sends the client's request to one target over the shared ``ClientSession`` and
returns once the response headers are in; ``relay()`` streams that response back. Bodies are
streamed both ways with backpressure (only bodies small enough to replay on a retry are read
whole); hop-by-hop headers are dropped both ways; forwarding headers are set. Failures before
the upstream's headers arrive become a ``GatewayError``; a failure after the response has
started aborts the client connection, so a truncated body never looks complete.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import StreamReader, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import SERVER, upstream_error
from .snapshot import Target

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers the gateway writes itself; a client's values are replaced (or, for
# X-Forwarded-For, extended). "forwarded" from a client is dropped: only what the gateway
# itself states about the connection reaches upstreams. "expect" is answered by the gateway.
_REPLACED: Final = frozenset(
    {
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "x-request-id",
        "forwarded",
        "expect",
    }
)
_REQUEST_DROP: Final = HOP_BY_HOP | _REPLACED
_NO_BODY_STATUS: Final = frozenset({204, 304})
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class Origin:
    """What the gateway tells the upstream about the request's origin."""

    client: str  # the client address (the peer, or what trusted proxies report)
    proto: str  # http or https, as the client used it
    request_id: str


class ClientGone(Exception):
    """The client went away while its request was being forwarded."""


class UpstreamAborted(Exception):
    """The upstream failed after the response had started; the client connection was aborted.

    ``response`` is the response already under way (its status line went to the client).
    """

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("upstream failed mid-response")
        self.response = response


def end_to_end(
    incoming: CIMultiDictProxy[str] | CIMultiDict[str], drop: frozenset[str]
) -> CIMultiDict[str]:
    """The headers not in ``drop`` (lower-case names) nor named by a Connection header."""
    headers = CIMultiDict(incoming)  # one C-level copy, then the few deletions: cheaper
    connection = incoming.getall("Connection", ())
    if connection:
        drop = drop | {t.strip().lower() for v in connection for t in v.split(",")}
    for name in drop:
        if name in headers:
            del headers[name]  # every header of that name, case-insensitively
    return headers


def request_headers(
    request: web.BaseRequest,
    target: Target,
    origin: Origin,
    also_drop: frozenset[str] = frozenset(),
) -> CIMultiDict[str]:
    incoming = request.headers
    headers = end_to_end(incoming, _REQUEST_DROP | also_drop if also_drop else _REQUEST_DROP)
    peer = request.remote or ""
    prior = ", ".join(incoming.getall("X-Forwarded-For", ()))
    headers["Host"] = f"{target.host}:{target.port}"
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = origin.proto
    if "Host" in incoming:
        headers["X-Forwarded-Host"] = incoming["Host"]
    headers["X-Real-IP"] = origin.client
    headers["X-Request-ID"] = origin.request_id
    return headers


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


async def send(
    session: aiohttp.ClientSession,
    request: web.BaseRequest,
    *,
    target: Target,
    path_qs: str,
    body: Body,
    timeout: aiohttp.ClientTimeout,
    origin: Origin,
) -> aiohttp.ClientResponse:
    """Send the request to ``target``; return once the upstream's response headers are in."""
    try:
        return await session.request(
            request.method,
            URL(target.origin + path_qs, encoded=True),
            headers=request_headers(request, target, origin),
            data=body,
            allow_redirects=False,
            timeout=timeout,
        )
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        if _client_gone(request):
            raise ClientGone from exc
        raise upstream_error(exc) from exc


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
    kind = _KnownLength if upstream.content_length is not None else web.StreamResponse
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


class _KnownLength(web.StreamResponse):
    """Holds the headers back until the first body bytes (or the end), as aiohttp's own
    ``web.Response`` does: one write instead of two for a small answer."""

    _send_headers_immediately = False


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
