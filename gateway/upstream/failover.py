"""Choose a target, try it, and fail over where it is safe: the one loop that HTTP requests
and WebSocket handshakes share.

Retry rules (Pingora's and Envoy's, made strict), decided by ``next_target`` alone:
- a request that was never sent (connection refused, connect timeout) is retried on the next
  target, whatever its method;
- a request that was sent is retried only when its method is idempotent and its body can be
  sent again (none, or at most ``REPLAY_LIMIT`` bytes, buffered), and only when the upstream
  closed without answering, sent an invalid answer, or answered 502/503/504 (``status_kind``);
- never after a response timeout (the upstream may still be working on it), and never after
  any byte of the response went to the client (the loop ends before that);
- at most ``retries`` extra attempts, each on a target not yet tried (or, after the connection
  closed without an answer and with no other target left, the same one once more if it is
  still usable: that is how a stale keep-alive connection is recovered), after a short
  jittered back-off. A POST that reached an upstream is never sent to a second one.

Every outcome is also a passive health check of its target
(``HealthBook.passed``/``failed``; an answer ``NOT_A_TARGET_FAILURE`` names passes), and
ejections for answers never take a service's last targets out (with none usable,
``first_target`` tries those, if the probes hold them up); every retry counts in
``gateway_retries_total{kind}``, and an answer from a later tier in
``gateway_failovers_total``. A connection that failed in TLS (the node's certificate did not
verify, or the handshake failed) is a connect failure like any other, and also counts in
``gateway_upstream_tls_failures_total{node}``, with its target and reason in the request's
log line (``upstream_tls_failures``).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final, Generic, TypeVar

from ..errors import GatewayError

if TYPE_CHECKING:
    from ..context import Exchange, Shared
    from ..snapshot import Route, Target
    from .balancer import Balancer
    from .health import HealthBook

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
REPLAY_LIMIT: Final = 64 * 1024  # bodies up to this size are buffered so that they can be retried
NEVER_SENT: Final = frozenset({"connect", "connect_timeout"})
SENT_RETRYABLE: Final = frozenset({"disconnect", "io", "protocol", "status", "status_503", "stale"})
# Closed before any answer: also what reusing a keep-alive connection the upstream had just
# closed looks like, so with no other target left the same one may be tried again.
SAME_TARGET_AGAIN: Final = frozenset({"disconnect", "io", "stale"})
# Not the target failing: a kept-alive connection closed under the request (the pool's
# timing), this machine short of descriptors (local), and answers the target made itself,
# as nginx's max_fails does not count them: a 503 (shedding load: ejecting it would put its
# load on the others) and any other 5xx but 502 and 504 (a request a client can make fail
# would take the target out for every client).
NOT_A_TARGET_FAILURE: Final = frozenset({"stale", "local", "status_503", "server_error"})


def status_kind(status: int) -> str:
    """A 5xx answer's kind: ``status`` for 502 and 504 (the upstream's own gateway failed:
    a failure of the target, retried), ``status_503`` (retried, not the target's failure),
    ``server_error`` for the others (neither)."""
    if status in (502, 504):
        return "status"
    return "status_503" if status == 503 else "server_error"


BACKOFF: Final = 0.025  # seconds, jittered ±50 %

T = TypeVar("T")


class Failed(Exception, Generic[T]):
    """One attempt at one target failed. ``kind``: what happened (``GatewayError.kind``, or
    ``status`` for a 5xx answer); ``reason``: for the target's health record; ``error``: the
    client's answer if no retry follows, unless ``answer`` (an upstream's 5xx, say) is to be
    passed on instead, after ``discard(answer)`` if a retry does follow."""

    def __init__(
        self,
        kind: str,
        reason: str,
        error: GatewayError,
        answer: T | None = None,
        discard: Callable[[T], None] | None = None,
    ) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.error = error
        self.answer = answer
        self.discard = discard

    @classmethod
    def of(cls, error: GatewayError) -> Failed[T]:
        """An upstream failure the gateway answers itself (``error.kind`` says which; its TLS
        reason, if any, is the target's)."""
        return cls(error.kind or "unknown", error.tls or error.code, error)


def may_retry(kind: str, method: str, replayable: bool) -> bool:
    if kind in NEVER_SENT:
        return True
    return kind in SENT_RETRYABLE and method in IDEMPOTENT and replayable


def next_target(
    balancer: Balancer,
    route: Route,
    usable: Callable[[Target], bool],
    *,
    kind: str,
    method: str,
    replayable: bool,
    tried: Sequence[Target],
) -> Target | None:
    """After an attempt that failed with ``kind``: the target to try next, or None to stop.
    No I/O; ``tried`` is every target tried so far, in order."""
    if not may_retry(kind, method, replayable):
        return None
    last = tried[-1]
    if kind == "stale" and tried.count(last) == 1 and usable(last):
        # A kept-alive connection the upstream had closed (it restarted, a NAT forgot it):
        # the pool's timing, not the target's, so the same target once more, on a new
        # connection (http.py drops its idle ones), whatever ``retries`` says (nginx's
        # cached connections do not count against its tries either).
        return last
    if len({target.key for target in tried}) > route.retries:  # (a stale one's again not counted)
        return None
    target = balancer.choose(route, usable, tried)
    if target is None and kind in SAME_TARGET_AGAIN:
        # No other target: the same one once more (an upstream that closed as it was sent
        # to), if still usable.
        return last if tried.count(last) == 1 and usable(last) else None
    return target


def first_target(shared: Shared, route: Route) -> tuple[Target, Callable[[Target], bool]]:
    """The first target to try, and what counts as usable for this request (judged at one
    moment for all its attempts); 503 when no target is usable."""
    health = shared.health
    now = health.monotonic()

    def usable(target: Target) -> bool:
        return health.usable(target, now)

    first = shared.balancer.choose(route, usable)
    if first is None:
        # Real traffic's ejections never take a service's last targets out (Envoy's panic
        # mode): with none usable, those ejected for their answers (502s, timeouts: what a
        # client may cause) and up by the probes are tried all the same. Not those that
        # refused connections or never made one: they are known to be out.
        def in_panic(target: Target) -> bool:
            return health.usable_in_panic(target, now)

        first = shared.balancer.choose(route, in_panic)
        if first is None:
            raise all_down(health, route)
        return first, in_panic
    return first, usable


async def attempt(
    shared: Shared,
    ex: Exchange,
    route: Route,
    first: tuple[Target, Callable[[Target], bool]],
    send: Callable[[Target], Awaitable[T]],
    *,
    replayable: bool,
) -> tuple[T, Target]:
    """``send`` to ``first``'s target, then to the targets ``next_target`` picks while each
    attempt raises ``Failed``; return the answer that ends it and the target that gave it (or
    raise the last error). ``ex.target`` is the target tried last, for the log line."""
    target, usable = first
    tried: list[Target] = []
    tls_failures: list[str] = []  # "<target label>: <reason>", for the log line
    while True:
        tried.append(target)
        ex.target = target
        try:
            answer = await send(target)
        except Failed as failed:
            if failed.error.tls is not None:
                shared.metrics.upstream_tls_failures.add((target.node,))
                tls_failures.append(f"{target.label}: {failed.error.tls}")
                ex.log_fields["upstream_tls_failures"] = tls_failures
            if failed.kind not in NOT_A_TARGET_FAILURE:
                shared.health.failed(
                    target, failed.reason, route.probe, route.ejection,
                    answering=failed.kind not in NEVER_SENT,
                )  # fmt: skip
            elif failed.answer is not None:  # it answered (a 503, a 500): the target works
                shared.health.passed(target)
            following = next_target(
                shared.balancer, route, usable, kind=failed.kind, method=ex.request.method,
                replayable=replayable, tried=tried,
            )  # fmt: skip
            if following is None:
                if failed.answer is None:
                    raise failed.error from None
                answer = failed.answer
                break
            if failed.answer is not None and failed.discard is not None:
                failed.discard(failed.answer)
            shared.metrics.retries.add((route.service, failed.kind))
            ex.trace.event(
                "retry", {"failure": failed.kind, "from": target.label, "to": following.label}
            )
            await asyncio.sleep(BACKOFF * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
            target = following
        else:
            shared.health.passed(target)
            break
    if target.tier > 0:
        shared.metrics.failovers.add((route.service, target.node))
        ex.trace.event("failover", {"node": target.node, "tier": target.tier})
    return answer, target


def all_down(health: HealthBook, route: Route) -> GatewayError:
    """503 with Retry-After: the seconds until an ejection ends, or until probes (every
    ``unhealthy_interval`` while none is usable) can have passed ``rise`` times."""
    now = health.monotonic()
    probe = route.probe  # while none is usable, probes run every unhealthy_interval
    waits = [
        max(health.get(t).ejected_until - now, 0) or probe.unhealthy_interval * probe.rise
        for t in route.targets
    ]
    return GatewayError(
        503,
        "no_healthy_upstream",
        "no target of this service is up",
        kind="unavailable",
        headers={"Retry-After": str(max(1, math.ceil(min(waits))))},
    )
