"""The one retry decision (``failover.next_target`` and ``may_retry``), table-driven: what is
tried after an attempt failed with each kind of failure."""

from __future__ import annotations

import functools

import pytest

from gateway.snapshot import Route
from gateway.upstream.balancer import Balancer
from gateway.upstream.failover import (
    IDEMPOTENT,
    NEVER_SENT,
    SAME_TARGET_AGAIN,
    SENT_RETRYABLE,
    may_retry,
    next_target,
)

from ..helpers import compiled_routes


@functools.cache
def compiled(name: str, retries: int) -> Route:
    """``three`` runs on nodes a, b and c (one tier each), ``solo`` on a alone."""
    return compiled_routes(f"""\
retries: {retries}
nodes: {{a: {{host: 10.0.0.1}}, b: {{host: 10.0.0.2}}, c: {{host: 10.0.0.3}}}}
services:
  three: {{port: 80, nodes: [a, b, c]}}
  solo: {{port: 80, nodes: [a]}}
""")[name]


ALL_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE", "POST", "PATCH", "CONNECT")
KINDS = ("connect", "connect_timeout", "disconnect", "io", "stale", "protocol", "status",
         "status_503", "server_error", "timeout", "busy", "aborted", "unknown")  # fmt: skip


def test_the_vocabulary() -> None:
    assert frozenset({"connect", "connect_timeout"}) == NEVER_SENT
    assert frozenset({"disconnect", "io", "protocol", "status", "status_503", "stale"}) == (
        SENT_RETRYABLE
    )
    assert frozenset({"disconnect", "io", "stale"}) == SAME_TARGET_AGAIN
    assert frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}) == IDEMPOTENT


def expected_may_retry(kind: str, method: str, replayable: bool) -> bool:
    if kind in ("connect", "connect_timeout"):
        return True  # never sent: any method, any body
    if kind in ("disconnect", "io", "protocol", "status", "status_503", "stale"):
        return method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE") and replayable
    return False  # timeout (it may still be working on it) and everything else


@pytest.mark.parametrize("kind", KINDS)
def test_may_retry_for_every_kind_method_and_body(kind: str) -> None:
    table = {
        (method, replayable): may_retry(kind, method, replayable)
        for method in ALL_METHODS
        for replayable in (True, False)
    }
    assert table == {
        (method, replayable): expected_may_retry(kind, method, replayable)
        for method in ALL_METHODS
        for replayable in (True, False)
    }


# (route, retries, kind, method, replayable, tried, usable, expected next target or None)
CASES: list[tuple[str, int, str, str, bool, str, str, str | None]] = [
    # never sent: the next target, whatever the method and body
    ("three", 1, "connect", "POST", False, "a", "abc", "b"),
    ("three", 1, "connect_timeout", "PATCH", False, "a", "abc", "b"),
    ("three", 1, "connect", "GET", True, "a", "ac", "c"),  # the next usable one
    # sent: only idempotent methods with a body that can be sent again
    ("three", 1, "disconnect", "GET", True, "a", "abc", "b"),
    ("three", 1, "io", "PUT", True, "a", "abc", "b"),
    # a kept-alive connection closed: the same target again (on a new connection), whatever
    # ``retries`` says, and that attempt not counted against it
    ("three", 1, "stale", "GET", True, "a", "abc", "a"),
    ("three", 0, "stale", "GET", True, "a", "abc", "a"),
    ("three", 1, "connect", "GET", True, "aa", "abc", "b"),
    ("three", 1, "stale", "GET", True, "a", "bc", "b"),  # ejected meanwhile: another one
    ("three", 1, "stale", "POST", True, "a", "abc", None),
    ("three", 1, "protocol", "DELETE", True, "a", "abc", "b"),
    ("three", 1, "status", "HEAD", True, "a", "abc", "b"),
    ("three", 1, "disconnect", "POST", True, "a", "abc", None),  # a POST that reached one
    ("three", 1, "status", "PATCH", True, "a", "abc", None),
    ("three", 1, "disconnect", "PUT", False, "a", "abc", None),  # its body streamed away
    ("three", 1, "status", "GET", False, "a", "abc", None),
    # a response timeout: never
    ("three", 1, "timeout", "GET", True, "a", "abc", None),
    ("three", 1, "timeout", "POST", False, "a", "abc", None),
    # kinds that are no upstream failure to retry
    ("three", 1, "busy", "GET", True, "a", "abc", None),
    ("three", 1, "aborted", "GET", True, "a", "abc", None),
    # no other target: the same one again only after it closed without an answer
    ("solo", 1, "disconnect", "GET", True, "a", "a", "a"),
    ("solo", 1, "io", "GET", True, "a", "a", "a"),
    ("solo", 1, "stale", "GET", True, "a", "a", "a"),
    ("solo", 0, "stale", "GET", True, "a", "a", "a"),
    ("solo", 1, "stale", "GET", True, "aa", "a", None),  # once
    ("solo", 1, "stale", "PATCH", True, "a", "a", None),
    ("three", 1, "disconnect", "GET", True, "a", "a", "a"),  # the others are unusable
    ("three", 2, "io", "GET", True, "ab", "ab", "b"),  # the last one tried, again
    ("solo", 1, "status", "GET", True, "a", "a", None),  # a 5xx: only to another target
    ("solo", 1, "protocol", "GET", True, "a", "a", None),
    ("solo", 1, "connect", "GET", True, "a", "a", None),  # refused: not the same one again
    ("solo", 1, "connect_timeout", "POST", False, "a", "a", None),
    ("solo", 1, "disconnect", "POST", True, "a", "a", None),  # still only what may retry
    # at most ``retries`` extra attempts
    ("three", 0, "connect", "GET", True, "a", "abc", None),
    ("three", 1, "connect", "GET", True, "ab", "abc", None),
    ("three", 2, "connect", "GET", True, "ab", "abc", "c"),
    ("three", 2, "connect", "GET", True, "abc", "abc", None),
    ("three", 5, "connect", "GET", True, "abc", "abc", None),  # every target tried
    ("solo", 1, "disconnect", "GET", True, "aa", "a", None),  # the same one, once
    ("solo", 2, "disconnect", "GET", True, "aa", "a", None),  # once, whatever ``retries``
    ("solo", 5, "disconnect", "GET", True, "a", "", None),  # not once its failure ejected it
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case)))
def test_next_target(case: tuple[str, int, str, str, bool, str, str, str | None]) -> None:
    route, retries, kind, method, replayable, tried, usable, expected = case
    compiled_route = compiled(route, retries)
    assert compiled_route.retries == retries
    targets = {t.node: t for t in compiled_route.targets}
    chosen = next_target(
        Balancer(),
        compiled_route,
        lambda t: t.node in usable,
        kind=kind,
        method=method,
        replayable=replayable,
        tried=[targets[n] for n in tried],
    )
    assert (chosen.node if chosen else None) == expected
