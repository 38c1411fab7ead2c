"""The client connections of one process as a whole: how many each client address holds and
how many there are in all (``limits.max_connections_per_client``, ``max_client_connections``),
which are idle, and which are in the middle of a request head (for the header timeout).

A connection is *idle* between requests, before any byte of the next head has arrived (a new
connection, too): at the global cap the longest-idle one is closed to make room, as nginx
reuses its idle keep-alive connections, and a new connection is refused only when none is
idle. Loopback admin peers (127.0.0.1, ::1) are never held to the per-client cap and have
``RESERVED`` slots beyond the global one, so /health and the admin endpoints answer while
clients fill the gateway.

One sweep task for all connections (as ``websocket/keepalive.py`` does for sessions): a head
that has not completed ``client_header_timeout`` after its first byte is answered 408 by its
connection. The hot path only notes when a head spans reads.

Refusals are counted in ``gateway_connections_refused_total{reason}`` (``per_client``,
``max_connections``) and logged once per client address per minute, with how many were
refused since the previous line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..snapshot import EdgePolicy

log = logging.getLogger("gateway")

RESERVED: Final = 32  # connections beyond the caps for the loopback admin peers
ADMIN_PEERS: Final = frozenset({"127.0.0.1", "::1"})
LOG_EVERY: Final = 60.0  # seconds between two refusal lines for one address
MAX_SWEEP_PERIOD: Final = 1.0
PER_CLIENT: Final = "per_client"
MAX_CONNECTIONS: Final = "max_connections"
TERMINATOR: Final = b"\r\n\r\n"


class Held(Protocol):
    """A client connection as the table sees it (``server.Connection``)."""

    def evict(self) -> None:
        """Close it without an answer: it is idle, and its slot is wanted."""

    def head_timed_out(self) -> bool:
        """Answer 408 and close, if it waits for the rest of its head (not while a request
        of it is being handled); True when it did."""


class ConnectionTable:
    """Counts per client address and in all; the idle connections, longest-idle first; the
    unfinished heads, oldest first. ``policy()`` is the current snapshot's ``edge``."""

    def __init__(
        self,
        metrics: Metrics,
        policy: Callable[[], EdgePolicy],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self._metrics = metrics
        self._address: dict[Held, str] = {}  # every admitted connection's client address
        self._per_address: dict[str, int] = {}
        self._idle: OrderedDict[Held, None] = OrderedDict()
        self._heads: OrderedDict[Held, float] = OrderedDict()  # when each head began
        self._fresh: set[Held] = set()  # admitted, and no byte of a request yet
        # (reason, address) -> when its last line was logged, how many were refused since
        self._refused: dict[tuple[str, str], tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._address)

    def held_by(self, address: str) -> int:
        return self._per_address.get(address, 0)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def fresh(self) -> int:
        """Connections accepted that have not sent a byte yet (a stop waits for them)."""
        return len(self._fresh)

    @property
    def heads(self) -> int:
        """Unfinished heads that span reads (a head that arrives whole is never noted)."""
        return len(self._heads)

    # -- connections come and go -----------------------------------------------------------

    def admit(self, conn: Held, address: str) -> bool:
        """Count a new connection from ``address``, closing idle ones to make room if the
        gateway is full; False (and counted, and maybe logged) when it is to be refused."""
        policy = self.policy()
        admin = address in ADMIN_PEERS
        held = self._per_address.get(address, 0)
        if not admin and held >= policy.per_client:
            self._refuse(PER_CLIENT, address, policy.per_client)
            return False
        limit = policy.max_clients + (RESERVED if admin else 0)
        while len(self._address) >= limit:
            if not self._idle:
                self._refuse(MAX_CONNECTIONS, address, limit)
                return False
            victim = next(iter(self._idle))
            self.release(victim)
            victim.evict()
        self._address[conn] = address
        self._per_address[address] = held + 1
        self._idle[conn] = None
        self._fresh.add(conn)
        return True

    def relayed(self, conn: Held) -> None:
        """A connection taken over by a WebSocket relay: no more heads, idle times or
        evictions for it, but it goes on counting against both caps (one address's sessions
        held the process's every descriptor) until ``release`` when its session ends."""
        self._idle.pop(conn, None)
        self._heads.pop(conn, None)
        self._fresh.discard(conn)

    def release(self, conn: Held) -> None:
        """Forget a connection (closed, or its WebSocket session ended); once only."""
        address = self._address.pop(conn, None)
        if address is None:
            return
        held = self._per_address[address] - 1
        if held:
            self._per_address[address] = held
        else:
            del self._per_address[address]
        self._idle.pop(conn, None)
        self._heads.pop(conn, None)
        self._fresh.discard(conn)

    # -- between requests and in a head ----------------------------------------------------

    def idle(self, conn: Held) -> None:
        """Its response is written and no byte of another request has come."""
        if conn in self._address:
            self._idle[conn] = None

    def busy(self, conn: Held) -> None:
        """A head began (bytes came): no longer idle."""
        self._idle.pop(conn, None)
        self._fresh.discard(conn)

    def head_started(self, conn: Held) -> None:
        """A head spans reads: the header timeout runs from now."""
        if conn in self._address and conn not in self._heads:
            self._heads[conn] = self.clock()

    def head_done(self, conn: Held) -> None:
        self._heads.pop(conn, None)

    # -- the sweeps ------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(min(MAX_SWEEP_PERIOD, self.policy().header_timeout / 4))
            try:
                self.sweep(self.clock())
            except Exception:  # one connection's trouble must not stop the sweeps of all
                log.exception("connection sweep failed")

    def sweep(self, now: float) -> None:
        cutoff = now - self.policy().header_timeout
        expired = []
        for conn, began in self._heads.items():
            if began > cutoff:
                break  # oldest first: the rest are younger
            expired.append(conn)
        for conn in expired:
            if conn.head_timed_out():
                self._heads.pop(conn, None)
        self._log_refusals(now)

    # -- refusals --------------------------------------------------------------------------

    def _refuse(self, reason: str, address: str, limit: int) -> None:
        self._metrics.connections_refused.labels(reason).inc()
        key = (reason, address)
        noted = self._refused.get(key)
        if noted is not None:
            self._refused[key] = (noted[0], noted[1] + 1)
            return
        self._refused[key] = (self.clock(), 0)
        _log_refused(reason, address, limit, 1)

    def _log_refusals(self, now: float) -> None:
        """A line for each address refused again since its last line a minute ago."""
        for key, noted in list(self._refused.items()):
            when, since = noted
            if now - when < LOG_EVERY:
                continue
            if since:
                reason, address = key
                policy = self.policy()
                limit = policy.per_client if reason == PER_CLIENT else policy.max_clients
                _log_refused(reason, address, limit, since)
                self._refused[key] = (now, 0)
            else:
                del self._refused[key]


def _log_refused(reason: str, address: str, limit: int, count: int) -> None:
    log.warning(
        "client connections refused",
        extra={"fields": {"reason": reason, "client": address, "limit": limit, "refused": count}},
    )


def head_end(tail: bytes, data: bytes) -> int:
    """Where in ``data`` the request head ends (just past its empty line), or -1 when it
    does not end in ``data``; ``tail`` is the end of what came of the head before (its last
    3 bytes), since the empty line may straddle two reads."""
    if tail:
        joint = (tail + data[:3]).find(TERMINATOR)
        if joint >= 0:
            return joint + 4 - len(tail)
    at = data.find(TERMINATOR)
    return at + 4 if at >= 0 else -1
