"""What keeps WebSocket sessions honest, for all of them from one task: keepalive pings,
dead peers, idle sessions, the session counters in /metrics, and closing at shutdown.

A leg that sent nothing for ``ws_ping_interval`` gets a ping (with the gateway's own payload,
whose pong is not passed on); a leg that then stays silent for half an interval is dead, and
the session ends (1001 to the upstream when the client died, 1014 to the client when the
upstream did). Sweeps run every quarter interval (at most every second), so a dead peer is
found within two intervals. One task and a few numbers per session, instead of timers per
message on every leg.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .websocket import (
    BAD_GATEWAY,
    CLIENT,
    GOING_AWAY,
    KEEPALIVE,
    UPSTREAM,
    Session,
    close_both,
)

if TYPE_CHECKING:
    from .app import Gateway

MAX_SWEEP_PERIOD = 1.0


class Keepalive:
    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self._actions: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._period())
                self.sweep(time.monotonic())
        finally:
            for task in self._actions:
                task.cancel()

    def _period(self) -> float:
        intervals = [
            route.ws.ping_interval
            for route in self._gw.snapshot.routes.values()
            if route.ws is not None
        ]
        return min([MAX_SWEEP_PERIOD, *(i / 4 for i in intervals)])

    def sweep(self, now: float) -> None:
        for session in list(self._gw.websockets):
            if session.ended_by:
                continue
            self._check(session, now)

    def _check(self, session: Session, now: float) -> None:
        interval = session.policy.ping_interval
        for leg in (CLIENT, UPSTREAM):
            pinged = session.pinged[leg]
            if pinged and session.seen[leg] >= pinged:
                session.pinged[leg] = pinged = 0.0  # it answered (or spoke)
            if pinged and now - pinged >= interval / 2:
                dead = "dead client" if leg == CLIENT else "dead upstream"
                session.ending(dead, GOING_AWAY if leg == CLIENT else BAD_GATEWAY)
                code = session.close_code or GOING_AWAY
                self._spawn(close_both(session, code, first=1 - leg))  # the live leg first
                return
            if not pinged and now - session.seen[leg] >= interval:
                session.pinged[leg] = now
                self._spawn(_ping(session, leg))
        idle = session.policy.idle_timeout
        if idle is not None and now - session.last_activity > idle:
            session.ending("idle", GOING_AWAY)
            self._spawn(close_both(session, GOING_AWAY))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)


async def _ping(session: Session, leg: int) -> None:
    try:
        async with asyncio.timeout(session.policy.ping_interval):
            await session.legs[leg].ping(KEEPALIVE)
    except Exception:  # noqa: BLE001, S110 - a leg that cannot take a ping is found dead anyway
        pass


def report(gw: Gateway) -> None:
    """Bring the relayed message and byte counters of open sessions up to date."""
    for session in list(gw.websockets):
        session.report(gw.metrics)


async def close_all(gw: Gateway) -> None:
    """Close every open session with 1001 on both legs (at shutdown)."""
    sessions = list(gw.websockets)
    for session in sessions:
        session.ending("shutdown", GOING_AWAY)
    closing = (close_both(s, GOING_AWAY) for s in sessions)
    await asyncio.gather(*closing, return_exceptions=True)
