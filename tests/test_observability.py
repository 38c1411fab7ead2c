"""/health, /metrics and the JSON log lines, as the node standards ask."""

from __future__ import annotations

import asyncio
import random
import re
import string

from aiohttp import web

from gateway.config import parse_config

from .helpers import NODA1, NODA2, raw_exchange, routes


def _samples(text: str) -> dict[str, float]:
    """Prometheus text → {"name{labels}": value} for every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def _free_port(host: str) -> int:
    server = await asyncio.start_server(lambda r, w: None, host, 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return int(port)


async def test_health_follows_the_standards_format_and_rule(upstream, gateway, client):
    up = await upstream(NODA1)
    dead = await _free_port(NODA2)
    gw = await gateway(
        routes(
            {
                "city": f"{{port: {up.port}, nodes: [noda1]}}",
                "search": f"{{port: {dead}, nodes: [noda2]}}",
            },
            noda1=NODA1,
            noda2=NODA2,
        )
    )
    async with client.get(gw.url + "/health") as response:
        body = await response.json()
    assert response.status == 200
    assert body == {
        "status": "healthy",
        "service": "gateway",
        "version": body["version"],
        "uptime": body["uptime"],
        "generation": 1,  # beyond the standards' fields: which restart, which config
        "config_hash": gw.gateway.shared.config_hash,
        "dependencies": {"city": "unknown", "search": "unknown"},
        "nodes": {"noda1": "online", "noda2": "online"},
    }
    assert isinstance(body["uptime"], int)
    assert re.fullmatch("[0-9a-f]{12}", body["config_hash"])

    async with client.get(gw.url + "/api/city/x") as r:
        assert r.status == 200
    async with client.get(gw.url + "/api/search/x") as r:
        assert r.status == 502
    async with client.get(gw.url + "/health") as response:
        body = await response.json()
    # One failure is not yet `fall`: the target stays in use, but is not called connected.
    assert body["dependencies"] == {"city": "connected", "search": "unknown"}
    for _ in range(2):  # health.fall failures take the only target of search out
        async with client.get(gw.url + "/api/search/x") as r:
            assert r.status == 502
    async with client.get(gw.url + "/health") as response:
        body = await response.json()
    assert response.status == 200  # degraded still serves
    assert body["status"] == "degraded"
    assert body["dependencies"] == {"city": "connected", "search": "disconnected"}
    assert body["nodes"] == {"noda1": "online", "noda2": "offline"}

    gw.gateway.shared.draining = True  # what SIGTERM sets while requests in flight finish
    async with client.get(gw.url + "/health") as response:
        assert response.status == 503
        assert (await response.json())["status"] == "unhealthy"


async def test_metrics_have_the_standard_names_and_counts(upstream, gateway, client):
    up = await upstream(NODA1)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    for _ in range(3):
        async with client.get(gw.url + "/api/city/rooms") as r:
            await r.read()
    async with client.post(gw.url + "/api/city/rooms", data=b"x") as r:
        await r.read()
    async with client.get(gw.url + "/api/nothing/here") as r:
        assert r.status == 404
    async with client.request("PROPFIND", gw.url + "/api/city/pot") as r:
        await r.read()
    bogus = await raw_exchange(gw.port, b"FROBNICATE /api/city/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert bogus.status == 400
    async with client.get(gw.url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    samples = _samples(text)
    assert samples['http_requests_total{method="GET",service="city",status="200"}'] == 3
    assert samples['http_requests_total{method="POST",service="city",status="200"}'] == 1
    assert samples['http_requests_total{method="GET",service="unmatched",status="404"}'] == 1
    assert samples['http_requests_total{method="OTHER",service="city",status="200"}'] == 1
    assert samples['http_requests_total{method="OTHER",service="unmatched",status="400"}'] == 1
    assert samples['http_request_duration_seconds_count{service="city"}'] == 5
    assert samples['http_request_duration_seconds_bucket{le="+Inf",service="city"}'] == 5
    assert samples['active_connections{service="city"}'] == 0
    assert samples['service_health{dependency="noda1",service="city"}'] == 1
    assert samples['service_health{dependency="city",service="gateway"}'] == 1
    assert samples["gateway_client_connections"] >= 1
    assert "# TYPE gateway_upstream_errors_total counter" in text


async def test_status_labels_are_a_fixed_set_whatever_the_upstream_answers(
    upstream, gateway, client
):
    async def echo_status(request):  # an httpbin-like /status/<code>
        return web.Response(status=int(request.path.rsplit("/", 1)[1]))

    up = await upstream(NODA1, echo_status)
    config = routes({"city": f"{{port: {up.port}, nodes: [noda1], retries: 0}}"}, noda1=NODA1)
    gw = await gateway(config + "metrics_cache: 0\n")
    # Registered codes keep their number; any other one from 100 to 599 is its class. (5xx
    # answers, one of each: health.fall of them in a row would eject the only target.)
    answers = [200, 299, 250, 418, 429, 452, 499, 302, 399, 503, 599, 204, 226]
    for code in answers:
        async with client.get(gw.url + f"/api/city/status/{code}") as r:
            assert r.status == code
    async with client.get(gw.url + "/metrics") as response:
        text = await response.text()
    by_status = {
        found.group(1): float(found.group(2))
        for found in re.finditer(
            r'^http_requests_total\{method="GET",service="city",status="([^"]*)"\} (\S+)$',
            text,
            re.MULTILINE,
        )
    }
    assert by_status == {
        "200": 1, "2xx": 2, "4xx": 2, "429": 1, "499": 1, "302": 1, "3xx": 1, "503": 1,
        "5xx": 1, "204": 1, "226": 1,
    }  # fmt: skip
    routed = re.findall(r'^gateway_route_requests_total\{route="city",service="city",'
                        r'status="([^"]*)"\}', text, re.MULTILINE)  # fmt: skip
    assert sorted(routed) == sorted(by_status)


async def test_a_removed_service_leaves_no_series_though_its_work_outlives_the_reload(
    upstream, gateway, client
):
    release = asyncio.Event()

    async def chat(request):
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                await ws.send_str("echo " + message.data)
            return ws
        if request.path.endswith("/slow"):
            await release.wait()
            return web.Response(status=503)  # in flight at the reload, and it fails
        return web.Response(text="ok")

    up = await upstream(NODA1, chat)
    city = f"{{port: {up.port}, nodes: [noda1]}}"
    both = routes({"city": city, "chat": f"{{port: {up.port}, nodes: [noda1], websocket: true}}"},
                  noda1=NODA1) + "metrics_cache: 0\n"  # fmt: skip
    gw = await gateway(both)

    async def chat_series() -> list[str]:
        async with client.get(gw.url + "/metrics") as response:
            text = await response.text()
        assert 'http_requests_total{method="GET",service="city",status="200"}' in text
        return [line for line in text.splitlines() if 'service="chat"' in line]

    async with client.get(gw.url + "/api/city/x") as r:
        assert r.status == 200
    ws = await client.ws_connect(gw.url.replace("http", "ws") + "/ws/chat/room")
    await ws.send_str("hi")
    assert (await ws.receive(timeout=5)).data == "echo hi"
    slow = asyncio.create_task(client.get(gw.url + "/api/chat/slow"))
    while not any(seen.raw_path.endswith("/slow") for seen in up.seen):  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert await chat_series()  # counted while chat is served
    gw.gateway.apply(parse_config(routes({"city": city}, noda1=NODA1) + "metrics_cache: 0\n"))
    # The open session reports what it relayed at each scrape; the request ends, with a 503;
    # the session relays more and ends.
    assert await chat_series() == []
    release.set()
    async with await slow as r:
        assert r.status == 503
    await ws.send_str("again")
    assert (await ws.receive(timeout=5)).data == "echo again"
    await ws.close()
    while gw.gateway.shared.sessions:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert await chat_series() == []
    gw.gateway.apply(parse_config(both))  # back: its series start again, from 0
    async with client.get(gw.url + "/api/chat/x") as r:
        assert r.status == 200
    assert 'http_requests_total{method="GET",service="chat",status="200"} 1.0' in (
        await chat_series()
    )


async def test_a_reload_drops_the_series_of_routes_nodes_and_zones_it_removed(
    upstream, gateway, client
):
    up = await upstream(NODA1)
    dead = await _free_port(NODA2)

    def config(routes_: str, nodes: str, zone: str) -> str:
        service = f"{{port: {up.port}, nodes: {nodes}, retries: 1, routes: [{routes_}]}}"
        return (
            routes(
                {"city": service, "search": f"{{port: {dead}, nodes: [noda2]}}"},
                noda1=NODA1,
                noda2=NODA2,
            )
            + f"metrics_cache: 0\nrate_limits: {{{zone}: {{rate: 1000r/s, burst: 1000}}}}\n"
            + (f"default_rate_limit: {zone}\n")
        )

    a, b = "{path: /api/city/a/, to: /a/}", "{path: /api/city/b/, to: /b/}"
    named = "{path: /api/city/rooms/, to: /rooms/, name: rooms}"
    # noda2 first: its refused connections fail over to noda1, and eject it.
    gw = await gateway(config(f"{a}, {b}, {named}", "[noda2, noda1]", "zone_a"))
    for path in ("b/x", "b/x", "b/x", "rooms/x", "a/x"):
        async with client.get(gw.url + f"/api/city/{path}") as r:
            assert r.status == 200

    async def scrape() -> dict[str, float]:
        async with client.get(gw.url + "/metrics") as response:
            return _samples(await response.text())

    def route(name: str) -> str:
        return f'gateway_route_requests_total{{route="{name}",service="city",status="200"}}'

    before = await scrape()
    assert before[route("city#1")] == 3
    assert before[route("rooms")] == 1
    assert before['gateway_ejections_total{node="noda2",service="city"}'] == 1
    assert before['gateway_rate_limit_decisions_total{result="allowed",zone="zone_a"}'] == 5
    assert before['gateway_failovers_total{node="noda1",service="city"}'] == 5
    assert before['gateway_retries_total{kind="connect",service="city"}'] == 3

    # A route put first: the unnamed ones' indexes move (a is city#1 now, b city#2); the
    # named one moves to another path, and keeps its name and its count. noda2 and zone_a go.
    new = "{path: /api/city/new/, to: /new/}"
    moved = "{path: /api/city/halls/, to: /rooms/, name: rooms}"
    gw.gateway.apply(parse_config(config(f"{new}, {a}, {b}, {moved}", "[noda1]", "zone_b")))
    async with client.get(gw.url + "/api/city/b/x") as r:
        assert r.status == 200
    after = await scrape()
    city = {k: v for k, v in after.items() if 'service="city"' in k or "zone=" in k}
    assert {k: v for k, v in city.items() if "_total" in k and "route_requests" in k} == {
        route("city#2"): 1,  # b, counted afresh under its new index
        route("rooms"): 1,
    }
    assert not [k for k in after if "noda2" in k and 'service="city"' in k]  # search's stay
    assert not [k for k in after if "zone_a" in k]
    assert after['gateway_rate_limit_decisions_total{result="allowed",zone="zone_b"}'] == 1
    # What the reload kept keeps its counts.
    assert after['gateway_retries_total{kind="connect",service="city"}'] == 3
    assert after['gateway_failovers_total{node="noda1",service="city"}'] == 5
    assert after['http_requests_total{method="GET",service="city",status="200"}'] == 6


async def test_upstream_errors_are_counted_by_kind(gateway, client):
    dead = await _free_port(NODA1)
    gw = await gateway(routes({"city": f"{{port: {dead}, nodes: [noda1]}}"}, noda1=NODA1))
    for _ in range(3):  # health.fall refused connections eject the only target
        async with client.get(gw.url + "/api/city/x") as r:
            assert r.status == 502
    async with client.get(gw.url + "/api/city/x") as r:
        assert r.status == 503  # known to be down: no attempt, Retry-After
        assert (await r.json())["error"] == "no_healthy_upstream"
        assert int(r.headers["Retry-After"]) >= 1
    async with client.get(gw.url + "/metrics") as response:
        samples = _samples(await response.text())
    assert samples['gateway_upstream_errors_total{kind="connect",service="city"}'] == 3
    assert samples['gateway_upstream_errors_total{kind="unavailable",service="city"}'] == 1
    assert samples['gateway_ejections_total{node="noda1",service="city"}'] == 1
    assert samples['service_health{dependency="noda1",service="city"}'] == 0
    assert samples['service_health{dependency="city",service="gateway"}'] == 0
    assert samples['gateway_node_up{node="noda1"}'] == 0


async def test_fifty_thousand_random_requests_do_not_grow_the_scrape(upstream, gateway, client):
    up = await upstream(NODA1)
    # metrics_cache 0: the scrapes below follow one another closely, and each must be fresh.
    config = routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1)
    gw = await gateway(config + "metrics_cache: 0\n")
    # Every label combination the blast below can reach, once: methods and statuses are
    # fixed sets; what must not add series is the endless variety of paths.
    for method in ("GET", "PUT", "PURGE"):
        for path in ("/api/nope/x", "/nope", "/api/city/%2e%2e"):
            async with client.request(method, gw.url + path) as r:
                await r.read()
    for _ in range(2):  # the first scrape is itself counted under service="gateway"
        async with client.get(gw.url + "/metrics") as response:
            before = set(_samples(await response.text()))

    rng = random.Random(7)
    letters = string.ascii_letters + string.digits

    def word() -> str:
        return "".join(rng.choices(letters, k=rng.randint(1, 12)))

    async def blast(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        batch = [
            # Methods the HTTP parser knows but the metrics do not; unknown ones are refused by
            # the parser (and close the connection), see the test above.
            f"{rng.choice(['GET', 'PUT', 'PROPFIND', 'MKCOL', 'PURGE', 'REPORT', 'SEARCH'])} "
            f"{rng.choice(['/api/', '/', '/ws/', '/api/x'])}{word()}/{word()}?{word()}={word()} "
            f"HTTP/1.1\r\nHost: a\r\n\r\n"
            for _ in range(count)
        ]
        writer.write("".join(batch).encode())
        await writer.drain()
        for _ in range(count):
            head = await reader.readuntil(b"\r\n\r\n")
            found = re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE)
            assert found is not None
            length = int(found.group(1))
            await reader.readexactly(length)
        writer.close()

    for _ in range(25):
        await asyncio.gather(*(blast(500) for _ in range(4)))
    async with client.get(gw.url + "/metrics") as response:
        after = _samples(await response.text())
    assert set(after) == before
    unmatched = sum(
        v for k, v in after.items() if k.startswith("http_requests_total{") and "unmatched" in k
    )
    assert unmatched >= 50_000


async def test_one_json_log_line_per_request(upstream, gateway, client):
    up = await upstream(NODA1)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    async with client.get(
        gw.url + "/api/city/rooms?token=secret", headers={"X-Request-ID": "r-1"}
    ) as r:
        await r.read()
    await raw_exchange(
        gw.port, b"GET /api/city/%2e%2e HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    await raw_exchange(gw.port, b"GET /x\x00 HTTP/1.1\r\nHost: a\r\n\r\n")
    await raw_exchange(
        gw.port,
        b"GET http://alice:S3cret@gw.example/api/city/x?token=t HTTP/1.1\r\n"
        b"Host: gw.example\r\nConnection: close\r\n\r\n",
    )
    async with client.get(gw.url + "/api/city/u/@me/http://a:b@c/d") as r:
        await r.read()  # a path that holds "@" and "://": logged as it came
    lines = gw.log_lines()
    requests = [line for line in lines if line["message"] in ("request", "bad request")]
    assert len(requests) == 5
    ok, bad_path, bad_http, absolute, at = requests
    assert absolute["status"] == 400
    assert absolute["path"] == "http://gw.example/api/city/x"  # no password, no query
    assert at["path"] == "/api/city/u/@me/http://a:b@c/d"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ok["timestamp"])
    assert ok["level"] == "INFO"
    assert ok["service"] == "gateway"
    assert ok["request_id"] == "r-1"
    assert ok["method"] == "GET"
    assert ok["path"] == "/api/city/rooms"  # the query (tokens!) is not logged
    assert ok["status"] == 200
    assert ok["route"] == "city"
    assert ok["upstream"] == f"noda1 {NODA1}:{up.port}"
    assert ok["client"] == "127.0.0.1"
    assert ok["duration_ms"] >= 0
    assert bad_path["status"] == 400
    assert bad_path["error"] == "bad_path"
    assert bad_http["status"] == 400
    assert "request_id" in bad_http
    assert not any("traceback" in line for line in lines)


def test_a_scrape_of_workers_labels_each_workers_samples():
    from gateway.metrics import Metrics  # noqa: PLC0415 - only this test builds registries

    one, two = Metrics(), Metrics()
    for metrics, requests, healthy in ((one, 3, 1), (two, 4, 0)):
        for _ in range(requests):
            metrics.observe_request("city", "city", "GET", 200, 0.02)
        metrics.health.labels("city", "noda1").set(healthy)
    text = one.render(None, {0: one.families(), 3: two.families()})[0].decode()
    assert 'http_requests_total{method="GET",service="city",status="200",worker="0"} 3.0' in text
    assert 'http_requests_total{method="GET",service="city",status="200",worker="3"} 4.0' in text
    assert 'http_request_duration_seconds_count{service="city",worker="3"} 4.0' in text
    assert 'service_health{dependency="noda1",service="city",worker="0"} 1.0' in text
    assert 'service_health{dependency="noda1",service="city",worker="3"} 0.0' in text
    assert "gateway_workers_reporting 2.0" in text
    assert text.count("# TYPE http_requests_total counter") == 1  # one family, both workers


def test_log_lines_go_out_in_pipe_atomic_chunks():
    from gateway.logs import LineWriter  # noqa: PLC0415

    class Recorder:
        def __init__(self) -> None:
            self.writes: list[str] = []

        def write(self, text: str) -> None:
            self.writes.append(text)

        def flush(self) -> None:
            pass

    stream = Recorder()
    writer = LineWriter(stream)  # type: ignore[arg-type]  # a stream that records its writes
    lines = [f'{{"n": {i}, "pad": "{"x" * random.randint(0, 300)}"}}' for i in range(500)]
    writer._lines = list(lines)  # what one loop iteration collected
    writer.flush()
    assert all(len(w) <= 4000 and w.endswith("\n") for w in stream.writes)
    assert "".join(stream.writes).splitlines() == lines
