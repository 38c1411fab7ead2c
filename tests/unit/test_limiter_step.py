"""nginx's limit_req arithmetic (``ratelimit.local.step``) on hand-computed sequences, the
decision's headers, zone compilation, and the in-memory limiter with a fake clock."""

from __future__ import annotations

import random

import pytest

from gateway.config import RateLimit
from gateway.ratelimit.local import LocalLimiter, step
from gateway.ratelimit.zones import Decision, Zone, bucket_key, compile_zone

from ..helpers import FakeClock

API = compile_zone("api", RateLimit(rate="10r/s", burst=20))
SLOW = compile_zone("slow", RateLimit(rate="30r/m", burst=4))
DELAYED = compile_zone("delayed", RateLimit(rate="10r/s", burst=20, delay=5))


def run(zone: Zone, times_ms: list[int]) -> list[bool]:
    """Requests of one bucket at these times: which were allowed."""
    state: tuple[int, int] | None = None
    allowed = []
    for now in times_ms:
        decision, new = step(zone, state, now)
        allowed.append(decision.allowed)
        if new is not None:
            state = new
    return allowed


def test_zones_are_compiled_to_nginx_units() -> None:
    assert (API.rate, API.burst, API.delay) == (10_000, 20_000, 20_000)  # nodelay by default
    assert (SLOW.rate, SLOW.burst) == (500, 4_000)  # 30 r/m: 500 milli-requests a second
    assert DELAYED.delay == 5_000
    one_a_minute = compile_zone("m", RateLimit(rate="1r/m", burst=0))
    assert one_a_minute.rate == 16  # nginx's integer division: 1000 / 60


def test_a_new_key_starts_empty() -> None:
    assert step(API, None, 5_000) == (Decision(True, 0), (0, 5_000))


def test_a_simultaneous_burst_lets_exactly_burst_plus_one_through() -> None:
    state: tuple[int, int] | None = None
    excesses = []
    for _ in range(25):
        decision, new = step(API, state, 1_000)
        excesses.append((decision.allowed, decision.excess))
        state = new if new is not None else state
    assert excesses[:21] == [(True, 1000 * i) for i in range(21)]
    assert excesses[21:] == [(False, 21_000)] * 4
    assert state == (20_000, 1_000)


def test_after_the_burst_one_request_per_100_ms() -> None:
    burst = [0] * 21
    every_10_ms = list(range(10, 1001, 10))
    allowed = run(API, burst + every_10_ms)
    assert all(allowed[:21])
    passed = [t for t, ok in zip(every_10_ms, allowed[21:], strict=True) if ok]
    assert passed == [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]


def test_30r_per_minute_drains_500_milli_requests_a_second() -> None:
    assert step(SLOW, (3_000, 0), 1_000)[0] == Decision(True, 3_500)
    assert step(SLOW, (3_000, 0), 2_000)[0] == Decision(True, 3_000)
    assert step(SLOW, (3_000, 0), 1)[0] == Decision(True, 4_000)  # 500 * 1 // 1000 == 0
    assert step(SLOW, (3_000, 0), 3)[0] == Decision(True, 3_999)
    assert step(SLOW, (3_000, 0), 10_000)[0] == Decision(True, 0)  # drained below 0: 0
    # A full bucket (burst 4: 4000) lets one more through every 2 s.
    full = [0] * 5
    assert run(SLOW, [*full, 1_999, 2_000, 3_999, 4_000]) == [True] * 5 + [
        False, True, False, True,
    ]  # fmt: skip


def test_a_refused_request_changes_nothing() -> None:
    full = (20_000, 1_000)
    decision, new = step(API, full, 1_050)
    assert (decision, new) == (Decision(False, 20_500), None)
    # Not counted: 50 ms later still, from the same state, the same request passes.
    assert step(API, full, 1_100) == (Decision(True, 20_000), (20_000, 1_100))


def test_last_moves_only_when_time_moved() -> None:
    assert step(API, (3_000, 1_000), 1_000) == (Decision(True, 4_000), (4_000, 1_000))
    assert step(API, (3_000, 1_000), 1_200) == (Decision(True, 2_000), (2_000, 1_200))


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (99_000, (Decision(True, 6_000), (6_000, 100_000))),  # a little back: no drain, keep last
        (40_000, (Decision(True, 6_000), (6_000, 100_000))),  # -60000 exactly: still "a little"
        (39_999, (Decision(True, 5_990), (5_990, 39_999))),  # beyond: 1 ms elapsed, last reset
        (0, (Decision(True, 5_990), (5_990, 0))),
    ],
)
def test_a_clock_going_backwards_follows_nginx(
    now: int, expected: tuple[Decision, tuple[int, int]]
) -> None:
    assert step(API, (5_000, 100_000), now) == expected


def test_delay_seconds() -> None:
    assert Decision(True, 8_000).delay_seconds(DELAYED) == pytest.approx(0.3)
    assert Decision(True, 5_000).delay_seconds(DELAYED) == 0.0  # within delay=: at once
    assert Decision(True, 20_000).delay_seconds(DELAYED) == pytest.approx(1.5)
    assert Decision(False, 21_000).delay_seconds(DELAYED) == 0.0  # refused: no delay
    assert Decision(True, 20_000).delay_seconds(API) == 0.0  # nodelay


def test_retry_after() -> None:
    assert Decision(False, 21_000).retry_after(API) == 1  # 100 ms, rounded up
    assert Decision(False, 35_000).retry_after(API) == 2  # 1.5 s
    assert Decision(False, 5_000).retry_after(SLOW) == 2  # 1000 / 500
    assert Decision(False, 5_001).retry_after(SLOW) == 3
    one_a_minute = compile_zone("m", RateLimit(rate="1r/m", burst=20))
    assert Decision(False, 21_000).retry_after(one_a_minute) == 63  # 1000 / 16 = 62.5


def test_the_ratelimit_header() -> None:
    assert Decision(True, 0).header(API) == '"api";r=20;t=0'
    assert Decision(True, 5_000).header(API) == '"api";r=15;t=1'
    assert Decision(True, 15_500).header(API) == '"api";r=4;t=2'
    assert Decision(True, 20_000).header(API) == '"api";r=0;t=2'
    assert Decision(False, 21_000).header(API) == '"api";r=0;t=1'
    assert Decision(True, 4_000).header(SLOW) == '"slow";r=0;t=8'


@pytest.mark.parametrize(
    ("rate", "burst", "policy", "ttl_ms"),
    [
        # (burst + 1 request) / rate, then a second more
        ("10r/s", 20, '"z";q=21;w=3', 3_100),  # 21 requests, drained in 2.1 s
        ("30r/m", 4, '"z";q=5;w=10', 11_000),
        ("1r/m", 20, '"z";q=21;w=1313', 1_313_500),  # nginx's 1r/m: 16 milli-requests/s
        ("1r/m", 0, '"z";q=1;w=63', 63_500),
        ("100r/s", 0, '"z";q=1;w=1', 1_010),
        ("5r/s", 0, '"z";q=1;w=1', 1_200),
    ],
)
def test_compile_zone_policy_and_ttl(rate: str, burst: int, policy: str, ttl_ms: int) -> None:
    zone = compile_zone("z", RateLimit(rate=rate, burst=burst))
    assert (zone.policy, zone.ttl_ms) == (policy, ttl_ms)


def test_bucket_keys_are_per_zone_and_opaque() -> None:
    key = bucket_key(API, ("203.0.113.7", "city"))
    assert key.startswith("api:")
    assert len(key) == len("api:") + 24  # 12 bytes of blake2b, in hex
    assert "203.0.113.7" not in key
    assert bucket_key(API, ("203.0.113.7", "city")) == key
    assert bucket_key(API, ("203.0.113.7city",)) != key  # the parts stay apart
    assert bucket_key(SLOW, ("203.0.113.7", "city")).removeprefix("slow:") == key[4:]


def test_the_local_limiter_runs_step_on_its_clock() -> None:
    clock = FakeClock(10.0)
    limiter = LocalLimiter(clock=clock)
    results = [limiter.decide_now(API, "k").allowed for _ in range(22)]
    assert results == [True] * 21 + [False]
    clock.advance(0.1)
    assert limiter.decide_now(API, "k") == Decision(True, 20_000)
    assert limiter.decide_now(API, "other") == Decision(True, 0)  # buckets are apart


def test_the_least_recently_updated_key_is_evicted_past_max_keys() -> None:
    clock = FakeClock(10.0)
    limiter = LocalLimiter(clock=clock, max_keys=2)
    limiter.decide_now(API, "k1")
    limiter.decide_now(API, "k2")
    assert limiter.decide_now(API, "k1") == Decision(True, 1_000)  # k1 updated: newest
    limiter.decide_now(API, "k3")  # three keys: k2 goes
    assert limiter.decide_now(API, "k2") == Decision(True, 0)  # as new; now k1 goes
    assert limiter.decide_now(API, "k3") == Decision(True, 1_000)
    assert limiter.decide_now(API, "k1") == Decision(True, 0)


def test_a_refusal_does_not_make_a_key_recent() -> None:
    clock = FakeClock(10.0)
    tiny = compile_zone("tiny", RateLimit(rate="1r/m", burst=0))
    limiter = LocalLimiter(clock=clock, max_keys=2)
    limiter.decide_now(tiny, "old")
    limiter.decide_now(tiny, "new")
    assert limiter.decide_now(tiny, "old") == Decision(False, 1_000)  # refused: not updated
    limiter.decide_now(tiny, "third")  # "old" is still the least recently updated
    assert limiter.decide_now(tiny, "new") == Decision(False, 1_000)  # kept
    assert limiter.decide_now(tiny, "old") == Decision(True, 0)  # evicted: as new


def test_an_idle_key_expires_after_its_zones_ttl() -> None:
    """Within one zone an expired bucket has drained anyway; the ttl shows when a reload made
    the zone's burst smaller: the bucket filled under the old burst is dropped once idle for
    longer than the new zone's ttl, as Redis would have expired it."""
    clock = FakeClock(10.0)
    limiter = LocalLimiter(clock=clock)
    wide = compile_zone("z", RateLimit(rate="10r/s", burst=100))
    narrow = compile_zone("z", RateLimit(rate="10r/s", burst=2))
    assert narrow.ttl_ms == 1_300
    for _ in range(51):
        limiter.decide_now(wide, "k")
    clock.advance(1.3)  # idle for exactly the ttl: kept, and far over the new burst
    assert limiter.decide_now(narrow, "k") == Decision(False, 50_000 - 13_000 + 1_000)
    clock.advance(0.002)  # over 1300 ms since the bucket was last updated: expired
    assert limiter.decide_now(narrow, "k") == Decision(True, 0)
    assert limiter.decide_now(narrow, "k") == Decision(True, 1_000)


async def test_clear_and_close_forget_every_bucket() -> None:
    clock = FakeClock(10.0)
    limiter = LocalLimiter(clock=clock)
    await limiter.start()
    assert limiter.state is None
    assert (await limiter.decide(API, "k")).excess == 0
    assert (await limiter.decide(API, "k")).excess == 1_000
    limiter.clear()
    assert (await limiter.decide(API, "k")).excess == 0
    await limiter.close()
    assert (await limiter.decide(API, "k")).excess == 0


@pytest.mark.parametrize("rate", ["1r/m", "7r/m", "59r/m", "1r/s", "3r/s", "10r/s", "250r/s"])
@pytest.mark.parametrize("burst", [0, 1, 5])
def test_expiry_never_changes_a_decision(rate: str, burst: int) -> None:
    # Dropping an idle key (Redis's PEXPIRE, the local limiter's ttl) must give what nginx's
    # arithmetic on the kept key gives: step over buckets that never expire is the oracle.
    # (Below 1r/s, a key dropped once its burst drained let every request through.)
    zone = compile_zone("z", RateLimit(rate=rate, burst=burst))
    rng = random.Random(f"{rate}/{burst}")
    clock = FakeClock(100.0)
    limiter = LocalLimiter(clock=clock)
    kept: tuple[int, int] | None = None
    mean = 1 / max(zone.rate / 1000, 0.01)  # about one request per rate's interval
    for _ in range(400):
        clock.advance(rng.expovariate(1 / mean) * rng.choice((0.2, 1, 3)))
        expected, new = step(zone, kept, int(clock() * 1000))
        kept = new if new is not None else kept
        assert limiter.decide_now(zone, "k") == expected
