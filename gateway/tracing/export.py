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
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from opentelemetry import context as otel_context
from opentelemetry import trace as api
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from .. import __version__
from .context import Parent, Trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import Span

    from ..config.types import Tracing
    from ..metrics import Metrics

_SCHEDULE_DELAY_MS: Final = 1000  # a batch at least each second (the SDK's default is 5)
_MAX_BATCH: Final = 512


class _Counting(SpanExporter):
    """The OTLP exporter, its outcomes counted, and the spans it was handed given back to
    the queue's account (``_Bounded.taken``)."""

    def __init__(self, inner: SpanExporter, metrics: Metrics, bounded: _Bounded) -> None:
        self._inner = inner
        self._exported = metrics.trace_spans
        self._failed = metrics.trace_spans_dropped.labels("export_failed")
        self._bounded = bounded

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._bounded.taken(len(spans))
        try:
            result = self._inner.export(spans)
        except Exception:  # noqa: BLE001 - any failure of the exporter loses this batch only
            result = SpanExportResult.FAILURE
        (self._exported if result is SpanExportResult.SUCCESS else self._failed).inc(len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _Bounded(SpanProcessor):
    """In front of the batch processor: keeps its own count of the spans queued (added at
    ``on_end``, taken when the exporter is handed them), and drops and counts a span that
    would find the queue full, rather than letting the SDK drop one with a log line each."""

    def __init__(self, queue_size: int, metrics: Metrics) -> None:
        self._queue_size = queue_size
        self._queued = 0
        self._lock = threading.Lock()
        self._dropped = metrics.trace_spans_dropped.labels("queue_full")
        self.batch: BatchSpanProcessor | None = None

    def taken(self, count: int) -> None:
        with self._lock:
            self._queued = max(self._queued - count, 0)

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            full = self._queued >= self._queue_size
            if not full:
                self._queued += 1
        if full:
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
        self._otlp = OTLPSpanExporter(
            endpoint=settings.otlp_endpoint, timeout=settings.export_timeout
        )
        exporter = _Counting(self._otlp, metrics, bounded)
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
        self._timeout = settings.export_timeout

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
        """Export what is queued, within about twice ``export_timeout`` in all (the export
        under way when the time is up still gets its own); blocking: run it in a thread. The
        SDK exports batch after batch, each with its own timeout: once the time is up the
        exporter is shut, so that the batches left fail at once (counted as
        ``export_failed``) instead of each waiting on a slow or unreachable collector (2,048
        spans queued for a collector that never answers: 25 s before, 10 s now)."""
        deadline = threading.Timer(self._timeout, self._otlp.shutdown)
        deadline.daemon = True
        deadline.start()
        try:
            self._provider.shutdown()
        finally:
            deadline.cancel()
