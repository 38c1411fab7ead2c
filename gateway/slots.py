"""Per-service limits on requests in flight, so that one stalled service cannot take every
upstream connection. Waiters are served first come, first served."""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import suppress

from .errors import GatewayError


class Slots:
    """A counting semaphore whose size can change (on config reload) and whose wait is bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def resize(self, limit: int) -> None:
        self.limit = limit
        while self._waiters and self.in_use < self.limit:
            if self._wake_oldest():
                self.in_use += 1

    async def acquire(self, timeout: float) -> None:
        """Take a slot, waiting up to ``timeout`` seconds; 503 if none frees up in time."""
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot arrived just as we gave up: pass it on
            else:
                waiter.cancel()
                with suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise GatewayError(
                    503,
                    "upstream_busy",
                    "too many requests in flight to this service",
                    kind="busy",
                    headers={"Retry-After": "1"},
                ) from None
            raise
        # A slot handed over by release() or resize(): in_use already counts it.

    def release(self) -> None:
        # The slot goes straight to the oldest waiter, unless a shrink left too many in use.
        if self.in_use <= self.limit and self._wake_oldest():
            return
        self.in_use -= 1

    def _wake_oldest(self) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False
