"""Strict HTTP/1.1 at the edge: what a request must be before anything reads it further.

Two halves, because aiohttp's C parser (llhttp, strict for requests) refuses part of it
itself and lets the rest through:

- ``check(request)``, the pipeline's first phase, refuses what the parser accepts: request-line
  versions other than HTTP/1.0 and HTTP/1.1 (llhttp takes ``HTTP/2.0``, ``HTTP/0.9`` and a
  request line with no version at all, which it reads as HTTP/0.9) with 505; a
  ``Transfer-Encoding`` other than ``chunked`` alone (llhttp takes ``gzip, chunked`` and
  decodes only the chunked framing, silently dropping the gzip coding) with 501 (RFC 9112
  §6.1); and ``Transfer-Encoding`` in an HTTP/1.0 request with 400 (RFC 9112 §6.1: its
  framing is faulty).
- ``parse_error(exc)``, for ``Protocol.handle_error``, names what the parser refused: an
  unknown version (``HTTP/1.2``, ``HTTP/3.0``) is 505, an unsupported transfer coding 501,
  a control byte in a header value (or a bad byte in a name) 400 ``bad_header``. llhttp
  describes what it refused in English only; the phrases below are matched against the
  locked aiohttp's (``tests/test_strict_http.py`` fails when an upgrade changes them).

Every answer here closes the connection, and goes out with an HTTP/1.1 status line whatever
version the request named. Header *values* need no check of their own: llhttp refuses every
CTL but HTAB in a request header (0x00-0x08, 0x0A-0x1F, 0x7F); obs-text (0x80-0xFF) is
allowed and reaches the upstream byte for byte (``upstream/client.request_head``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from aiohttp import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine

from ..errors import GatewayError
from ..request import answer_in_http11

if TYPE_CHECKING:
    from ..request import Request

_VERSIONS: Final = frozenset({HttpVersion10, HttpVersion11})
# 5xx answers that describe the client's request, not a failure of the gateway: logged as a
# bad request, without a traceback.
CLIENT_5XX: Final = frozenset({501, 505})
# HTTP/1.1 says it with close=True; an HTTP/1.0 client gets it said too.
_CLOSE: Final = {"Connection": "close"}


def version_not_supported() -> GatewayError:
    return GatewayError(
        505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served",
        headers=_CLOSE, close=True,
    )  # fmt: skip


def unsupported_transfer_coding() -> GatewayError:
    return GatewayError(
        501,
        "unsupported_transfer_coding",
        "the only transfer coding accepted is chunked",
        headers=_CLOSE,
        close=True,
    )


def bad_header() -> GatewayError:
    return GatewayError(
        400, "bad_header", "a request header holds a forbidden byte",
        headers=_CLOSE, close=True,
    )  # fmt: skip


def check(request: Request) -> None:
    """Refuse (``GatewayError``) a request the parser took that the gateway does not serve."""
    version = request.version
    if version not in _VERSIONS:
        answer_in_http11(request)
        raise version_not_supported()
    coding = request.headers.get("Transfer-Encoding")
    if coding is not None:
        if version == HttpVersion10:
            raise GatewayError(
                400, "bad_request", "an HTTP/1.0 request cannot use Transfer-Encoding",
                headers=_CLOSE, close=True,
            )  # fmt: skip
        # Coding names are case-insensitive (RFC 9112 §7); the parser strips the OWS.
        if coding != "chunked" and coding.lower() != "chunked":
            raise unsupported_transfer_coding()


# What llhttp (through aiohttp's C parser) says when it refuses each kind of request.
_BAD_VERSION: Final = "Invalid HTTP version"
_TRANSFER_CODING: Final = (
    "Request has invalid `Transfer-Encoding`",  # an unknown coding, or chunked not last
    "Invalid `Transfer-Encoding` header value",  # chunked twice, in one field or two
    "Duplicate 'Transfer-Encoding' header found",  # two fields (aiohttp's own check)
)
_HEADER_BYTES: Final = (
    "Invalid header value char",  # a CTL in a value
    "Missing expected LF after header value",  # a bare CR in a value
    "Missing expected CR after header value",  # a bare LF in a value
    "Invalid header token",  # a name with a byte outside tchar
    "Invalid header field char",
)


def parse_error(exc: BaseException | None) -> GatewayError | None:
    """The answer for a request the parser refused, when this module has one to give."""
    if isinstance(exc, BadStatusLine):
        return version_not_supported() if _BAD_VERSION in exc.message else None
    if isinstance(exc, BadHttpMessage):
        message = exc.message
        if any(phrase in message for phrase in _TRANSFER_CODING):
            return unsupported_transfer_coding()
        if any(phrase in message for phrase in _HEADER_BYTES):
            return bad_header()
    return None
