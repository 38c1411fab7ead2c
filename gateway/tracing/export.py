"""One OpenTelemetry span per sampled request, exported over OTLP/HTTP (protobuf).

The only module that imports the SDK, and only when ``tracing.otlp_endpoint`` is set:
``Tracer`` is built once per process. The sampling decision is the gateway's own, made before
any SDK object exists (so an unsampled request costs what it costs with tracing off):

- a parent from a trusted proxy (or from anyone, with ``sampled_from: anyone``): its
  sampled flag decides (parent-based);
- otherwise (no parent, an invalid one, or an untrusted client's): ``sample_ratio``.

A sampled span goes to the SDK's ``BatchSpanProcessor``, which exports from a thread of its
own; the event loop only appends to its queue. The queue is bounded: a span that finds it
full is dropped and counted (``gateway_trace_spans_dropped_total{reason="queue_full"}``), as
is every span of a batch the collector refused or did not take within ``export_timeout``
(``reason="export_failed"``). A slow or dead collector never makes a request wait.

``export_timeout`` bounds one export in all, the collector's whole answer included (``_Watch``:
a socket timeout alone bounds each read, so an answer trickling in a byte at a time would
never end), and a stop waits at most twice ``export_timeout`` for the queue to drain.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import requests
from opentelemetry import context as otel_context
from opentelemetry import trace as api
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.ssltransport import SSLTransport

from .. import __version__
from .context import Parent, Trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import Span

    from ..config.types import Tracing
    from ..metrics import Metrics

log = logging.getLogger("gateway.tracing")

_SCHEDULE_DELAY_MS: Final = 1000  # a batch at least each second (the SDK's default is 5)
_MAX_BATCH: Final = 512
_SHOWN: Final = 200  # characters of a collector's message or Location in a log line, at most


class _Exporting(threading.local):
    """What the thread making an export knows of it: the deadline of its request under way
    (``_Watch``), and how many of its spans the collector's answer rejected (``_Collector``,
    read by ``_Counting``). The SDK exports from its worker thread, and from the caller's in
    ``force_flush``: each thread has its own."""

    watch: _Watch | None = None
    rejected: int = 0


_exporting = _Exporting()


class NotTakenError(Exception):
    """The collector answered, but not that it took the spans (a redirect, a body that is no
    OTLP answer). Not a connection error: the SDK fails the batch without a retry."""


class _Watch:
    """The deadline of one request, its whole answer included: when it passes, the sockets
    of the connections the request used are shut down, which ends a read under way in the
    exporting thread (shutdown, not close: the descriptor stays the reading thread's)."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._lock = threading.Lock()
        self._connections: list[HTTPConnection] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Watch:
        _exporting.watch = self
        self._timer.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timer.cancel()
        _exporting.watch = None

    def add(self, connection: HTTPConnection) -> None:
        with self._lock:
            self._connections.append(connection)
            expired = self.expired
        if expired:  # connected after the deadline: its socket did not exist when it passed
            _abort(connection)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            connections = list(self._connections)
        for connection in connections:
            _abort(connection)


def _not_after_the_deadline(record: logging.LogRecord) -> bool:
    """A filter for urllib3's log: nothing from a request whose deadline has passed (its
    answer cut short by ``_Watch`` makes urllib3 warn of a malformed header, with a
    traceback; the SDK's error line says the export timed out)."""
    watch = _exporting.watch
    return watch is None or not watch.expired


def _watched(connection: HTTPConnection) -> None:
    if (watch := _exporting.watch) is not None:
        watch.add(connection)


def _abort(connection: HTTPConnection) -> None:
    sock = connection.sock
    if isinstance(sock, SSLTransport):  # TLS inside a proxy's TLS tunnel
        sock = sock.socket
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # closed meanwhile: nothing left to end
            # The plain socket's shutdown: an SSLSocket's own drops its TLS state under the
            # thread reading from it.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _WatchedHTTPConnection(HTTPConnection):
    """Put under the current request's deadline when it connects and when it sends a request
    (a pooled connection does not connect again)."""

    def connect(self) -> None:
        super().connect()
        _watched(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watched(self)
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(_WatchedHTTPConnection, HTTPSConnection):
    """``_WatchedHTTPConnection`` for https:// (the TLS handshake is within ``connect``)."""


class _WatchedPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS: Final[dict[str, type[HTTPConnectionPool]]] = {
    "http": _WatchedPool,
    "https": _WatchedHTTPSPool,
}


class _Collector(HTTPAdapter):
    """How the exporter's ``requests`` session talks to the collector: each request (the SDK
    gives it what is left of ``export_timeout``) bounded in all by a ``_Watch``, and its
    answer read for what the SDK does not check. The SDK takes any status up to 399 for a
    success and never reads the body; here a 1xx or 3xx answer (redirects are not followed:
    an http->https ingress, a path without its slash, a login page) and a 2xx body that is no
    OTLP answer fail the batch, and a ``partial_success`` that rejects spans is noted for
    ``_Counting``. Proxies from the environment work as before (their managers get the
    watched pools too; a SOCKS proxy's keep their own, and a timeout per read)."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager

    def send(  # noqa: PLR0917 - requests' own signature, which its callers use positionally
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        if not isinstance(timeout, int | float):  # the SDK always gives seconds
            return super().send(request, stream, timeout, verify, cert, proxies)
        try:
            with _Watch(timeout) as watch:
                response = super().send(request, stream, timeout, verify, cert, proxies)
                body = response.content  # the body too, within the deadline
        except requests.RequestException as error:
            if watch.expired:
                raise requests.Timeout(f"no whole answer within {timeout:.3g}s") from error
            raise
        if watch.expired:  # an answer cut short may parse all the same: not one to believe
            response.close()
            raise requests.Timeout(f"no whole answer within {timeout:.3g}s")
        status = response.status_code
        if status < 200 or 300 <= status < 400:
            where = response.headers.get("Location")
            raise NotTakenError(
                f"the collector answered {status} {response.reason}"
                + (f" (Location: {where[:_SHOWN]})" if where else "")
                + ": redirects are not followed; tracing.otlp_endpoint must be the collector's"
                " own URL"
            )
        if status < 300:
            _exporting.rejected = _rejected(body, response.headers.get("Content-Type", ""))
        return response


def _rejected(body: bytes, content_type: str) -> int:
    """How many spans a collector's 2xx answer says it rejected (OTLP ``partial_success``);
    a body that is no ``ExportTraceServiceResponse`` raises ``NotTakenError``."""
    kind = content_type.partition(";")[0].strip().lower()
    if not body:
        return 0  # an empty message: a full success
    if kind not in ("", "application/x-protobuf", "application/protobuf"):
        raise NotTakenError(
            f"the collector answered with {kind or 'a body'}, not an OTLP answer: "
            "tracing.otlp_endpoint must be the collector's OTLP/HTTP traces URL"
        )
    try:
        answer = ExportTraceServiceResponse.FromString(body)
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError, in an untyped module
        raise NotTakenError(f"the collector's answer is not OTLP protobuf: {error}") from None
    partial = answer.partial_success
    rejected = int(partial.rejected_spans)
    if rejected or partial.error_message:
        log.warning(
            "the collector rejected spans" if rejected else "the collector warned",
            extra={"fields": {"rejected": rejected, "reason": partial.error_message[:_SHOWN]}},
        )
    return max(rejected, 0)


class _Counting(SpanExporter):
    """The OTLP exporter, its outcomes counted, and the spans it was handed given back to
    the queue's account (``_Bounded.taken``): a success less the spans the collector's
    ``partial_success`` rejected is exported, the rest ``export_failed``."""

    def __init__(self, inner: SpanExporter, metrics: Metrics, bounded: _Bounded) -> None:
        self._inner = inner
        self._exported = metrics.trace_spans
        self._failed = metrics.trace_spans_dropped.labels("export_failed")
        self._bounded = bounded
        self._shut = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self._bounded.taken(len(spans)):
            return SpanExportResult.FAILURE  # after the stop's deadline: counted already
        _exporting.rejected = 0
        try:
            result = self._inner.export(spans)
        except Exception:  # noqa: BLE001 - any failure of the exporter loses this batch only
            result = SpanExportResult.FAILURE
        failed = len(spans)
        if result is SpanExportResult.SUCCESS:
            failed = min(_exporting.rejected, len(spans))
            self._exported.inc(len(spans) - failed)
        self._failed.inc(failed)
        return result

    def shutdown(self) -> None:
        """Once (``Tracer.shutdown``'s deadline and the SDK's own shutdown both call it)."""
        with self._lock:
            shut, self._shut = self._shut, True
        if not shut:
            self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _Bounded(SpanProcessor):
    """In front of the batch processor: keeps its own count of the spans queued (added at
    ``on_end``, taken when the exporter is handed them), and drops and counts a span that
    would find the queue full, rather than letting the SDK drop one with a log line each.
    ``close`` (a stop's deadline) counts what is still queued as ``export_failed``."""

    def __init__(self, queue_size: int, metrics: Metrics) -> None:
        self._queue_size = queue_size
        self._queued = 0
        self._closed = False
        self._lock = threading.Lock()
        self._dropped = metrics.trace_spans_dropped.labels("queue_full")
        self._failed = metrics.trace_spans_dropped.labels("export_failed")
        self.batch: BatchSpanProcessor | None = None

    def taken(self, count: int) -> bool:
        """The exporter has ``count`` spans to export; False once closed (they were counted
        as ``export_failed`` then: not to be exported, nor counted again)."""
        with self._lock:
            self._queued = max(self._queued - count, 0)
            return not self._closed

    def close(self) -> int:
        """Count the spans still queued as ``export_failed`` (how many): the stop waits no
        longer for them."""
        with self._lock:
            left, self._queued, self._closed = self._queued, 0, True
        self._failed.inc(left)
        return left

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            closed = self._closed
            full = self._queued >= self._queue_size
            if not (full or closed):
                self._queued += 1
        if closed:  # a span that ends after the stop (none should)
            self._failed.inc()
        elif full:
            self._dropped.inc()
        elif self.batch is not None:
            self.batch.on_end(span)

    def shutdown(self) -> None:
        if self.batch is not None:
            self.batch.shutdown()  # type: ignore[no-untyped-call]  # the SDK leaves it unannotated

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.batch is None or self.batch.force_flush(timeout_millis)


class Tracer:
    """Starts and ends the spans of sampled requests; see the module's docstring."""

    def __init__(self, settings: Tracing, metrics: Metrics) -> None:
        self._ratio = settings.sample_ratio
        self._anyone = settings.sampled_from == "anyone"
        self._random = random.random
        bounded = _Bounded(settings.queue_size, metrics)
        session = requests.Session()
        collector = _Collector()
        session.mount("http://", collector)
        session.mount("https://", collector)
        self._otlp = OTLPSpanExporter(
            endpoint=settings.otlp_endpoint, timeout=settings.export_timeout, session=session
        )
        exporter = _Counting(self._otlp, metrics, bounded)
        self._exporter = exporter
        self._bounded = bounded
        bounded.batch = BatchSpanProcessor(
            exporter,
            max_queue_size=settings.queue_size,
            schedule_delay_millis=_SCHEDULE_DELAY_MS,
            max_export_batch_size=min(_MAX_BATCH, settings.queue_size),
            export_timeout_millis=settings.export_timeout * 1000,
        )
        self._provider = TracerProvider(
            sampler=ALWAYS_ON,  # the decision is made in start(), before the SDK is asked
            resource=Resource.create({"service.name": settings.service_name}),
            shutdown_on_exit=False,  # Gateway.stop shuts it down, in a thread, bounded
        )
        self._provider.add_span_processor(bounded)
        self._tracer = self._provider.get_tracer("daarion-gateway", __version__)
        # The exporter logs each retry as a warning; a failed batch (an error line) and the
        # drop counters say enough. The API warns of each malformed tracestate a client sends
        # (its span then has none; the upstream gets the header as it came): not a line each.
        for name in ("opentelemetry.exporter", "opentelemetry.trace"):
            logging.getLogger(name).setLevel(logging.ERROR)
        for name in ("urllib3.connection", "urllib3.connectionpool"):  # (not inherited)
            logging.getLogger(name).addFilter(_not_after_the_deadline)  # once: the same one
        self._timeout = settings.export_timeout
        self._stopped = False

    def start(self, parent: Parent | None, trusted: bool, tracestate: Sequence[str]) -> Trace:
        """The request's trace; a recording span when it is sampled."""
        if parent is not None and (trusted or self._anyone):
            sampled = parent.sampled
        else:
            sampled = self._random() < self._ratio
        if not sampled:
            trace = Trace.of(parent)
            trace.sampled = False
            return trace
        if parent is None:
            context = otel_context.Context()  # a root span: no current span of this thread
        else:
            remote = api.SpanContext(
                trace_id=int(parent.trace_id, 16),
                span_id=int(parent.span_id, 16),
                is_remote=True,
                trace_flags=api.TraceFlags(api.TraceFlags.SAMPLED),
                trace_state=api.TraceState.from_header(list(tracestate)),
            )
            context = api.set_span_in_context(api.NonRecordingSpan(remote))
        span = self._tracer.start_span(
            "request", context=context, kind=api.SpanKind.SERVER, start_time=time.time_ns()
        )
        ids = span.get_span_context()
        return Trace(
            f"{ids.trace_id:032x}",
            f"{ids.span_id:016x}",
            None if parent is None else parent.span_id,
            sampled=True,
            span=span,
        )

    def finish(
        self, trace: Trace, name: str, status: int, attributes: dict[str, str | int]
    ) -> None:
        """End a sampled request's span: its name, attributes and status (an error for a 5xx
        answer, as OpenTelemetry's HTTP server conventions have it)."""
        span = trace.span
        if not isinstance(span, api.Span):
            return
        span.update_name(name)
        span.set_attributes(attributes)
        if status >= 500:
            span.set_status(api.Status(api.StatusCode.ERROR))
        span.end()

    def force_flush(self) -> bool:
        """Export what is queued now; blocking: run it in a thread."""
        return self._provider.force_flush(int(self._timeout * 1000))

    def shutdown(self) -> None:
        """Export what is queued, within about twice ``export_timeout`` in all; blocking: run
        it in a thread. The SDK exports batch after batch, each bounded by ``export_timeout``
        (``_Collector``): once the time is up the exporter is shut, so that the batches left
        fail at once (counted as ``export_failed``) instead of each waiting on a slow or
        unreachable collector, while the export under way gets the rest of its own time.
        The SDK's shutdown runs in a daemon thread, waited for up to twice ``export_timeout``
        (its own would wait 30 s); whatever is still queued then is counted as
        ``export_failed``, and the process may exit without it."""
        if self._stopped:
            return
        self._stopped = True
        deadline = threading.Timer(self._timeout, self._exporter.shutdown)
        deadline.daemon = True
        deadline.start()
        sdk = threading.Thread(target=self._provider.shutdown, name="trace-export-stop")
        sdk.daemon = True
        sdk.start()
        sdk.join(2 * self._timeout)
        deadline.cancel()
        left = self._bounded.close()
        if left or sdk.is_alive():
            log.warning(
                "the stop waited no longer for the collector: spans still queued are counted "
                "as export_failed",
                extra={
                    "fields": {
                        "spans": left,
                        "export_under_way": sdk.is_alive(),
                        "seconds": 2 * self._timeout,
                    }
                },
            )
