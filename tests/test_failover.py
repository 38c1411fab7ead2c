"""Cross-node failover with real processes on two loopback "nodes": NODA2 (127.0.0.2, the
preferred node of the multimodal services) and NODA1 (127.0.0.3, the fallback)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.config import parse_config
from gateway.upstream.probe import judge

from .helpers import NODA1, NODA2, RawClient, Seen, routes, sample, unanswered_port

FAST = "health: {interval: 0.2, timeout: 0.5, rise: 2, fall: 3}"


def named(node: str):
    """An upstream handler that says which node answered."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"node": node, "path": request.path})

    return handler


def search(noda2_port: int, noda1_port: int, extra: str = FAST) -> str:
    """``search`` on noda2, falling back to noda1 (each on its own test port)."""
    body = f"{{port: {noda2_port}, nodes: [noda2, {{node: noda1, port: {noda1_port}}}], {extra}}}"
    return routes({"search": body}, probes=True, noda1=NODA1, noda2=NODA2)


async def served_by(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    async with session.get(url) as response:
        if response.status != 200:
            return response.status, None
        return 200, (await response.json())["node"]


async def upstreams(session: aiohttp.ClientSession, gw) -> dict[str, Any]:
    async with session.get(gw.url + "/gateway/upstreams") as response:
        report: dict[str, Any] = await response.json()
        return report


def target_state(report: dict[str, Any], service: str, node: str) -> str:
    state: str = next(t for t in report["services"][service]["targets"] if t["node"] == node)[
        "state"
    ]
    return state


def api_seen(up) -> list[Seen]:
    return [s for s in up.seen if s.raw_path != "/health"]


async def test_killing_the_preferred_node_loses_no_request_and_traffic_returns(
    node_process, gateway, client
):
    noda2 = node_process(NODA2, "noda2")
    noda1 = node_process(NODA1, "noda1")
    gw = await gateway(search(noda2.port, noda1.port))
    url = gw.url + "/api/search/q"
    results: list[tuple[float, int, str | None]] = []
    stop = asyncio.Event()

    async def steady() -> None:
        while not stop.is_set():
            status, node = await served_by(client, url)
            results.append((time.monotonic(), status, node))

    loops = [asyncio.create_task(steady()) for _ in range(4)]
    await asyncio.sleep(0.5)
    assert {node for _, _, node in results} == {"noda2"}  # the preferred node serves

    killed = time.monotonic()
    noda2.kill()  # SIGKILL: the process and its connections are gone at once
    await asyncio.sleep(0.8)
    report = await upstreams(client, gw)
    assert target_state(report, "search", "noda2") in ("down", "ejected")
    assert report["nodes"] == {"noda1": "online", "noda2": "offline"}
    after_kill = [node for t, _, node in results if t > killed + 0.3]
    assert after_kill
    assert set(after_kill) == {"noda1"}

    await asyncio.to_thread(noda2.start)  # same address and port; returns once it listens
    restarted = time.monotonic()
    await asyncio.sleep(1.6)
    stop.set()
    await asyncio.gather(*loops)

    assert {status for _, status, _ in results} == {200}, "a request was lost"
    back = min(t for t, _, node in results if t > restarted and node == "noda2")
    assert back - restarted <= 0.2 * 2 + 1.0  # interval x rise + 1 s
    async with client.get(gw.url + "/metrics") as response:
        text = await response.text()
    assert 'gateway_failovers_total{node="noda1",service="search"}' in text
    assert 'gateway_node_up{node="noda2"} 1.0' in text
    lines = [line for line in gw.log_lines() if line["message"] == "node is offline"]
    assert [line["node"] for line in lines] == ["noda2"]


async def test_a_post_is_never_sent_to_a_second_node_but_a_get_is_retried(
    upstream, gateway, client
):
    async def dies_after_reading(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        request.transport.abort()  # the node dies with the request in hand
        return web.Response()

    noda2 = await upstream(NODA2, dies_after_reading)
    noda1 = await upstream(NODA1, named("noda1"))
    # fall: 10 keeps noda2 from being ejected by these failures: each request meets it.
    gw = await gateway(search(noda2.port, noda1.port, "health: {enabled: false, fall: 10}"))
    async with client.post(gw.url + "/api/search/index", data=b"doc") as response:
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_disconnected"
    assert noda1.seen == []  # no copy of the POST
    async with client.get(gw.url + "/api/search/q") as response:
        assert response.status == 200
        assert (await response.json())["node"] == "noda1"
    async with client.put(gw.url + "/api/search/doc/1", data=b"small body") as response:
        assert response.status == 200  # idempotent, buffered: sent again
    big = b"x" * (65 * 1024)
    async with client.put(gw.url + "/api/search/doc/2", data=big) as response:
        assert response.status == 502  # too big to have been kept: not replayable
    assert [(s.method, s.body) for s in noda1.seen] == [("GET", b""), ("PUT", b"small body")]
    assert [s.method for s in noda2.seen] == ["POST", "GET", "PUT", "PUT"]
    async with client.get(gw.url + "/metrics") as response:
        text = await response.text()
    assert 'gateway_retries_total{kind="disconnect",service="search"} 2.0' in text


async def test_connect_failures_are_retried_for_any_method(upstream, gateway, client):
    dead = socket.socket()
    dead.bind((NODA2, 0))  # bound, never listening: connections are refused
    noda1 = await upstream(NODA1, named("noda1"))
    gw = await gateway(search(dead.getsockname()[1], noda1.port, "health: {enabled: false}"))
    async with client.post(gw.url + "/api/search/index", data=b"doc") as response:
        assert response.status == 200  # never sent to noda2, so safe to send to noda1
    assert [(s.method, s.body) for s in noda1.seen] == [("POST", b"doc")]
    dead.close()


async def test_a_reset_mid_response_is_passed_on_and_not_retried(upstream, gateway, client):
    async def breaks(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"x" * 100)
        assert request.transport is not None
        request.transport.abort()
        return response

    noda2 = await upstream(NODA2, breaks)
    noda1 = await upstream(NODA1, named("noda1"))
    gw = await gateway(search(noda2.port, noda1.port, "health: {enabled: false}"))
    async with client.get(gw.url + "/api/search/q") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert noda1.seen == []


async def test_a_slow_upstream_is_504_at_its_timeout_without_retry(upstream, gateway, client):
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response()

    noda2 = await upstream(NODA2, slow)
    noda1 = await upstream(NODA1, named("noda1"))
    extra = "health: {enabled: false}, timeouts: {response: 0.3}"
    gw = await gateway(search(noda2.port, noda1.port, extra))
    started = time.monotonic()
    async with client.get(gw.url + "/api/search/q") as response:
        assert response.status == 504
    assert time.monotonic() - started < 2
    assert noda1.seen == []


async def test_all_nodes_down_is_a_quick_503_never_a_hang(node_process, gateway, client):
    noda2 = node_process(NODA2, "noda2")
    noda1 = node_process(NODA1, "noda1")
    gw = await gateway(search(noda2.port, noda1.port))
    noda2.kill()
    noda1.kill()
    statuses = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        started = time.monotonic()
        async with client.get(gw.url + "/api/search/q") as response:
            statuses.append(response.status)
            assert time.monotonic() - started <= 1.5
            if response.status == 503:
                assert int(response.headers["Retry-After"]) >= 1
                assert (await response.json())["error"] == "no_healthy_upstream"
                break
        await asyncio.sleep(0.05)
    assert statuses[-1] == 503
    assert set(statuses) <= {502, 503}


async def test_unanswered_connects_to_both_nodes_stay_within_the_bound(gateway, client):
    with unanswered_port(NODA2) as port2, unanswered_port(NODA1) as port1:
        gw = await gateway(search(port2, port1, "health: {enabled: false}"))
        started = time.monotonic()
        async with client.get(gw.url + "/api/search/q") as response:
            assert response.status == 502
            assert (await response.json())["error"] == "upstream_connect_timeout"
        assert time.monotonic() - started <= 1.5  # 2 attempts x 0.5 s connect + back-off


async def test_targets_of_one_tier_share_the_load(upstream, gateway, client):
    a = await upstream(NODA2, named("a"))
    b = await upstream(NODA1, named("b"))
    text = routes(
        {"vector": f"{{port: {a.port}, nodes: [[noda2, {{node: noda1, port: {b.port}}}]]}}"},
        noda1=NODA1,
        noda2=NODA2,
    )
    gw = await gateway(text)
    nodes = [(await served_by(client, gw.url + "/api/vector/x"))[1] for _ in range(10)]
    assert sorted(nodes, key=str) == ["a"] * 5 + ["b"] * 5
    assert nodes[:2] in (["a", "b"], ["b", "a"])


def test_health_check_contract():
    assert judge(200, b'{"status": "healthy"}') == (True, "status 200")
    assert judge(200, b'{"status": "degraded"}')[0]
    assert judge(204, b"")[0]
    assert judge(200, b"OK")[0]  # not JSON: any 2xx passes
    assert judge(200, b'{"status": "unhealthy"}') == (False, "reports unhealthy")
    assert judge(503, b'{"status": "healthy"}') == (False, "status 503")
    assert judge(301, b"") == (False, "status 301")


async def test_probes_take_a_target_out_and_bring_it_back(upstream, gateway, client):
    state = {"status": "healthy"}

    async def service(request: web.Request) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.json_response({"status": state["status"]})
        return web.json_response({"node": "noda2"})

    noda2 = await upstream(NODA2, service)
    noda1 = await upstream(NODA1, named("noda1"))
    extra = "health: {path: /healthz, interval: 0.1, timeout: 0.5, rise: 2, fall: 2}"
    gw = await gateway(search(noda2.port, noda1.port, extra))
    assert (await served_by(client, gw.url + "/api/search/q"))[1] == "noda2"
    state["status"] = "unhealthy"
    await asyncio.sleep(0.5)
    report = await upstreams(client, gw)
    assert target_state(report, "search", "noda2") == "down"
    target = report["services"]["search"]["targets"][0]
    assert target["reason"] == "2 probes failed: reports unhealthy"
    assert report["services"]["search"]["health_check"] == "/healthz"
    assert (await served_by(client, gw.url + "/api/search/q"))[1] == "noda1"
    state["status"] = "healthy"
    await asyncio.sleep(0.5)
    assert (await served_by(client, gw.url + "/api/search/q"))[1] == "noda2"
    changes = [line for line in gw.log_lines() if line["message"].startswith("upstream target is")]
    assert [(c["node"], c["message"]) for c in changes] == [
        ("noda2", "upstream target is down"),
        ("noda2", "upstream target is up"),
    ]  # transitions only, not one line per probe
    assert {s.raw_path for s in noda2.seen} >= {"/healthz", "/search/q"}


async def test_a_reload_that_turns_probes_off_brings_back_what_they_took_out(
    upstream, gateway, client
):
    # The operator's way around a broken health endpoint: with no probe to pass any more,
    # a target the probes had taken down used to stay down (503s) until a restart.
    async def broken_health(request: web.Request) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.json_response({"status": "unhealthy"}, status=500)
        return web.json_response({"node": "noda2"})

    noda2 = await upstream(NODA2, broken_health)
    noda1 = await upstream(NODA1, named("noda1"))
    extra = "health: {path: /healthz, interval: 0.1, timeout: 0.5, rise: 2, fall: 2}"
    gw = await gateway(search(noda2.port, noda1.port, extra))
    await asyncio.sleep(0.5)
    assert target_state(await upstreams(client, gw), "search", "noda2") == "down"
    assert (await served_by(client, gw.url + "/api/search/q"))[1] == "noda1"
    gw.gateway.apply(parse_config(search(noda2.port, noda1.port, "health: {enabled: false}")))
    report = await upstreams(client, gw)
    assert target_state(report, "search", "noda2") == "failing"  # in use; its last probe failed
    assert report["services"]["search"]["targets"][0]["reason"] == "probes turned off"
    assert (await served_by(client, gw.url + "/api/search/q"))[1] == "noda2"


async def test_real_traffic_502_and_504_eject_but_other_answers_do_not(upstream, gateway, client):
    # As nginx's max_fails: what the target answered itself is no failure of it. A 500 (a
    # request any client can make fail) ejected the target, for every client; a 503 (load
    # being shed) put its load on the others. A 502 or 504 (the upstream's own gateway
    # failed) still counts, as connection failures and timeouts do.
    async def picky(request: web.Request) -> web.StreamResponse:
        status = {"/search/boom": 500, "/search/busy": 503, "/search/gateway": 502}
        if request.path in status:
            return web.json_response({"error": "x"}, status=status[request.path])
        return web.json_response({"error": "no such thing"}, status=404)

    noda2 = await upstream(NODA2, picky)
    noda1 = await upstream(NODA1, named("noda1"))
    gw = await gateway(search(noda2.port, noda1.port, "health: {enabled: false}"))
    for _ in range(10):
        async with client.get(gw.url + "/api/search/missing") as response:
            assert response.status == 404  # the upstream's answer, passed on
    for _ in range(6):
        async with client.post(gw.url + "/api/search/boom", data=b"d") as response:
            assert response.status == 500  # a POST's 5xx is passed on, never retried
        async with client.post(gw.url + "/api/search/busy", data=b"d") as response:
            assert response.status == 503
    assert target_state(await upstreams(client, gw), "search", "noda2") == "up"
    for _ in range(3):
        async with client.post(gw.url + "/api/search/gateway", data=b"d") as response:
            assert response.status == 502
    report = await upstreams(client, gw)
    assert target_state(report, "search", "noda2") == "ejected"
    assert report["services"]["search"]["targets"][0]["ejected_for_s"] > 0
    async with client.post(gw.url + "/api/search/index", data=b"d") as response:
        assert (await response.json())["node"] == "noda1"  # while ejected


async def test_ejections_never_take_a_services_last_targets_out(upstream, gateway, client):
    # Envoy's panic mode: with every target ejected by real traffic (here 502s from one
    # path), a client of the paths that work got 503 no_healthy_upstream from both nodes,
    # which answered all along. The targets the probes hold up are tried all the same.
    async def flaky(request: web.Request) -> web.StreamResponse:
        if request.path == "/search/gateway":
            return web.json_response({"error": "x"}, status=502)
        return web.json_response({"node": request.host})

    noda2 = await upstream(NODA2, flaky)
    noda1 = await upstream(NODA1, flaky)
    gw = await gateway(search(noda2.port, noda1.port, "health: {enabled: false}"))
    for _ in range(6):  # 3 for each target (a POST is not retried: one target each time)
        async with client.post(gw.url + "/api/search/gateway", data=b"d") as response:
            assert response.status == 502
    report = await upstreams(client, gw)
    assert {t["state"] for t in report["services"]["search"]["targets"]} == {"ejected"}
    for _ in range(5):
        async with client.get(gw.url + "/api/search/q") as response:
            assert response.status == 200, await response.text()


class Rebooting:
    """A keep-alive HTTP/1.1 upstream on NODA1 whose ``reboot()`` makes every connection made
    before it answer its next request with a reset (SO_LINGER 0), with no FIN before: what a
    rebooted node, or a NAT that forgot its connections, does to kept-alive ones."""

    def __init__(self, work: Callable[[bytes], Awaitable[bool]] | None = None) -> None:
        self.epoch = 0
        self.reset = 0
        self.seen: list[bytes] = []  # each request's method
        self._work = work  # before each answer: False, and the connection is dropped instead
        self._serving: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, NODA1, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.server.close()
        for task in self._serving:
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)
        await self.server.wait_closed()

    def reboot(self) -> None:
        self.epoch += 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        epoch = self.epoch
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.seen.append(head.split(b" ", 1)[0])
                if self._work is not None and not await self._work(head):
                    return
                if self.epoch != epoch:
                    self.reset += 1
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    writer.transport.abort()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()
            self._serving.discard(task)


@pytest.mark.parametrize("retries", [1, 0])
async def test_pooled_connections_a_rebooted_node_forgot_cost_no_request(gateway, client, retries):
    # Each GET's one retry took the next pooled connection, as dead as the first: 5 of 10
    # GETs got 502, and with retries: 0 each dead connection cost one (nginx: 10 x 200). A
    # reset kept-alive connection is the pool's timing: its idle siblings are closed, and
    # the same target is tried again on a new connection, retries or not.
    up = Rebooting()
    port = await up.start()
    try:
        gw = await gateway(
            routes({"city": f"{{port: {port}, nodes: [noda1], retries: {retries}}}"}, noda1=NODA1)
        )
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as many:

            async def get() -> int:
                async with many.get(gw.url + "/api/city/x") as response:
                    await response.read()
                    return response.status

            assert await asyncio.gather(*(get() for _ in range(10))) == [200] * 10
        up.reboot()
        statuses = []
        for _ in range(10):
            async with client.get(gw.url + "/api/city/x") as response:
                statuses.append(response.status)
        assert statuses == [200] * 10
        assert up.reset == 1  # the others were closed, never sent to
    finally:
        await up.stop()


async def test_a_reused_connection_lost_while_the_upstream_works_is_not_stale(gateway, client):
    # Any reused connection lost before the answer counted as stale, and a stale failure is
    # retried on the same target whatever retries says: a DELETE whose worker died after a
    # second of work (OOM, a worker timeout) ran twice. Only a connection lost right after
    # the write is stale; later, it is a disconnect, under the retry rules as any other.
    async def work(head: bytes) -> bool:
        if head.startswith(b"DELETE"):
            await asyncio.sleep(0.5)  # at work, then its worker dies
            return False
        return True

    up = Rebooting(work)
    port = await up.start()
    try:
        text = routes({"city": f"{{port: {port}, nodes: [noda1], retries: 0}}"}, noda1=NODA1)
        gw = await gateway(text)
        async with client.get(gw.url + "/api/city/x") as response:
            assert response.status == 200  # a connection in the pool
        async with client.delete(gw.url + "/api/city/x") as response:
            assert response.status == 502
        assert up.seen == [b"GET", b"DELETE"]
    finally:
        await up.stop()


async def test_a_503_from_the_preferred_node_is_retried_for_a_get(upstream, gateway, client):
    async def starting(request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "starting"}, status=503)

    noda2 = await upstream(NODA2, starting)
    noda1 = await upstream(NODA1, named("noda1"))
    gw = await gateway(search(noda2.port, noda1.port, "health: {enabled: false}"))
    assert await served_by(client, gw.url + "/api/search/q") == (200, "noda1")
    async with client.post(gw.url + "/api/search/index", data=b"d") as response:
        assert response.status == 503  # not idempotent: the upstream's answer stands
    assert [s.method for s in noda1.seen] == ["GET"]


async def test_reloads_keep_what_is_known_about_targets(node_process, gateway, client):
    noda2 = node_process(NODA2, "noda2")
    noda1 = node_process(NODA1, "noda1")
    text = search(noda2.port, noda1.port)
    gw = await gateway(text)
    noda2.kill()
    await asyncio.sleep(0.8)
    before = await upstreams(client, gw)
    assert target_state(before, "search", "noda2") in ("down", "ejected")
    gw.gateway.apply(parse_config(text + "timeouts: {response: 10}\n"))
    after = await upstreams(client, gw)
    assert (
        after["services"]["search"]["targets"][0]["since"]
        == (before["services"]["search"]["targets"][0]["since"])
    )
    assert target_state(after, "search", "noda2") in ("down", "ejected")


async def test_upstreams_endpoint_lists_every_target(upstream, gateway, client):
    noda2 = await upstream(NODA2, named("noda2"))
    noda1 = await upstream(NODA1, named("noda1"))
    gw = await gateway(search(noda2.port, noda1.port, "health: {enabled: false}"))
    async with client.get(gw.url + "/gateway/upstreams") as response:
        assert response.status == 200
        report = orjson.loads(await response.read())
    targets = report["services"]["search"]["targets"]
    assert [(t["node"], t["url"], t["tier"], t["state"]) for t in targets] == [
        ("noda2", f"http://{NODA2}:{noda2.port}", 0, "unknown"),
        ("noda1", f"http://{NODA1}:{noda1.port}", 1, "unknown"),
    ]
    assert report["services"]["search"]["health_check"] is None
    async with client.post(gw.url + "/gateway/upstreams") as response:
        assert response.status == 405
    async with client.get(gw.url + "/gateway/unknown") as response:
        assert response.status == 404


async def test_a_service_that_returns_is_served_again_within_unhealthy_interval_times_rise(
    node_process, gateway, client
):
    # One node, probed every 30 s while it is usable, and every 0.1 s while it is not: once
    # it is back, two passing probes (rise) bring it back within a fraction of a second, not
    # an interval or two later.
    city = node_process(NODA1, "noda1")
    text = (
        "health: {interval: 30, unhealthy_interval: 0.1, timeout: 0.5, rise: 2, fall: 1}\n"
        f"nodes:\n  noda1: {{host: {NODA1}}}\n"
        f"services:\n  city: {{port: {city.port}, nodes: [noda1]}}\n"
    )
    gw = await gateway(text)
    assert await served_by(client, gw.url + "/api/city/x") == (200, "noda1")
    city.kill()
    status, _ = await served_by(client, gw.url + "/api/city/x")  # refused: ejected (fall 1)
    assert status == 502
    # The fast probes take it down (the prober looks at least once a second).
    deadline = time.monotonic() + 3
    while target_state(await upstreams(client, gw), "city", "noda1") != "down":
        assert time.monotonic() < deadline, "the probes did not take the dead node down"
        await asyncio.sleep(0.05)
    city.start()
    back = time.monotonic()
    while (await served_by(client, gw.url + "/api/city/x"))[0] != 200:
        assert time.monotonic() - back < 2.0, "not served again within 2 s of returning"
        await asyncio.sleep(0.02)
    assert time.monotonic() - back < 1.0


async def test_two_targets_on_one_node_never_hide_each_other_in_service_health(
    upstream, gateway, client
):
    # As Swapper's 8890 and 8891 on one node: one gauge for the node, 0 while either is down
    # (the service itself stays up, in its own series and in /health).
    dead = socket.socket()
    dead.bind((NODA1, 0))  # bound, never listening: connections are refused
    live = await upstream(NODA1, named("noda1"))
    nodes = f"[{{node: noda1, port: {dead.getsockname()[1]}}}, {{node: noda1, port: {live.port}}}]"
    body = f"{{port: {live.port}, nodes: {nodes}, {FAST}}}"
    gw = await gateway(routes({"swapper": body}, probes=True, noda1=NODA1))
    deadline = time.monotonic() + 10
    while [t["state"] for t in (await upstreams(client, gw))["services"]["swapper"]["targets"]] != [
        "down",
        "up",
    ]:
        assert time.monotonic() < deadline, "the probes did not take the dead target down"
        await asyncio.sleep(0.1)
    async with client.get(gw.url + "/metrics") as response:
        text = await response.text()
    assert sample(text, 'service_health{dependency="noda1",service="swapper"}') == 0
    assert sample(text, 'service_health{dependency="swapper",service="gateway"}') == 1
    async with client.get(gw.url + "/health") as response:
        assert (await response.json())["dependencies"]["swapper"] == "connected"
    dead.close()


async def test_a_gateway_out_of_descriptors_says_so_and_never_blames_the_target(
    node_process, gateway, client
):
    # Out of file descriptors (one address's WebSocket sessions can fill the table), the
    # connect to a healthy upstream failed as if the target were down: it was ejected, and
    # every client got 503 no_healthy_upstream through the ejection.
    import resource  # noqa: PLC0415 - only this test lowers the limit

    up = node_process(NODA1, "noda1")  # a process of its own: not out of descriptors
    config = routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1)
    gw = await gateway(config + "upstream_keepalive_timeout: 0.1\n")
    assert await served_by(client, gw.url + "/api/city/x") == (200, "noda1")
    raws = [await RawClient.connect(gw.port) for _ in range(3)]  # fall: 3
    await asyncio.sleep(1.3)  # accepted; and the kept-alive upstream connection closed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open(os.devnull, os.O_RDONLY)  # the number the next descriptor gets
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))  # none more may open
    try:
        answers = [await raw.ask(b"GET /api/city/x HTTP/1.1\r\nHost: a\r\n\r\n") for raw in raws]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert {(a.status, a.json()["error"]) for a in answers} == {(503, "gateway_overloaded")}
    assert target_state(await upstreams(client, gw), "city", "noda1") == "up"
    assert await served_by(client, gw.url + "/api/city/x") == (200, "noda1")
    for raw in raws:
        raw.writer.close()


async def test_probes_out_of_descriptors_never_take_a_target_down(node_process, gateway, client):
    # The probes failed with EMFILE as if the target were down: after fall of them every
    # target of every service was, and clients got 503 no_healthy_upstream until rise probes
    # passed again, well after the descriptors were back. Such a probe says nothing now.
    import resource  # noqa: PLC0415 - only these tests lower the limit

    up = node_process(NODA1, "noda1")
    health = "health: {interval: 0.1, timeout: 0.5, rise: 2, fall: 2}"
    service = f"{{port: {up.port}, nodes: [noda1], {health}}}"
    # Kept-alive probe connections close between probes: each probe connects anew.
    keepalive = "upstream_keepalive_timeout: 0.05\n"
    gw = await gateway(routes({"city": service}, probes=True, noda1=NODA1) + keepalive)
    raw = await RawClient.connect(gw.port)  # open before the limit: asks the report below
    await asyncio.sleep(0.3)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        await asyncio.sleep(0.6)  # 5 rounds of probes, none able to connect
        report = await raw.ask(b"GET /gateway/upstreams HTTP/1.1\r\nHost: a\r\n\r\n")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    targets = report.json()["services"]["city"]["targets"]
    assert [t["state"] for t in targets] == ["up"]
    assert await served_by(client, gw.url + "/api/city/x") == (200, "noda1")
    async with client.get(gw.url + "/metrics") as response:
        text = await response.text()
    assert 'gateway_health_checks_total{node="noda1",result="fail",service="city"}' not in text
    raw.writer.close()
