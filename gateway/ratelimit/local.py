"""The in-memory limiter: nginx's arithmetic (``step``) over buckets in this process's memory.

Used when no Redis is configured (or ``url: memory://``), and as the shared limiter's
``on_error: local`` fallback while Redis fails. The shared limiter runs the same arithmetic
inside Redis (``shared.LUA``), which the tests check against a real Redis server and against
``step``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from .zones import Decision, Zone

MAX_LOCAL_KEYS: Final = 200_000  # about 40 MB at worst; the least recently used go first


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
            current = None  # idle past its time: as if expired in Redis
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
