"""Authentication through the whole gateway: 401 and 403 answers, identity headers the
upstream gets (and only those), WebSocket tokens in the query or a subprotocol, the rate
limiter's user key, the log line and the metric."""

from __future__ import annotations

import time

import aiohttp
import pytest
from aiohttp import web

from .helpers import NODA1, raw_exchange, routes, sample
from .jwtkit import ISSUER, SECRET, claims, mint

AUTH = (
    "auth:\n"
    "  providers:\n"
    f"    daarion: {{algorithms: [HS256], secret: '{SECRET}', issuer: '{ISSUER}',"
    " claims: {type: access}}\n"
)


def token(**changes: object) -> str:
    return mint(claims(now=time.time(), **changes))


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def config(port: int, auth: str, extra: str = "") -> str:
    service = f"{{port: {port}, nodes: [noda1], websocket: true, auth: {auth}{extra}}}"
    return routes({"city": service}, noda1=NODA1) + AUTH


async def answer(client, url: str, headers: dict[str, str] | None = None):
    async with client.get(url, headers=headers or {}) as r:
        body = await r.json() if r.content_type == "application/json" else None
        return r.status, r.headers, body


async def test_required_refuses_missing_invalid_expired_and_refresh_tokens(
    upstream, gateway, client
):
    up = await upstream(NODA1)
    gw = await gateway(config(up.port, "required"))
    url = f"{gw.url}/api/city/rooms"
    status, headers, body = await answer(client, url)
    assert (status, body["error"]) == (401, "missing_token")
    assert headers["WWW-Authenticate"] == 'Bearer realm="daarion"'
    assert body["request_id"] == headers["X-Request-ID"]
    for bad, code in (
        ("not-a-token", "invalid_token"),
        (token(exp=int(time.time()) - 3600), "token_expired"),
        (token(type="refresh"), "invalid_token"),
        (token(iss="someone-else"), "invalid_token"),
        (mint(claims(now=time.time()), key="another secret of at least 32 bytes"), "invalid_token"),
    ):
        status, headers, body = await answer(client, url, bearer(bad))
        assert (status, body["error"]) == (401, code), bad
        assert headers["WWW-Authenticate"] == 'Bearer realm="daarion", error="invalid_token"'
    assert up.seen == []  # nothing unauthenticated reached the service
    async with client.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    assert sample(text, 'gateway_auth_total{result="missing_token",service="city"}') == 1
    assert sample(text, 'gateway_auth_total{result="token_expired",service="city"}') == 1
    assert sample(text, 'gateway_auth_total{result="invalid_token",service="city"}') == 4


async def test_a_valid_token_passes_with_its_identity_and_nothing_spoofed(
    upstream, gateway, client
):
    up = await upstream(NODA1)
    gw = await gateway(config(up.port, "required"))
    good = token(email="olena@daarion.city", roles=["citizen", "builder"])
    headers = {**bearer(good), "X-User-Id": "admin", "x_user_roles": "root"}
    status, _, _ = await answer(client, f"{gw.url}/api/city/rooms?x=1", headers)
    assert status == 200
    (seen,) = up.seen
    assert seen.header("X-User-Id") == "user-1"
    assert seen.header("X-User-Roles") == "citizen,builder"
    assert seen.header("X-User-Email") == "olena@daarion.city"
    assert seen.header("Authorization") == f"Bearer {good}"  # services may read it
    assert [name for name, _ in seen.headers if name.lower() == "x-user-id"] == ["X-User-Id"]
    line = next(x for x in gw.log_lines() if x.get("path") == "/api/city/rooms")
    assert line["user"] == "user-1"
    assert good not in str(gw.log_lines())


async def test_roles_are_checked_and_optional_lets_the_anonymous_through(upstream, gateway, client):
    up = await upstream(NODA1)
    gw = await gateway(config(up.port, "{mode: required, roles: [member, admin]}"))
    status, headers, body = await answer(client, f"{gw.url}/api/city/x", bearer(token()))
    assert (status, body["error"]) == (403, "insufficient_scope")
    assert headers["WWW-Authenticate"] == 'Bearer realm="daarion", error="insufficient_scope"'
    status, _, _ = await answer(client, f"{gw.url}/api/city/x", bearer(token(roles="member")))
    assert status == 200
    up2 = await upstream(NODA1)
    gw2 = await gateway(config(up2.port, "optional"))
    status, _, _ = await answer(client, f"{gw2.url}/api/city/x", {"X-User-Id": "admin"})
    assert status == 200
    assert up2.seen[-1].header("X-User-Id") is None  # anonymous: no identity, and no spoof
    status, _, body = await answer(client, f"{gw2.url}/api/city/x", bearer("garbage"))
    assert (status, body["error"]) == (401, "invalid_token")


async def test_a_route_can_lift_its_services_auth(upstream, gateway, client):
    up = await upstream(NODA1)
    service = (
        f"{{port: {up.port}, nodes: [noda1], auth: required, routes: ["
        "{path: /api/city/public/, to: /public/, auth: none},"
        "{path: /api/city/, to: /city/}]}"
    )
    gw = await gateway(routes({"city": service}, noda1=NODA1) + AUTH)
    assert (await answer(client, f"{gw.url}/api/city/public/a"))[0] == 200
    assert (await answer(client, f"{gw.url}/api/city/rooms"))[0] == 401


async def test_the_limiters_user_key_is_the_tokens_subject(upstream, gateway, client):
    up = await upstream(NODA1)
    text = config(up.port, "required", ", rate_limit: per_user") + (
        "rate_limits: {per_user: {rate: 1r/m, burst: 0, key: [user]}}\n"
    )
    gw = await gateway(text)
    url = f"{gw.url}/api/city/x"
    alice, bob = bearer(token(sub="alice")), bearer(token(sub="bob"))
    assert (await answer(client, url, alice))[0] == 200
    assert (await answer(client, url, alice))[0] == 429
    assert (await answer(client, url, bob))[0] == 200  # same address, another user
    # A subject spelled as the anonymous key of an address has a bucket of its own.
    up2 = await upstream(NODA1)
    text = config(up2.port, "optional", ", rate_limit: per_user") + (
        "rate_limits: {per_user: {rate: 1r/m, burst: 0, key: [user]}}\n"
    )
    gw2 = await gateway(text)
    url = f"{gw2.url}/api/city/x"
    assert (await answer(client, url))[0] == 200  # anonymous: ip:127.0.0.1's bucket
    assert (await answer(client, url, bearer(token(sub="ip:127.0.0.1"))))[0] == 200
    assert (await answer(client, url))[0] == 429


async def test_a_bearer_header_is_read_as_services_read_it(upstream, gateway, client):
    # Only "Bearer " with one space was a token: "Bearer<TAB><forged>" passed an optional
    # route as anonymous, and reached a service that splits on any whitespace and would
    # read a user nothing checked. The scheme in any case, then spaces or tabs, is a token;
    # a bearer scheme glued to what follows is refused; another scheme passes as it came.
    up = await upstream(NODA1)
    gw = await gateway(config(up.port, "optional"))
    url = f"{gw.url}/api/city/x"
    forged = mint(claims(now=time.time()), key="another secret of at least 32 bytes")
    for value in (f"Bearer\t{forged}", f"bearer  {forged}", f"BEARER {forged} "):
        status, _, body = await answer(client, url, {"Authorization": value})
        assert (status, body["error"]) == (401, "invalid_token"), value
    for value in (f"Bearer:{forged}", f"Bearer,{forged}", f"bearer.{forged}"):
        status, _, body = await answer(client, url, {"Authorization": value})
        assert (status, body["error"]) == (400, "invalid_request"), value
    assert up.seen == []
    status, _, _ = await answer(client, url, {"Authorization": f"bEaReR\t{token(sub='alice')}"})
    assert status == 200
    assert up.seen[-1].header("X-User-Id") == "alice"
    assert (await answer(client, url, {"Authorization": "Basic YTpi"}))[0] == 200  # the service's
    assert up.seen[-1].header("Authorization") == "Basic YTpi"
    assert up.seen[-1].header("X-User-Id") is None


async def test_refused_tokens_count_toward_the_rate_limit(upstream, gateway, client):
    # A client sending bad tokens was never limited, and each cost a signature check. As in
    # nginx (limit_req before the access checks), a zone by address decides first: once
    # over, the client gets 429 without its token being looked at.
    up = await upstream(NODA1)
    zone = "rate_limits: {per_ip: {rate: 1r/m, burst: 2}}\n"
    gw = await gateway(config(up.port, "required", ", rate_limit: per_ip") + zone)
    url = f"{gw.url}/api/city/x"
    forged = bearer(mint(claims(now=time.time()), key="another secret of at least 32 bytes"))
    assert [(await answer(client, url, forged))[0] for _ in range(4)] == [401, 401, 401, 429]
    assert (await answer(client, url, bearer(token())))[0] == 429  # the address's bucket
    assert up.seen == []
    async with client.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    assert sample(text, 'gateway_rate_limit_decisions_total{result="rejected",zone="per_ip"}') == 2
    assert sample(text, 'gateway_rate_limit_decisions_total{result="allowed",zone="per_ip"}') == 3
    # A zone by user needs the token's subject: a refused token counts as anonymous, in its
    # address's bucket; a valid token's user keeps a bucket of its own.
    up2 = await upstream(NODA1)
    zone = "rate_limits: {per_user: {rate: 1r/m, burst: 1, key: [user]}}\n"
    gw2 = await gateway(config(up2.port, "required", ", rate_limit: per_user") + zone)
    url = f"{gw2.url}/api/city/x"
    assert [(await answer(client, url, forged))[0] for _ in range(3)] == [401, 401, 429]
    assert (await answer(client, url))[0] == 429  # no token: anonymous, the same bucket
    assert (await answer(client, url, bearer(token(sub="alice"))))[0] == 200


async def echo_ws(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(protocols=("chat",))
    await ws.prepare(request)
    async for message in ws:
        await ws.send_str(f"echo {message.data}")
    return ws


async def test_websocket_tokens_in_the_query_or_a_subprotocol_are_taken_out(
    upstream, gateway, client
):
    up = await upstream(NODA1, handler=echo_ws)
    gw = await gateway(config(up.port, "required"))
    ws_url = f"ws://127.0.0.1:{gw.port}/ws/city/rooms/1"
    good = token()
    async with client.ws_connect(f"{ws_url}?room=1&access_token={good}") as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo hi"
    assert up.seen[-1].raw_path == "/ws/city/rooms/1?room=1"
    assert up.seen[-1].header("X-User-Id") == "user-1"
    async with client.ws_connect(ws_url, protocols=("chat", f"bearer.{good}")) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo hi"
    assert up.seen[-1].header("Sec-WebSocket-Protocol") == "chat"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with client.ws_connect(ws_url):
            pass
    assert refused.value.status == 401
    assert all(good not in line.get("path", "") for line in gw.log_lines())


async def test_a_browser_can_read_a_401_and_its_preflight_needs_no_token(upstream, gateway, client):
    up = await upstream(NODA1)
    text = config(up.port, "required") + (
        "cors: {origins: ['https://app.daarion.space'], credentials: true}\n"
    )
    gw = await gateway(text)
    origin = {"Origin": "https://app.daarion.space"}
    status, headers, body = await answer(client, f"{gw.url}/api/city/x", origin)
    assert (status, body["error"]) == (401, "missing_token")
    assert headers["Access-Control-Allow-Origin"] == "https://app.daarion.space"
    assert headers["Access-Control-Allow-Credentials"] == "true"
    preflight = {
        **origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization",
    }
    async with client.options(f"{gw.url}/api/city/x", headers=preflight) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.daarion.space"
    assert up.seen == []


async def test_health_and_metrics_report_a_jwks_that_cannot_be_fetched(
    upstream, gateway, client, tmp_path
):
    from .helpers import free_port  # noqa: PLC0415 - only this test needs a dead port

    up = await upstream(NODA1)
    dead = free_port()
    plain = routes({"city": f"{{port: {up.port}, nodes: [noda1], auth: required}}"}, noda1=NODA1)
    text = plain + (
        "auth:\n  providers:\n    sso:\n      algorithms: [ES256]\n"
        f"      jwks_url: http://127.0.0.1:{dead}/jwks.json\n      jwks_timeout: 0.5\n"
    )
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    gw = await gateway(text, str(path))
    async with client.get(f"{gw.url}/health") as r:
        body = await r.json()
    assert r.status == 200
    assert body["dependencies"]["jwks:sso"] == "disconnected"
    assert body["status"] == "degraded"
    status, _, body = await answer(client, f"{gw.url}/api/city/x", bearer("a.b.c"))
    assert (status, body["error"]) == (401, "invalid_token")  # no keys: nothing verifies
    series = 'service_health{dependency="jwks:sso",service="gateway"}'
    async with client.get(f"{gw.url}/metrics") as r:
        assert sample(await r.text(), series) == 0  # for the alert: 401s are no 5xx
    path.write_text("metrics_cache: 0\n" + plain + AUTH)  # the provider goes: its series too
    assert gw.gateway.reload()
    async with client.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    assert 'dependency="jwks:' not in text  # a secret's provider has no keys to fetch


def test_a_jwks_url_over_plain_http_is_refused_but_to_loopback():
    from gateway.config import ConfigError, parse_config  # noqa: PLC0415

    def provider(url: str) -> str:
        return routes({"city": "{port: 1, nodes: [noda1]}"}, noda1=NODA1) + (
            f"auth: {{providers: {{sso: {{algorithms: [ES256], jwks_url: '{url}'}}}}}}\n"
        )

    with pytest.raises(ConfigError, match=r"auth.providers.sso.jwks_url.*must be https://"):
        parse_config(provider("http://sso.daarion.city/jwks.json"))
    parse_config(provider("https://sso.daarion.city/jwks.json"))
    parse_config(provider("http://127.0.0.1:9000/jwks.json"))


async def test_a_wildcard_cors_is_no_reason_to_open_a_websocket(upstream, gateway, client):
    up = await upstream(NODA1, handler=echo_ws)
    text = routes({"city": f"{{port: {up.port}, nodes: [noda1], websocket: true}}"}, noda1=NODA1)
    gw = await gateway(text + "cors: {origins: ['*']}\n")
    url = f"ws://127.0.0.1:{gw.port}/ws/city/rooms/1"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with client.ws_connect(url, origin="https://evil.test"):
            pass
    assert refused.value.status == 403
    async with client.ws_connect(url, protocols=("chat",)) as ws:  # no Origin: not a browser
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo hi"


async def test_a_role_with_a_comma_never_reaches_the_service_as_two(upstream, gateway, client):
    up = await upstream(NODA1)
    gw = await gateway(config(up.port, "required"))
    good = token(roles=["citizen", "user,admin"], email="olena\udcff@daarion.city")
    status, _, _ = await answer(client, f"{gw.url}/api/city/x", bearer(good))
    assert status == 200
    assert up.seen[-1].header("X-User-Roles") == "citizen"
    assert up.seen[-1].header("X-User-Email") == "olena@daarion.city"  # no lone surrogate
    # A string is one role to the route's check ("user,admin" is not admin): the same here.
    status, _, _ = await answer(client, f"{gw.url}/api/city/x", bearer(token(roles="user,admin")))
    assert status == 200
    assert up.seen[-1].header("X-User-Roles") == ""
    # Nor one with spaces around it: " admin" is not admin to the route's check, and would
    # be to a service trimming "viewer, admin".
    spaced = token(roles=["viewer", " admin", "ops "])
    status, _, _ = await answer(client, f"{gw.url}/api/city/x", bearer(spaced))
    assert status == 200
    assert up.seen[-1].header("X-User-Roles") == "viewer"


async def test_a_second_authorization_header_is_refused(upstream, gateway, client):
    # Only the first would be checked; a service reading the last one (or all, joined)
    # would trust a token nobody verified.
    up = await upstream(NODA1)
    gw = await gateway(config(up.port, "optional"))
    good = token()
    for second in ("Bearer forged.unsigned.token", f"Bearer {good}"):
        raw = (
            f"GET /api/city/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {good}\r\n"
            f"Authorization: {second}\r\nConnection: close\r\n\r\n"
        )
        response = await raw_exchange(gw.port, raw.encode())
        assert response.status == 400
        assert response.json()["error"] == "invalid_request"
        assert response.json()["request_id"] == response.header("X-Request-ID")
        assert response.header("WWW-Authenticate") == (
            'Bearer realm="daarion", error="invalid_request"'
        )
    assert up.seen == []
    async with client.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    assert sample(text, 'gateway_auth_total{result="invalid_request",service="city"}') == 2


async def test_every_bearer_subprotocol_is_taken_out_of_the_offer(upstream, gateway, client):
    up = await upstream(NODA1, handler=echo_ws)
    gw = await gateway(config(up.port, "required"))
    ws_url = f"ws://127.0.0.1:{gw.port}/ws/city/rooms/1"
    offer = ("chat", f"bearer.{token()}", "Bearer.unchecked.second.token")
    async with client.ws_connect(ws_url, protocols=offer) as ws:
        assert ws.protocol == "chat"
    assert up.seen[-1].header("Sec-WebSocket-Protocol") == "chat"


async def test_a_subject_that_is_not_utf8_keeps_the_answer_and_its_one_log_line(
    upstream, gateway, client
):
    # JSON may escape a lone surrogate ("\udc80": JavaScript's JSON.stringify writes such),
    # and the JSON encoder of the log line refuses it: the line, not the answer, adapts.
    up = await upstream(NODA1)
    services = {
        "city": f"{{port: {up.port}, nodes: [noda1], auth: required}}",
        "dead": "{port: 1, nodes: [noda1], auth: required}",  # nothing listens: a 502
    }
    gw = await gateway(routes(services, noda1=NODA1) + AUTH)
    odd = bearer(token(sub="olena\udc80"))
    status, _, _ = await answer(client, f"{gw.url}/api/city/x", odd)
    assert status == 200
    status, _, body = await answer(client, f"{gw.url}/api/dead/x", odd)
    assert status == 502
    assert body is not None
    assert body["error"] == "upstream_unavailable"
    lines = [line for line in gw.log_lines() if line["message"] == "request"]
    assert [(line["status"], line["user"]) for line in lines] == [
        (200, "olena\\udc80"),
        (502, "olena\\udc80"),
    ]
    assert not [line for line in gw.log_lines() if line["level"] == "ERROR"]
    async with client.get(gw.url + "/metrics") as response:
        text = await response.text()
    assert sample(text, 'http_requests_total{method="GET",service="dead",status="502"}') == 1
    assert 'service="unmatched"' not in text  # counted once, as what it was
