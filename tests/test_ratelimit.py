"""Rate limiting: nginx's limit_req arithmetic, run by the Lua script in a real Redis, seen
through the gateway as a client sees it."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio

from gateway.config import RateLimit, RedisSettings
from gateway.edge.trusted import TrustedProxies, parse
from gateway.ratelimit.local import LocalLimiter, step
from gateway.ratelimit.shared import RedisLimiter
from gateway.ratelimit.zones import compile_zone

from .helpers import NODA1, STANDARD, burst, limited, statuses

API_LIMIT = compile_zone("api_limit", RateLimit(rate="10r/s", burst=20))


# -- the script, against a real Redis --------------------------------------------------------


@pytest.fixture
async def limiter(shared_redis_url, redis_prefix):
    made = []

    async def make(**settings) -> RedisLimiter:
        made.append(
            RedisLimiter(RedisSettings(url=shared_redis_url, prefix=redis_prefix, **settings))
        )
        await made[-1].start()
        return made[-1]

    yield make
    for item in made:
        await item.close()


async def test_script_lets_21_of_a_simultaneous_burst_through(limiter):
    redis_limiter = await limiter()
    decisions = await asyncio.gather(*(redis_limiter.decide(API_LIMIT, "k") for _ in range(30)))
    assert [d.allowed for d in decisions] == [True] * 21 + [False] * 9
    assert [d.excess for d in decisions[:21]] == [i * 1000 for i in range(21)]
    assert {d.excess for d in decisions[21:]} == {21000}  # refusals change nothing
    assert redis_limiter.state == "connected"


async def test_script_then_allows_one_request_per_100_ms(limiter):
    redis_limiter = await limiter()
    await asyncio.gather(*(redis_limiter.decide(API_LIMIT, "k") for _ in range(25)))
    allowed = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        allowed += (await redis_limiter.decide(API_LIMIT, "k")).allowed
        await asyncio.sleep(0.005)
    assert 9 <= allowed <= 11  # 10 r/s, give or take the edges of the second


async def test_refused_requests_are_not_charged(limiter):
    redis_limiter = await limiter()
    await asyncio.gather(*(redis_limiter.decide(API_LIMIT, "k") for _ in range(21)))
    hammered = await asyncio.gather(*(redis_limiter.decide(API_LIMIT, "k") for _ in range(200)))
    assert not any(d.allowed for d in hammered)
    await asyncio.sleep(0.15)
    assert (await redis_limiter.decide(API_LIMIT, "k")).allowed  # the slot was not eaten


async def test_separate_keys_are_separate_buckets(limiter):
    redis_limiter = await limiter()
    a = await asyncio.gather(*(redis_limiter.decide(API_LIMIT, "a") for _ in range(25)))
    b = await asyncio.gather(*(redis_limiter.decide(API_LIMIT, "b") for _ in range(25)))
    assert sum(d.allowed for d in a) == 21
    assert sum(d.allowed for d in b) == 21


async def test_a_call_with_keys_repeated_and_interleaved_steps_each_request_in_turn(
    limiter, shared_redis_url, redis_prefix
):
    # One batch (one EVALSHA: asked in one tick), three buckets of two zones interleaved,
    # refusals among them. The script reads a repeated key once and writes it once: the
    # answers and the state left must be those of nginx's steps, request by request.
    redis_limiter = await limiter()
    tight = compile_zone("tight", RateLimit(rate="1r/m", burst=2))  # nothing drains here
    asks = [(API_LIMIT, "a"), (tight, "t"), (API_LIMIT, "a"), (tight, "t"), (API_LIMIT, "b")]
    asks += [(tight, "t"), (tight, "t"), (API_LIMIT, "a"), (tight, "t"), (API_LIMIT, "b")]
    decisions = await asyncio.gather(*(redis_limiter.decide(z, k) for z, k in asks))
    states: dict[str, tuple[int, int] | None] = {}
    expected = []
    for zone, key in asks:
        decision, new = step(zone, states.get(key), 0)  # one clock reading for the call
        expected.append((decision.allowed, decision.excess))
        if new is not None:
            states[key] = new
    assert [(d.allowed, d.excess) for d in decisions] == expected
    assert [allowed for allowed, _ in expected].count(False) == 2  # the script refused too
    inspector = redis.asyncio.from_url(shared_redis_url)
    try:
        lasts = set()
        for key, state in states.items():
            name = f"{redis_prefix}{{{key}}}"
            excess, last = await inspector.hmget(name, "e", "l")
            assert state is not None
            assert excess is not None
            assert last is not None
            assert int(excess) == state[0]
            lasts.add(int(last))
            assert await inspector.pttl(name) > 0
        assert len(lasts) == 1  # one clock reading for all of them
    finally:
        await inspector.aclose()


async def test_keys_expire_once_drained(limiter, shared_redis_url, redis_prefix):
    redis_limiter = await limiter()
    zone = compile_zone("short", RateLimit(rate="10r/s", burst=2))
    await redis_limiter.decide(zone, "k")
    inspector = redis.asyncio.from_url(shared_redis_url)
    ttl = await inspector.pttl(f"{redis_prefix}{{k}}")
    await inspector.aclose()
    assert 0 < ttl <= zone.ttl_ms == 1300


async def test_delay_spreads_the_burst_beyond_delay_instead_of_refusing(limiter):
    redis_limiter = await limiter()
    zone = compile_zone("d", RateLimit(rate="10r/s", burst=5, delay=2))
    decisions = await asyncio.gather(*(redis_limiter.decide(zone, "k") for _ in range(7)))
    assert [d.allowed for d in decisions] == [True] * 6 + [False]
    assert [d.delay_seconds(zone) for d in decisions[:6]] == [0, 0, 0, 0.1, 0.2, 0.3]


# -- the same arithmetic in memory (fallback, memory://), with a fake clock -------------------


def test_local_limiter_follows_nginx_to_the_millisecond():
    now = [1000.0]
    local = LocalLimiter(clock=lambda: now[0])
    results = [local.decide_now(API_LIMIT, "k").allowed for _ in range(30)]
    assert results == [True] * 21 + [False] * 9
    now[0] += 0.099
    assert not local.decide_now(API_LIMIT, "k").allowed
    now[0] += 0.001
    assert local.decide_now(API_LIMIT, "k").allowed
    assert not local.decide_now(API_LIMIT, "k").allowed
    now[0] += 10
    assert sum(local.decide_now(API_LIMIT, "k").allowed for _ in range(30)) == 21


def test_step_keeps_the_fraction_of_a_slot():
    # nginx moves `last` only when time moved: 50 ms + 50 ms drain one whole request.
    zone = API_LIMIT
    _, state = step(zone, None, 0)
    for _ in range(20):
        _, state = step(zone, state, 0)
    assert state == (20000, 0)
    decision, unchanged = step(zone, state, 50)
    assert (decision.allowed, unchanged) == (False, None)
    decision, state = step(zone, state, 100)
    assert decision.allowed
    assert state == (20000, 100)


def test_rates_per_minute_use_nginx_integer_arithmetic():
    assert compile_zone("m", RateLimit(rate="30r/m", burst=5)).rate == 500
    assert compile_zone("m", RateLimit(rate="1r/m")).rate == 16  # 1000 / 60, as nginx


def test_client_addresses():
    none = TrustedProxies([])
    assert none.client("127.0.0.1", ["1.2.3.4"]) == "127.0.0.1"
    assert parse("::ffff:1.2.3.4") == parse("1.2.3.4")
    assert none.client("::ffff:10.1.2.3", []) == "10.1.2.3"
    trusted = TrustedProxies(["127.0.0.0/8", "10.0.0.0/8"])
    assert trusted.client("127.0.0.1", ["203.0.113.9, 10.0.0.7"]) == "203.0.113.9"
    assert trusted.client("127.0.0.1", ["198.51.100.1", "203.0.113.9, 10.0.0.7"]) == "203.0.113.9"
    assert trusted.client("127.0.0.1", ["10.0.0.1, 10.0.0.2"]) == "10.0.0.1"
    assert trusted.client("127.0.0.1", ["garbage, 203.0.113.9"]) == "203.0.113.9"
    assert trusted.client("127.0.0.1", ["203.0.113.9, garbage"]) == "127.0.0.1"
    assert trusted.client("192.0.2.1", ["203.0.113.9"]) == "192.0.2.1"


# -- through the gateway -----------------------------------------------------------------------


async def test_gateway_lets_21_of_a_burst_through_and_answers_the_rest_429(
    upstream, gateway, shared_redis_url, redis_prefix
):
    up = await upstream(NODA1)
    gw = await gateway(limited(up.port, shared_redis_url, redis_prefix, STANDARD))
    started = time.monotonic()
    responses = await burst(gw.url + "/api/city/x", 30)
    drained = int((time.monotonic() - started) / 0.1)  # 0 on an idle machine
    allowed = statuses(responses)[200]
    assert 21 <= allowed <= 21 + drained
    assert statuses(responses)[429] == 30 - allowed
    assert len(up.seen) == allowed  # a refused request never reaches an upstream
    refused = next(r for r in responses if r.status == 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["RateLimit-Policy"] == '"z";q=21;w=3'
    assert refused.headers["RateLimit"] == '"z";r=0;t=1'
    assert refused.headers["Content-Type"] == "application/json"
    passed = [r for r in responses if r.status == 200]
    assert all(r.headers["RateLimit-Policy"] == '"z";q=21;w=3' for r in passed)
    assert sorted(r.headers["RateLimit"] for r in passed)[0] == '"z";r=0;t=2'


async def test_refusal_body_and_configurable_status(upstream, gateway, client, shared_redis_url,
                                                    redis_prefix):  # fmt: skip
    up = await upstream(NODA1)
    zone = "{rate: 1r/m, burst: 0, status: 503, headers: false}"
    gw = await gateway(limited(up.port, shared_redis_url, redis_prefix, zone))
    async with client.get(gw.url + "/api/city/a") as first:
        assert first.status == 200
        assert "RateLimit" not in first.headers  # headers: false
    async with client.get(gw.url + "/api/city/b") as refused:
        body = await refused.json()
        assert refused.status == 503
        assert int(refused.headers["Retry-After"]) >= 59
    assert body == {
        "error": "rate_limited",
        "message": body["message"],
        "request_id": refused.headers["X-Request-ID"],
    }


async def test_health_and_metrics_are_never_limited(
    upstream, gateway, shared_redis_url, redis_prefix
):
    up = await upstream(NODA1)
    gw = await gateway(limited(up.port, shared_redis_url, redis_prefix, "{rate: 1r/m}"))
    assert statuses(await burst(gw.url + "/health", 40)) == {200: 40}
    assert statuses(await burst(gw.url + "/metrics", 40)) == {200: 40}


async def test_two_gateways_on_one_redis_enforce_one_limit(
    upstream, gateway, shared_redis_url, redis_prefix
):
    up = await upstream(NODA1)
    config = limited(up.port, shared_redis_url, redis_prefix)
    first = await gateway(config)
    second = await gateway(config)
    a, b = await asyncio.gather(
        burst(first.url + "/api/city/x", 15), burst(second.url + "/api/city/x", 15)
    )
    assert sum(r.status == 200 for r in a + b) == 21
    assert len(up.seen) == 21


async def test_each_client_address_has_its_own_bucket(
    upstream, gateway, shared_redis_url, redis_prefix
):
    up = await upstream(NODA1)
    gw = await gateway(limited(up.port, shared_redis_url, redis_prefix))
    one, other = await asyncio.gather(
        burst(gw.url + "/api/city/x", 25, source="127.0.0.1"),
        burst(gw.url + "/api/city/x", 25, source="127.0.0.5"),
    )
    assert statuses(one) == {200: 21, 429: 4}
    assert statuses(other) == {200: 21, 429: 4}


async def test_spoofed_forwarding_headers_from_an_untrusted_peer_change_nothing(
    upstream, gateway, shared_redis_url, redis_prefix
):
    up = await upstream(NODA1)
    gw = await gateway(limited(up.port, shared_redis_url, redis_prefix))
    spoofs = [
        {
            "X-Forwarded-For": f"198.51.100.{i}",
            "X-Real-IP": f"198.51.100.{i}",
            "Forwarded": f"for=198.51.100.{i}",
            "True-Client-IP": f"198.51.100.{i}",
            "CF-Connecting-IP": f"198.51.100.{i}",
        }
        for i in range(30)
    ]
    assert statuses(await burst(gw.url + "/api/city/x", 30, headers=spoofs)) == {200: 21, 429: 9}
    assert {s.header("X-Real-IP") for s in up.seen} == {"127.0.0.1"}


async def test_trusted_proxies_make_the_forwarded_client_the_key(
    upstream, gateway, shared_redis_url, redis_prefix
):
    up = await upstream(NODA1)
    trusted = "trusted_proxies: [127.0.0.0/8]\n"
    gw = await gateway(limited(up.port, shared_redis_url, redis_prefix, extra=trusted))
    url = gw.url + "/api/city/x"
    chains = [{"X-Forwarded-For": "203.0.113.1, 127.0.0.9", "X-Forwarded-Proto": "https"}] * 25
    other = [{"X-Forwarded-For": "203.0.113.2"}] * 25
    first, second = await asyncio.gather(
        burst(url, 25, headers=chains), burst(url, 25, headers=other)
    )
    assert statuses(first) == {200: 21, 429: 4}
    assert statuses(second) == {200: 21, 429: 4}
    assert {s.header("X-Real-IP") for s in up.seen} == {"203.0.113.1", "203.0.113.2"}
    https = [s for s in up.seen if s.header("X-Real-IP") == "203.0.113.1"]
    assert {s.header("X-Forwarded-Proto") for s in https} == {"https"}
    assert {s.header("X-Forwarded-For") for s in https} == {"203.0.113.1, 127.0.0.9, 127.0.0.1"}


async def test_delay_holds_requests_back_instead_of_refusing(
    upstream, gateway, shared_redis_url, redis_prefix
):
    up = await upstream(NODA1)
    zone = "{rate: 4r/s, burst: 5, delay: 2}"
    gw = await gateway(limited(up.port, shared_redis_url, redis_prefix, zone))
    started = time.monotonic()
    responses = await burst(gw.url + "/api/city/x", 7)
    elapsed = time.monotonic() - started
    assert statuses(responses) == {200: 6, 429: 1}
    assert elapsed >= 0.74  # the sixth waited its 750 ms; a lower bound cannot flake
    delayed = [line for line in gw.log_lines() if line.get("rate_limit") == "delayed"]
    assert len(delayed) == 3


async def test_dry_run_counts_and_logs_but_refuses_nothing(
    upstream, gateway, client, shared_redis_url, redis_prefix
):
    up = await upstream(NODA1)
    zone = "{rate: 1r/m, burst: 20, dry_run: true}"
    gw = await gateway(limited(up.port, shared_redis_url, redis_prefix, zone))
    assert statuses(await burst(gw.url + "/api/city/x", 30)) == {200: 30}
    async with client.get(gw.url + "/metrics") as response:
        text = await response.text()
    assert 'gateway_rate_limit_decisions_total{result="dry_run_rejected",zone="z"} 9.0' in text
    assert 'gateway_rate_limit_decisions_total{result="allowed",zone="z"} 21.0' in text
    logged = [line for line in gw.log_lines() if line.get("rate_limit") == "dry_run"]
    assert len(logged) == 9


async def test_dry_run_delays_nothing_either(
    upstream, gateway, client, shared_redis_url, redis_prefix
):
    # nginx's DELAYED_DRY_RUN: what delay= would hold back passes at once, counted.
    up = await upstream(NODA1)
    zone = "{rate: 1r/s, burst: 5, delay: 0, dry_run: true}"
    gw = await gateway(limited(up.port, shared_redis_url, redis_prefix, zone))
    started = time.monotonic()
    assert statuses(await burst(gw.url + "/api/city/x", 7)) == {200: 7}
    assert time.monotonic() - started < 2.5  # the 6th alone would have waited 5 s
    async with client.get(gw.url + "/metrics") as response:
        text = await response.text()
    for result, count in (("allowed", 1), ("dry_run_delayed", 5), ("dry_run_rejected", 1)):
        assert f'decisions_total{{result="{result}",zone="z"}} {count}.0' in text
    logged = [line.get("rate_limit") for line in gw.log_lines() if line.get("route") == "city"]
    assert sorted(map(str, logged)) == ["None", "dry_run", *["dry_run_delayed"] * 5]


async def test_a_slow_zones_key_outlives_its_drained_burst(limiter):
    # 1r/m, no burst: a second request 1.1 s after the first is refused, as nginx refuses
    # it; a key that expired once its (empty) burst drained let it through.
    redis_limiter = await limiter()
    zone = compile_zone("slow", RateLimit(rate="1r/m", burst=0))
    assert (await redis_limiter.decide(zone, "k")).allowed
    await asyncio.sleep(1.1)
    assert not (await redis_limiter.decide(zone, "k")).allowed


async def test_header_keys_and_empty_keys(upstream, gateway, shared_redis_url, redis_prefix):
    up = await upstream(NODA1)
    zone = "{rate: 1r/m, burst: 1, key: ['header:X-Api-Key']}"
    gw = await gateway(limited(up.port, shared_redis_url, redis_prefix, zone))
    url = gw.url + "/api/city/x"
    key_a = [{"X-Api-Key": "a"}] * 5
    key_b = [{"X-Api-Key": "b"}] * 5
    assert statuses(await burst(url, 5, headers=key_a)) == {200: 2, 429: 3}
    assert statuses(await burst(url, 5, headers=key_b)) == {200: 2, 429: 3}
    assert statuses(await burst(url, 5)) == {200: 5}  # no key: not limited, as in nginx


async def test_a_zone_without_service_in_its_key_is_shared_by_its_services(
    upstream, gateway, shared_redis_url, redis_prefix
):
    up = await upstream(NODA1)
    zone = "{rate: 1r/m, burst: 3}"
    shared = limited(up.port, shared_redis_url, redis_prefix + "s", zone, services=("a", "b"))
    per_service = limited(
        up.port, shared_redis_url, redis_prefix + "p", zone[:-1] + ", key: [client_ip, service]}",
        services=("a", "b"),
    )  # fmt: skip
    for text, expected in ((shared, 4), (per_service, 8)):
        gw = await gateway(text)
        a, b = await asyncio.gather(burst(gw.url + "/api/a/x", 5), burst(gw.url + "/api/b/x", 5))
        assert sum(r.status == 200 for r in a + b) == expected


async def test_memory_url_limits_per_process(upstream, gateway, redis_prefix):
    up = await upstream(NODA1)
    gw = await gateway(limited(up.port, "memory://", redis_prefix))
    assert statuses(await burst(gw.url + "/api/city/x", 30)) == {200: 21, 429: 9}
