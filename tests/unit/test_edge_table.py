"""The connection table's decisions (edge/connections.py) without sockets: caps, the admin
reserve, eviction order, the header-timeout sweep, refusal lines; and ``head_end``."""

from __future__ import annotations

import pytest

from gateway.edge.connections import RESERVED, ConnectionTable, head_end
from gateway.metrics import Metrics
from gateway.snapshot import EdgePolicy

from ..helpers import FakeClock


class Conn:
    def __init__(self, waiting: bool = True) -> None:
        self.evicted = False
        self.waiting = waiting
        self.timed_out = False

    def evict(self) -> None:
        self.evicted = True

    def head_timed_out(self) -> bool:
        self.timed_out = self.waiting
        return self.waiting


def table(per_client: int = 2, max_clients: int = 3) -> tuple[ConnectionTable, FakeClock, Metrics]:
    policy = EdgePolicy(
        header_timeout=10, header_buffer=4096, keepalive_timeout=75, send_timeout=60,
        per_client=per_client, max_clients=max_clients,
    )  # fmt: skip
    clock, metrics = FakeClock(), Metrics()
    return ConnectionTable(metrics, lambda: policy, clock), clock, metrics


def refused(metrics: Metrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value(
        "gateway_connections_refused_total", {"reason": reason}
    )


def test_the_per_client_cap_spares_the_admin_peers() -> None:
    t, _, metrics = table(per_client=2, max_clients=100)
    assert t.admit(Conn(), "10.0.0.1")
    assert t.admit(Conn(), "10.0.0.1")
    assert not t.admit(Conn(), "10.0.0.1")
    assert refused(metrics, "per_client") == 1
    assert t.admit(Conn(), "10.0.0.2")
    assert all(t.admit(Conn(), "127.0.0.1") for _ in range(10))
    assert (t.held_by("10.0.0.1"), len(t)) == (2, 13)


def test_the_global_cap_closes_the_longest_idle_then_refuses() -> None:
    t, _, metrics = table(per_client=10, max_clients=3)
    a, b, c = Conn(), Conn(), Conn()
    for conn in (a, b, c):
        assert t.admit(conn, "10.0.0.1")
    t.busy(a)  # a head began on a: b is now the longest idle
    d = Conn()
    assert t.admit(d, "10.0.0.2")
    assert (a.evicted, b.evicted, c.evicted) == (False, True, False)
    t.busy(c)
    t.busy(d)
    t.idle(a)  # its response is written
    assert t.admit(Conn(), "10.0.0.3")
    assert a.evicted
    assert t.idle_count == 1  # the newcomer
    for held in list(t._address):
        t.busy(held)
    assert refused(metrics, "max_connections") == 0
    assert not t.admit(Conn(), "10.0.0.4")
    assert refused(metrics, "max_connections") == 1
    assert len(t) == 3


def test_admin_peers_have_reserved_slots_beyond_the_cap() -> None:
    t, _, _ = table(per_client=10, max_clients=2)
    for _ in range(2):
        conn = Conn()
        assert t.admit(conn, "10.0.0.1")
        t.busy(conn)
    admins = [Conn() for _ in range(RESERVED)]
    for conn in admins:
        assert t.admit(conn, "::1")
        t.busy(conn)
    assert not t.admit(Conn(), "::1")
    assert not t.admit(Conn(), "10.0.0.2")


def test_release_is_once_and_forgets_everything() -> None:
    t, _, _ = table()
    conn = Conn()
    assert t.admit(conn, "10.0.0.1")
    t.head_started(conn)
    t.release(conn)
    t.release(conn)
    t.idle(conn)  # too late: not counted again
    t.head_started(conn)
    assert (len(t), t.held_by("10.0.0.1"), t.idle_count, t.heads) == (0, 0, 0, 0)


def test_the_sweep_times_out_heads_oldest_first_and_skips_busy_ones() -> None:
    t, clock, _ = table(per_client=10, max_clients=10)
    old, busy, young = Conn(), Conn(waiting=False), Conn()
    for conn in (old, busy, young):
        t.admit(conn, "10.0.0.1")
    t.head_started(old)
    t.head_started(busy)
    clock.advance(5)
    t.head_started(young)
    t.sweep(clock() + 5.5)
    assert (old.timed_out, busy.timed_out, young.timed_out) == (True, False, False)
    assert t.heads == 2  # busy stays until its request is done; young is not due
    t.sweep(clock() + 10)
    assert young.timed_out
    assert t.heads == 1


@pytest.mark.parametrize(
    ("tail", "data", "end"),
    [
        (b"", b"GET / HTTP/1.1\r\n\r\nbody", 18),
        (b"", b"GET / HTTP/1.1\r\nHost: a\r\n", -1),
        (b"a\r\n", b"\r\nbody", 2),
        (b"\r\n\r", b"\nbody", 1),
        (b"\n\r\n", b"body\r\n\r\n", 8),  # not an empty line: "\n\r\n" then "b"
        (b"a\r\n", b"\rx", -1),
        (b"", b"", -1),
    ],
)
def test_head_end(tail: bytes, data: bytes, end: int) -> None:
    assert head_end(tail, data) == end
