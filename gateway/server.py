"""The HTTP server the clients connect to: aiohttp's low-level ``web.Server`` with a protocol
class of the gateway's own.

Why ``web.Server`` and not ``web.Application``: the gateway has exactly one catch-all handler
(``pipeline.handle``), so the router and middleware chain would only add work on the hot
path; and owning the protocol class lets requests that the HTTP parser itself rejects get the
same JSON error body, request id and single log line as every other error, counts client
connections, and lets a WebSocket relay take a connection over (``detach``). The aiohttp
internals this needs are all in ``aiohttp_private.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from . import logs
from .aiohttp_private import answer_in_http11, detach, protocol_factory
from .edge import strict
from .errors import GatewayError, error_response
from .logs import REQUEST_ID, new_request_id
from .metrics import UNMATCHED, Metrics

log = logging.getLogger("gateway")

# Client-side limits, in the spirit of nginx's defaults. The two size limits differ by design:
# aiohttp's LineTooLong carries only the limit it hit, which tells 414 from 431.
MAX_REQUEST_LINE: Final = 8190
MAX_HEADER_FIELD: Final = 8192
SERVER_LIMITS: Final[dict[str, Any]] = {
    "keepalive_timeout": 75.0,  # idle keep-alive connections are closed after this
    "max_line_size": MAX_REQUEST_LINE,  # beyond it: 414
    "max_field_size": MAX_HEADER_FIELD,  # one header name or value; beyond it: 431
    "max_headers": 100,
    "lingering_time": 2.0,  # how long an unread request body is drained after an early answer
}

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Server(web.Server):
    """Makes ``Protocol`` connections that hand every request to ``handler``."""

    def __init__(self, handler: Handler, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.metrics = metrics
        self._make = protocol_factory(self, Protocol)

    def __call__(self) -> web.RequestHandler:
        return self._make()


class Protocol(web.RequestHandler):
    """aiohttp's HTTP protocol, with the gateway's JSON answer for unparsable requests."""

    def __init__(self, manager: Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._metrics = manager.metrics

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._metrics.client_connections.inc()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._metrics.client_connections.dec()

    def detach(self) -> tuple[asyncio.Transport, bytes] | None:
        """Let go of the connection for a WebSocket relay, which takes the transport and what
        the client sent after its handshake. None when the client has gone already. (The
        relay's session decrements ``gateway_client_connections`` when it ends.)"""
        return detach(self)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
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
            # traceback, only the first line of aiohttp's description.
            fields["detail"] = (message or str(exc or "")).strip().partition("\n")[0][:200]
            logs.access("bad request", fields)
        self._metrics.observe_request(UNMATCHED, UNMATCHED, "OTHER", err.status, 0.0)
        answer_in_http11(request)  # not aiohttp's HTTP/1.0; and so with Connection: close
        response = error_response(err, request_id)
        response.force_close()
        return response


def _parse_error(status: int, exc: BaseException | None) -> GatewayError:
    refused = strict.parse_error(exc)  # an HTTP version, a transfer coding, a header's bytes
    if refused is not None:
        return refused
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (MAX_REQUEST_LINE,):
            return GatewayError(414, "uri_too_long", "the request line is too long")
        return GatewayError(431, "headers_too_large", "a request header is too long")
    if isinstance(exc, BadHttpMessage) or status == 400:
        return GatewayError(400, "bad_request", "the request is not valid HTTP/1.1")
    if status == 504:
        return GatewayError(504, "timeout", "the request took too long")
    return GatewayError(500, "internal_error", "the gateway failed to handle the request")
