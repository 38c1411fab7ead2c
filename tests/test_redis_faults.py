"""Redis failing under the gateway: killed, paused (SIGSTOP), scripts flushed, absent at
start; and Sentinel and Cluster URLs. Every test here runs its own redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config import RateLimit, RedisSettings
from gateway.ratelimit import shared
from gateway.ratelimit.shared import MAX_IN_FLIGHT, RedisLimiter
from gateway.ratelimit.zones import compile_zone

from .helpers import (
    ESTABLISHED,
    NODA1,
    RedisServer,
    RunningGateway,
    burst,
    free_port,
    limited,
    sample,
    statuses,
    tcp_sockets,
)

ZONE = compile_zone("z", RateLimit(rate="10r/s", burst=20))


async def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> float:
    """Poll ``predicate`` (sync or async) until true; return how long it took."""
    started = time.monotonic()
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)


async def health(client, gw) -> dict[str, Any]:
    async with client.get(gw.url + "/health") as response:
        report: dict[str, Any] = await response.json()
        return report


def messages(gw, text: str) -> list[dict[str, Any]]:
    return [line for line in gw.log_lines() if line["message"] == text]


DOWN = "redis unavailable: rate limits fall back"
BACK = "redis is back: shared rate limits again"


@pytest.fixture
async def behind_redis(own_redis, upstream, gateway):
    """A gateway limiting ``city`` through a redis-server of this test's own:
    ``server, gw, url = await behind_redis()``."""

    async def start(on_error: str = "local") -> tuple[RedisServer, RunningGateway, str]:
        server = own_redis()
        up = await upstream(NODA1)
        text = limited(up.port, server.url, "t:", redis_timeout=0.05).replace(
            "prefix: 't:',", f"prefix: 't:', on_error: {on_error},"
        )
        gw = await gateway(text)
        return server, gw, gw.url + "/api/city/x"

    return start


async def recovered(gw: RunningGateway) -> float:
    return await wait_until(lambda: gw.gateway.shared.limiter.state == "connected", what="recovery")


async def test_killed_redis_falls_back_to_local_limits_then_recovers(behind_redis, gateway, client):
    server, gw, url = await behind_redis()
    assert statuses(await burst(url, 5)) == {200: 5}

    server.kill()
    assert statuses(await burst(url, 30)) == {200: 21, 429: 9}  # same zone, per process
    assert statuses(await burst(url, 10)) == {429: 10}
    body = await health(client, gw)
    assert (body["status"], body["dependencies"]["redis"]) == ("degraded", "disconnected")
    async with client.get(gw.url + "/metrics") as response:
        text = await response.text()
    assert "gateway_rate_limit_degraded 1.0" in text
    assert 'service_health{dependency="redis",service="gateway"} 0.0' in text
    assert len(messages(gw, DOWN)) == 1  # one line per transition, not per request

    server.start()  # same port
    assert await recovered(gw) < 1.0
    assert (await health(client, gw))["status"] == "healthy"
    assert len(messages(gw, BACK)) == 1
    # Lines of no request's: not under the id of the request that saw Redis fail.
    assert "request_id" not in messages(gw, DOWN)[0]
    assert "request_id" not in messages(gw, BACK)[0]
    other = await gateway(gw.config_text)
    a, b = await asyncio.gather(burst(url, 15), burst(other.url + "/api/city/x", 15))
    assert sum(r.status == 200 for r in a + b) == 21  # shared again, in the restarted Redis


async def test_paused_redis_adds_at_most_its_timeout_and_keeps_the_pool_small(behind_redis, client):
    server, gw, url = await behind_redis()
    assert statuses(await burst(url, 3)) == {200: 3}
    server.pause()
    try:
        started = time.monotonic()
        responses = await burst(url, 30)
        elapsed = time.monotonic() - started
        assert statuses(responses) == {200: 21, 429: 9}
        assert elapsed < 1.0  # bounded by the 50 ms timeout, not by Redis coming back
        for _ in range(5):  # more requests while stalled: the fallback answers at once
            await burst(url, 10)
        assert tcp_sockets(remote_port=server.port, state=ESTABLISHED) <= MAX_IN_FLIGHT + 1
        assert gw.gateway.shared.limiter.state == "disconnected"
        assert len(messages(gw, DOWN)) == 1
        assert messages(gw, DOWN)[0]["reason"] == "timeout"
    finally:
        server.resume()
    await recovered(gw)
    assert (await health(client, gw))["dependencies"]["redis"] == "connected"


@contextlib.asynccontextmanager
async def started(server: RedisServer, **settings: Any) -> AsyncIterator[RedisLimiter]:
    """A RedisLimiter on ``server``, started, closed at the end (Redis resumed first)."""
    limiter = RedisLimiter(RedisSettings(url=server.url, **settings))
    await limiter.start()
    try:
        yield limiter
    finally:
        server.resume()
        await limiter.close()


async def test_decisions_leave_no_garbage_for_the_cyclic_collector(own_redis):
    # Each call answered by callbacks left a reference cycle (its flight, its deadline, the
    # deadline's callback): 15 objects a decision that only the cyclic collector frees, and
    # more collections (p99 up from 21 to 36 ms in bench/run.py). Reference counting frees
    # everything a decision makes.
    wide = compile_zone("wide", RateLimit(rate="1000000r/s", burst=1000000))
    async with started(own_redis(), timeout=1.0) as limiter:
        for _ in range(20):
            await limiter.decide(wide, "k")  # connected, the script loaded
        gc.collect()
        gc.disable()
        try:
            for _ in range(500):
                assert (await limiter.decide(wide, "k")).allowed
            assert gc.collect() == 0
        finally:
            gc.enable()


async def test_decisions_queued_behind_a_failed_call_wait_no_second_timeout(own_redis):
    # More decisions in one tick than MAX_IN_FLIGHT batches hold (512 each): after the calls
    # in flight time out, the queued rest is the fallback's at once, not one more timeout.
    server = own_redis()
    async with started(server, timeout=1.0, on_error="local") as limiter:
        server.pause()
        answered: list[float] = []

        async def decide(key: str) -> None:
            await limiter.decide(ZONE, key)
            answered.append(time.monotonic())

        await asyncio.gather(*(decide(f"k{i % 600}") for i in range(600 * MAX_IN_FLIGHT)))
        assert limiter.state == "disconnected"
        # All within one timeout's end (a second one would put a second between them).
        assert max(answered) - min(answered) < 0.8, max(answered) - min(answered)


async def test_a_redis_that_answers_ping_but_refuses_the_script_stays_the_fallback(own_redis):
    # Out of memory under noeviction (likewise a read-only replica, MISCONF): PING passes,
    # every write fails. The probe runs the script, so the limiter does not flap between
    # Redis and fallback, each time with empty local buckets (a fresh burst every 250 ms).
    server = own_redis("--maxmemory", "1", "--maxmemory-policy", "noeviction")
    assert server.command("PING").startswith(b"+PONG")
    async with started(server, timeout=0.05, on_error="local") as limiter:
        allowed = 0
        begun = time.monotonic()
        while time.monotonic() - begun < 1.2:  # 10r/s burst 20: 21 at once, then ~12
            allowed += (await limiter.decide(ZONE, "one-client")).allowed
            await asyncio.sleep(0.005)
        assert allowed <= 21 + 13, allowed
        assert limiter.state == "disconnected"
        server.command("CONFIG", "SET", "maxmemory", "0")
        await wait_until(lambda: limiter.state == "connected", what="recovery")


async def test_closing_the_limiter_answers_every_decision_still_waiting(own_redis):
    # A reload that changes ``redis`` closes the old limiter: its requests in flight and
    # queued are answered from the fallback, not left waiting forever.
    server = own_redis()
    limiter = RedisLimiter(RedisSettings(url=server.url, timeout=5.0, on_error="allow"))
    await limiter.start()
    try:
        server.pause()
        waiting = []
        for i in range(MAX_IN_FLIGHT + 1):  # a call per tick: MAX_IN_FLIGHT of them, one queued
            waiting.append(asyncio.ensure_future(limiter.decide(ZONE, f"k{i}")))
            await asyncio.sleep(0.01)
        await limiter.close()
        decisions = await asyncio.wait_for(asyncio.gather(*waiting), 1.0)
        assert all(d.allowed for d in decisions)
        assert (await limiter.decide(ZONE, "later")).allowed  # closed: the fallback's
    finally:
        server.resume()


async def test_a_reload_away_from_a_failed_redis_clears_what_it_reported(
    own_redis, upstream, gateway, client
):
    # gateway_rate_limit_degraded stayed 1 (its alert firing) after a reload to a working
    # Redis or to none, and service_health{dependency="redis"} stayed 0 with no Redis at all.
    from gateway.config import parse_config  # noqa: PLC0415

    dead, alive = own_redis(), own_redis()
    dead.kill()
    up = await upstream(NODA1)
    fresh = "metrics_cache: 0\n"  # every scrape rendered anew
    gw = await gateway(limited(up.port, dead.url, "t:", redis_timeout=0.05) + fresh)

    async def reported() -> tuple[float, float | None]:
        async with client.get(gw.url + "/metrics") as response:
            text = await response.text()
        health = 'service_health{dependency="redis",service="gateway"}'
        present = any(line.startswith(health + " ") for line in text.splitlines())
        return (
            sample(text, "gateway_rate_limit_degraded"),
            sample(text, health) if present else None,
        )

    assert await reported() == (1.0, 0.0)
    gw.gateway.apply(parse_config(limited(up.port, alive.url, "t:", redis_timeout=0.05) + fresh))
    await recovered(gw)
    assert await reported() == (0.0, 1.0)
    alive.kill()
    await burst(gw.url + "/api/city/x", 3)
    await wait_until(lambda: gw.gateway.shared.limiter.state == "disconnected")
    text = limited(up.port, alive.url, "t:")
    without = "\n".join(line for line in text.splitlines() if not line.startswith("redis:"))
    gw.gateway.apply(parse_config(without + "\n" + fresh))
    assert await reported() == (0.0, None)


async def test_a_limiter_closed_while_it_starts_reports_nothing_after(own_redis):
    # Two quick reloads: the first one's limiter is closed while its start still waits on
    # Redis. Its start's failure used to mark it down and leave a probe running for good.
    server = own_redis()
    server.pause()
    said: list[bool] = []
    limiter = RedisLimiter(RedisSettings(url=server.url, timeout=0.05), on_transition=said.append)
    starting = asyncio.ensure_future(limiter.start())
    await asyncio.sleep(0.05)
    await limiter.close()
    await asyncio.wait_for(starting, 3)
    server.resume()
    await asyncio.sleep(0.3)  # a probe would have run by now
    assert said == []
    assert limiter.state == "connected"  # never marked down: it was closed first


# A script that keeps Redis busy for ARGV[1] microseconds (its TIME, polled).
BUSY = (
    "local t = redis.call('TIME') local s = t[1] * 1000000 + t[2] "
    "repeat local n = redis.call('TIME') until n[1] * 1000000 + n[2] - s >= tonumber(ARGV[1])"
)


def resp(*args: str) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args)


async def test_an_answer_in_time_is_not_lost_to_a_loop_held_past_the_timeout(own_redis):
    # Redis is busy with another client's script for 40 ms; 10 ms into it the limiter asks,
    # so Redis answers 30 ms later, within the 50 ms timeout, while the gateway's loop is
    # held from 20 ms to 320 ms (CPU starvation): at the deadline the answer waits in the
    # socket, unread. Judged by the timer alone it was a timeout: on_error deny refused.
    server = own_redis()
    limiter = RedisLimiter(RedisSettings(url=server.url, timeout=0.05, on_error="deny"))
    try:
        await limiter.start()
        assert (await limiter.decide(ZONE, "k")).allowed  # connected, the script loaded
        with socket.create_connection(("127.0.0.1", server.port)) as busy:
            busy.sendall(resp("PING"))
            assert busy.recv(100) == b"+PONG\r\n"  # a client Redis serves already
            for _ in range(5):  # a Redis slower than the arrangement: set it up again
                busy.sendall(resp("EVAL", BUSY, "0", "40000"))
                await asyncio.sleep(0.01)  # Redis has taken it and runs it
                asyncio.get_running_loop().call_later(0.01, time.sleep, 0.3)
                started = time.monotonic()
                decision = await limiter.decide(ZONE, "k")
                held = time.monotonic() - started >= 0.3  # the deadline passed meanwhile
                assert busy.recv(100)  # the busy script's answer
                if held:
                    break
            assert held, "the loop was never held while the answer was on its way"
        assert decision.allowed
        assert limiter.state == "connected"
    finally:
        await limiter.close()


async def test_flushed_scripts_are_reloaded_without_falling_back(behind_redis):
    server, gw, url = await behind_redis()
    assert statuses(await burst(url, 10)) == {200: 10}
    assert server.command("SCRIPT", "FLUSH").startswith(b"+OK")
    # Still the same shared bucket: 11 more fit, not a fresh local 21.
    assert statuses(await burst(url, 20)) == {200: 11, 429: 9}
    assert gw.gateway.shared.limiter.state == "connected"
    assert messages(gw, DOWN) == []


@pytest.mark.parametrize(("policy", "expected"), [("allow", {200: 30}), ("deny", {429: 30})])
async def test_on_error_allow_and_deny(behind_redis, policy, expected):
    server, _, url = await behind_redis(on_error=policy)
    server.kill()
    assert statuses(await burst(url, 30)) == expected


async def test_redis_absent_at_start_then_arriving(own_redis, upstream, gateway, client):
    server = own_redis()
    server.kill()
    up = await upstream(NODA1)
    gw = await gateway(limited(up.port, server.url, "t:", redis_timeout=0.05))
    assert (await health(client, gw))["dependencies"]["redis"] == "disconnected"
    assert statuses(await burst(gw.url + "/api/city/x", 25)) == {200: 21, 429: 4}
    server.start()
    await recovered(gw)
    assert (await health(client, gw))["status"] == "healthy"


async def test_sentinel_url(own_redis, tmp_path):
    master = own_redis()
    sentinel_port = free_port()
    sentinel = own_redis(
        "--sentinel",
        config=(
            f"port {sentinel_port}\n"
            f"sentinel monitor primary 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds primary 1000\n"
        ),
    )
    limiter = RedisLimiter(RedisSettings(url=f"redis+sentinel://127.0.0.1:{sentinel.port}/primary"))
    try:
        await limiter.start()
        decisions = await asyncio.gather(*(limiter.decide(ZONE, "k") for _ in range(25)))
        assert sum(d.allowed for d in decisions) == 21
        assert limiter.state == "connected"
        assert master.command("DBSIZE") == b":1\r\n"  # the bucket lives in the master
    finally:
        await limiter.close()


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is valid and free too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port


async def test_cluster_url_spreads_keys_over_slots(own_redis):
    nodes = [
        own_redis("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                  port=cluster_port())
        for _ in range(3)
    ]  # fmt: skip
    create = await asyncio.create_subprocess_exec(
        "redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
        "--cluster-replicas", "0", "--cluster-yes", stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await asyncio.wait_for(create.wait(), 30) == 0
    await wait_until(
        lambda: all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in nodes),
        timeout=10,
        what="cluster ok",
    )
    # A generous timeout: 200 decisions over redis-py's cluster client on a loaded machine may
    # take longer than the default 50 ms, and a fallback is not what this test is about.
    limiter = RedisLimiter(
        RedisSettings(url=f"redis+cluster://127.0.0.1:{nodes[0].port}", timeout=1.0)
    )
    try:
        await limiter.start()
        # A cluster that has just formed may still refuse the first call; the probe retries.
        await wait_until(lambda: limiter.state == "connected", what="cluster reachable")
        keys = [f"client-{i}" for i in range(8)]
        decisions = await asyncio.gather(
            *(limiter.decide(ZONE, k) for k in keys for _ in range(25))
        )
        assert sum(d.allowed for d in decisions) == 21 * len(keys)
        assert limiter.state == "connected"
        used = [int(n.command("DBSIZE").strip()[1:]) for n in nodes]
        assert sum(used) == len(keys)
        assert sum(1 for u in used if u) >= 2  # the buckets live on several nodes
    finally:
        await limiter.close()


async def test_password_db_and_unix_socket_urls(own_redis, tmp_path):
    server = own_redis("--requirepass", "s3cret", "--unixsocket", str(tmp_path / "r.sock"))
    urls = [
        f"redis://:s3cret@127.0.0.1:{server.port}/2",
        f"redis://default:s3cret@127.0.0.1:{server.port}/3",
        f"unix://:s3cret@{tmp_path / 'r.sock'}?db=4",
    ]
    for url in urls:
        limiter = RedisLimiter(RedisSettings(url=url, prefix="p:"))
        try:
            await limiter.start()
            decisions = await asyncio.gather(*(limiter.decide(ZONE, "k") for _ in range(25)))
            assert sum(d.allowed for d in decisions) == 21
            assert limiter.state == "connected", url
        finally:
            await limiter.close()
    keyspace = server.command("INFO", "keyspace", password="s3cret")  # noqa: S106 - a test server
    for db in (2, 3, 4):  # each URL's db got its bucket
        assert f"db{db}:keys=1".encode() in keyspace


async def test_a_wrong_password_means_the_fallback(own_redis):
    server = own_redis("--requirepass", "s3cret")
    limiter = RedisLimiter(RedisSettings(url=f"redis://:wrong@127.0.0.1:{server.port}/0"))
    try:
        await limiter.start()
        assert limiter.state == "disconnected"
        decisions = await asyncio.gather(*(limiter.decide(ZONE, "k") for _ in range(25)))
        assert sum(d.allowed for d in decisions) == 21  # local limits, same zone
    finally:
        await limiter.close()


async def test_a_redis_gone_while_no_request_needs_it_is_reported(
    behind_redis, client, monkeypatch
):
    # No traffic at night (or only routes with no rate limit): /health and the degraded
    # gauge, which the alert reads, still find out, from the limiter's own check.
    monkeypatch.setattr(shared, "WATCH_INTERVAL", 0.1)
    server, gw, url = await behind_redis()
    assert statuses(await burst(url, 2)) == {200: 2}
    server.kill()
    await wait_until(lambda: gw.gateway.shared.limiter.state == "disconnected", what="found")
    body = await health(client, gw)
    assert (body["status"], body["dependencies"]["redis"]) == ("degraded", "disconnected")
    async with client.get(gw.url + "/metrics") as response:
        assert "gateway_rate_limit_degraded 1.0" in await response.text()
    assert len(messages(gw, DOWN)) == 1
    assert "request_id" not in messages(gw, DOWN)[0]
    server.start()
    await recovered(gw)
    assert len(messages(gw, BACK)) == 1
