"""Every metric the gateway exports, defined once.

Label values come only from config names (service, node) and fixed sets (methods, status
codes, error kinds), so the scrape cannot grow with what clients or upstreams send: a request
for an unknown service counts as ``unmatched``, an unusual method as ``OTHER``, a status code
outside ``STATUSES`` as its class (``2xx``).
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any, Final, Generic, TypedDict, TypeVar

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
# The status codes labelled as themselves: IANA's registered ones (not those it lists as
# unused, 306 and 418), and nginx's 499, the gateway's own for a client that went away. An
# upstream may answer any code from 100 to 599 (an httpbin-like /status/<code>, a proxy's
# proxy): the others are labelled by their class, so a service has at most
# len(STATUSES) + 5 status values. "5xx" still matches the dashboards' status=~"5..".
STATUSES: Final = frozenset({
    *range(100, 104), *range(200, 209), 226, *range(300, 306), 307, 308, *range(400, 418),
    *range(421, 427), 428, 429, 431, 451, 499, *range(500, 509), 510, 511,
})  # fmt: skip
OTHER_STATUS: Final = "other"  # outside 100-599: the gateway answers none (it makes 600+ 502)
# Every code's label by the code, 0 to 999 (all aiohttp sends), indexed once per request.
_STATUS_LABELS: Final = tuple(
    (str(code) if code in STATUSES else f"{code // 100}xx") if 100 <= code < 600 else OTHER_STATUS
    for code in range(1000)
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
        # What the served config names (``configure``): the series of other names go.
        services, routes, targets = Scope(1), Scope(2), Scope(2)  # targets: (service, node)
        nodes, zones = Scope(1), Scope(1)
        self._scopes = (services, routes, targets, nodes, zones)
        self._route_kinds: Mapping[tuple[str, str], Hashable] = {}
        # The series every request updates are plain numbers, made into families only when
        # scraped (``Tally``, ``Latencies``, ``Levels``): prometheus_client's children take a
        # lock and several calls per update, about 5 us of every request's CPU for these. So
        # are all the others labelled by a service or a node, which a reload may remove.
        self.requests = self._tally(
            "http_requests",
            "Requests answered, by service, method and status.",
            ("service", "method", "status"),
            services,
        )
        self.route_requests = self._tally(
            "gateway_route_requests",
            "Requests answered, by service, route (its name, or the service's for a service's "
            "own two rules) and status.",
            ("service", "route", "status"),
            routes,
        )
        self.duration = Latencies(
            "http_request_duration_seconds",
            "Time from request start to the end of the response, by service "
            "(WebSocket sessions are not observed here).",
            services,
        )
        r.register(self.duration)
        self.active = Levels(
            "active_connections",
            "Requests in flight (and, for WebSockets, open sessions), by service.",
            services,
        )
        r.register(self.active)
        self.health = self._labelled(
            Gauge,
            "service_health",
            "1 when a dependency is usable, 0 when it is not. service=gateway lists the "
            "gateway's own dependencies; service=<name>,dependency=<node> each upstream target.",
            ["service", "dependency"],
        )
        self.upstream_errors = self._tally(
            "gateway_upstream_errors",
            "Upstream failures by service and kind (connect, connect_timeout, timeout, "
            "disconnect, protocol, io, busy, aborted).",
            ("service", "kind"),
            services,
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
        self.failovers = self._tally(
            "gateway_failovers",
            "Requests answered by a node other than the service's preferred ones.",
            ("service", "node"),
            targets,
        )
        self.retries = self._tally(
            "gateway_retries",
            "Extra attempts (on another target, or on a new connection after a stale one), by "
            "service and the failure that caused it.",
            ("service", "kind"),
            services,
        )
        self.ejections = self._tally(
            "gateway_ejections",
            "Targets taken out after consecutive failures of real traffic.",
            ("service", "node"),
            targets,
        )
        self.probes = self._tally(
            "gateway_health_checks",
            "Active health probes by service, node and result (pass, fail).",
            ("service", "node", "result"),
            targets,
        )
        self.ws_sessions = Levels(
            "gateway_websocket_sessions",
            "Open WebSocket sessions (also counted in active_connections).",
            services,
        )
        r.register(self.ws_sessions)
        self.ws_opened = self._tally(
            "gateway_websocket_sessions_opened",
            "WebSocket sessions relayed, by service.",
            ("service",),
            services,
        )
        self.ws_closed = self._tally(
            "gateway_websocket_sessions_closed",
            "WebSocket sessions ended, by service and the client leg's close code "
            "(1000-1015 as such, 3xxx, 4xxx, other, none).",
            ("service", "code"),
            services,
        )
        self.ws_messages = self._tally(
            "gateway_websocket_messages",
            "WebSocket data messages relayed, by direction (up: to the service).",
            ("service", "direction"),
            services,
        )
        self.ws_bytes = self._tally(
            "gateway_websocket_bytes",
            "WebSocket payload bytes relayed, by direction (up: to the service).",
            ("service", "direction"),
            services,
        )
        self.rate_limit_decisions = self._tally(
            "gateway_rate_limit_decisions",
            "Rate-limit decisions by zone and result (allowed, delayed, rejected, "
            "dry_run_rejected, dry_run_delayed).",
            ("zone", "result"),
            zones,
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
        self.auth = self._tally(
            "gateway_auth",
            "Token checks on routes with auth, by service and result (ok, anonymous, "
            "missing_token, invalid_token, token_expired, insufficient_scope, invalid_request).",
            ("service", "result"),
            services,
        )
        self.upstream_tls_failures = self._tally(
            "gateway_upstream_tls_failures",
            "Connections to a node (by requests, handshakes and probes) that failed in TLS: its "
            "certificate failed verification, or the handshake failed; by node.",
            ("node",),
            nodes,
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
        self.scrapes = ScrapeCache()
        self._scoped: tuple[_Scoped[Any, Any], ...] = tuple(
            family for family in vars(self).values() if isinstance(family, _Scoped)
        )

    def _labelled(
        self, kind: type[M], name: str, documentation: str, labels: list[str], **options: Any
    ) -> M:
        metric = kind(name, documentation, labels, registry=self.registry, **options)
        self._label_names[id(metric)] = tuple(labels)
        return metric

    def _tally(self, name: str, documentation: str, labels: tuple[str, ...], scope: Scope) -> Tally:
        tally = Tally(name, documentation, labels, scope)
        self.registry.register(tally)
        return tally

    def serving_config(self, digest: str) -> None:
        """``gateway_config_info``: this one, and no other."""
        self.config_info.clear()
        self.config_info.labels(digest).set(1)

    def observe_request(
        self, service: str, route: str, method: str, status: int, seconds: float
    ) -> None:
        label = _STATUS_LABELS[status]  # (the gateway's statuses are 100-599)
        self.requests.add((service, method_label(method), label))
        self.route_requests.add((service, route, label))
        if status != 101:  # a WebSocket session's length is not a request latency
            self.duration.observe(service, seconds)

    def active_for(self, service: str) -> Level:
        """The service's ``active_connections``: whoever increments it keeps this one to
        decrement (a reload may have dropped the service's series meanwhile)."""
        return self.active.of(service)

    def count_auth(self, service: str, result: str) -> None:
        self.auth.add((service, result))

    def count_limit(self, zone: str, result: str) -> None:
        self.rate_limit_decisions.add((zone, result))

    def configure(
        self,
        services: Iterable[str],
        routes: Mapping[tuple[str, str], Hashable],
        targets: Iterable[tuple[str, str]],
        zones: Iterable[str],
    ) -> None:
        """The names the served config has, at the start and after each reload: the series of
        every other service, route, target (service, node), node and rate-limit zone go, now
        and at every scrape (when work begun under an earlier config counted one again).
        ``routes``: each route's (service, name), and what it is where its name says nothing
        of that (an unnamed route's ``<service>#<index>``, which a reload may give to another
        route: its series then start again)."""
        services_, routes_, targets_, nodes_, zones_ = self._scopes
        previous = services_.live
        services = {*services, GATEWAY, UNMATCHED}
        targets = set(targets)
        for route, kind in routes.items():
            if self._route_kinds.get(route, kind) != kind:
                self.route_requests.drop(route)
        self._route_kinds = dict(routes)
        services_.set((name,) for name in services)
        routes_.set({*routes, (GATEWAY, GATEWAY), (UNMATCHED, UNMATCHED)})
        targets_.set(targets)
        nodes_.set({(node,) for _, node in targets})
        zones_.set((zone,) for zone in zones)
        for family in self._scoped:
            family.sweep()
        if previous is not None:  # service_health{service="gateway",dependency=<service>}
            gone = {name for (name,) in previous} - services
            self.remove_series(
                self.health, lambda labels: labels[0] == GATEWAY and labels[1] in gone
            )

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


_BOUNDS: Final = (*(str(bound) for bound in BUCKETS), "+Inf")  # as prometheus_client writes le

# The families below are counted as plain numbers and made into metric families when the
# registry is collected (a scrape, ``Metrics.families``), with the names, labels, buckets and
# _created series prometheus_client's own would have (always: the gateway never turns them
# off). Only the event loop's thread updates or reads them: no lock. No ``describe``: the
# registry (auto_describe) collects them once for their names, while they are empty.


class Scope:
    """The config names a family's series may carry in their first ``width`` labels: the
    services (or routes, targets, nodes, zones) of the config being served, set by
    ``Metrics.configure`` at the start and at each reload. The families drop every other
    series when collected: work begun under an earlier config (a request, a WebSocket
    session, a probe in flight at the reload) may still count for a name the reload
    removed, and nothing is checked per count."""

    __slots__ = ("live", "version", "width")

    def __init__(self, width: int) -> None:
        self.width = width
        self.live: frozenset[tuple[str, ...]] | None = None  # None: none set yet, all kept
        self.version = 0  # one more at each change of ``live``

    def set(self, live: Iterable[tuple[str, ...]]) -> None:
        self.live = frozenset(live)
        self.version += 1


K = TypeVar("K", tuple[str, ...], str)
V = TypeVar("V")


class _Scoped(Generic[K, V]):
    """A family's series by their label values (a tuple, or one service's name), limited to
    a ``Scope``."""

    def __init__(self, scope: Scope | None) -> None:
        self._scope = scope
        self._series: dict[K, V] = {}
        # (the scope's version, how many series) after the last sweep: series are only
        # added between sweeps, so the same two numbers mean there is nothing new to check.
        self._swept = (0, 0)

    def sweep(self) -> None:
        """Drop the series outside the scope."""
        scope = self._scope
        if scope is None or scope.live is None or self._swept == (scope.version, len(self)):
            return
        live, width = scope.live, scope.width
        for key in [k for k in self._series if _leading(k, width) not in live]:
            del self._series[key]
        self._swept = (scope.version, len(self))

    def drop(self, leading: tuple[str, ...]) -> None:
        """Drop the series whose first labels are ``leading``."""
        width = len(leading)
        self._series = {k: v for k, v in self._series.items() if _leading(k, width) != leading}
        self._swept = (0, 0)  # fewer series: the next sweep cannot tell by their number

    def __len__(self) -> int:
        return len(self._series)


def _leading(key: tuple[str, ...] | str, width: int) -> tuple[str, ...]:
    return (key,) if isinstance(key, str) else key[:width]


class Tally(_Scoped[tuple[str, ...], list[float]]):
    """A counter family: a count per tuple of label values."""

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], scope: Scope | None = None
    ) -> None:
        super().__init__(scope)
        self._name, self._documentation, self._labels = name, documentation, labels

    def add(self, key: tuple[str, ...], amount: float = 1) -> None:
        counted = self._series.get(key)
        if counted is None:
            counted = self._series[key] = [0, time.time()]  # [count, created]
        counted[0] += amount

    def collect(self) -> list[Metric]:
        self.sweep()
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        for key, (count, created) in self._series.items():
            family.add_metric(list(key), count, created)
        return [family]


class _Buckets:
    """One service's latencies: a count per bucket (the last one +Inf), not cumulative until
    scraped, and their sum."""

    __slots__ = ("counts", "created", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.created = time.time()


class Latencies(_Scoped[str, _Buckets]):
    """A histogram family of ``BUCKETS``, by service."""

    def __init__(self, name: str, documentation: str, scope: Scope | None = None) -> None:
        super().__init__(scope)
        self._name, self._documentation = name, documentation

    def observe(self, service: str, seconds: float) -> None:
        buckets = self._series.get(service)
        if buckets is None:
            buckets = self._series[service] = _Buckets()
        buckets.counts[bisect_left(BUCKETS, seconds)] += 1  # as prometheus_client: le is <=
        buckets.total += seconds

    def collect(self) -> list[Metric]:
        self.sweep()
        family = HistogramMetricFamily(self._name, self._documentation, labels=["service"])
        for service, buckets in self._series.items():
            cumulative = itertools.accumulate(buckets.counts)
            family.add_metric([service], list(zip(_BOUNDS, cumulative, strict=True)), buckets.total)
            family.samples.append(
                Sample(f"{self._name}_created", {"service": service}, buckets.created)
            )
        return [family]


class Level:
    """A gauge kept as a plain number (one service's ``active_connections``)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class Levels(_Scoped[str, Level]):
    """A gauge family of ``Level``s, by service. Whoever increments one keeps it to decrement:
    a sweep may have dropped it meanwhile (its service removed), and the service's new one, if
    it comes back, starts from 0."""

    def __init__(self, name: str, documentation: str, scope: Scope | None = None) -> None:
        super().__init__(scope)
        self._name, self._documentation = name, documentation

    def of(self, service: str) -> Level:
        level = self._series.get(service)
        if level is None:
            level = self._series[service] = Level()
        return level

    def collect(self) -> list[Metric]:
        self.sweep()
        family = GaugeMetricFamily(self._name, self._documentation, labels=["service"])
        for service, level in self._series.items():
            family.add_metric([service], level.value)
        return [family]


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
