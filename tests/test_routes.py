"""Routes inside services, end to end: DAARION's city, agents and web app shaped stand-ins
behind one gateway, every route form, overrides, conflicts, and what check says."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from .helpers import NODA1, NODA2, ROOT, Upstream

GATEWAY = [sys.executable, "-m", "gateway"]


def city_app() -> web.Application:
    """Shaped like city-service: /city/*, /api/city/snapshot, uploads that return their URL,
    public pages, and rooms over WebSocket that broadcast to their members."""
    rooms: dict[str, set[web.WebSocketResponse]] = defaultdict(set)

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"service": "city", "path": request.raw_path})

    async def upload(request: web.Request) -> web.StreamResponse:
        await request.read()
        # The URL its own upload call returns: on the gateway's public origin.
        return web.json_response({"url": "/static/uploads/a1.png"})

    async def room(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        members = rooms[request.match_info["room"]]
        members.add(ws)
        try:
            async for message in ws:
                for member in list(members):
                    await member.send_str(f"{request.match_info['room']}: {message.data}")
        finally:
            members.discard(ws)
        return ws

    app = web.Application()
    app.router.add_get("/ws/city/rooms/{room}", room)
    app.router.add_post("/city/uploads", upload)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def echo_app(name: str) -> web.Application:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"service": name, "path": request.raw_path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def serve(app: web.Application, host: str) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def daarion() -> object:
    started = []

    async def start(name: str, host: str = NODA1) -> int:
        runner, port = await serve(city_app() if name == "city" else echo_app(name), host)
        started.append(runner)
        return port

    yield start
    for runner in started:
        await runner.cleanup()


def node_config(**services: str) -> str:
    lines = "\n".join(f"  {name}: {body}" for name, body in services.items())
    return (
        "health: {enabled: false}\n"
        f"nodes: {{noda1: {{host: {NODA1}}}, noda2: {{host: {NODA2}}}}}\n"
        "rate_limits: {api: {rate: 100r/s, burst: 100}, strict: {rate: 1r/m, burst: 0}}\n"
        "default_rate_limit: api\n"
        f"services:\n{lines}\n"
    )


async def get(client: aiohttp.ClientSession, url: str, **options: object) -> tuple[int, object]:
    async with client.get(url, allow_redirects=False, **options) as response:  # type: ignore[arg-type]  # options are get()'s keywords
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body


async def test_daarions_surface_through_one_gateway(daarion, gateway, client):
    city, frontend, agents = (
        await daarion("city"),
        await daarion("frontend"),
        await daarion("agents", NODA2),
    )
    gw = await gateway(
        node_config(
            city=f"""{{port: {city}, nodes: [noda1], routes: [
      {{path: /api/city/snapshot, to: /api/city/snapshot}},
      {{path: /api/city/, to: /city/}},
      {{path: /public/, to: /public/}},
      {{path: /static/uploads/, to: /static/uploads/, methods: [GET], rate_limit: none}},
      {{path: /ws/city/, to: /ws/city/, websocket: true}},
      {{path: /ws/events, to: /ws/events, websocket: true, exact: true}}]}}""",
            agents=f"""{{port: {agents}, nodes: [noda2], routes: [
      {{path: /api/agents/agents, to: /agents}},
      {{path: /api/agents/, to: /agents/}}]}}""",
            frontend=f"{{port: {frontend}, nodes: [noda1], rate_limit: none, "
            "routes: [{path: /, to: /}]}",
        )
    )
    expect = {
        "/api/city/snapshot": ("city", "/api/city/snapshot"),  # kept as is
        "/api/city/rooms?limit=5": ("city", "/city/rooms?limit=5"),  # /api stripped
        "/public/map": ("city", "/public/map"),
        "/static/uploads/a1.png": ("city", "/static/uploads/a1.png"),
        "/api/agents/agents": ("agents", "/agents"),  # the web app's two calls: an empty
        "/api/agents/invoke": ("agents", "/agents/invoke"),  # prefix and the default
        "/": ("frontend", "/"),
        "/rooms/general": ("frontend", "/rooms/general"),
        "/api/unknown/x": ("frontend", "/api/unknown/x"),  # what no other route claims
    }
    for path, (service, upstream_path) in expect.items():
        status, body = await get(client, gw.url + path)
        assert (status, body) == (200, {"service": service, "path": upstream_path}), path
    # The upload call's URL is reachable on the gateway's origin.
    async with client.post(gw.url + "/api/city/uploads", data=b"png") as response:
        url = (await response.json())["url"]
    assert await get(client, gw.url + url) == (
        200, {"service": "city", "path": "/static/uploads/a1.png"}
    )  # fmt: skip
    # A method the uploads route does not take falls through to the web app.
    async with client.post(gw.url + "/static/uploads/a1.png", data=b"x") as response:
        assert (await response.json())["service"] == "frontend"
    # The gateway's own paths stay its own, whatever the routes say.
    assert (await get(client, gw.url + "/health"))[0] == 200
    assert (await get(client, gw.url + "/gateway/unknown"))[0] == 404
    # Rooms over WebSocket: two members, a broadcast each way.
    one = await client.ws_connect(gw.url.replace("http", "ws") + "/ws/city/rooms/general")
    two = await client.ws_connect(gw.url.replace("http", "ws") + "/ws/city/rooms/general")
    await one.send_str("hello")
    for member in (one, two):
        message = await member.receive(timeout=5)
        assert (message.type, message.data) == (WSMsgType.TEXT, "general: hello")
    await one.close()
    await two.close()
    # The request lines name the route; the route counter too.
    lines = [line for line in gw.log_lines() if line.get("message") == "request"]
    assert {line["path"]: line["route"] for line in lines}["/api/agents/agents"] == "agents#0"
    metrics = (await (await client.get(gw.url + "/metrics")).text()).splitlines()
    assert 'gateway_route_requests_total{route="agents#1",service="agents",status="200"} 1.0' in (
        metrics
    )
    assert 'http_requests_total{method="GET",service="agents",status="200"} 2.0' in metrics


async def test_a_routes_own_rate_limit_and_timeout(daarion, upstream, gateway, client):
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return web.json_response({"path": request.raw_path})

    up: Upstream = await upstream(NODA1, slow)
    gw = await gateway(
        node_config(
            city=f"""{{port: {up.port}, nodes: [noda1], retries: 0, routes: [
      {{path: /api/city/admin/, to: /city/admin/, name: admin, rate_limit: strict,
        timeouts: {{response: 0.2}}}},
      {{path: /api/city/, to: /city/}}]}}"""
        )
    )
    assert (await get(client, gw.url + "/api/city/rooms"))[0] == 200  # 0.5 s is fine here
    assert (await get(client, gw.url + "/api/city/admin/users"))[0] == 504  # not within 0.2 s
    # strict (1r/m, burst 0): its own bucket, not the service's api zone.
    status, body = await get(client, gw.url + "/api/city/admin/users")
    assert (status, body["error"]) == (429, "rate_limited")  # type: ignore[index]  # a JSON body
    assert (await get(client, gw.url + "/api/city/rooms"))[0] == 200
    metrics = await (await client.get(gw.url + "/metrics")).text()
    assert 'gateway_rate_limit_decisions_total{result="rejected",zone="strict"} 1.0' in metrics
    assert 'gateway_route_requests_total{route="admin",service="city",status="504"} 1.0' in metrics


async def test_hosts_methods_exact_and_the_slash_redirect(daarion, gateway, client):
    space, city = await daarion("space"), await daarion("citysite")
    gw = await gateway(
        node_config(
            space=f"{{port: {space}, nodes: [noda1], "
            "routes: [{path: /, to: /, hosts: [app.daarion.space]}]}",
            site=f"""{{port: {city}, nodes: [noda1], routes: [
      {{path: /, to: /, hosts: [gateway.daarion.city]}},
      {{path: /docs/, to: /documentation/}},
      {{path: /ping, to: /health, exact: true, methods: [GET]}}]}}""",
        )
    )
    host = {"Host": "App.Daarion.Space:8443"}
    assert await get(client, gw.url + "/x", headers=host) == (
        200,
        {"service": "space", "path": "/x"},
    )
    city_host = {"Host": "gateway.daarion.city"}
    assert (await get(client, gw.url + "/x", headers=city_host))[1] == {
        "service": "citysite",
        "path": "/x",
    }
    assert (await get(client, gw.url + "/x", headers={"Host": "evil.example"}))[0] == 404
    assert (await get(client, gw.url + "/docs/api"))[1] == {
        "service": "citysite",
        "path": "/documentation/api",
    }
    async with client.get(gw.url + "/docs?v=2", allow_redirects=False) as response:
        assert (response.status, response.headers["Location"]) == (301, "/docs/?v=2")
    assert (await get(client, gw.url + "/ping"))[1] == {"service": "citysite", "path": "/health"}
    assert (await get(client, gw.url + "/ping/x"))[0] == 404  # exact
    async with client.post(gw.url + "/ping") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD"


async def test_a_redirect_from_a_route_gets_the_routes_public_path(upstream, gateway, client):
    async def slash(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(
            f"http://{request.host}{request.path}/",
            headers={"Set-Cookie": "sid=1; Path=/static/a; HttpOnly"},
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", slash)
    runner, port = await serve(app, NODA1)
    try:
        gw = await gateway(
            node_config(
                files=f"""{{port: {port}, nodes: [noda1], routes: [
      {{path: /public/, to: /static/, cookie_path: true}}]}}"""
            )
        )
        async with client.get(
            gw.url + "/public/a", allow_redirects=False, headers={"Host": "gw.example"}
        ) as response:
            assert response.headers["Location"] == "http://gw.example/public/a/"
            assert response.headers["Set-Cookie"] == "sid=1; Path=/public/a; HttpOnly"
    finally:
        await runner.cleanup()


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "routes.yaml"
    config.write_text(text)
    return subprocess.run(
        [*GATEWAY, "check", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip


def test_check_warns_of_a_guarded_route_whose_other_methods_go_unguarded(tmp_path, monkeypatch):
    # methods: routes, it does not refuse: a POST of a GET-only admin path is /api/city/'s,
    # without the admin route's auth and limit. Said by check; a guard for every method of
    # the path (a route of the same path for the others) silences it.
    monkeypatch.setenv("JWT_SECRET", "s" * 32)
    auth = 'auth: {providers: {daarion: {algorithms: [HS256], secret: "${JWT_SECRET}"}}}\n'
    admin = "{path: /api/city/admin/, to: /city/admin/, auth: required, rate_limit: strict"
    city = "{path: /api/city/, to: /city/}"
    result = check(
        tmp_path,
        auth
        + node_config(
            city=f"{{port: 7001, nodes: [noda1], routes: [{admin}, methods: [GET]}}, {city}]}}"
        ),
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: route city#0 (/api/city/admin/ GET) takes only those methods: POST, PUT, "
        "PATCH, DELETE, OPTIONS, TRACE, CONNECT, any other method of its path go to route "
        "city#1 (/api/city/) without its auth and its rate limit (strict); leave methods off "
        "the guarded route"
    ]
    # Methods listed on a second route of the path still leave the others (TRACE, WebDAV's,
    # made-up ones) to /api/city/; only a guard without methods covers them all.
    partly = check(
        tmp_path,
        auth
        + node_config(
            city=f"{{port: 7001, nodes: [noda1], routes: [{admin}, methods: [GET]}}, {admin}, "
            f"methods: [POST, PUT, PATCH, DELETE, OPTIONS]}}, {city}]}}"
        ),
    )
    assert [line for line in partly.stdout.splitlines() if "any other method" in line] != []
    guarded = check(
        tmp_path,
        auth + node_config(city=f"{{port: 7001, nodes: [noda1], routes: [{admin}}}, {city}]}}"),
    )
    assert guarded.returncode == 0, guarded.stderr
    assert [line for line in guarded.stdout.splitlines() if line.startswith("warning:")] == []


def test_check_names_both_places_of_a_conflict_and_warns_of_dead_routes(tmp_path):
    conflict = check(
        tmp_path,
        node_config(
            city="{port: 7001, nodes: [noda1], routes: [{path: /api/x/, to: /x/}]}",
            auth="{port: 7011, nodes: [noda1], routes: [{path: /api/x/, to: /y/, methods: [GET]}, "
            "{path: /a/, to: /b}]}",
        ),
    )
    assert conflict.returncode == 2
    problems = {
        line.strip().partition(" (line")[0]: line.partition("): ")[2]
        for line in conflict.stderr.splitlines()[1:]
    }
    assert problems == {
        "services.auth.routes[0]": "the same path as services.city.routes[0] (/api/x/) for the "
        "same methods and hosts",
        "services.auth.routes[1].to": "must end with / exactly when path does",
    }
    dead = check(
        tmp_path,
        node_config(
            city="{port: 7001, nodes: [noda1], routes: [{path: /health, to: /h, exact: true}, "
            "{path: /gateway/x, to: /x}, {path: /api/city/, to: /city/}, {path: /metrics, "
            "to: /m}]}"
        ),
    )
    assert dead.returncode == 0, dead.stderr
    warnings = [line for line in dead.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: services.city.routes[0] (/health) can never match: /health, /metrics and "
        "/gateway/ are the gateway's own",
        "warning: services.city.routes[1] (/gateway/x) can never match: /health, /metrics and "
        "/gateway/ are the gateway's own",
    ]
    table = [line.split("->")[0].strip() for line in dead.stdout.splitlines() if "->" in line]
    # Match order: longest first. A prefix /metrics still matches /metrics/x: no warning.
    assert table == ["/api/city/", "/gateway/x", "/metrics", "/health (exact)"]
