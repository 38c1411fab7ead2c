"""Every metric the gateway exports, defined once.

Label values come only from config names (service, node) and fixed sets (methods, status
codes, error kinds), so the scrape cannot grow with what clients send: a request for an
unknown service counts as ``unmatched``, an unusual method as ``OTHER``.
"""

from __future__ import annotations

import itertools
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypedDict, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample

from . import __version__

UNMATCHED: Final = "unmatched"
GATEWAY: Final = "gateway"
METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)


class Family(TypedDict):
    """One metric family of one worker, as JSON."""

    name: str
    help: str
    type: str
    unit: str
    samples: list[tuple[str, dict[str, str], float]]


Families = list[Family]  # one worker's samples as JSON (``serve --workers``)

BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


M = TypeVar("M", Counter, Gauge, Histogram)


def method_label(method: str) -> str:
    return method if method in METHODS else "OTHER"


class Metrics:
    """One registry per gateway instance (so tests can run several side by side)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Each labelled metric's label names, in order: to find its series through the public
        # collect() (``remove_series``).
        self._label_names: dict[int, tuple[str, ...]] = {}
        # The series every request updates are plain numbers, made into families only when
        # scraped (``PerRequest``): prometheus_client's children take a lock and several calls
        # per update, about 5 us of every request's CPU for these four.
        self.per_request = PerRequest()
        r.register(self.per_request)
        self.health = self._labelled(
            Gauge,
            "service_health",
            "1 when a dependency is usable, 0 when it is not. service=gateway lists the "
            "gateway's own dependencies; service=<name>,dependency=<node> each upstream target.",
            ["service", "dependency"],
        )
        self.upstream_errors = self._labelled(
            Counter,
            "gateway_upstream_errors",
            "Upstream failures by service and kind (connect, connect_timeout, timeout, "
            "disconnect, protocol, io, busy, aborted).",
            ["service", "kind"],
        )
        self.client_connections = Gauge(
            "gateway_client_connections", "Open client TCP connections.", registry=r
        )
        self.connections_refused = self._labelled(
            Counter,
            "gateway_connections_refused",
            "Client connections closed at once on arrival, by the cap they met (per_client: "
            "max_connections_per_client; max_connections: max_client_connections, with no "
            "idle connection to close instead).",
            ["reason"],
        )
        for reason in ("per_client", "max_connections"):
            self.connections_refused.labels(reason)  # 0 from the start, not absent
        self.config_reloads = self._labelled(
            Counter,
            "gateway_config_reloads",
            "Config reload attempts by result (success, failure).",
            ["result"],
        )
        self.config_ok = Gauge(
            "gateway_config_last_reload_successful",
            "1 when the last config reload succeeded, 0 when the last one was rejected.",
            registry=r,
        )
        self.config_ok.set(1)
        self.config_info = self._labelled(
            Gauge,
            "gateway_config_info",
            "1 for the config this process serves, by the hash of its text (the first 12 hex "
            "digits of its SHA-256; /health's config_hash).",
            ["hash"],
        )
        self.generation = Gauge(
            "gateway_generation",
            "The generation of the gateway this process belongs to: 1 at a start, one more "
            "at each restart (SIGUSR2, daarion-gateway restart).",
            registry=r,
        )
        self.node_up = self._labelled(
            Gauge,
            "gateway_node_up",
            "1 while some target on the node is usable, 0 when the node is offline.",
            ["node"],
        )
        self.failovers = self._labelled(
            Counter,
            "gateway_failovers",
            "Requests answered by a node other than the service's preferred ones.",
            ["service", "node"],
        )
        self.retries = self._labelled(
            Counter,
            "gateway_retries",
            "Extra attempts on another target, by service and the failure that caused it.",
            ["service", "kind"],
        )
        self.ejections = self._labelled(
            Counter,
            "gateway_ejections",
            "Targets taken out after consecutive failures of real traffic.",
            ["service", "node"],
        )
        self.probes = self._labelled(
            Counter,
            "gateway_health_checks",
            "Active health probes by service, node and result (pass, fail).",
            ["service", "node", "result"],
        )
        self.ws_sessions = self._labelled(
            Gauge,
            "gateway_websocket_sessions",
            "Open WebSocket sessions (also counted in active_connections).",
            ["service"],
        )
        self.ws_opened = self._labelled(
            Counter,
            "gateway_websocket_sessions_opened",
            "WebSocket sessions relayed, by service.",
            ["service"],
        )
        self.ws_closed = self._labelled(
            Counter,
            "gateway_websocket_sessions_closed",
            "WebSocket sessions ended, by service and the client leg's close code "
            "(1000-1015 as such, 3xxx, 4xxx, other, none).",
            ["service", "code"],
        )
        self.ws_messages = self._labelled(
            Counter,
            "gateway_websocket_messages",
            "WebSocket data messages relayed, by direction (up: to the service).",
            ["service", "direction"],
        )
        self.ws_bytes = self._labelled(
            Counter,
            "gateway_websocket_bytes",
            "WebSocket payload bytes relayed, by direction (up: to the service).",
            ["service", "direction"],
        )
        self.rate_limit_decisions = self._labelled(
            Counter,
            "gateway_rate_limit_decisions",
            "Rate-limit decisions by zone and result (allowed, delayed, rejected, "
            "dry_run_rejected).",
            ["zone", "result"],
        )
        self.rate_limit_degraded = Gauge(
            "gateway_rate_limit_degraded",
            "1 while Redis fails and rate limits use the on_error fallback.",
            registry=r,
        )
        self.tls_expiry = self._labelled(
            Gauge,
            "gateway_tls_certificate_expiry_timestamp_seconds",
            "When each served certificate expires (Unix time), by its first name.",
            ["name"],
        )
        self.tls_reloads = self._labelled(
            Counter,
            "gateway_tls_certificate_reloads",
            "Certificate loads after the first, by result (success; failure: the previous one "
            "kept serving).",
            ["result"],
        )
        self.acme_orders = self._labelled(
            Counter,
            "gateway_acme_orders",
            "ACME certificate orders (first ones and renewals), by result (success, failure).",
            ["result"],
        )
        self.auth = self._labelled(
            Counter,
            "gateway_auth",
            "Token checks on routes with auth, by service and result (ok, anonymous, "
            "missing_token, invalid_token, token_expired, insufficient_scope).",
            ["service", "result"],
        )
        self.upstream_tls_failures = self._labelled(
            Counter,
            "gateway_upstream_tls_failures",
            "Connections to a node (by requests, handshakes and probes) that failed in TLS: its "
            "certificate failed verification, or the handshake failed; by node.",
            ["node"],
        )
        self.trace_spans = Counter(
            "gateway_trace_spans_exported",
            "Spans the collector accepted (tracing.otlp_endpoint).",
            registry=r,
        )
        self.trace_spans_dropped = self._labelled(
            Counter,
            "gateway_trace_spans_dropped",
            "Sampled spans never delivered, by reason: queue_full (the export queue was full: "
            "the collector is slow or down) or export_failed (the collector refused or did not "
            "answer in time).",
            ["reason"],
        )
        build = Gauge("gateway_build_info", "Gateway version.", ["version"], registry=r)
        build.labels(__version__).set(1)
        # Cached label children: labels() costs a lock and a dict lookup we can skip.
        self._limit_children: dict[tuple[str, str], Counter] = {}
        self._auth_children: dict[tuple[str, str], Counter] = {}
        self._ws_children: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        self.scrapes = ScrapeCache()

    def _labelled(
        self, kind: type[M], name: str, documentation: str, labels: list[str], **options: Any
    ) -> M:
        metric = kind(name, documentation, labels, registry=self.registry, **options)
        self._label_names[id(metric)] = tuple(labels)
        return metric

    def serving_config(self, digest: str) -> None:
        """``gateway_config_info``: this one, and no other."""
        self.config_info.clear()
        self.config_info.labels(digest).set(1)

    def observe_request(
        self, service: str, route: str, method: str, status: int, seconds: float
    ) -> None:
        self.per_request.observe(service, route, method_label(method), status, seconds)

    def active_for(self, service: str) -> Level:
        """The service's ``active_connections``: whoever increments it keeps this one to
        decrement (a reload may have dropped the service's series meanwhile)."""
        return self.per_request.active(service)

    def ws_counters(self, service: str, direction: str) -> tuple[Counter, Counter]:
        """(messages, bytes) children for one direction of a service's sessions."""
        key = (service, direction)
        pair = self._ws_children.get(key)
        if pair is None:
            pair = self._ws_children[key] = (
                self.ws_messages.labels(service, direction),
                self.ws_bytes.labels(service, direction),
            )
        return pair

    def count_auth(self, service: str, result: str) -> None:
        counter = self._auth_children.get((service, result))
        if counter is None:
            counter = self._auth_children[service, result] = self.auth.labels(service, result)
        counter.inc()

    def count_limit(self, zone: str, result: str) -> None:
        counter = self._limit_children.get((zone, result))
        if counter is None:
            counter = self._limit_children[zone, result] = self.rate_limit_decisions.labels(
                zone, result
            )
        counter.inc()

    def forget_service(self, service: str) -> None:
        """Drop the series of a service that a config reload removed."""
        self.per_request.forget(service)
        for metric in (
            self.upstream_errors,
            self.health,
            self.failovers,
            self.retries,
            self.ejections,
            self.probes,
            self.ws_sessions,
            self.ws_opened,
            self.ws_closed,
            self.ws_messages,
            self.ws_bytes,
            self.auth,
        ):
            self.remove_series(
                metric, lambda labels: labels[0] == service or labels[:2] == (GATEWAY, service)
            )
        self._ws_children = {k: v for k, v in self._ws_children.items() if k[0] != service}
        self._auth_children = {k: v for k, v in self._auth_children.items() if k[0] != service}

    def remove_series(
        self, metric: MetricWrapperBase, drop: Callable[[tuple[str, ...]], bool]
    ) -> None:
        """Remove every series of ``metric`` whose label values ``drop`` says to."""
        for labels in list(self._series(metric)):
            if drop(labels):
                metric.remove(*labels)

    def _series(self, metric: MetricWrapperBase) -> Iterator[tuple[str, ...]]:
        """The label values of each series of ``metric`` (the public ``collect()``, not the
        client's private table of children)."""
        names = self._label_names[id(metric)]
        seen: set[tuple[str, ...]] = set()
        for family in metric.collect():
            for sample in family.samples:
                labels = tuple(sample.labels[name] for name in names)
                if labels not in seen:
                    seen.add(labels)
                    yield labels

    def scrape_format(self, accept: str | None) -> str:
        """The content type a scrape with this ``Accept`` gets (what ``render`` writes)."""
        return choose_encoder(accept or "")[1]

    def render(
        self, accept: str | None, workers: dict[int, Families] | None = None
    ) -> tuple[bytes, str]:
        """The scrape in the format the scraper asks for (Prometheus text 0.0.4 by default);
        with ``workers`` (every worker's samples, this one's included), all of them."""
        encoder, content_type = choose_encoder(accept or "")
        if workers is None:
            return encoder(self.registry), content_type
        merged = CollectorRegistry(auto_describe=False)
        merged.register(_Fixed(merge(workers)))
        return encoder(merged), content_type

    def families(self) -> Families:
        return [
            {
                "name": family.name,
                "help": family.documentation,
                "type": family.type,
                "unit": family.unit,
                "samples": [(s.name, s.labels, s.value) for s in family.samples],
            }
            for family in self.registry.collect()
        ]


class Level:
    """A gauge kept as a plain number (``active_connections`` of one service)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class _Latencies:
    """One service's ``http_request_duration_seconds``: a count per bucket (the last one
    +Inf), not cumulative until scraped."""

    __slots__ = ("counts", "created", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.created = time.time()


# As prometheus_client decides whether its own counters and histograms have _created series.
_DISABLE_CREATED: Final = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False")
_CREATED: Final = _DISABLE_CREATED.lower() not in {"true", "1", "t"}
_BOUNDS: Final = (*(str(bound) for bound in BUCKETS), "+Inf")  # as prometheus_client writes le


class PerRequest:
    """The series that every request updates, as plain numbers in dicts, made into metric
    families when the registry is collected (a scrape, or ``Metrics.families``):
    ``http_requests``, ``gateway_route_requests``, ``http_request_duration_seconds`` and
    ``active_connections``, the same names, labels, buckets and ``_created`` series as
    prometheus_client's own would have. Only the event loop's thread updates or reads
    them, so no lock. One count per (service, route, method, status): both request counters
    are sums of it."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, str, int], list[float]] = {}  # [count, created]
        self._latencies: dict[str, _Latencies] = {}
        self._active: dict[str, Level] = {}

    def observe(self, service: str, route: str, method: str, status: int, seconds: float) -> None:
        key = (service, route, method, status)
        counted = self._requests.get(key)
        if counted is None:
            counted = self._requests[key] = [0, time.time()]
        counted[0] += 1
        if status == 101:
            return  # a WebSocket session's length is not a request latency
        latencies = self._latencies.get(service)
        if latencies is None:
            latencies = self._latencies[service] = _Latencies()
        latencies.counts[bisect_left(BUCKETS, seconds)] += 1  # as prometheus_client: le is <=
        latencies.total += seconds

    def active(self, service: str) -> Level:
        level = self._active.get(service)
        if level is None:
            level = self._active[service] = Level()
        return level

    def forget(self, service: str) -> None:
        self._requests = {k: v for k, v in self._requests.items() if k[0] != service}
        self._latencies.pop(service, None)
        self._active.pop(service, None)

    def describe(self) -> list[Metric]:
        return [_requests_family(), _routes_family(), _latency_family(), _active_family()]

    def collect(self) -> list[Metric]:
        by_method: dict[tuple[str, str, str], list[float]] = {}
        by_route: dict[tuple[str, str, str], list[float]] = {}
        for (service, route, method, status), (count, created) in self._requests.items():
            code = str(status)
            for table, key in (
                (by_method, (service, method, code)),
                (by_route, (service, route, code)),
            ):
                summed = table.get(key)
                if summed is None:
                    table[key] = [count, created]
                else:
                    summed[0] += count
                    summed[1] = min(summed[1], created)
        families = []
        for family, table in ((_requests_family(), by_method), (_routes_family(), by_route)):
            for labels, (count, created) in table.items():
                family.add_metric(labels, count, created if _CREATED else None)
            families.append(family)
        latency = _latency_family()
        for service, latencies in self._latencies.items():
            cumulative = list(itertools.accumulate(latencies.counts))
            latency.add_metric(
                [service], list(zip(_BOUNDS, cumulative, strict=True)), latencies.total
            )
            if _CREATED:
                latency.samples.append(
                    Sample(f"{latency.name}_created", {"service": service}, latencies.created)
                )
        active = _active_family()
        for service, level in self._active.items():
            active.add_metric([service], level.value)
        return [*families, latency, active]


def _requests_family() -> CounterMetricFamily:
    return CounterMetricFamily(
        "http_requests",
        "Requests answered, by service, method and status.",
        labels=["service", "method", "status"],
    )


def _routes_family() -> CounterMetricFamily:
    return CounterMetricFamily(
        "gateway_route_requests",
        "Requests answered, by service, route (its name, or the service's for a service's own "
        "two rules) and status.",
        labels=["service", "route", "status"],
    )


def _latency_family() -> HistogramMetricFamily:
    return HistogramMetricFamily(
        "http_request_duration_seconds",
        "Time from request start to the end of the response, by service (WebSocket sessions "
        "are not observed here).",
        labels=["service"],
    )


def _active_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "active_connections",
        "Requests in flight (and, for WebSockets, open sessions), by service.",
        labels=["service"],
    )


class ScrapeCache:
    """The text of the last scrape in each format (Prometheus text, OpenMetrics), kept for a
    few seconds (``metrics_cache``): rendering every family costs ~2 ms of CPU (with
    ``--workers``, asking every other worker too), so scrapers polling in a loop must not
    make the gateway render on each of their requests."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[float, bytes]] = {}

    def get(self, content_type: str, now: float, ttl: float) -> bytes | None:
        """The text rendered at most ``ttl`` seconds before ``now``, if any."""
        kept = self._kept.get(content_type)
        if kept is None or not 0 <= now - kept[0] < ttl:
            return None
        return kept[1]

    def put(self, content_type: str, now: float, body: bytes) -> None:
        self._kept[content_type] = (now, body)


class _Fixed:
    """A collector of metric families computed beforehand."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge(workers: dict[int, Families]) -> list[Metric]:
    """Every worker's samples, each with a ``worker`` label (its index): a worker's counters
    then reset on their own when it is restarted, and a worker missing from one scrape leaves
    a gap in its own series only; ``sum()`` gives the gateway's totals. Also
    ``gateway_workers_reporting``: how many workers' samples are in."""
    families: dict[str, Metric] = {}
    for index, worker in sorted(workers.items()):
        label = str(index)
        for family in worker:
            name = family["name"]
            merged = families.get(name)
            if merged is None:
                merged = families[name] = Metric(
                    name, family["help"], family["type"], family["unit"]
                )
            for sample_name, labels, value in family["samples"]:
                merged.samples.append(Sample(sample_name, {**labels, "worker": label}, value))
    reporting = Metric(
        "gateway_workers_reporting",
        "Worker processes whose numbers are in this scrape (serve --workers).",
        "gauge",
    )
    reporting.samples.append(Sample("gateway_workers_reporting", {}, float(len(workers))))
    return [*families.values(), reporting]
