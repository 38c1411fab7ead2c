"""Path attacks, sent as raw bytes (client libraries would normalise them away), and
property-based checks of the path mapping."""

from __future__ import annotations

import posixpath
import random
import re
import string
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import routing
from gateway.errors import GatewayError
from gateway.routetable import Entry, Found, RouteTable

from .helpers import NODA1, RunningGateway, Upstream, raw_exchange, routes

ATTACKS = [
    b"/api/city/../etc/passwd",
    b"/api/city/%2e%2e/etc/passwd",
    b"/api/city/%2E%2E/x",
    b"/api/city/.%2e/x",
    b"/api/city/%2e./x",
    b"/api/city/%2E%2e/x",
    b"/api/city/./x",
    b"/api/city/%2e/x",
    b"/api/city/x/..",
    b"/api/city/x/%2e%2e",
    b"/api/city/..;/x",
    b"/api/city/%2e%2e;jsessionid=1/x",
    b"/api/city/a%2fb",
    b"/api/city/a%2Fb",
    b"/api/city/..%2f..%2fetc",
    b"/api/city/a%5cb",
    b"/api/city/a%5Cb",
    b"/api/city/..%5c..%5cwindows",
    b"/api/city/a\\b",
    b"/api/city/..\\x",
    b"/api/city/a%00b",
    b"/api/city/a%0d%0aX-Injected:%201",
    b"/api/city/a%7fb",
    b"/api/city/%252e%252e/x",
    b"/api/city/%252f",
    b"/api/city/%255c",
    b"/api/city/a%zz",
    b"/api/city/a%2",
    b"/api/city/a%",
    b"/api/city/a\x00b",
    b"/api/city/a\x01b",
    b"/api/city/a\x7fb",
    b"/api/city/a\tb",
    b"/api/city/caf\xc3\xa9",
    b"/api/city/caf\xe9",  # not UTF-8: the line logged must not be lost to it
    b"/api/city/\xed\xb2\x80",  # a lone surrogate, encoded
    b"http://evil.example/api/city/x",
    b"https://127.0.0.3/api/city/x",
    b"//evil.example/api/city/x",
    b"*",
    b"/api/../api/city/x",
    b"/api/city/x/../../../etc",
    b"/api/%2e%2e/city",
    b"/..%2fapi/city/x",
    b"/api/./city/x",
]


# The same attacks through each form of route: a service's own rules, and written ones.
ROUTE_FORMS = {
    "own rules": "",
    "prefix with slash": ", routes: [{path: /api/city/, to: /city/}]",
    "prefix without slash": ", routes: [{path: /api/city, to: /city}]",
    "to root": ", routes: [{path: /api/city/, to: /}]",
    "root": ", routes: [{path: /, to: /}]",
    "exact": ", routes: [{path: /api/city/x, to: /x, exact: true}, {path: /, to: /}]",
}


@pytest.mark.parametrize("form", ROUTE_FORMS)
@pytest.mark.parametrize("target", ATTACKS, ids=lambda t: t.decode("latin-1"))
async def test_path_attacks_get_400_and_reach_no_upstream(upstream, gateway, target, form):
    up = await upstream(NODA1)
    service = f"{{port: {up.port}, nodes: [noda1]{ROUTE_FORMS[form]}}}"
    gw = await gateway(routes({"city": service}, noda1=NODA1))
    request = b"GET " + target + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    response = await raw_exchange(gw.port, request)
    assert response.status == 400, response.raw[:200]
    body = response.json()
    assert body["error"] in ("bad_path", "bad_request_target", "bad_request")
    assert body["request_id"] == response.header("X-Request-ID")
    assert up.seen == []
    lines = [line for line in gw.log_lines() if line.get("status") == 400]
    assert len(lines) == 1
    assert "traceback" not in lines[0]


async def _guarded(
    upstream: Callable[..., Awaitable[Upstream]],
    gateway: Callable[..., Awaitable[RunningGateway]],
) -> tuple[Upstream, RunningGateway]:
    """An upstream, and a gateway with a guarded /api/city/admin/ beside /api/city/."""
    up = await upstream(NODA1)
    written = "[{path: /api/city/admin/, to: /guarded/}, {path: /api/city/, to: /city/}]"
    gw = await gateway(
        routes({"city": f"{{port: {up.port}, nodes: [noda1], routes: {written}}}"}, noda1=NODA1)
    )
    return up, gw


@pytest.mark.parametrize(
    "target",
    [
        "/api/city/admin/x",
        "/api/city/%61dmin/x",
        "/api/city/adm%69n/x",
        "/api/city/%61%64%6D%69%6E/x",
        "/api/city//admin/x",
        "/api//city///admin//x",
    ],
)
async def test_a_route_sees_the_path_its_upstream_will(upstream, gateway, target):
    # What guards /api/city/admin/ (its auth, its rate limit) cannot be walked around by
    # spelling the path another way: an upstream decodes %61 to "a" (and many merge "//"),
    # so the route is picked on the path so normalized, and that path is what is sent.
    up, gw = await _guarded(upstream, gateway)
    response = await raw_exchange(
        gw.port, f"GET {target}?q=%61 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    assert response.status == 200, response.raw[:200]
    assert [s.raw_path for s in up.seen] == ["/guarded/x?q=%61"]  # the query as it came


@pytest.mark.parametrize("target", ["/api/city/admin", "/api/city/%61dmin", "/api//city/admin"])
async def test_a_guarded_prefix_without_its_slash_is_a_redirect_not_the_shorter_route(
    upstream, gateway, target
):
    # nginx's order: "/api/city/admin" is a 301 to "/api/city/admin/" (whose auth and limits
    # then apply), not the "/api/city/" route's (an upstream with a "/city/admin" handler
    # would have answered it with no token).
    up, gw = await _guarded(upstream, gateway)
    response = await raw_exchange(
        gw.port, f"GET {target}?q=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    assert (response.status, response.header("Location")) == (301, "/api/city/admin/?q=1")
    assert up.seen == []


@pytest.mark.parametrize(
    ("target", "seen"),
    [
        ("/api/a%2Bb/x", "/plus/x"),
        ("/api/a+b/x", "/plus/x"),
        ("/api/users/%40me/x", "/me/x"),
        ("/api/v1/jobs%3Apurge", "/purge"),
        ("/api/v1/jobs%3apurge?q=%40", "/purge?q=%40"),  # (the query as it came)
        ("/api/a%3Bb/x", "/any/a%3Bb/x"),  # an escaped ";" is data: no route has it
    ],
)
async def test_escapes_of_what_a_route_path_holds_take_that_route(upstream, gateway, target, seen):
    # Upstreams decode "%40" and "%2B" in a path (aiohttp, Starlette, Go, nginx's $uri): a
    # route written with "@" or "+" must take their escapes too, or the broader route
    # would take the guarded resource around its auth and limits.
    up = await upstream(NODA1)
    written = (
        '[{path: "/api/a+b/", to: /plus/}, {path: "/api/users/@me/", to: /me/},'
        ' {path: "/api/v1/jobs:purge", to: /purge, exact: true}, {path: /api/, to: /any/}]'
    )
    gw = await gateway(
        routes({"city": f"{{port: {up.port}, nodes: [noda1], routes: {written}}}"}, noda1=NODA1)
    )
    response = await raw_exchange(
        gw.port, f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    assert response.status == 200, response.raw[:200]
    assert [s.raw_path for s in up.seen] == [seen]


@pytest.mark.parametrize(
    "target", ["/api/city/admin;x/y", "/api/city/admin;/y", "/api/city/ad%6Din;v=1/y",
               "/api/city/admin;x"],
)  # fmt: skip
async def test_path_parameters_that_would_take_another_route_are_refused(upstream, gateway, target):
    # Tomcat, Jetty and Spring strip ";parameters" before routing: "/city/admin;x/y" is
    # their "/city/admin/y", which /api/city/admin/ guards. Refused rather than forwarded
    # by the shorter route around that guard.
    up, gw = await _guarded(upstream, gateway)
    response = await raw_exchange(
        gw.port, f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    assert (response.status, response.json()["error"]) == (400, "bad_path"), response.raw[:200]
    assert up.seen == []
    # Parameters that leave the route as it is pass as they came.
    for passing, seen in [("/api/city/rooms;jsessionid=1/y", "/city/rooms;jsessionid=1/y"),
                         ("/api/city/admin/a;b", "/guarded/a;b")]:  # fmt: skip
        response = await raw_exchange(
            gw.port, f"GET {passing} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
        )
        assert response.status == 200, response.raw[:200]
        assert up.seen[-1].raw_path == seen


async def test_random_paths_never_leave_the_prefix(upstream, gateway):
    """A seeded fuzz through the real gateway: what arrives always stays under /city/."""
    up = await upstream(NODA1)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    rng = random.Random(20261127)
    pieces = [
        ".",
        "..",
        "%2e",
        "%2E",
        "%2f",
        "%5c",
        "%25",
        "a",
        "b",
        "/",
        "//",
        ";",
        "%41",
        "~",
        "%",
    ]
    sent = []
    for _ in range(300):
        tail = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        target = f"/api/city/{tail}"
        response = await raw_exchange(
            gw.port, f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
        )
        assert response.status in (200, 400), target
        if response.status == 200:
            sent.append(target)
    assert [s.raw_path for s in up.seen] == [
        normalized(t).replace("/api/city", "/city", 1) for t in sent
    ]
    for seen in up.seen:
        assert _stays_under(seen.raw_path, "/city")
    assert len(sent) > 30  # the fuzz is not all rejected


# Unreserved, and the other characters a route path may hold: the sub-delims but ";", ":", "@".
ROUTABLE = frozenset(string.ascii_letters + string.digits + "-._~" + "!$&'()*+,=" + ":@")


def normalized(path: str) -> str:
    """What the gateway makes of a path it accepts (RFC 3986 6.2.2.2 and nginx's
    merge_slashes), written out independently of routing.py: each escape of a character a
    route path may hold decoded, every run of slashes one slash; the query untouched."""
    path, question, query = path.partition("?")
    decoded = re.sub(
        r"%([0-9A-Fa-f]{2})",
        lambda m: chr(int(m[1], 16)) if chr(int(m[1], 16)) in ROUTABLE else m[0],
        path,
    )
    return re.sub("/+", "/", decoded) + question + query


def _resolve(path: str) -> str:
    """How a lenient server might read a path: decode twice, backslash as slash, resolve dots."""
    decoded = unquote(unquote(path)).replace("\\", "/")
    decoded = re.sub(r"/\.\.;[^/]*", "/..", decoded)
    return posixpath.normpath(decoded if decoded.startswith("/") else "/" + decoded)


def _stays_under(path: str, prefix: str) -> bool:
    resolved = _resolve(path.partition("?")[0])
    return resolved == prefix or resolved.startswith(prefix + "/")


SEGMENT_ALPHABET = st.sampled_from(
    [
        ".",
        "..",
        "%2e",
        "%2E",
        "%2f",
        "%2F",
        "%5c",
        "%5C",
        "%00",
        "%25",
        "%252e",
        "\\",
        ";",
        "a",
        "b",
        "Z",
        "0",
        "-",
        "_",
        "~",
        "%41",
        "%",
        "%g",
        "é",
        " ",
        "\t",
        "?",
        "#",
        ":",
        "@",
        "%40",
        "%2B",
        "%3a",
        "%3B",
        "%26",
        "%3D",
    ]
)
TARGETS = st.lists(st.lists(SEGMENT_ALPHABET, max_size=4).map("".join), max_size=6).map(
    lambda segments: "/api/svc/" + "/".join(segments)
)


def _map(
    target: str, prefix: str, path: str = "/api/svc"
) -> tuple[routing.RequestTarget, str] | int:
    """(checked target, upstream path) through a route from ``path`` to ``prefix``, or the
    error status."""
    table = RouteTable([Entry("svc", path, prefix, False, None, None, False, None)])
    try:
        checked = routing.check_target(target)
        found = table.match(checked.path, "GET")
        assert isinstance(found, Found)
        assert found.entry.id == "svc"
        return checked, routing.upstream_path(found.entry.to, found.rest)
    except GatewayError as err:
        return err.status


# Route forms: (path, to). A service's own rule maps /api/<name> to its http_prefix (which
# may be empty); written routes map a path with or without its trailing slash, or the root.
FORMS = [
    ("/api/svc", "/svc"),
    ("/api/svc", ""),
    ("/api/svc", "/deep/prefix"),
    ("/api/svc/", "/svc/"),
    ("/api/svc/", "/"),
    ("/api/", "/v1/"),
    ("/", "/"),
]


@settings(max_examples=3000, deadline=None)
@given(target=TARGETS, form=st.sampled_from(FORMS))
@example(target="/api/svc/%2e%2e/x", form=("/api/svc", "/svc"))
@example(target="/api/svc/..;/x", form=("/api/svc", ""))
@example(target="/api/svc//x", form=("/api/svc/", "/"))
def test_mapping_is_safe_and_byte_exact(target: str, form: tuple[str, str]) -> None:
    route_path, prefix = form
    outcome = _map(target, prefix, route_path)
    if isinstance(outcome, int):
        assert outcome == 400
        return
    checked, mapped = outcome
    without_fragment = target.partition("#")[0]
    path, question, query = without_fragment.partition("?")
    # Byte exact but for the two normalizations: the upstream path is `to` plus the client's
    # bytes after the route's path, with unreserved escapes decoded and slashes merged.
    assert mapped == (prefix + normalized(path)[len(route_path) :] or "/")
    assert checked.query == question + query
    # Safe: however leniently the upstream decodes it, it stays under the prefix.
    assert not mapped.startswith("//")  # would read as //host to a URL parser
    under = prefix.rstrip("/")  # "/svc/" and "/svc" keep a path under the same directory
    assert _stays_under(mapped, under) if under else _resolve(mapped).startswith("/")


@given(st.text(max_size=40))
def test_check_target_never_fails_other_than_with_a_400(text: str) -> None:
    try:
        routing.check_target("/" + text)
    except GatewayError as err:
        status = err.status
    else:
        status = 200
    assert status in (200, 400)


@pytest.mark.parametrize(
    ("request_bytes", "status", "error"),
    [
        (b"GET /api/city/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "uri_too_long"),
        (b"GET /api/city/ HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431,
         "headers_too_large"),
    ],
)  # fmt: skip
async def test_oversized_request_lines_and_headers(upstream, gateway, request_bytes, status, error):
    up = await upstream(NODA1)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    response = await raw_exchange(gw.port, request_bytes)
    assert response.status == status
    assert response.json()["error"] == error
    assert up.seen == []
