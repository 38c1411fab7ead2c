"""The one error type the gateway answers with, and the one mapping from client exceptions.

Every answer the gateway produces itself is JSON ``{"error", "message", "request_id"}``.
``kind`` is a fixed, small vocabulary used as a metric label (``gateway_upstream_errors_total``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Final

import aiohttp
import orjson
from aiohttp import web


class GatewayError(Exception):
    """An answer the gateway gives instead of an upstream's.

    ``kind`` is set for upstream failures only (connect, timeout, ...), for metrics.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        kind: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.kind = kind
        self.headers = headers


def upstream_error(exc: BaseException) -> GatewayError:
    """Translate an exception raised before the upstream's response headers arrived."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return GatewayError(
            502,
            "upstream_connect_timeout",
            "the upstream did not accept a connection in time",
            kind="connect_timeout",
        )
    if isinstance(exc, (aiohttp.SocketTimeoutError, asyncio.TimeoutError)):
        return GatewayError(
            504, "upstream_timeout", "the upstream did not answer in time", kind="timeout"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return GatewayError(
            502, "upstream_unavailable", "the upstream refused or is unreachable", kind="connect"
        )
    if isinstance(exc, aiohttp.ClientResponseError):
        # aiohttp reports an unparsable upstream response as a ClientResponseError carrying
        # status 400: that is the upstream's fault, never the client's.
        return GatewayError(
            502, "upstream_bad_response", "the upstream sent an invalid response", kind="protocol"
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return GatewayError(
            502,
            "upstream_disconnected",
            "the upstream closed the connection without answering",
            kind="disconnect",
        )
    return GatewayError(502, "upstream_error", "the upstream connection failed", kind="io")


SERVER: Final = "daarion-gateway"  # instead of aiohttp's, which names its version


def own_headers(request_id: str) -> dict[str, str]:
    """Headers of every answer the gateway makes itself."""
    return {"X-Request-ID": request_id, "Cache-Control": "no-store", "Server": SERVER}


def error_response(err: GatewayError, request_id: str) -> web.Response:
    body = {"error": err.code, "message": err.message, "request_id": request_id}
    return web.Response(
        status=err.status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={**own_headers(request_id), **(err.headers or {})},
    )
