"""What the gateway knows about each upstream target and node, kept across config reloads.

Two sources, one record per target (``TargetHealth``):
- **active** checks (``probe.py`` calls ``probed``): a target goes *down* after ``fall``
  consecutive failed probes and comes back *up* after ``rise`` consecutive passes;
- **passive** checks (the forwarding path calls ``passed``/``failed``): after ``fall`` consecutive
  failures of real traffic (connect failures, timeouts, 5xx) a target is *ejected* for
  ``base`` seconds, ``base`` more each time that repeats (at most ``max``). ``rise``
  consecutive passing probes end an ejection early, so a returning node is back in use
  within ``interval * rise``.

A target is usable when it is up and not ejected. A node is offline when none of its targets
is usable. Only transitions are logged and exported. A target's ``reason`` says why it is in
its state: the transition's, or, while it stays usable, its last check's (a failing target
shows what failed, say ``request failed: certificate verify failed: ...``). No I/O here: time
comes in as ``now``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from ..metrics import GATEWAY, Metrics
from ..snapshot import EjectionPolicy, ProbePolicy, Route, Target

log = logging.getLogger("gateway.health")

# How long without an ejection before the next one starts again from ``base``.
EJECTION_MEMORY_FACTOR: Final = 2


@dataclass(slots=True)
class TargetHealth:
    up: bool = True  # optimistic until probes say otherwise: startup never black-holes traffic
    reason: str = "not checked yet"
    since: float = 0.0  # wall clock of the last change of usability
    probe_passes: int = 0  # consecutive
    probe_failures: int = 0  # consecutive
    traffic_failures: int = 0  # consecutive
    ejected_until: float = 0.0  # monotonic
    # The ejection came of answers (502s, timeouts, resets: the target took the connections),
    # not of connections refused or never made: with every target out, such an ejection is
    # overridden (``usable_in_panic``), since a client may have caused it.
    ejected_answering: bool = False
    ejections: int = 0  # in a row, for the growing ejection time
    last_ejection: float = float("-inf")  # monotonic
    last_ok: bool | None = None  # the last probe or exchange; None before any

    def usable(self, now: float) -> bool:
        return self.up and now >= self.ejected_until

    def usable_in_panic(self, now: float) -> bool:
        """Usable when a service has no usable target: ejections that came of answers
        are ignored (Envoy's panic mode)."""
        return self.up and (self.ejected_answering or now >= self.ejected_until)

    def state(self, now: float) -> str:
        if not self.up:
            return "down"
        if now < self.ejected_until:
            return "ejected"
        if self.last_ok is None:
            return "unknown"
        return "up" if self.last_ok else "failing"  # failing: in use, fall not reached yet


class HealthBook:
    """Every target's ``TargetHealth``, keyed by ``Target.key`` so reloads keep it."""

    def __init__(
        self,
        metrics: Metrics,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self._targets: dict[tuple[str, str, str, int], TargetHealth] = {}
        self._offline: set[str] = set()  # nodes last seen with no usable target
        self.monotonic = monotonic
        self.wall = wall

    def get(self, target: Target) -> TargetHealth:
        """``target``'s record; a target the config does not have (a request or probe of the
        snapshot before a reload asking) gets a fresh one that is not kept: records are made
        and dropped by ``sync`` only, so such a target cannot come back as a node's."""
        health = self._targets.get(target.key)
        return TargetHealth(since=self.wall()) if health is None else health

    def usable(self, target: Target, now: float) -> bool:
        health = self._targets.get(target.key)
        return health is None or health.usable(now)

    def usable_in_panic(self, target: Target, now: float) -> bool:
        health = self._targets.get(target.key)
        return health is None or health.usable_in_panic(now)

    def sync(self, routes: Iterable[Route]) -> None:
        """Know exactly the configured targets: new ones start optimistic, removed ones are
        forgotten (with their series). Called at start and after each reload."""
        routes = list(routes)
        keep = {t.key for r in routes for t in r.targets}
        for route in routes:
            for target in route.targets:
                health = self._targets.get(target.key)
                if health is None:
                    self._targets[target.key] = TargetHealth(since=self.wall())
                elif not route.probe.enabled:
                    # No probe will run again: what the last ones said is void (a target
                    # they had marked down would never come back).
                    was_usable, was_up = health.usable(self.monotonic()), health.up
                    health.up, health.probe_passes, health.probe_failures = True, 0, 0
                    if not was_up:
                        self._changed(target, health, was_usable, "probes turned off")
        for key in [k for k in self._targets if k not in keep]:
            del self._targets[key]
        targets = {k[:2] for k in keep}
        nodes = {(k[1],) for k in keep}
        metrics = self._metrics
        metrics.remove_series(
            metrics.health, lambda labels: labels not in targets and labels[0] != GATEWAY
        )
        metrics.remove_series(metrics.node_up, lambda labels: labels not in nodes)
        self._offline &= {k[1] for k in keep}

    # -- passive: real traffic ----------------------------------------------------------------

    def passed(self, target: Target) -> None:
        """Real traffic got an answer from ``target`` (the hot path: kept small)."""
        health = self._targets.get(target.key)
        if health is None:
            return  # removed by a reload while its request ran
        if health.last_ok is not True:  # rare: its first answer, or one after a failure
            self._still_usable(health, "request answered")
        health.last_ok = True
        health.traffic_failures = 0

    def failed(self, target: Target, reason: str, policy: ProbePolicy,
               ejection: EjectionPolicy, *, answering: bool = True) -> None:  # fmt: skip
        """Real traffic failed with ``target``: count it, and eject after ``fall`` in a row.
        ``answering``: the target took the connection (False: refused, or never made)."""
        health = self._targets.get(target.key)
        if health is None:
            return  # removed by a reload while its request ran
        health.last_ok = False
        now = self.monotonic()
        if now < health.ejected_until:
            return  # already out: requests that were in flight are not new evidence
        health.traffic_failures += 1
        if health.traffic_failures < policy.fall:
            self._still_usable(health, f"request failed: {reason}")
            return
        if now - health.last_ejection > ejection.max * EJECTION_MEMORY_FACTOR:
            health.ejections = 0
        health.ejections += 1
        seconds = min(ejection.base * health.ejections, ejection.max)
        was_usable = health.usable(now)
        health.ejected_until = now + seconds
        health.ejected_answering = answering
        health.last_ejection = now
        health.traffic_failures = 0
        health.probe_passes = 0
        self._metrics.ejections.add((target.service, target.node))
        reason = f"ejected for {seconds:g} s after {policy.fall} failures ({reason})"
        self._changed(target, health, was_usable, reason)

    # -- active: probes -----------------------------------------------------------------------

    def probed(self, target: Target, ok: bool, reason: str, policy: ProbePolicy) -> None:
        """Record one active probe of ``target``."""
        health = self._targets.get(target.key)
        if health is None:
            return  # removed by a reload while the probe ran
        now = self.monotonic()
        was_usable = health.usable(now)
        previous, health.last_ok = health.last_ok, ok
        if ok:
            health.probe_failures = 0
            health.probe_passes += 1
            if health.probe_passes >= policy.rise and (not health.up or now < health.ejected_until):
                health.up, health.ejected_until = True, 0.0
                self._changed(target, health, was_usable, f"{policy.rise} probes passed")
            elif previous is not True:
                self._still_usable(health, f"probe passed: {reason}", now)
        else:
            health.probe_passes = 0
            health.probe_failures += 1
            if health.up and health.probe_failures >= policy.fall:
                health.up = False
                reason = f"{policy.fall} probes failed: {reason}"
                self._changed(target, health, was_usable, reason)
            else:
                self._still_usable(health, f"probe failed: {reason}", now)
        self._check_nodes(now)

    def _still_usable(self, health: TargetHealth, reason: str, now: float | None = None) -> None:
        """A check that changed nothing: while the target is usable, it is why it is up or
        failing (a down or ejected target keeps the reason it went out for)."""
        if health.usable(self.monotonic() if now is None else now):
            health.reason = reason

    def _changed(self, target: Target, health: TargetHealth, was_usable: bool, reason: str) -> None:
        now = self.monotonic()
        health.reason = reason
        if health.usable(now) == was_usable:
            return
        health.since = self.wall()
        log.log(
            logging.WARNING if was_usable else logging.INFO,
            "upstream target is %s",
            health.state(now),
            extra={
                "fields": {
                    "upstream_service": target.service,
                    "node": target.node,
                    "target": f"{target.host}:{target.port}",
                    "reason": reason,
                }
            },
        )
        self._check_nodes(now)

    def _check_nodes(self, now: float) -> dict[str, bool]:
        """Which nodes have a usable target; logs nodes going offline or coming back."""
        online: dict[str, bool] = {}
        for key, health in self._targets.items():
            online[key[1]] = online.get(key[1], False) or health.usable(now)
        for node, ok in online.items():
            if ok and node in self._offline:
                self._offline.discard(node)
                log.info("node is online", extra={"fields": {"node": node}})
            elif not ok and node not in self._offline:
                self._offline.add(node)
                log.warning("node is offline", extra={"fields": {"node": node}})
        return online

    # -- views --------------------------------------------------------------------------------

    def service_state(self, route: Route, now: float) -> str:
        """``connected``: a usable target whose last check passed; ``disconnected``: no usable
        target; ``unknown``: usable targets, none confirmed yet (or the last checks failed
        without reaching ``fall``)."""
        records = [self.get(t) for t in route.targets]
        usable = [r for r in records if r.usable(now)]
        if not usable:
            return "disconnected"
        return "connected" if any(r.last_ok for r in usable) else "unknown"

    def export(self, routes: Iterable[Route]) -> tuple[dict[str, str], dict[str, str]]:
        """Set every health gauge from the current state; return the service and node states
        (for /health). States depend on time (ejections end), so this runs per scrape."""
        now = self.monotonic()
        services = {}
        for route in routes:
            services[route.service] = state = self.service_state(route, now)
            self._metrics.health.labels(GATEWAY, route.service).set(
                0 if state == "disconnected" else 1
            )
            # One series per node: with several targets of the service there (two ports), 1
            # only when every one of them is usable, so that none is hidden by another.
            by_node: dict[str, int] = {}
            for target in route.targets:
                up = int(self.get(target).usable(now))
                by_node[target.node] = by_node.get(target.node, 1) & up
            for node, up in by_node.items():
                self._metrics.health.labels(route.service, node).set(up)
        nodes = {}
        for node, ok in sorted(self._check_nodes(now).items()):
            nodes[node] = "online" if ok else "offline"
            self._metrics.node_up.labels(node).set(1 if ok else 0)
        return services, nodes

    def describe(self, target: Target) -> dict[str, object]:
        """One target for ``/gateway/upstreams``."""
        health = self.get(target)
        now = self.monotonic()
        out: dict[str, object] = {
            "state": health.state(now),
            "reason": health.reason,
            "since": _iso(health.since),
        }
        if now < health.ejected_until:
            out["ejected_for_s"] = round(health.ejected_until - now, 3)
        return out


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
