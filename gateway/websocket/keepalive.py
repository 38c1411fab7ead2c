"""What keeps WebSocket sessions honest, for all of them from one task: keepalive pings,
dead peers, idle sessions, close handshakes that do not finish, the session counters in
/metrics, and closing at shutdown.

A leg that sent nothing for ``ws_ping_interval`` gets a ping (with the gateway's own payload,
whose pong is not passed on); a leg that then stays silent for half an interval is dead: its
connection is dropped, and the other leg gets 1001 (the client died) or
``ws_upstream_gone_code`` (the upstream did: 1011 by default). Sweeps run every quarter
interval (at most every second), so a dead peer is found within two intervals; so is one
that takes none of what it is sent for two intervals (its leg cannot be pinged while a frame
to it is half written, and the other leg is not read meanwhile). A session
whose close handshake has not finished ``CLOSE_TIMEOUT`` after it began is cut. One task and
a few numbers per session, instead of timers per leg.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .session import CLOSE_TIMEOUT, GOING_AWAY, Session, close_all

if TYPE_CHECKING:
    from ..context import Shared

log = logging.getLogger("gateway.websocket")

MAX_SWEEP_PERIOD = 1.0


class Keepalive:
    def __init__(self, shared: Shared) -> None:
        self._shared = shared

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._period())
            self.sweep(time.monotonic())

    def _period(self) -> float:
        intervals = [
            entry.policy.ws.ping_interval
            for entry in self._shared.snapshot.table.entries
            if entry.policy.ws is not None
        ]
        return min([MAX_SWEEP_PERIOD, *(i / 4 for i in intervals)])

    def sweep(self, now: float) -> None:
        for session in list(self._shared.sessions):
            try:
                if session.deadline:
                    if now >= session.deadline:
                        session.cut()
                else:
                    _check(session, now)
            except Exception:  # one session's trouble must not stop the sweeps of all
                log.exception(
                    "websocket sweep failed", extra={"fields": {"session": session.request_id}}
                )


def _check(session: Session, now: float) -> None:
    interval = session.policy.ping_interval
    for leg in session.legs:
        if leg.paused:  # not read (the other side is slow to take its data): not silent
            leg.pinged = 0.0
            peer = leg.peer
            if now - leg.paused_at >= 2 * interval:
                # The other side took none of what it was sent for two intervals: dead, or
                # frozen (and it cannot be pinged while a frame to it is half written).
                gone = GOING_AWAY if peer.is_client else session.policy.upstream_gone_code
                session.ending(f"dead {peer.name}", gone)
                if peer.transport is not None:
                    peer.transport.abort()
                return
            continue
        pinged = leg.pinged
        if pinged and leg.seen >= pinged:
            leg.pinged = pinged = 0.0  # it answered (or spoke)
        if pinged and now - pinged >= interval / 2:
            gone = GOING_AWAY if leg.is_client else session.policy.upstream_gone_code
            session.ending(f"dead {leg.name}", gone)
            if leg.transport is not None:
                leg.transport.abort()  # its loss closes the other leg
            return
        if not pinged and now - leg.seen >= interval and leg.ping():
            leg.pinged = now
    # Messages and payload bytes that went through, a frame's as they stream (not as its
    # header announces them): a session moving one long frame is not idle.
    relayed = sum(sum(leg.reader.passed()) for leg in session.legs)
    if relayed != session.relayed:
        session.relayed, session.activity = relayed, now
        return
    idle = session.policy.idle_timeout
    if idle is not None and now - session.activity > idle:
        session.ending("idle", GOING_AWAY)
        session.close_both(GOING_AWAY)


def report(sessions: set[Session]) -> None:
    """Bring the relayed message and byte counters of open sessions up to date."""
    for session in list(sessions):
        session.report()


async def shut_down(sessions: set[Session]) -> None:
    """Close every open session with 1001 on both legs, and wait (a close handshake's time
    at most) for them to be closed."""
    close_all(sessions)
    deadline = time.monotonic() + CLOSE_TIMEOUT
    # Sessions end in transport callbacks; polling their set (50 ms, 5 s at most, once at
    # shutdown) is simpler than an event that every session would have to set.
    while sessions and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    for session in list(sessions):
        session.cut()
    for _ in range(3):  # the connection_lost callbacks that end them
        await asyncio.sleep(0)
