"""CORS at the edge, with aiohttp-cors's semantics, and the other headers the gateway adds to
every answer (``security_headers``). Pure: no I/O, no aiohttp; compiled per snapshot into each
``Route`` (``compile_cors``), read per request.

aiohttp-cors itself needs a ``web.Application`` (its ``on_response_prepare`` signal) and a
``UrlDispatcher`` resource per route; the gateway runs the low-level ``web.Server`` with its own
route table, so the library's rules are kept here instead:

- a preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is answered by
  the gateway, never forwarded: the origin, the method and every requested header must be
  allowed, else it is refused (403) without CORS headers;
- every other answer to an allowed origin carries ``Access-Control-Allow-Origin`` (the origin
  echoed), ``-Allow-Credentials: true`` when set and ``-Expose-Headers``; no ``Origin``, or
  one not allowed: none;
- beyond aiohttp-cors: ``Vary: Origin`` on every answer of a CORS route (merged with the
  upstream's), the upstream's own ``Access-Control-*`` removed there (the gateway is then the
  one source), ``*`` sent as ``*`` (never with credentials: the config refuses that), a
  preflight answered 204 with every configured method, and origins compared as origins
  (default ports normalised, ``https://*.domain`` on a dot boundary), not as strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable

    from multidict import MultiMapping, MutableMultiMapping

    from ..config.types import Cors

REQUEST_METHOD: Final = "Access-Control-Request-Method"
REQUEST_HEADERS: Final = "Access-Control-Request-Headers"
ALLOW_ORIGIN: Final = "Access-Control-Allow-Origin"
ALLOW_CREDENTIALS: Final = "Access-Control-Allow-Credentials"
ALLOW_METHODS: Final = "Access-Control-Allow-Methods"
ALLOW_HEADERS: Final = "Access-Control-Allow-Headers"
EXPOSE_HEADERS: Final = "Access-Control-Expose-Headers"
MAX_AGE: Final = "Access-Control-Max-Age"
_PREFIX: Final = "access-control-"
DEFAULT_PORTS: Final = {"http": 80, "https": 443}

# scheme://host[:port], nothing else (an origin never has a path, user or query).
_ORIGIN_RE: Final = re.compile(
    r"(https?)://([a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?"
)
_WILDCARD_RE: Final = re.compile(r"(https?)://\*(\.[a-z0-9.-]+?)(?::([0-9]{1,5}))?")

Origin = tuple[str, str, int]  # scheme, host (lowercase), port (the default one filled in)


def parse_origin(text: str) -> Origin | None:
    """An ``Origin`` header as (scheme, host, port), or None when it is not an http(s)
    origin (``null``, another scheme, a path, a port out of range...)."""
    match = _ORIGIN_RE.fullmatch(text.lower())
    if match is None:
        return None
    scheme, host, port = match.groups()
    number = DEFAULT_PORTS[scheme] if port is None else int(port)
    return (scheme, host, number) if 0 < number < 65536 else None


def parse_host(host: str, scheme: str) -> tuple[str, int] | None:
    """A ``Host`` header as (host, port), the port of ``scheme`` (the request's) by default."""
    match = _ORIGIN_RE.fullmatch(f"{scheme}://{host.lower()}")
    if match is None:
        return None
    _, name, port = match.groups()
    return name, DEFAULT_PORTS[scheme] if port is None else int(port)


def same_origin(origin: str, host: str | None, scheme: str) -> bool:
    """Whether ``origin``'s host and port are the request's ``Host`` (a browser's page on the
    gateway's own name)."""
    parsed = parse_origin(origin)
    own = parse_host(host, scheme) if host and scheme in DEFAULT_PORTS else None
    return parsed is not None and own is not None and parsed[1:] == own


ORIGINS_KEPT: Final = 1024  # Origins whose answer headers are remembered, per policy


@dataclass(frozen=True, slots=True)
class Added:
    """What the gateway adds to one answer: CORS's headers, replacing whatever
    ``Access-Control-*`` the answer had (``cors`` None: a route without CORS, whose answers keep
    the upstream's and get no ``Vary``), and ``defaults`` (the security headers), each only
    where the answer has none of its own."""

    cors: tuple[tuple[str, str], ...] | None
    defaults: tuple[tuple[str, str], ...]

    def apply(self, headers: MutableMultiMapping[str]) -> None:
        if self.cors is not None:
            for name in [n for n in headers if n.lower().startswith(_PREFIX)]:
                headers.popall(name, None)
            headers.extend(self.cors)
            vary_origin(headers)
        for name, value in self.defaults:
            if name not in headers:
                headers[name] = value


def vary_origin(headers: MutableMultiMapping[str]) -> None:
    """Add ``Origin`` to ``Vary``, keeping what is there (one header, values in order)."""
    values = headers.getall("Vary", ())
    if not values:
        headers["Vary"] = "Origin"
        return
    tokens = [t.strip() for value in values for t in value.split(",") if t.strip()]
    if not any(t == "*" or t.lower() == "origin" for t in tokens):
        headers["Vary"] = ", ".join([*tokens, "Origin"])


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a preflight is refused (403, without CORS headers)."""

    message: str


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """One ``cors`` section, compiled: what its answers carry, for each kind of origin."""

    exact: frozenset[Origin]
    wildcards: tuple[tuple[str, str, int], ...]  # scheme, ".domain", port
    any: bool  # "*": every http(s) origin
    null: bool  # "null" listed
    credentials: bool
    methods: frozenset[str]  # upper case
    headers: frozenset[str]  # lower case
    expose: str | None  # the Access-Control-Expose-Headers value
    max_age: str
    defaults: tuple[tuple[str, str], ...]  # the security headers, for Added
    allow_methods: str = field(init=False)
    refused: Added = field(init=False)  # no Origin, or one not allowed
    star: Added | None = field(init=False)  # "*" (never with credentials): one answer for all
    # added() by Origin: a browser app sends the same one on every call (bounded).
    _by_origin: dict[str, Added] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "allow_methods", ", ".join(sorted(self.methods)))
        set_(self, "refused", Added((), self.defaults))
        star = self.any and not self.credentials
        set_(self, "star", Added(self._simple("*"), self.defaults) if star else None)
        set_(self, "_by_origin", {})

    def allows(self, origin: str, *, named: bool = False) -> bool:
        """Whether ``origin`` is allowed; ``named``: by an exact or wildcard entry, not "*"."""
        if origin == "null":
            return self.null
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        if (self.any and not named) or parsed in self.exact:
            return True
        scheme, host, port = parsed
        return any(
            scheme == w_scheme and port == w_port and host.endswith(suffix)
            for w_scheme, suffix, w_port in self.wildcards
        )

    def added(self, origin: str | None) -> Added:
        """What an answer (not a preflight's) to a request from ``origin`` gets."""
        if origin is None:
            return self.refused
        known = self._by_origin.get(origin)
        if known is not None:
            return known
        if not self.allows(origin):
            added = self.refused
        elif self.star is not None and origin != "null":
            added = self.star
        else:
            added = Added(self._simple(origin), self.defaults)
        if len(self._by_origin) >= ORIGINS_KEPT:  # random Origins cannot grow it
            self._by_origin.clear()
        self._by_origin[origin] = added
        return added

    def _simple(self, allow_origin: str) -> tuple[tuple[str, str], ...]:
        headers = [(ALLOW_ORIGIN, allow_origin)]
        if self.credentials:
            headers.append((ALLOW_CREDENTIALS, "true"))
        if self.expose is not None:
            headers.append((EXPOSE_HEADERS, self.expose))
        return tuple(headers)

    def preflight(
        self, origin: str, request_headers: MultiMapping[str]
    ) -> dict[str, str] | Refused:
        """The headers of a preflight's 204, or why it is refused (aiohttp-cors's order: the
        origin, the method, then every requested header)."""
        if not self.allows(origin):
            return Refused("this origin may not call this route")
        if requested_method(request_headers) not in self.methods:
            return Refused("this method is not allowed from other origins")
        requested = _header_list(request_headers.getall(REQUEST_HEADERS, ()))
        if any(name.lower() not in self.headers for name in requested):
            return Refused("a requested header is not allowed from other origins")
        answer = {
            ALLOW_ORIGIN: "*" if self.star is not None and origin != "null" else origin,
            ALLOW_METHODS: self.allow_methods,
            MAX_AGE: self.max_age,
            "Vary": "Origin",
        }
        if requested:
            answer[ALLOW_HEADERS] = ", ".join(requested)
        if self.credentials:
            answer[ALLOW_CREDENTIALS] = "true"
        return answer


def is_preflight(headers: MultiMapping[str]) -> bool:
    """Whether an OPTIONS with these headers is a preflight (else it is a request like any
    other, forwarded)."""
    return REQUEST_METHOD in headers and "Origin" in headers


def requested_method(headers: MultiMapping[str]) -> str:
    """The method a preflight asks about (compared in upper case, as aiohttp-cors does)."""
    return headers.get(REQUEST_METHOD, "").strip().upper()


def _header_list(values: Iterable[str]) -> list[str]:
    """The names of ``Access-Control-Request-Headers``, each once, in order."""
    seen: dict[str, str] = {}
    for value in values:
        for part in value.split(","):
            name = part.strip(" \t")
            if name:
                seen.setdefault(name.lower(), name)
    return list(seen.values())


def security(values: Iterable[tuple[str, str | None]]) -> tuple[tuple[str, str], ...]:
    """The security headers that are set (a null leaves one out)."""
    return tuple((name, value) for name, value in values if value is not None)


def compile_cors(cors: Cors, defaults: tuple[tuple[str, str], ...]) -> CorsPolicy:
    exact: set[Origin] = set()
    wildcards: list[tuple[str, str, int]] = []
    for origin in cors.origins:
        text = origin.lower()
        wildcard = _WILDCARD_RE.fullmatch(text)
        if wildcard is not None:
            scheme, suffix, port = wildcard.groups()
            wildcards.append((scheme, suffix, DEFAULT_PORTS[scheme] if port is None else int(port)))
        elif (parsed := parse_origin(text)) is not None:
            exact.add(parsed)
        elif text not in ("*", "null"):  # pragma: no cover - the config's pattern refuses it
            raise ValueError(f"not an origin: {origin}")
    return CorsPolicy(
        exact=frozenset(exact),
        wildcards=tuple(wildcards),
        any="*" in cors.origins,
        null="null" in cors.origins,
        credentials=cors.credentials,
        methods=frozenset(m.upper() for m in cors.methods),
        headers=frozenset(h.lower() for h in cors.headers),
        expose=", ".join(cors.expose) or None,
        max_age=str(cors.max_age),
        defaults=defaults,
    )


def cors_of(*layers: Cors | str | None) -> Cors | None:
    """The first ``cors`` that is set (a route's, a service's, the top level's); ``none``:
    no CORS."""
    for layer in layers:
        if layer is not None:
            return None if isinstance(layer, str) else layer
    return None
