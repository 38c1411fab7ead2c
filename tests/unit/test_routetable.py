"""The route table: the longest matching path wins across services, on segment boundaries;
exact, methods and hosts narrow a route; lookups cost the same however big the table."""

from __future__ import annotations

import random

import pytest

from gateway.routetable import (
    Elsewhere,
    Entry,
    Found,
    RouteTable,
    WrongMethod,
    _prefixes,
    request_host,
)


def route(
    name: str,
    path: str,
    to: str = "/",
    *,
    exact: bool = False,
    methods: set[str] | None = None,
    hosts: set[str] | None = None,
    websocket: bool = False,
) -> Entry[str]:
    return Entry(
        name, path, to, exact,
        None if methods is None else frozenset(methods),
        None if hosts is None else frozenset(hosts),
        websocket, name,
    )  # fmt: skip


def hit(found: object) -> tuple[str, str] | object:
    """A found route as (name, rest); anything else as it is."""
    return (found.entry.id, found.rest) if isinstance(found, Found) else found


def name_of(found: object) -> str | None:
    return found.entry.id if isinstance(found, Found) else None


CITY = RouteTable(
    [
        route("snapshot", "/api/city/snapshot", "/api/city/snapshot"),
        route("admin", "/api/city/admin/", "/city/admin/"),
        route("city", "/api/city/", "/city/"),
        route("public", "/public/", "/public/"),
        route("uploads", "/static/uploads/", "/static/uploads/", methods={"GET"}),
        route("events", "/ws/events", "/ws/events", exact=True, websocket=True),
        route("rooms", "/ws/city/", "/ws/city/", websocket=True),
        route("agents", "/api/agents"),
        route("frontend", "/", "/"),
    ]
)


@pytest.mark.parametrize(
    ("path", "name", "rest"),
    [
        ("/api/city/snapshot", "snapshot", ""),
        ("/api/city/snapshot/2026", "snapshot", "/2026"),
        ("/api/city/snapshotx", "city", "snapshotx"),  # a segment boundary, not a prefix
        ("/api/city/rooms", "city", "rooms"),
        ("/api/city/admin/users", "admin", "users"),
        ("/public/map", "public", "map"),
        ("/publicity", "frontend", "publicity"),
        ("/ws/events", "events", ""),
        ("/ws/events/more", "frontend", "ws/events/more"),  # exact: the whole path only
        ("/ws/city/rooms/general", "rooms", "rooms/general"),
        ("/api/agents", "agents", ""),
        ("/api/agents/invoke", "agents", "/invoke"),
        ("/api/agentsx", "frontend", "api/agentsx"),
        ("/", "frontend", ""),
        ("/index.html", "frontend", "index.html"),
    ],
)
def test_the_longest_matching_path_wins(path: str, name: str, rest: str) -> None:
    assert hit(CITY.match(path, "GET")) == (name, rest)


def test_methods_narrow_a_route_and_fall_through_to_a_shorter_one() -> None:
    assert name_of(CITY.match("/static/uploads/a.png", "HEAD")) == "uploads"  # GET takes HEAD
    assert name_of(CITY.match("/static/uploads/a.png", "POST")) == "frontend"
    alone = RouteTable([route("uploads", "/static/", "/static/", methods={"GET", "PUT"})])
    assert alone.match("/static/a", "DELETE") == WrongMethod(frozenset({"GET", "PUT"}))


def test_hosts_narrow_a_route() -> None:
    table = RouteTable(
        [
            route("space", "/", hosts={"app.daarion.space"}),
            route("city", "/", hosts={"gateway.daarion.city"}),
            route("any", "/api/"),
        ]
    )
    assert table.by_host
    assert name_of(table.match("/x", "GET", "app.daarion.space")) == "space"
    assert name_of(table.match("/x", "GET", "gateway.daarion.city")) == "city"
    assert table.match("/x", "GET", "evil.example") is None
    assert name_of(table.match("/api/x", "GET", "evil.example")) == "any"
    assert not CITY.by_host


def test_a_prefix_without_its_slash_is_sent_to_it() -> None:
    table = RouteTable([route("public", "/public/", "/public/")])
    assert table.match("/public", "GET") == Elsewhere("/public/")
    assert table.match("/publicx", "GET") is None
    assert table.match("/other", "GET") is None


def test_the_redirect_to_a_slashed_prefix_comes_before_a_shorter_route() -> None:
    # As nginx: the shorter "/api/city/" does not take "/api/city/admin" around the policy of
    # "/api/city/admin/" (CITY's "/" would take "/public" the same way).
    assert CITY.match("/api/city/admin", "GET") == Elsewhere("/api/city/admin/")
    assert CITY.match("/public", "POST") == Elsewhere("/public/")
    assert name_of(CITY.match("/api/city/adminx", "GET")) == "city"
    # A route of the path itself wins (exact, or a prefix without the slash) for its methods;
    # for the others the redirect stands: the shorter route would take them around the
    # slashed one's policy. A slashed route for another host is no reason to redirect.
    table = RouteTable(
        [
            route("slashed", "/a/"),
            route("bare", "/a", exact=True, methods={"GET"}),
            route("b", "/b/", hosts={"b.example"}),
            route("root", "/"),
        ]
    )
    assert name_of(table.match("/a", "GET")) == "bare"
    assert table.match("/a", "POST") == Elsewhere("/a/")
    assert name_of(table.match("/a", "HEAD")) == "bare"  # (GET's)
    assert table.match("/b", "GET", "b.example") == Elsewhere("/b/")
    assert name_of(table.match("/b", "GET", "other.example")) == "root"
    # Nor is one that does not take the method: after the hop the shorter route would serve.
    posts = RouteTable([route("city", "/api/city/"), route("p", "/api/p/", methods={"POST"})])
    assert posts.match("/api/p", "POST") == Elsewhere("/api/p/")
    assert name_of(posts.match("/api/p", "GET")) is None  # nothing takes GET /api/p


def test_a_prefix_of_the_same_path_for_other_methods_does_not_cancel_the_redirect() -> None:
    table = RouteTable(
        [route("admin", "/api/city/admin/"), route("landing", "/api/city/admin", methods={"GET"}),
         route("city", "/api/city/")]
    )  # fmt: skip
    assert name_of(table.match("/api/city/admin", "GET")) == "landing"
    for method in ("POST", "DELETE", "PUT"):
        assert table.match("/api/city/admin", method) == Elsewhere("/api/city/admin/")


ROUTES = [
    route("admin", "/api/city/admin/"), route("x", "/api/city/x", exact=True),
    route("city", "/api/city/"), route("bare", "/api/agents"), route("root", "/"),
]  # fmt: skip


def test_a_path_of_many_segments_costs_only_its_part_as_long_as_the_longest_route() -> None:
    # Each candidate prefix is a slice hashed in a dict lookup: walked from the end of an
    # 8 KB path of 4,000 segments, that was 8,000 slices of up to 8 KB per request (quadratic,
    # before any rate limit). No route is longer than 16 characters here: the walk starts
    # there, and the answers are those of the unbounded walk.
    table = RouteTable(ROUTES)
    path = "/api/city/" + "a/" * 4000
    walked = list(_prefixes(path, 16))
    assert len(walked) <= 2 * path[:17].count("/") + 2
    assert max(map(len, walked)) <= 17
    assert hit(table.match(path, "GET")) == ("city", path.removeprefix("/api/city/"))
    rng = random.Random(20261206)
    pieces = ["api", "city", "admin", "agents", "x", "a", ""]
    for _ in range(5000):
        path = "/" + "/".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        unbounded = [c for c in _prefixes(path, len(path)) if len(c) <= 16]
        assert [c for c in _prefixes(path, 16) if len(c) <= 16] == unbounded, path


def test_match_order_is_longest_first_and_exact_before_prefix() -> None:
    table = RouteTable([route("a", "/a"), route("root", "/"), route("ax", "/a", exact=True)])
    assert [e.id for e in table.entries] == ["ax", "a", "root"]
    assert name_of(table.match("/a", "GET")) == "ax"


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("App.Daarion.Space:443", "app.daarion.space"),
        ("gateway.daarion.city", "gateway.daarion.city"),
        ("[::1]:8080", "[::1]"),
        # The fully qualified form names the same host (nginx strips the dot too): a route
        # narrowed to app.example must not be walked around with "app.example.".
        ("app.example.", "app.example"),
        ("App.Example.:8443", "app.example"),
        (None, ""),
        ("", ""),
    ],
)
def test_request_host(header: str | None, host: str) -> None:
    assert request_host(header) == host


def test_a_big_table_finds_every_route_by_its_path() -> None:
    # Correctness only: what a lookup costs as the table grows is bench/routes.py's.
    big = RouteTable([route(f"r{i}", f"/api/s{i}/") for i in range(1000)])
    assert hit(big.match("/api/s777/a/b", "GET")) == ("r777", "a/b")
    assert big.match("/api/s1000/a", "GET") is None
