"""The one error type the gateway answers with, the table of upstream failures (and why a
connection failed in TLS), and the two ways an exchange ends without an answer of the
gateway's own.

Every answer the gateway produces itself is JSON ``{"error", "message", "request_id"}``.
``kind`` is a fixed, small vocabulary used as a metric label (``gateway_upstream_errors_total``)
and by the failover decision (``upstream/failover.py``) to tell what may be retried.
A leaf: every module may import it; of the gateway it imports only the leaf
``aiohttp_private`` (its answers are ``Whole`` ones, written in one write).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Final

import aiohttp
import orjson
from aiohttp import web

from .aiohttp_private import Whole


class GatewayError(Exception):
    """An answer the gateway gives instead of an upstream's.

    ``kind`` is set for upstream failures only (connect, timeout, ...), for metrics.
    ``close``: the client connection cannot be used after this answer (an unread body).
    ``tls``: why the connection to the upstream failed in TLS, when it did (``tls_reason``):
    for the log line, the target's health and ``gateway_upstream_tls_failures_total``; never
    in the client's answer, which is the connect failure's.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        kind: str | None = None,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
        tls: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.kind = kind
        self.headers = headers
        self.close = close  # close the client connection after the answer (an unread body)
        self.tls = tls


class ClientGone(Exception):
    """The client went away while its request was being forwarded."""


class ClientFault(Exception):
    """The client broke its request's limits while it was being forwarded (its body paused
    too long, or grew too big): ``error`` is its answer. Never the upstream's failure."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class UpstreamAborted(Exception):
    """The exchange failed after the response had started; the client connection was aborted.

    ``response`` is the response already under way (its status line went to the client).
    ``by_client``: the client's own body failed (see ``ClientFault``), not the upstream.
    """

    def __init__(self, response: web.StreamResponse, *, by_client: bool = False) -> None:
        super().__init__("upstream failed mid-response")
        self.response = response
        self.by_client = by_client


# The answer for each kind of upstream failure (``GatewayError.kind``), HTTP and WebSocket alike.
_UPSTREAM_FAILURES: Final = {
    "connect": (502, "upstream_unavailable", "the upstream refused or is unreachable"),
    "connect_timeout": (
        502,
        "upstream_connect_timeout",
        "the upstream did not accept a connection in time",
    ),
    "timeout": (504, "upstream_timeout", "the upstream did not answer in time"),
    "protocol": (502, "upstream_bad_response", "the upstream sent an invalid response"),
    "disconnect": (
        502,
        "upstream_disconnected",
        "the upstream closed the connection without answering",
    ),
    "io": (502, "upstream_error", "the upstream connection failed"),
    # The gateway's own machine had no descriptor, buffer or memory for the connection: its
    # fault, not the target's (never counted against it, nor retried elsewhere).
    "local": (
        503,
        "gateway_overloaded",
        "the gateway has no room for another upstream connection now; try again",
    ),
    # A kept-alive connection the upstream closed as the request was written on it: retried
    # where safe, and not counted against the target.
    "stale": (
        502,
        "upstream_disconnected",
        "the upstream closed the connection without answering",
    ),
}


def upstream_failure(kind: str, tls: str | None = None) -> GatewayError:
    """The answer for an upstream failure of ``kind`` (a key of the table above); ``tls``:
    the TLS reason, when that is how it failed."""
    status, code, message = _UPSTREAM_FAILURES[kind]
    return GatewayError(status, code, message, kind=kind, tls=tls)


def tls_reason(exc: BaseException) -> str | None:
    """Why a connection failed in TLS, or None when it did not: ``certificate verify failed:
    <OpenSSL's reason>`` (an unknown issuer, a name the certificate does not carry, expiry...)
    or ``TLS handshake failed: <reason>`` (no common version, a plain HTTP port...). Takes
    the ``ssl`` error itself or aiohttp's connect error around it."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        exc = exc.os_error
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {(exc.reason or str(exc)).lower().replace('_', ' ')}"
    return None


SERVER: Final = "daarion-gateway"  # instead of aiohttp's, which names its version


def own_headers(request_id: str) -> dict[str, str]:
    """Headers of every answer the gateway makes itself."""
    return {"X-Request-ID": request_id, "Cache-Control": "no-store", "Server": SERVER}


def error_response(err: GatewayError, request_id: str) -> web.StreamResponse:
    body = {"error": err.code, "message": err.message, "request_id": request_id}
    headers = {**own_headers(request_id), "Content-Type": "application/json"}
    if err.headers:
        headers.update(err.headers)
    return Whole(status=err.status, headers=headers, body=orjson.dumps(body))
