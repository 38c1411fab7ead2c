"""Active health checks: every ``health.interval`` each target's ``health.path`` is fetched
with a short timeout (every ``health.unhealthy_interval`` while no target of its service is
usable, so that a service that returns is served again within about that times ``rise``).
A 2xx whose JSON ``status`` is not ``unhealthy`` passes (the DAARION services answer static
JSON; a 2xx without such a field passes too). Results go to the ``HealthBook``, which applies
rise/fall. One task for the whole gateway; it reads the current snapshot each round, so
reloads change what it probes without restarting it. A target's next probe waits for its
last one to end. A target on a node with ``tls`` is probed over HTTPS as its traffic goes; a
probe that fails in TLS gives that reason (``certificate verify failed: ...``) and counts in
``gateway_upstream_tls_failures_total``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Final

import aiohttp
import orjson

from ..dial import LOCAL_ERRNOS
from ..errors import tls_reason
from ..metrics import Metrics
from ..snapshot import Route, Snapshot, Target
from .health import HealthBook

log = logging.getLogger("gateway.health")

MAX_BODY: Final = 65536
MAX_CONCURRENT: Final = 64
PROBE_HEADERS: Final = {"User-Agent": "daarion-gateway-health", "Accept": "application/json"}


def judge(status: int, body: bytes) -> tuple[bool, str]:
    """Pass or fail, and why, for one probe answer."""
    if not 200 <= status < 300:
        return False, f"status {status}"
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return True, f"status {status}"
    if isinstance(document, dict) and document.get("status") == "unhealthy":
        return False, "reports unhealthy"
    return True, f"status {status}"


class Prober:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        session: aiohttp.ClientSession,
        health: HealthBook,
        metrics: Metrics,
    ) -> None:
        self._snapshot = snapshot
        self._session = session
        self._health = health
        self._metrics = metrics
        # Per target: when its last probe started, and the jitter of its interval.
        self._last: dict[tuple[str, str, str, int], tuple[float, float]] = {}
        self._probing: set[tuple[str, str, str, int]] = set()  # probes under way
        self._running: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(MAX_CONCURRENT)
        self._first: set[asyncio.Task[None]] = set()  # the first round's probes
        self._first_started = asyncio.Event()
        self._ended = asyncio.Event()  # a probe ended: what waited for it may be due

    async def run(self) -> None:
        try:
            first = self._round()
            self._first = set(self._running)
            self._first_started.set()
            await asyncio.sleep(first)
            while True:  # a scheduler: it sleeps until the next probe is due, or one ended
                delay = self._round()
                self._ended.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._ended.wait()
        finally:
            for task in self._running:
                task.cancel()

    async def first_round(self) -> None:
        """Until the probes of ``run``'s first round have answered or timed out (each within
        its ``health.timeout``)."""
        await self._first_started.wait()
        await asyncio.gather(*self._first, return_exceptions=True)

    def _round(self) -> float:
        """Start the probes that are due; return the seconds until the next one is."""
        now = time.monotonic()
        soonest = now + 1.0
        configured = set()
        health = self._health
        for route in self._snapshot().routes.values():
            policy = route.probe
            if not policy.enabled:
                continue
            down = not any(health.usable(t, now) for t in route.targets)
            every = policy.unhealthy_interval if down else policy.interval
            for target in route.targets:
                key = target.key
                configured.add(key)
                last = self._last.get(key)
                due = now if last is None else last[0] + every * last[1]  # the first at once
                if due <= now and key in self._probing:
                    continue  # due while its last probe runs: looked at again once it ends
                if due <= now:
                    # A little jitter keeps probes of many targets from marching in step.
                    jitter = random.uniform(0.95, 1.05)  # noqa: S311 - scheduling, not secrets
                    self._last[key] = (now, jitter)
                    due = now + every * jitter
                    self._start(route, target)
                soonest = min(soonest, max(due, now + 0.01))
        for key in self._last.keys() - configured:
            del self._last[key]
        return max(0.01, soonest - time.monotonic())

    def _start(self, route: Route, target: Target) -> None:
        task = asyncio.get_running_loop().create_task(self._probe(route, target))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _probe(self, route: Route, target: Target) -> None:
        self._probing.add(target.key)
        try:
            async with self._limit:
                judged = await self._fetch(target, route.probe.path, route.probe.timeout)
        finally:
            self._probing.discard(target.key)
            self._ended.set()
        if judged is None:
            return  # this machine was short of descriptors: nothing said of the target
        ok, reason = judged
        self._metrics.probes.add((target.service, target.node, "pass" if ok else "fail"))
        self._health.probed(target, ok, reason, route.probe)

    async def _fetch(self, target: Target, path: str, timeout: float) -> tuple[bool, str] | None:
        """(passed, why); None when the probe could not be made for want of this machine's
        resources (descriptors, buffers: ``dial.LOCAL_ERRNOS``), which is no failure of the
        target's, as requests do not count it either."""
        tls = target.tls
        try:
            async with asyncio.timeout(timeout):
                async with self._session.get(
                    target.origin + path,
                    headers=PROBE_HEADERS,
                    allow_redirects=False,
                    ssl=True if tls is None else tls.context,
                    server_hostname=None if tls is None else tls.server_hostname,
                ) as response:
                    body = await response.content.read(MAX_BODY)
                    return judge(response.status, body)
        except TimeoutError:
            return False, "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            cause = getattr(exc, "os_error", exc)
            if isinstance(cause, OSError) and cause.errno in LOCAL_ERRNOS:
                return None
            reason = tls_reason(exc)
            if reason is None:
                return False, type(exc).__name__
            self._metrics.upstream_tls_failures.add((target.node,))
            return False, reason
