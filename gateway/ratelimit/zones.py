"""Rate-limit zones as nginx's ``limit_req`` counts them, the decisions limiters make, and
the ``Limiter`` seam both limiters (``local.py``, ``shared.py``) sit behind.

nginx keeps per key the time of the last accepted request (ms) and an ``excess`` in
milli-requests. A request adds 1000; elapsed time drains ``rate`` (milli-requests per second);
the request is refused when the new excess would exceed ``burst * 1000``, and a refused request
changes nothing. A key seen for the first time starts at excess 0, so at 10r/s burst=20 a
simultaneous burst lets exactly 21 through, then one more every 100 ms.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Protocol

from ..config import RateLimit


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
    ttl_ms: int  # idle keys expire once a new request would find them at 0 (+1 s)
    policy: str  # the RateLimit-Policy header value


def compile_zone(name: str, spec: RateLimit) -> Zone:
    count, _, unit = spec.rate.partition("r/")
    rate = int(count) * 1000 // (60 if unit == "m" else 1)  # nginx: rate * 1000 / scale
    burst = spec.burst * 1000
    delay = burst if spec.delay is None else spec.delay * 1000
    # A key may go once nginx's arithmetic would give its next request what a new key gets
    # (excess 0): after (excess + 1000) / rate, the excess at most the burst. Draining the
    # burst alone is too soon below 1r/s: at 1r/m a key gone after a second let every request
    # through.
    idle_ms = math.ceil((burst + 1000) * 1000 / rate) if rate else 0
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
        ttl_ms=idle_ms + 1000,
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
