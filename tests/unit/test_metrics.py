"""The per-request series (``metrics.Tally``, ``Latencies``, ``Levels``: plain numbers made into
families at scrape time) against prometheus_client's own Counter, Histogram and Gauge fed the
same requests: the same scrape, line for line, in both formats."""

from __future__ import annotations

import random
import re
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from gateway.metrics import BUCKETS, Metrics, method_label

FAMILIES = (
    "http_requests",
    "gateway_route_requests",
    "http_request_duration_seconds",
    "active_connections",
    "gateway_rate_limit_decisions",
    "gateway_auth",
    "gateway_websocket_sessions",
    "gateway_websocket_bytes",
)


class Oracle:
    """The series as the gateway kept them before, in prometheus_client's objects."""

    def __init__(self, gateway: Metrics) -> None:
        docs = {family.name: family.documentation for family in gateway.registry.collect()}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "http_requests", docs["http_requests"], ["service", "method", "status"], registry=r
        )
        self.routes = Counter(
            "gateway_route_requests",
            docs["gateway_route_requests"],
            ["service", "route", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            docs["http_request_duration_seconds"],
            ["service"],
            buckets=BUCKETS,
            registry=r,
        )
        self.active = Gauge(
            "active_connections", docs["active_connections"], ["service"], registry=r
        )
        self.limits = Counter(
            "gateway_rate_limit_decisions",
            docs["gateway_rate_limit_decisions"],
            ["zone", "result"],
            registry=r,
        )
        self.auth = Counter("gateway_auth", docs["gateway_auth"], ["service", "result"], registry=r)
        self.ws_sessions = Gauge(
            "gateway_websocket_sessions",
            docs["gateway_websocket_sessions"],
            ["service"],
            registry=r,
        )
        self.ws_bytes = Counter(
            "gateway_websocket_bytes",
            docs["gateway_websocket_bytes"],
            ["service", "direction"],
            registry=r,
        )

    def observe(self, service: str, route: str, method: str, status: int, seconds: float) -> None:
        method = method_label(method)
        self.requests.labels(service, method, str(status)).inc()
        self.routes.labels(service, route, str(status)).inc()
        if status != 101:
            self.duration.labels(service).observe(seconds)

    def forget(self, service: str) -> None:
        for metric in (
            self.requests,
            self.routes,
            self.duration,
            self.active,
            self.auth,
            self.ws_sessions,
            self.ws_bytes,
        ):
            for family in metric.collect():
                # A sample's labels are the metric's in order, then a histogram's le.
                for labels in {
                    tuple(v for k, v in s.labels.items() if k != "le") for s in family.samples
                }:
                    if labels[0] == service:
                        metric.remove(*labels)


def blocks(registry: CollectorRegistry, accept: str) -> dict[str, str]:
    """Each of FAMILIES' text in the scrape (its HELP, TYPE and samples, as written), by
    name."""
    text = choose_encoder(accept)[0](registry).decode().removesuffix("# EOF\n")
    found: dict[str, str] = {}
    for block in re.split(r"(?m)^(?=# HELP )", text):
        named = re.match(rf"# HELP ({'|'.join(FAMILIES)})(_total|_created)? ", block)
        if named is not None:
            found[named.group(0)] = block
    return found


CREATED = re.compile(r"(?m)^(\S*_created(?:\{[^}]*\})?) (\S+)$")


def scrape(registry: CollectorRegistry, accept: str) -> str:
    """FAMILIES' scrape, line for line in the order written, every _created value (a clock's)
    as T."""
    return CREATED.sub(r"\1 T", "".join(sorted(blocks(registry, accept).values())))


def created(registry: CollectorRegistry) -> dict[str, float]:
    """Every _created series' value, by series."""
    text = "".join(blocks(registry, "").values())
    return {series: float(value) for series, value in CREATED.findall(text)}


def test_the_per_request_series_scrape_as_prometheus_clients_own() -> None:
    rng = random.Random(7)
    started = time.time()
    metrics = Metrics()
    oracle = Oracle(metrics)
    services = ["city", "agents", "unmatched", "gateway"]
    # Every bucket bound exactly, either side of it, and beyond the last one.
    latencies = [b for bound in BUCKETS for b in (bound, bound * 0.999, bound * 1.001)]
    latencies += [0.0, 100.0, 1e-9]
    for i in range(3000):
        service = rng.choice(services)
        route = rng.choice([service, f"{service}#1", f"{service}#2"])
        method = rng.choice(["GET", "POST", "HEAD", "BREW", "get"])
        status = rng.choice([200, 200, 404, 101, 502, 499])
        seconds = latencies[i % len(latencies)] if i < 3 * len(latencies) else rng.random()
        metrics.observe_request(service, route, method, status, seconds)
        oracle.observe(service, route, method, status, seconds)
        zone, result = rng.choice(["per_ip", "burst"]), rng.choice(["allowed", "rejected"])
        metrics.count_limit(zone, result)
        oracle.limits.labels(zone, result).inc()
        result = rng.choice(["ok", "missing_token"])
        metrics.count_auth(service, result)
        oracle.auth.labels(service, result).inc()
        direction, size = rng.choice(["up", "down"]), rng.choice([0, 1, 125, 65536])
        metrics.ws_bytes.add((service, direction), size)
        oracle.ws_bytes.labels(service, direction).inc(size)
    held = metrics.active_for("city")
    for service, n in (("city", 3), ("agents", 2)):
        for _ in range(n):
            metrics.active_for(service).inc()
            oracle.active.labels(service).inc()
    metrics.active_for("agents").dec()
    oracle.active.labels("agents").dec()
    metrics.ws_sessions.of("city").inc()
    oracle.ws_sessions.labels("city").inc()
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        got = scrape(metrics.registry, accept)
        assert 'http_request_duration_seconds_bucket{le="0.005",service="city"}' in got
        assert got == scrape(oracle.registry, accept)
    # A series is created at its first count (each gateway count came just before the
    # oracle's), and keeps that time.
    ours, theirs = created(metrics.registry), created(oracle.registry)
    assert ours.keys() == theirs.keys()
    assert all(started <= ours[k] <= theirs[k] for k in ours)
    routes = {(s, r): None for s in services for r in (s, f"{s}#1", f"{s}#2")}

    def configure(*served: str) -> None:
        metrics.configure(
            services=served,
            routes={route: kind for route, kind in routes.items() if route[0] != "city"}
            if "city" not in served
            else routes,
            targets=[],
            zones=["per_ip", "burst"],
        )

    configure("agents")  # a reload that removed city
    oracle.forget("city")
    # Work in flight across the reload ends: it counts for city, which no scrape shows, and
    # the gauge it holds goes back down.
    held.dec()
    metrics.observe_request("city", "city", "GET", 200, 0.1)
    metrics.ws_bytes.add(("city", "up"), 5)
    got = scrape(metrics.registry, "")
    assert 'service="city"' not in got
    assert 'service="agents"' in got
    assert got == scrape(oracle.registry, "")
    configure("agents", "city")  # the service is back: its series start again
    metrics.active_for("city").inc()
    metrics.observe_request("city", "city", "GET", 200, 0.1)
    got = scrape(metrics.registry, "")
    assert 'active_connections{service="city"} 1.0' in got
    assert 'http_requests_total{method="GET",service="city",status="200"} 1.0' in got


def test_the_per_request_series_are_in_each_workers_families() -> None:
    metrics = Metrics()
    metrics.observe_request("city", "city", "GET", 200, 0.02)
    names = [family["name"] for family in metrics.families()]
    assert names[:4] == list(FAMILIES[:4])  # where the prometheus_client objects had them
    (requests,) = (f for f in metrics.families() if f["name"] == "http_requests")
    assert requests["type"] == "counter"
    assert [(n, labels, v) for n, labels, v in requests["samples"] if n.endswith("_total")] == [
        ("http_requests_total", {"service": "city", "method": "GET", "status": "200"}, 1)
    ]
