"""The route table: every public path of a snapshot, compiled once, and the lookup that picks
a request's route (the longest matching path, across every service). Pure, no I/O, and no
imports of the gateway's own (``snapshot`` builds tables from configs).

A route's ``path`` is a prefix that matches on a segment boundary (``/public/`` matches
``/public/x``; ``/api/city`` matches ``/api/city`` and ``/api/city/x``, not ``/api/cityx``), or
the whole path when ``exact``; ``methods`` and ``hosts`` narrow it. Looking a path up costs a
few dict lookups per segment of the request path (of its part no longer than the longest
route), however many routes there are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

API: Final = "/api/"
WS: Final = "/ws/"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    """One compiled route: what it matches and what its matched path becomes upstream."""

    id: str  # its name in metrics and log lines
    path: str  # the public path (a prefix on a segment boundary, or the whole path if exact)
    to: str  # what replaces it upstream
    exact: bool
    methods: frozenset[str] | None  # None: any
    hosts: frozenset[str] | None  # None: any
    websocket: bool
    policy: T  # what a request on it uses (the snapshot's Route)

    def allows(self, method: str) -> bool:
        methods = self.methods
        return methods is None or method in methods or (method == "HEAD" and "GET" in methods)


@dataclass(frozen=True, slots=True)
class Found(Generic[T]):
    entry: Entry[T]
    rest: str  # the request path after the matched path: "to + rest" goes upstream


@dataclass(frozen=True, slots=True)
class Elsewhere:
    """No route has this path, but one has it with a slash appended: redirect there (nginx)."""

    path: str


@dataclass(frozen=True, slots=True)
class WrongMethod:
    """Routes have this path, but not for this method."""

    allowed: frozenset[str]


class RouteTable(Generic[T]):
    """Every route of a snapshot, looked up by path in a fixed number of dict lookups per
    segment of the request path (the longest matching path wins), whatever the table's size.
    Compiled once per snapshot; no regex per request."""

    def __init__(self, entries: Iterable[Entry[T]]) -> None:
        self.entries: tuple[Entry[T], ...] = tuple(
            sorted(entries, key=lambda e: (-len(e.path), not e.exact, e.path))
        )  # match order
        self._exact: dict[str, list[Entry[T]]] = {}
        self._prefix: dict[str, list[Entry[T]]] = {}
        for entry in self.entries:
            (self._exact if entry.exact else self._prefix).setdefault(entry.path, []).append(entry)
        self.by_host = any(entry.hosts is not None for entry in self.entries)
        # Prefix paths that end with "/", without it: a request for one may be a redirect.
        self._slashless = frozenset(p[:-1] for p in self._prefix if len(p) > 1 and p[-1] == "/")
        # No prefix longer than this can match: the walk up a long path starts here, so that
        # a path of many segments costs its length, not its length times its segments.
        self._longest = max(map(len, self._prefix), default=0)

    def match(
        self, path: str, method: str, host: str = ""
    ) -> Found[T] | Elsewhere | WrongMethod | None:
        """The route for a checked ``path``; ``host`` (lowercase, no port) matters only when
        some route names hosts."""
        wrong: set[str] = set()
        exact = self._exact.get(path)
        if exact is not None:
            entry = self._pick(exact, method, host, wrong)
            if entry is not None:
                return Found(entry, "")
        prefixes = self._prefix
        # nginx's order: a prefix route asked for without its slash ("/api/city/admin" for
        # "/api/city/admin/") is a 301 to it, before a shorter route ("/api/city/") can take
        # the path around the longer one's policy; unless a route has the path itself and
        # takes the request (one for other methods would leave it to the shorter route).
        if (
            path in self._slashless  # (no string made per request: the path's hash is kept)
            and _hosted(prefixes.get(path + "/"), host, method)
            and not _hosted(exact, host, method)
            and not _hosted(prefixes.get(path), host, method)
        ):
            return Elsewhere(path + "/")
        for candidate in _prefixes(path, self._longest):
            entries = prefixes.get(candidate)
            if entries is not None:
                entry = self._pick(entries, method, host, wrong)
                if entry is not None:
                    return Found(entry, path[len(candidate) :])
        if wrong:
            return WrongMethod(frozenset(wrong))
        return None

    def _pick(
        self, entries: list[Entry[T]], method: str, host: str, wrong: set[str]
    ) -> Entry[T] | None:
        for entry in entries:
            if entry.hosts is not None and host not in entry.hosts:
                continue
            if entry.allows(method):
                return entry
            if entry.methods is not None:
                wrong |= entry.methods
        return None


def _hosted(entries: list[Entry[T]] | None, host: str, method: str | None = None) -> bool:
    """Whether one of ``entries`` takes ``host`` (and ``method``, if given). A slashed route
    that would not take the method is no reason to redirect: after the hop, the shorter
    route would serve it all the same."""
    return entries is not None and any(
        (e.hosts is None or host in e.hosts) and (method is None or e.allows(method))
        for e in entries
    )


def _prefixes(path: str, longest: int) -> Iterator[str]:
    """The prefixes of ``path`` a route may match, longest first: the path itself, then at
    each "/" the prefix with it and the one without it (``/a/b`` → ``/a/b``, ``/a/``, ``/a``,
    ``/``); none longer than ``longest`` but for one at most (a prefix with its "/" whose
    prefix without it is as long)."""
    size = len(path)
    end = size - 1 if path.endswith("/") else size
    if size <= longest:
        yield path
    if end < size and size > 1 and end <= longest:
        yield path[:-1]
    i = path.rfind("/", 0, min(end, longest + 1))
    while i >= 0:
        yield path[: i + 1]
        if i:
            yield path[:i]
        i = path.rfind("/", 0, i)


def request_host(host_header: str | None) -> str:
    """The host name a request is for: its Host header, lowercase, without the port and
    without the trailing dot of a fully qualified name (``app.example.`` is ``app.example``,
    as nginx reads it)."""
    if not host_header:
        return ""
    host = host_header.lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0].removesuffix(".")
