"""The headers an upstream gets, for HTTP requests and WebSocket handshakes alike: hop-by-hop
headers dropped, names with an underscore dropped (unless the route's
``underscores_in_headers``), what a client could spoof removed (identity headers always; from a
peer that is not a trusted proxy, client-address, X-Forwarded-* and override headers), the
forwarding headers stated by the gateway, and the identity of a verified token."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDict, CIMultiDictProxy

from ..edge.trusted import CLIENT_ADDRESS, IDENTITY, OVERRIDES

if TYPE_CHECKING:
    from ..request import Request
    from ..snapshot import Target

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
        "traceparent",
        "forwarded",
        "expect",
    }
)
_REQUEST_DROP: Final = HOP_BY_HOP | _REPLACED


@dataclass(frozen=True, slots=True)
class Forwarding:
    """What the gateway tells the upstream about where the request came from, and who."""

    client: str  # the client address (the peer, or what trusted proxies report)
    proto: str  # http or https, as the client used it
    request_id: str
    trusted_peer: bool = False  # the peer is a trusted proxy: its X-Forwarded-* are kept
    identity: tuple[tuple[str, str], ...] = ()  # headers from the verified token
    strip: frozenset[str] = IDENTITY  # identity header names (lower-case, '-'), removed
    traceparent: str | None = None  # the gateway span's (W3C Trace Context), replacing any
    keep_tracestate: bool = True  # False when the client's traceparent was not continued


@functools.lru_cache(maxsize=4096)
def _spoofed(names: tuple[str, ...], trusted_peer: bool, strip: frozenset[str]) -> tuple[str, ...]:
    """The names of a request's headers that ``spoofable`` removes. Requests of one client
    send the same names in the same order: one lookup per request, not one per header."""
    return tuple(name for name in names if spoofable(name, trusted_peer, strip))


@functools.lru_cache(maxsize=1024)
def spoofable(name: str, trusted_peer: bool, strip: frozenset[str]) -> bool:
    """Whether a client's header ``name`` is removed before forwarding: an identity header
    (however spelled: case, '_' for '-'), and, from a peer that is not a trusted proxy, a
    client-address, X-Forwarded-* or override header. (Header names repeat: cached.)"""
    key = name.lower().replace("_", "-")
    if key in strip:
        return True
    if trusted_peer:
        return False
    return key.startswith("x-forwarded-") or key in CLIENT_ADDRESS or key in OVERRIDES


def end_to_end(
    incoming: CIMultiDictProxy[str] | CIMultiDict[str], drop: frozenset[str]
) -> CIMultiDict[str]:
    """A copy of the headers not in ``drop`` (lower-case names) nor named by a Connection
    header."""
    # One C-level copy, then the few deletions: cheaper than copying header by header.
    return only_end_to_end(CIMultiDict(incoming), drop)


def only_end_to_end(headers: CIMultiDict[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """``headers`` itself, without those in ``drop`` nor named by a Connection header (for
    headers of the gateway's own, which need no copy)."""
    connection = headers.getall("Connection", ())
    if connection:
        drop = drop | {t.strip().lower() for v in connection for t in v.split(",")}
    for name in drop:
        if name in headers:
            del headers[name]  # every header of that name, case-insensitively
    return headers


def public_host(
    incoming: CIMultiDictProxy[str] | CIMultiDict[str], trusted_peer: bool
) -> str | None:
    """The host the client asked for: a trusted proxy's ``X-Forwarded-Host`` (the client's
    Host reached the proxy, not the gateway), else the request's own ``Host``."""
    if trusted_peer:
        forwarded = incoming.get("X-Forwarded-Host")
        if forwarded:
            return forwarded
    return incoming.get("Host")


def request_headers(
    request: Request,
    target: Target,
    forwarding: Forwarding,
    also_drop: frozenset[str] = frozenset(),
    *,
    underscores: bool = False,
) -> CIMultiDict[str]:
    """``underscores``: keep header names holding ``_`` (nginx's ``underscores_in_headers``).
    Dropped otherwise, as nginx does: a backend that maps ``X-Real-IP`` and ``X_Real_IP`` to
    the same variable (CGI, WSGI, PHP) would otherwise believe the client's spoof of a header
    the gateway sets."""
    incoming = request.headers
    headers = end_to_end(incoming, _REQUEST_DROP | also_drop if also_drop else _REQUEST_DROP)
    # One C-level join and search of the names (~0.2 us): the usual request has no "_".
    if not underscores and "_" in "".join(incoming):
        for name in {name for name in headers if "_" in name}:
            del headers[name]
    for name in _spoofed(tuple(headers), forwarding.trusted_peer, forwarding.strip):
        if name in headers:
            del headers[name]
    peer = request.remote or ""
    prior = ", ".join(incoming.getall("X-Forwarded-For", ())) if forwarding.trusted_peer else ""
    headers["Host"] = target.authority  # an IPv6 node's address in brackets (RFC 3986)
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = forwarding.proto
    host = public_host(incoming, forwarding.trusted_peer)
    if host is not None:
        headers["X-Forwarded-Host"] = host
    headers["X-Real-IP"] = forwarding.client
    headers["X-Request-ID"] = forwarding.request_id
    if forwarding.traceparent is not None:
        headers["traceparent"] = forwarding.traceparent
    if not forwarding.keep_tracestate and "tracestate" in headers:
        del headers["tracestate"]  # W3C: an invalid traceparent's tracestate is not passed on
    for name, value in forwarding.identity:
        headers[name] = value
    return headers
