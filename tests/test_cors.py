"""CORS owned by the gateway, the security headers, and WebSocket origins by default, through
real sockets: real upstreams (which record what reached them), the gateway, a client."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from gateway.cli import summary
from gateway.config import parse_config

from .helpers import NODA1, NODA2, free_port, limited, routes

APP = "https://app.daarion.city"
CORS = (
    "cors: {origins: [https://app.daarion.city, 'https://*.daarion.city', "
    "http://127.0.0.1:8080], credentials: true, max_age: 120}\n"
)
EXPOSED = "X-Request-ID, RateLimit, RateLimit-Policy, Retry-After"


def cors_headers(response: aiohttp.ClientResponse) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in response.headers.items():
        if name.lower().startswith("access-control-"):
            found.setdefault(name.lower(), []).append(value)
    return found


def city(port: int, extra: str = "", top: str = CORS) -> str:
    return routes({"city": f"{{port: {port}, nodes: [noda1]{extra}}}"}, noda1=NODA1) + top


async def test_an_allowed_origin_gets_one_set_of_cors_headers(upstream, gateway, client):
    up = await upstream()
    gw = await gateway(city(up.port))
    async with client.get(gw.url + "/api/city/rooms", headers={"Origin": APP}) as r:
        assert r.status == 200
        assert cors_headers(r) == {
            "access-control-allow-origin": [APP],
            "access-control-allow-credentials": ["true"],
            "access-control-expose-headers": [EXPOSED],
        }
        assert r.headers.getall("Vary") == ["Origin"]
    assert up.seen[0].header("Origin") == APP  # the upstream still sees who asked


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://evil-daarion.city",  # a look-alike, not a subdomain
        "https://daarion.city.evil.test",
        "https://daarion.city",  # the wildcard is for subdomains
        "http://app.daarion.city",  # another scheme is another origin
        "null",
    ],
)
async def test_another_origin_gets_no_cors_headers(upstream, gateway, client, origin):
    up = await upstream()
    gw = await gateway(city(up.port))
    async with client.get(gw.url + "/api/city/rooms", headers={"Origin": origin}) as r:
        assert r.status == 200  # CORS is the browser's to enforce: the answer still comes
        assert cors_headers(r) == {}
        assert r.headers["Vary"] == "Origin"


async def test_subdomains_and_a_listed_null_are_allowed(upstream, gateway, client):
    up = await upstream()
    top = "cors: {origins: ['https://*.daarion.city', 'null', 'http://127.0.0.1:8080']}\n"
    gw = await gateway(city(up.port, top=top))
    for origin in ("https://x.daarion.city", "https://a.b.daarion.city", "null",
                   "http://127.0.0.1:8080"):  # fmt: skip
        async with client.get(gw.url + "/api/city/", headers={"Origin": origin}) as r:
            assert r.headers.getall("Access-Control-Allow-Origin") == [origin]
            assert "Access-Control-Allow-Credentials" not in r.headers


async def test_a_preflight_is_answered_by_the_gateway_and_never_forwarded(
    upstream, gateway, client
):
    up = await upstream()
    gw = await gateway(city(up.port))
    asked = {
        "Origin": "https://x.daarion.city",
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    async with client.options(gw.url + "/api/city/rooms/1", headers=asked) as r:
        assert r.status == 204
        assert await r.read() == b""
        assert cors_headers(r) == {
            "access-control-allow-origin": ["https://x.daarion.city"],
            "access-control-allow-methods": ["DELETE, GET, HEAD, PATCH, POST, PUT"],
            "access-control-allow-headers": ["authorization, content-type"],
            "access-control-max-age": ["120"],
            "access-control-allow-credentials": ["true"],
        }
        assert r.headers["Vary"] == "Origin"
        assert r.headers["X-Request-ID"]
    assert up.seen == []
    log = [line for line in gw.log_lines() if line["message"] == "request"]
    assert (log[-1]["status"], log[-1]["route"]) == (204, "city")


@pytest.mark.parametrize(
    "asked",
    [
        {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        {"Origin": APP, "Access-Control-Request-Method": "TRACE"},
        {"Origin": APP, "Access-Control-Request-Method": "POST",
         "Access-Control-Request-Headers": "Content-Type, X-Secret"},
    ],
    ids=["origin", "method", "header"],
)  # fmt: skip
async def test_a_preflight_not_allowed_is_refused_403_without_cors_headers(
    upstream, gateway, client, asked
):
    up = await upstream()
    gw = await gateway(city(up.port))
    async with client.options(gw.url + "/api/city/rooms", headers=asked) as r:
        assert r.status == 403
        body = await r.json()
        assert body["error"] == "cors_refused"
        assert body["request_id"] == r.headers["X-Request-ID"]
        assert cors_headers(r) == {}
        assert r.headers["Vary"] == "Origin"  # as every answer of a CORS route
    assert up.seen == []


async def test_an_options_that_is_no_preflight_is_forwarded(upstream, gateway, client):
    up = await upstream()
    gw = await gateway(city(up.port))
    async with client.options(gw.url + "/api/city/rooms", headers={"Origin": APP}) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == APP
    async with client.options(
        gw.url + "/api/city/rooms", headers={"Access-Control-Request-Method": "PUT"}
    ) as r:
        assert r.status == 200
    assert [s.method for s in up.seen] == ["OPTIONS", "OPTIONS"]


async def upstream_with_its_own_cors(request: web.Request) -> web.StreamResponse:
    return web.json_response(
        {"ok": True},
        headers={
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Methods": "GET",
            "Vary": "Accept-Encoding",
            "X-Frame-Options": "SAMEORIGIN",
        },
    )


async def test_the_upstreams_cors_headers_give_way_to_the_gateways(upstream, gateway, client):
    up = await upstream(handler=upstream_with_its_own_cors)
    gw = await gateway(city(up.port))
    async with client.get(gw.url + "/api/city/x", headers={"Origin": APP}) as r:
        assert r.headers.getall("Access-Control-Allow-Origin") == [APP]
        assert "Access-Control-Allow-Methods" not in r.headers
        assert r.headers.getall("Vary") == ["Accept-Encoding, Origin"]
    async with client.get(gw.url + "/api/city/x", headers={"Origin": "https://evil.example"}) as r:
        assert cors_headers(r) == {}  # the upstream's * would have let any page read it


async def test_cors_none_passes_the_upstreams_through(upstream, gateway, client):
    up = await upstream(handler=upstream_with_its_own_cors)
    gw = await gateway(city(up.port, ", cors: none"))
    async with client.get(gw.url + "/api/city/x", headers={"Origin": APP}) as r:
        assert cors_headers(r) == {
            "access-control-allow-origin": ["*"],
            "access-control-allow-methods": ["GET"],
        }
        assert r.headers.getall("Vary") == ["Accept-Encoding"]
    asked = {"Origin": APP, "Access-Control-Request-Method": "PUT"}
    async with client.options(gw.url + "/api/city/x", headers=asked) as r:
        assert r.status == 200  # no CORS here: the upstream answers its own preflights
    assert [s.method for s in up.seen] == ["GET", "OPTIONS"]


async def test_a_route_overrides_its_services_cors(upstream, gateway, client):
    up = await upstream()
    rules = (
        ", cors: {origins: ['https://service.example']}, routes: ["
        "{path: /api/city/, to: /city/}, "
        "{path: /api/city/open/, to: /open/, cors: {origins: ['*']}}, "
        "{path: /api/city/plain/, to: /plain/, cors: none}]"
    )
    gw = await gateway(city(up.port, rules))
    origin = {"Origin": "https://other.example"}
    async with client.get(gw.url + "/api/city/x", headers=origin) as r:
        assert cors_headers(r) == {}
    async with client.get(
        gw.url + "/api/city/x", headers={"Origin": "https://service.example"}
    ) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "https://service.example"
    async with client.get(gw.url + "/api/city/open/x", headers=origin) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    async with client.get(gw.url + "/api/city/plain/x", headers=origin) as r:
        assert cors_headers(r) == {}
        assert "Vary" not in r.headers


async def test_the_gateways_own_errors_carry_cors_headers(upstream, gateway, client):
    dead = free_port(NODA1)  # nothing listens there
    gw = await gateway(city(dead, ", retries: 0, health: {fall: 1}"))
    async with client.get(gw.url + "/api/city/x", headers={"Origin": APP}) as r:
        assert r.status == 502
        assert r.headers.getall("Access-Control-Allow-Origin") == [APP]
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert r.headers["Vary"] == "Origin"
    async with client.get(gw.url + "/api/city/x", headers={"Origin": APP}) as r:
        assert r.status == 503  # every target is out now
        assert r.headers["Access-Control-Allow-Origin"] == APP
    # No route, no CORS policy: a 404 for a path nothing serves says nothing of CORS.
    async with client.get(gw.url + "/api/nothing/x", headers={"Origin": APP}) as r:
        assert r.status == 404
        assert cors_headers(r) == {}


async def test_a_rate_limit_refusal_carries_cors_headers(upstream, gateway, client, redis_prefix):
    up = await upstream()
    gw = await gateway(limited(up.port, "memory://", redis_prefix, "{rate: 1r/m}", extra=CORS))
    statuses = []
    for _ in range(2):
        async with client.get(gw.url + "/api/city/x", headers={"Origin": APP}) as r:
            statuses.append(r.status)
            assert r.headers["Access-Control-Allow-Origin"] == APP
            assert "RateLimit" in r.headers["Access-Control-Expose-Headers"]
    assert statuses == [200, 429]


SECURITY = "security_headers: {referrer_policy: null}\n"


async def test_security_headers_are_added_where_the_answer_has_none(upstream, gateway, client):
    up = await upstream(handler=upstream_with_its_own_cors)
    gw = await gateway(city(up.port, top=SECURITY))
    async with client.get(gw.url + "/api/city/x") as r:
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers.getall("X-Frame-Options") == ["SAMEORIGIN"]  # the upstream's own
        assert "Referrer-Policy" not in r.headers  # null: left out
    for path in ("/api/nothing", "/health"):  # the gateway's own answers too
        async with client.get(gw.url + path) as r:
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["X-Frame-Options"] == "DENY"


async def test_without_security_headers_none_are_added(upstream, gateway, client):
    up = await upstream()
    gw = await gateway(city(up.port, top=""))
    async with client.get(gw.url + "/api/city/x", headers={"Origin": APP}) as r:
        assert "X-Content-Type-Options" not in r.headers
        assert cors_headers(r) == {}
        assert "Vary" not in r.headers


# -- WebSocket origins -------------------------------------------------------------------------


async def ws_hello(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str("hello")
    await ws.close()
    return ws


def ws_city(
    port: int, extra: str = "", top: str = "cors: {origins: [https://app.daarion.city]}\n"
) -> str:
    return (
        routes(
            {"city": f"{{port: {port}, nodes: [noda1], websocket: true{extra}}}"},
            noda1=NODA1,
            noda2=NODA2,
        )
        + top
    )


async def handshake(client: aiohttp.ClientSession, url: str, **headers: str) -> int:
    try:
        ws = await client.ws_connect(url + "/ws/city/rooms/general", headers=headers)
    except aiohttp.WSServerHandshakeError as refused:
        return refused.status
    assert (await ws.receive(timeout=5)).data == "hello"
    await ws.close()
    return 101


async def test_websocket_origins_by_default(upstream, gateway, client):
    up = await upstream(handler=ws_hello)
    gw = await gateway(ws_city(up.port))
    host = f"127.0.0.1:{gw.port}"
    assert await handshake(client, gw.url) == 101  # no Origin: not a browser
    assert await handshake(client, gw.url, Origin=f"http://{host}") == 101  # the same origin
    assert await handshake(client, gw.url, Origin=APP) == 101  # one cors allows
    other_port = f"http://127.0.0.1:{gw.port + 1}"
    for other in ("https://evil.example", other_port, "http://127.0.0.1", "http://localhost"):
        assert await handshake(client, gw.url, Origin=other) == 403, other
    assert len(up.seen) == 3  # the refused ones reached no upstream


async def test_ws_origins_any_accepts_every_origin_and_check_warns(upstream, gateway, client):
    up = await upstream(handler=ws_hello)
    text = ws_city(up.port, ", ws_origins: any", top="")
    gw = await gateway(text)
    assert await handshake(client, gw.url, Origin="https://evil.example") == 101
    report = summary("routes.yaml", parse_config(text, env={}))
    warnings = [line for line in report.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert (
        "services.city: ws_origins: any accepts WebSocket sessions from every origin"
        in (warnings[0])
    )


async def test_a_ws_origins_list_is_exact(upstream, gateway, client):
    up = await upstream(handler=ws_hello)
    gw = await gateway(ws_city(up.port, ", ws_origins: ['https://other.daarion.city']"))
    assert await handshake(client, gw.url, Origin="https://other.daarion.city") == 101
    assert await handshake(client, gw.url, Origin=APP) == 403  # cors's do not count then
    assert await handshake(client, gw.url) == 403  # nor does no Origin


async def test_a_preflight_is_judged_by_the_route_of_the_method_it_announces(
    upstream, gateway, client
):
    """A route for GET only still has its preflights answered (they are OPTIONS)."""
    up = await upstream()
    gw = await gateway(city(up.port, ", routes: [{path: /api/city/, to: /city/, methods: [GET]}]"))
    asked = {"Origin": APP, "Access-Control-Request-Method": "GET"}
    async with client.options(gw.url + "/api/city/x", headers=asked) as r:
        assert r.status == 204
    asked["Access-Control-Request-Method"] = "DELETE"  # no route for it: as any OPTIONS
    async with client.options(gw.url + "/api/city/x", headers=asked) as r:
        assert r.status == 405
        assert cors_headers(r) == {}
    assert up.seen == []
