"""The health book on its own: probes, passive ejections, nodes, the views and the gauges,
with both of its clocks injected (nothing sleeps)."""

from __future__ import annotations

import logging

import pytest

from gateway.metrics import Metrics
from gateway.snapshot import Route, Target
from gateway.upstream.failover import all_down
from gateway.upstream.health import HealthBook

from ..helpers import FakeClock, compiled_routes

CONFIG = """\
health: {rise: 2, fall: 3, interval: 5}
ejection: {base: 5, max: 20}
nodes:
  a: {host: 10.0.0.1}
  b: {host: 10.0.0.2}
services:
  svc: {port: 80, nodes: [a, b]}
  solo: {port: 81, nodes: [b]}
"""
ROUTES = compiled_routes(CONFIG)
SVC, SOLO = ROUTES["svc"], ROUTES["solo"]
A, B = SVC.targets  # svc on node a, svc on node b
SOLO_B = SOLO.targets[0]
WALL_START = 1_700_000_000.0  # 2023-11-14T22:13:20Z


class Book:
    """A ``HealthBook`` with its two clocks, moved together by ``tick``."""

    def __init__(self, routes: list[Route] | None = None) -> None:
        self.metrics = Metrics()
        self.clock = FakeClock(1000.0)
        self.wall = FakeClock(WALL_START)
        self.book = HealthBook(self.metrics, monotonic=self.clock, wall=self.wall)
        self.book.sync(routes if routes is not None else list(ROUTES.values()))

    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.wall.advance(seconds)

    def usable(self, target: Target) -> bool:
        return self.book.usable(target, self.clock())

    def state(self, target: Target) -> object:
        return self.book.describe(target)["state"]

    def probe(self, target: Target, *results: bool, reason: str = "status 500") -> None:
        for ok in results:
            self.book.probed(target, ok, "ok" if ok else reason, ROUTES[target.service].probe)

    def fail(self, target: Target, times: int = 1, reason: str = "connect refused") -> None:
        route = ROUTES[target.service]
        for _ in range(times):
            self.book.failed(target, reason, route.probe, route.ejection)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def hb() -> Book:
    return Book()


def test_the_policies_come_from_the_config() -> None:
    assert (SVC.probe.rise, SVC.probe.fall, SVC.probe.interval) == (2, 3, 5.0)
    assert (SVC.ejection.base, SVC.ejection.max) == (5.0, 20.0)


def test_a_new_target_is_usable_and_unknown(hb: Book) -> None:
    assert hb.usable(A)
    assert hb.book.describe(A) == {
        "state": "unknown",
        "reason": "not checked yet",
        "since": "2023-11-14T22:13:20Z",
    }
    assert hb.book.usable(Target("gone", "z", "10.9.9.9", 1, 0), hb.clock())  # never seen


def test_fall_failed_probes_take_a_target_down_and_rise_passes_bring_it_back(hb: Book) -> None:
    hb.probe(A, False, False)
    assert hb.usable(A)
    assert hb.state(A) == "failing"  # in use: fall not reached yet
    hb.tick(7)
    hb.probe(A, False)
    assert not hb.usable(A)
    assert hb.book.describe(A) == {
        "state": "down",
        "reason": "3 probes failed: status 500",
        "since": "2023-11-14T22:13:27Z",  # when it stopped being usable
    }
    hb.probe(A, False, True)
    assert (hb.usable(A), hb.state(A)) == (False, "down")  # one pass is not enough
    hb.probe(A, True)
    assert (hb.usable(A), hb.state(A)) == (True, "up")
    assert hb.book.describe(A)["reason"] == "2 probes passed"


def test_only_consecutive_probe_results_count(hb: Book) -> None:
    hb.probe(A, False, False, True, False, False)
    assert (hb.usable(A), hb.state(A)) == (True, "failing")
    hb.probe(A, False)
    assert not hb.usable(A)
    hb.probe(A, True, False, True)
    assert not hb.usable(A)
    hb.probe(A, True)
    assert hb.usable(A)


def test_fall_traffic_failures_eject_for_base_seconds(hb: Book) -> None:
    hb.fail(A, 2)
    assert (hb.usable(A), hb.state(A)) == (True, "failing")
    assert hb.sample("gateway_ejections_total", service="svc", node="a") is None
    hb.fail(A)
    assert not hb.usable(A)
    assert hb.book.describe(A) == {
        "state": "ejected",
        "reason": "ejected for 5 s after 3 failures (connect refused)",
        "since": "2023-11-14T22:13:20Z",
        "ejected_for_s": 5.0,
    }
    assert hb.sample("gateway_ejections_total", service="svc", node="a") == 1.0
    hb.tick(2)
    assert hb.book.describe(A)["ejected_for_s"] == 3.0
    hb.tick(2.999)
    assert not hb.usable(A)
    hb.tick(0.001)
    assert hb.usable(A)  # the ejection ends by itself, without an event
    assert "ejected_for_s" not in hb.book.describe(A)
    assert hb.usable(B)  # the other target of the service was never involved


def test_failures_while_ejected_are_not_counted_again(hb: Book) -> None:
    # Requests already in flight when the target was ejected fail too: that is no new
    # evidence, so once the ejection ends it takes `fall` new failures to eject it again.
    hb.fail(A, 3)
    assert hb.sample("gateway_ejections_total", service="svc", node="a") == 1.0
    hb.fail(A, 10)
    hb.tick(5)
    assert hb.usable(A)
    hb.fail(A, 2)
    assert hb.usable(A)
    assert hb.sample("gateway_ejections_total", service="svc", node="a") == 1.0
    hb.fail(A)
    assert not hb.usable(A)
    assert hb.sample("gateway_ejections_total", service="svc", node="a") == 2.0


def test_an_answer_resets_the_count_of_traffic_failures(hb: Book) -> None:
    hb.fail(A, 2)
    hb.book.passed(A)
    hb.fail(A, 2)
    assert (hb.usable(A), hb.state(A)) == (True, "failing")
    hb.book.passed(A)
    assert hb.state(A) == "up"


def test_while_usable_a_target_says_what_its_last_check_found(hb: Book) -> None:
    """Without a transition, a target that is still usable shows its last check: a failing
    one says what failed before ``fall`` is reached."""
    tls = "certificate verify failed: unable to get local issuer certificate"
    hb.fail(A, reason=tls)
    assert hb.book.describe(A) == {
        "state": "failing",
        "reason": f"request failed: {tls}",
        "since": "2023-11-14T22:13:20Z",  # still usable: no change of usability
    }
    hb.book.passed(A)
    assert (hb.state(A), hb.book.describe(A)["reason"]) == ("up", "request answered")
    hb.probe(A, False, reason="timeout")
    assert hb.book.describe(A)["reason"] == "probe failed: timeout"
    hb.probe(A, True)
    assert hb.book.describe(A)["reason"] == "probe passed: ok"
    hb.probe(A, False, False, False)
    hb.fail(A, reason=tls)  # a request in flight when it went down: the reason stays
    assert hb.book.describe(A)["reason"] == "3 probes failed: status 500"
    hb.probe(A, True)
    assert hb.book.describe(A)["reason"] == "3 probes failed: status 500"  # down until rise
    hb.fail(B, 3)
    hb.book.passed(B)  # in flight when it was ejected
    hb.probe(B, False)
    assert hb.book.describe(B)["reason"] == ("ejected for 5 s after 3 failures (connect refused)")


def test_repeated_ejections_grow_by_base_up_to_max(hb: Book) -> None:
    lengths = []
    for _ in range(5):
        hb.fail(A, 3)
        described = hb.book.describe(A)
        lengths.append(described["ejected_for_s"])
        assert described["reason"] == (
            f"ejected for {described['ejected_for_s']:g} s after 3 failures (connect refused)"
        )
        seconds = described["ejected_for_s"]
        assert isinstance(seconds, float)
        hb.tick(seconds)
        assert hb.usable(A)
    assert lengths == [5.0, 10.0, 15.0, 20.0, 20.0]
    assert hb.sample("gateway_ejections_total", service="svc", node="a") == 5.0


@pytest.mark.parametrize(("quiet", "next_length"), [(20.0, 15.0), (40.0, 15.0), (40.5, 5.0)])
def test_the_growth_is_forgotten_after_twice_max_without_an_ejection(
    hb: Book, quiet: float, next_length: float
) -> None:
    """Two ejections (5 s, 10 s); the next one starts from ``base`` again only when more than
    2 x max = 40 s passed since the last one began."""
    hb.fail(A, 3)
    hb.tick(5)
    hb.fail(A, 3)
    hb.tick(quiet)
    hb.fail(A, 3)
    assert hb.book.describe(A)["ejected_for_s"] == next_length


def test_rise_passing_probes_end_an_ejection_early(hb: Book) -> None:
    hb.probe(A, True)  # a pass before the ejection does not count toward rise
    hb.fail(A, 3)
    hb.probe(A, True)
    assert (hb.usable(A), hb.state(A)) == (False, "ejected")
    hb.tick(1)
    hb.probe(A, True)
    assert hb.usable(A)
    assert hb.book.describe(A) == {
        "state": "up",
        "reason": "2 probes passed",
        "since": "2023-11-14T22:13:21Z",
    }


def node_events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, object]]:
    return [
        (r.getMessage(), r.__dict__["fields"]["node"])
        for r in caplog.records
        if r.name == "gateway.health" and r.getMessage().startswith("node is")
    ]


def test_a_node_is_offline_while_none_of_its_targets_is_usable(
    hb: Book, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.health")
    hb.probe(A, False, False, False)
    assert node_events(caplog) == [("node is offline", "a")]
    assert [r.levelname for r in caplog.records if r.getMessage() == "node is offline"] == [
        "WARNING"
    ]
    hb.probe(A, False, False)  # still offline: nothing more is logged
    hb.probe(B, False, False, False)  # b still has solo's target
    assert node_events(caplog) == [("node is offline", "a")]
    assert hb.book.export(ROUTES.values())[1] == {"a": "offline", "b": "online"}
    hb.fail(SOLO_B, 3)  # ejected: b's last usable target
    assert node_events(caplog)[1:] == [("node is offline", "b")]
    hb.probe(A, True, True)
    assert node_events(caplog)[2:] == [("node is online", "a")]
    hb.tick(5)  # solo's ejection ends on its own: seen at the next look
    assert hb.book.export(ROUTES.values())[1] == {"a": "online", "b": "online"}
    assert node_events(caplog)[3:] == [("node is online", "b")]


def test_target_transitions_are_logged_once_each(
    hb: Book, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.health")
    hb.fail(A, 3)
    hb.fail(A, 3)  # during the ejection: no new ejection, no line
    hb.probe(A, True, True)
    lines = [
        (r.levelname, r.getMessage(), r.__dict__["fields"]["reason"])
        for r in caplog.records
        if r.getMessage().startswith("upstream target")
    ]
    ejected = "ejected for 5 s after 3 failures (connect refused)"
    assert lines == [
        ("WARNING", "upstream target is ejected", ejected),
        ("INFO", "upstream target is up", "2 probes passed"),
    ]
    assert hb.sample("gateway_ejections_total", service="svc", node="a") == 1.0


def test_service_state(hb: Book) -> None:
    now = hb.clock
    assert hb.book.service_state(SVC, now()) == "unknown"  # nothing confirmed yet
    hb.book.passed(B)
    assert hb.book.service_state(SVC, now()) == "connected"
    hb.fail(B)  # the last check failed, fall not reached: in use, not confirmed
    assert hb.book.service_state(SVC, now()) == "unknown"
    hb.probe(A, True)
    assert hb.book.service_state(SVC, now()) == "connected"
    hb.probe(A, False, False, False)
    hb.fail(B, 2)  # b ejected
    assert hb.book.service_state(SVC, now()) == "disconnected"
    assert hb.book.service_state(SOLO, now()) == "unknown"  # solo's target on b is apart
    hb.tick(5)
    assert hb.book.service_state(SVC, now()) == "unknown"  # b is back, not confirmed yet


def test_export_sets_every_health_gauge(hb: Book) -> None:
    hb.book.passed(B)
    hb.probe(A, False, False, False)
    services, nodes = hb.book.export(ROUTES.values())
    assert services == {"svc": "connected", "solo": "unknown"}
    assert nodes == {"a": "offline", "b": "online"}
    assert hb.sample("service_health", service="gateway", dependency="svc") == 1.0
    assert hb.sample("service_health", service="gateway", dependency="solo") == 1.0
    assert hb.sample("service_health", service="svc", dependency="a") == 0.0
    assert hb.sample("service_health", service="svc", dependency="b") == 1.0
    assert hb.sample("service_health", service="solo", dependency="b") == 1.0
    assert hb.sample("gateway_node_up", node="a") == 0.0
    assert hb.sample("gateway_node_up", node="b") == 1.0

    hb.fail(B, 3)
    hb.fail(SOLO_B, 3)
    services, nodes = hb.book.export(ROUTES.values())
    assert services == {"svc": "disconnected", "solo": "disconnected"}
    assert nodes == {"a": "offline", "b": "offline"}
    assert hb.sample("service_health", service="gateway", dependency="svc") == 0.0
    assert hb.sample("service_health", service="svc", dependency="b") == 0.0
    assert hb.sample("gateway_node_up", node="b") == 0.0

    hb.tick(5)  # the ejections end: the next scrape says so
    services, nodes = hb.book.export(ROUTES.values())
    assert services == {"svc": "unknown", "solo": "unknown"}
    assert hb.sample("service_health", service="gateway", dependency="svc") == 1.0
    assert hb.sample("service_health", service="svc", dependency="b") == 1.0
    assert hb.sample("gateway_node_up", node="b") == 1.0


def test_sync_forgets_removed_targets_and_their_series(
    hb: Book, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.health")
    hb.probe(B, False, False, False)
    hb.probe(SOLO_B, False, False, False)
    hb.book.export(ROUTES.values())
    assert node_events(caplog) == [("node is offline", "b")]
    assert hb.sample("service_health", service="svc", dependency="b") == 0.0

    smaller = compiled_routes(
        CONFIG.replace("[a, b]", "[a]").replace("  solo: {port: 81, nodes: [b]}\n", "")
    )
    assert list(smaller) == ["svc"]
    hb.book.sync(smaller.values())
    hb.book.export(smaller.values())
    assert hb.sample("service_health", service="svc", dependency="b") is None
    assert hb.sample("service_health", service="solo", dependency="b") is None
    assert hb.sample("gateway_node_up", node="b") is None
    assert hb.sample("service_health", service="svc", dependency="a") == 1.0
    assert hb.sample("gateway_node_up", node="a") == 1.0

    hb.book.sync(ROUTES.values())  # b comes back: as new, usable, nothing known
    assert hb.usable(B)
    assert hb.book.describe(B)["reason"] == "not checked yet"
    assert node_events(caplog) == [("node is offline", "b")]  # no "online": it was forgotten
    hb.probe(B, False, False, False)
    hb.probe(SOLO_B, False, False, False)
    assert node_events(caplog) == [("node is offline", "b")] * 2


def test_turning_probes_off_brings_back_what_probes_had_marked_down(
    hb: Book, caplog: pytest.LogCaptureFixture
) -> None:
    # No probe runs any more, and traffic never reaches a down target: left down, it would
    # answer 503 until a restart.
    caplog.set_level(logging.INFO, logger="gateway.health")
    hb.probe(A, False, False, False)
    hb.probe(B, True)  # one pass of rise 2: void once probes are off
    assert not hb.usable(A)
    off = compiled_routes(CONFIG.replace("interval: 5}", "interval: 5, enabled: false}"))
    hb.book.sync(off.values())
    assert hb.usable(A)
    assert hb.book.describe(A)["reason"] == "probes turned off"
    assert hb.book.get(B).probe_passes == 0
    assert [r.getMessage() for r in caplog.records][-2:] == [
        "upstream target is failing", "node is online",
    ]  # fmt: skip
    hb.book.sync(off.values())  # nothing to undo a second time
    assert [r.getMessage() for r in caplog.records][-1] == "node is online"


def test_a_late_result_for_a_removed_target_brings_no_record_back(hb: Book) -> None:
    # A probe or request of the config before a reload ends after it: the target it
    # checked must not come back (a node of no service shown online, or offline, for good).
    hb.book.sync([SVC])
    route = ROUTES["solo"]
    hb.book.probed(SOLO_B, True, "ok", route.probe)
    hb.book.passed(SOLO_B)
    hb.book.failed(SOLO_B, "connect refused", route.probe, route.ejection)
    hb.book.sync([compiled_routes(CONFIG.replace("[a, b]", "[a]"))["svc"]])
    hb.book.probed(B, False, "status 500", SVC.probe)
    _, nodes = hb.book.export([ROUTES["svc"]])
    assert nodes == {"a": "online"}
    assert hb.book.describe(SOLO_B)["reason"] == "not checked yet"  # a view keeps nothing
    _, nodes = hb.book.export([])
    assert nodes == {"a": "online"}


def test_the_503_of_a_service_with_no_usable_target_says_when_to_retry(hb: Book) -> None:
    # Down targets are probed every unhealthy_interval (1 s), and need rise (2) passes.
    hb.probe(SOLO_B, False, False, False)
    assert all_down(hb.book, SOLO).headers == {"Retry-After": "2"}
    hb.fail(A, 3)  # ejected for 5 s, then usable again: the sooner of the two
    hb.probe(B, False, False, False)
    assert all_down(hb.book, SVC).headers == {"Retry-After": "2"}
    hb.probe(B, True, True)
    hb.fail(B, 3)
    hb.fail(A, 3)  # already out: no second ejection
    hb.tick(4.5)
    assert all_down(hb.book, SVC).headers == {"Retry-After": "1"}  # 0.5 s of both left
