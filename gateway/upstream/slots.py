"""Per-service limits on requests in flight, so that one stalled service cannot take every
upstream connection. Waiters are served first come, first served."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from contextlib import suppress
from typing import TYPE_CHECKING

from ..errors import GatewayError

if TYPE_CHECKING:
    from ..snapshot import Route


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


class SlotTable:
    """Each service's ``Slots``, kept across reloads (requests in flight keep theirs)."""

    def __init__(self) -> None:
        self._slots: dict[str, Slots] = {}

    def for_route(self, route: Route) -> Slots:
        slots = self._slots.get(route.service)
        if slots is None:
            slots = self._slots[route.service] = Slots(route.max_connections)
        return slots

    def sync(self, routes: Mapping[str, Route]) -> None:
        """Resize to a reloaded config's limits; forget the services it removed."""
        for name in list(self._slots):
            route = routes.get(name)
            if route is None:
                del self._slots[name]
            else:
                self._slots[name].resize(route.max_connections)
