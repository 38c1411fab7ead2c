"""Choose an upstream, send, and retry where it is safe: the forwarding phase.

Retry rules (Pingora's and Envoy's, made strict):
- a request that was never sent (connection refused, connect timeout) is retried on the next
  target, whatever its method;
- a request that was sent is retried only when its method is idempotent and its body can be
  sent again (none, or at most ``REPLAY_LIMIT`` bytes, buffered), and only when the upstream
  closed without answering, sent an invalid answer, or answered 502/503/504;
- never after a response timeout (the upstream may still be working on it), and never after
  any byte of the response went to the client;
- at most ``retries`` extra attempts, each on a target not yet tried (or, after the connection
  closed without an answer and with no other target left, the same one: that is how a stale
  keep-alive connection is recovered), after a short jittered back-off. A POST that reached
  an upstream is never sent to a second one.

Every outcome is also a passive health check of its target (``HealthBook.passed``/``failed``).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web

from .errors import GatewayError
from .forward import Origin, UpstreamAborted, read_body, relay, send

if TYPE_CHECKING:
    from .app import Gateway
    from .pipeline import Exchange
    from .snapshot import Route, Target

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
REPLAY_LIMIT: Final = 64 * 1024  # bodies up to this size are buffered so that they can be retried
RETRY_STATUS: Final = frozenset({502, 503, 504})
NEVER_SENT: Final = frozenset({"connect", "connect_timeout"})
SENT_RETRYABLE: Final = frozenset({"disconnect", "io", "protocol", "status"})
# Closed before any answer: also what reusing a keep-alive connection the upstream had just
# closed looks like, so with no other target left the same one may be tried again.
SAME_TARGET_AGAIN: Final = frozenset({"disconnect", "io"})
BACKOFF: Final = 0.025  # seconds, jittered ±50 %


def may_retry(kind: str | None, method: str, replayable: bool) -> bool:
    if kind in NEVER_SENT:
        return True
    return kind in SENT_RETRYABLE and method in IDEMPOTENT and replayable


async def exchange(
    gw: Gateway, ex: Exchange, route: Route, path_qs: str, extra: dict[str, str] | None
) -> web.StreamResponse:
    """Forward ``ex.request`` to a target of ``route`` and stream back its answer."""
    request = ex.request
    health = gw.health
    now = health.monotonic()

    def usable(target: Target) -> bool:
        return health.usable(target, now)

    first = gw.balancer.choose(route, usable)
    if first is None:
        raise all_down(gw, route)
    slots = gw.slots_for(route)
    await slots.acquire(route.connect_timeout)
    gauge = gw.metrics.active_for(route.service)
    gauge.inc()
    try:
        replay = REPLAY_LIMIT if route.retries and request.method in IDEMPOTENT else 0
        body = await read_body(request, replay)
        replayable = not isinstance(body, aiohttp.StreamReader)
        upstream = await _attempts(
            gw, ex, route, first, path_qs=path_qs, body=body, replayable=replayable, usable=usable
        )
        target = ex.target
        assert target is not None  # noqa: S101 - _attempts sets it with each attempt
        if target.tier > 0:
            gw.metrics.failovers.labels(route.service, target.node).inc()
        try:
            return await relay(request, upstream, ex.request_id, extra)
        except UpstreamAborted:
            health.failed(target, "aborted mid-response", route.probe, route.ejection)
            raise
    finally:
        gauge.dec()
        slots.release()


async def _attempts(
    gw: Gateway,
    ex: Exchange,
    route: Route,
    first: Target,
    *,
    path_qs: str,
    body: bytes | aiohttp.StreamReader | None,
    replayable: bool,
    usable: Callable[[Target], bool],
) -> aiohttp.ClientResponse:
    """Send until a target answers (or the rules say stop); return its response."""
    request = ex.request
    origin = Origin(ex.client, ex.proto, ex.request_id)
    tried: list[Target] = []
    failure: GatewayError | None = None
    for attempt in range(route.retries + 1):
        target = gw.balancer.choose(route, usable, tried) if attempt else first
        if target is None and failure is not None and failure.kind in SAME_TARGET_AGAIN:
            target = tried[-1]  # no other target: the same one again (a stale keep-alive)
        if target is None:
            break
        if failure is not None:
            gw.metrics.retries.labels(route.service, failure.kind or "unknown").inc()
            await asyncio.sleep(BACKOFF * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
        tried.append(target)
        ex.target = target
        try:
            upstream = await send(
                gw.session, request, target=target, path_qs=path_qs, body=body,
                timeout=route.client_timeout, origin=origin,
            )  # fmt: skip
        except GatewayError as err:
            gw.health.failed(target, err.code, route.probe, route.ejection)
            if not may_retry(err.kind, request.method, replayable):
                raise
            failure = err
            continue
        status = upstream.status
        if status < 500:
            gw.health.passed(target)
            return upstream
        gw.health.failed(target, f"status {status}", route.probe, route.ejection)
        if (
            status in RETRY_STATUS
            and attempt < route.retries
            and may_retry("status", request.method, replayable)
            and gw.balancer.has_other(route, usable, tried)
        ):
            upstream.release()
            failure = GatewayError(
                502, "upstream_status", f"the upstream answered {upstream.status}", kind="status"
            )
            continue
        return upstream
    if failure is None:
        raise all_down(gw, route)
    raise failure


def all_down(gw: Gateway, route: Route) -> GatewayError:
    """503 with Retry-After: the seconds until an ejection ends or the next probe."""
    now = gw.health.monotonic()
    waits = [
        max(gw.health.get(t).ejected_until - now, 0) or route.probe.interval for t in route.targets
    ]
    return GatewayError(
        503,
        "no_healthy_upstream",
        "no target of this service is up",
        kind="unavailable",
        headers={"Retry-After": str(max(1, math.ceil(min(waits))))},
    )
