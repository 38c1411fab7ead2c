"""Rate limiting with nginx's ``limit_req`` arithmetic: zones, decisions, the in-memory limiter.

nginx keeps per key the time of the last accepted request (ms) and an ``excess`` in
milli-requests. A request adds 1000; elapsed time drains ``rate`` (milli-requests per second);
the request is refused when the new excess would exceed ``burst * 1000``, and a refused request
changes nothing. A key seen for the first time starts at excess 0, so at 10r/s burst=20 a
simultaneous burst lets exactly 21 through, then one more every 100 ms.

``step()`` is that arithmetic for the in-memory limiter (per process: used when Redis is not
configured or not answering). The shared limiter runs the same arithmetic inside Redis, in
``redislimit.LUA``, which the tests check against a real Redis server.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from .config import RateLimit

MAX_LOCAL_KEYS: Final = 200_000  # about 40 MB at worst; the least recently used go first


@dataclass(frozen=True, slots=True)
class Zone:
    """A compiled ``rate_limits`` entry. Amounts are nginx's: milli-requests (per second)."""

    name: str
    rate: int  # milli-requests per second
    burst: int  # milli-requests
    delay: int  # milli-requests served without delay
    key: tuple[str, ...]
    dry_run: bool
    status: int
    headers: bool
    ttl_ms: int  # idle keys expire once their excess has drained (+1 s)
    policy: str  # the RateLimit-Policy header value


def compile_zone(name: str, spec: RateLimit) -> Zone:
    count, _, unit = spec.rate.partition("r/")
    rate = int(count) * 1000 // (60 if unit == "m" else 1)  # nginx: rate * 1000 / scale
    burst = spec.burst * 1000
    delay = burst if spec.delay is None else spec.delay * 1000
    drain_ms = math.ceil(burst * 1000 / rate) if rate else 0
    window = max(1, math.ceil((spec.burst + 1) * 1000 / rate)) if rate else 1
    return Zone(
        name=name,
        rate=rate,
        burst=burst,
        delay=delay,
        key=spec.key,
        dry_run=spec.dry_run,
        status=spec.status,
        headers=spec.headers,
        ttl_ms=drain_ms + 1000,
        policy=f'"{name}";q={spec.burst + 1};w={window}',
    )


@dataclass(frozen=True, slots=True)
class Decision:
    """One answer. ``excess``: the bucket's excess in milli-requests, this request counted
    (for a refusal: what it would have been)."""

    allowed: bool
    excess: int

    def delay_seconds(self, zone: Zone) -> float:
        """How long nginx's ``delay=`` holds an allowed request back (0 under nodelay)."""
        if not self.allowed or self.excess <= zone.delay:
            return 0.0
        return (self.excess - zone.delay) / zone.rate

    def retry_after(self, zone: Zone) -> int:
        """Whole seconds until a request would be allowed again (at least 1)."""
        return max(1, math.ceil((self.excess - zone.burst) / zone.rate))

    def header(self, zone: Zone) -> str:
        """The IETF ``RateLimit`` header: requests left now, seconds until the bucket is empty."""
        if self.allowed:
            remaining = (zone.burst - self.excess) // 1000
            reset = math.ceil(self.excess / zone.rate) if self.excess else 0
        else:
            remaining, reset = 0, self.retry_after(zone)
        return f'"{zone.name}";r={remaining};t={reset}'


def step(
    zone: Zone, state: tuple[int, int] | None, now_ms: int
) -> tuple[Decision, tuple[int, int] | None]:
    """nginx's ``ngx_http_limit_req_lookup``: (decision, new state or None if unchanged)."""
    if state is None:
        return Decision(True, 0), (0, now_ms)
    excess, last = state
    ms = now_ms - last
    if ms < -60000:
        ms = 1
    elif ms < 0:
        ms = 0
    new = max(0, excess - zone.rate * ms // 1000 + 1000)
    if new > zone.burst:
        return Decision(False, new), None
    return Decision(True, new), (new, now_ms if ms else last)


def bucket_key(zone: Zone, parts: tuple[str, ...]) -> str:
    """The bucket's name: the zone and a digest of what identifies the client (bounded, opaque)."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=12).hexdigest()
    return f"{zone.name}:{digest}"


class Limiter(Protocol):
    """Decides whether one request of a bucket may pass. ``state`` feeds /health."""

    @property
    def state(self) -> str | None: ...

    async def decide(self, zone: Zone, key: str) -> Decision: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class LocalLimiter:
    """Buckets in this process's memory, least recently used evicted past ``max_keys``."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_LOCAL_KEYS,
    ) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[int, int]] = {}

    @property
    def state(self) -> str | None:
        return None

    def decide_now(self, zone: Zone, key: str) -> Decision:
        now_ms = int(self._clock() * 1000)
        buckets = self._buckets
        current = buckets.get(key)
        if current is not None and now_ms - current[1] > zone.ttl_ms:
            current = None  # idle past its drain time: as if expired in Redis
        decision, new = step(zone, current, now_ms)
        if new is not None:
            buckets.pop(key, None)  # re-insert: dict order is least recently updated first
            buckets[key] = new
            if len(buckets) > self._max_keys:
                del buckets[next(iter(buckets))]
        return decision

    async def decide(self, zone: Zone, key: str) -> Decision:
        return self.decide_now(zone, key)

    def clear(self) -> None:
        self._buckets.clear()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.clear()
