"""What the gateway knows about each upstream target, kept across config reloads.

State is keyed by ``Target.key`` (service, node, host, port), outside the snapshot, so that
a reload that keeps a target keeps what is known about it. Only transitions are logged and
exported. This module makes decisions only; it does no I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import Literal

from .metrics import GATEWAY, Metrics
from .snapshot import Route, Target

log = logging.getLogger("gateway.health")

State = Literal["unknown", "up", "down"]


@dataclass(slots=True)
class TargetHealth:
    state: State = "unknown"
    reason: str = "no traffic yet"
    since: float = 0.0  # wall clock, for /health and logs


class HealthBook:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._targets: dict[tuple[str, str, str, int], TargetHealth] = {}

    def get(self, target: Target) -> TargetHealth:
        health = self._targets.get(target.key)
        if health is None:
            health = self._targets[target.key] = TargetHealth(since=time.time())
        return health

    def record(self, target: Target, ok: bool, reason: str) -> None:
        """Note the outcome of one exchange with ``target`` (passive check)."""
        health = self.get(target)
        state: State = "up" if ok else "down"
        if health.state == state:
            return
        previous = health.state
        health.state, health.reason, health.since = state, reason, time.time()
        self._metrics.health.labels(target.service, target.node).set(1 if ok else 0)
        level = logging.INFO if ok or previous == "unknown" else logging.WARNING
        log.log(
            level,
            "upstream target is %s",
            state,
            extra={
                "fields": {
                    "upstream_service": target.service,
                    "node": target.node,
                    "target": f"{target.host}:{target.port}",
                    "reason": reason,
                    "previous": previous,
                }
            },
        )

    def service_state(self, route: Route) -> str:
        """``connected`` if a target is up, ``disconnected`` if all are down, else ``unknown``."""
        states = {self.get(t).state for t in route.targets}
        if "up" in states:
            return "connected"
        if states == {"down"}:
            return "disconnected"
        return "unknown"

    def retain(self, routes: Iterable[Route]) -> None:
        """Forget targets that are no longer configured (after a reload)."""
        keep = {t.key for r in routes for t in r.targets}
        pairs = {key[:2] for key in keep}
        for key in [k for k in self._targets if k not in keep]:
            del self._targets[key]
            if key[:2] not in pairs:
                with suppress(KeyError):
                    self._metrics.health.remove(*key[:2])

    def export(self, routes: Iterable[Route]) -> dict[str, str]:
        """Update ``service_health{service="gateway",dependency=<service>}``; return the states."""
        states = {}
        for route in routes:
            state = self.service_state(route)
            states[route.service] = state
            self._metrics.health.labels(GATEWAY, route.service).set(
                0 if state == "disconnected" else 1
            )
        return states
