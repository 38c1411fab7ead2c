"""Tracing end to end: W3C Trace Context from the client through the gateway to real
upstreams, and the spans a real OTLP/HTTP receiver on loopback gets (an aiohttp app decoding
the protobuf ExportTraceServiceRequest with opentelemetry-proto)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jsonschema
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gateway.cli import main
from gateway.config import ConfigError, config_json_schema, parse_config
from gateway.tracing.context import parse_traceparent

from .helpers import NODA1, NODA2, RunningGateway, free_port, routes, sample

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{CLIENT_SPAN}-01"
UNSAMPLED = f"00-{TRACE}-{CLIENT_SPAN}-00"


@dataclass
class Collector:
    """An OTLP/HTTP receiver: every span it was sent, with its resource's attributes."""

    url: str
    spans: list[Span] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    delay: float = 0.0  # seconds before it answers: a slow collector
    posts: int = 0
    # Its answer to an export of so many spans (default: an ExportTraceServiceResponse
    # without partial_success, a full success).
    answer: Callable[[int], web.Response] | None = None


@pytest.fixture
async def collector() -> AsyncIterator[Callable[..., Awaitable[Collector]]]:
    runners: list[web.AppRunner] = []

    async def start(
        delay: float = 0.0, answer: Callable[[int], web.Response] | None = None
    ) -> Collector:
        holder: list[Collector] = []

        async def traces(request: web.Request) -> web.StreamResponse:
            got = holder[0]
            got.posts += 1
            assert request.content_type == "application/x-protobuf"
            export = ExportTraceServiceRequest.FromString(await request.read())
            if got.delay:
                await asyncio.sleep(got.delay)
            count = 0
            for resource_spans in export.resource_spans:
                got.resources.append(attributes(resource_spans.resource.attributes))
                for scope_spans in resource_spans.scope_spans:
                    got.spans.extend(scope_spans.spans)
                    count += len(scope_spans.spans)
            if got.answer is not None:
                return got.answer(count)
            return web.Response(
                body=ExportTraceServiceResponse().SerializeToString(),
                content_type="application/x-protobuf",
            )

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        holder.append(Collector(f"http://127.0.0.1:{port}/v1/traces", delay=delay, answer=answer))
        return holder[0]

    yield start
    for runner in runners:
        await runner.cleanup()


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP KeyValues as a dict (string and int values)."""
    found: dict[str, Any] = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        found[pair.key] = getattr(pair.value, kind)
    return found


def tracing(endpoint: str, extra: str = "") -> str:
    return f"tracing: {{otlp_endpoint: '{endpoint}'{extra}}}\n"


async def flushed(gw) -> None:
    """What the gateway queued is exported now (in a thread, as the SDK's processor does)."""
    tracer = gw.gateway.shared.tracer
    assert tracer is not None
    await asyncio.to_thread(tracer.force_flush)


def city(port: int) -> str:
    return routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1)


async def traced_city(upstream, gateway, collector, settings: str, before: str = ""):
    """A collector, a city upstream, and a gateway tracing to the collector with
    ``settings`` (``before``: more top-level config)."""
    otlp = await collector()
    up = await upstream(NODA1)
    gw = await gateway(tracing(otlp.url, settings) + before + city(up.port))
    return otlp, up, gw


def sent_traceparent(up, index: int = -1) -> str:
    value: str | None = up.seen[index].header("traceparent")
    assert value is not None
    return value


async def test_a_valid_traceparent_is_continued_with_tracing_off(upstream, gateway, client):
    up = await upstream(NODA1)
    gw = await gateway(city(up.port))
    headers = {"traceparent": SAMPLED, "tracestate": "vendor=abc,other=1"}
    async with client.get(gw.url + "/api/city/rooms", headers=headers) as response:
        assert response.status == 200
    parent = parse_traceparent(sent_traceparent(up))
    assert parent is not None
    assert parent.trace_id == TRACE  # the client's trace
    # Recording nothing, the gateway passes the caller's span on as the upstream's parent
    # (a span id of its own would name a parent no one exports), and its decision.
    assert parent.span_id == CLIENT_SPAN
    assert parent.sampled
    assert up.seen[-1].header("tracestate") == "vendor=abc,other=1"
    line = next(line for line in gw.log_lines() if line.get("message") == "request")
    assert line["trace_id"] == TRACE
    assert gw.gateway.shared.tracer is None


@pytest.mark.parametrize(
    "sent",
    [
        None,
        f"00-{TRACE.upper()}-{CLIENT_SPAN}-01",
        f"00-{'0' * 32}-{CLIENT_SPAN}-01",
        f"ff-{TRACE}-{CLIENT_SPAN}-01",
        "garbage",
    ],
)
async def test_an_absent_or_invalid_traceparent_starts_a_trace(upstream, gateway, client, sent):
    up = await upstream(NODA1)
    gw = await gateway(city(up.port))
    headers = {"tracestate": "vendor=abc"}
    if sent is not None:
        headers["traceparent"] = sent
    async with client.get(gw.url + "/api/city/rooms", headers=headers) as response:
        assert response.status == 200
    parent = parse_traceparent(sent_traceparent(up))
    assert parent is not None
    assert parent.trace_id != TRACE
    assert not parent.sampled
    # A tracestate belongs to the traceparent it came with: not passed on without it (W3C).
    assert up.seen[-1].header("tracestate") is None
    line = next(line for line in gw.log_lines() if line.get("message") == "request")
    assert line["trace_id"] == parent.trace_id


async def test_two_traceparent_headers_start_a_trace(upstream, gateway):
    up = await upstream(NODA1)
    gw = await gateway(city(up.port))
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            gw.url + "/api/city/x", headers=[("traceparent", SAMPLED), ("traceparent", SAMPLED)]
        ) as response,
    ):
        assert response.status == 200
    assert [v for k, v in up.seen[-1].headers if k.lower() == "traceparent"] != [SAMPLED]
    parent = parse_traceparent(sent_traceparent(up))
    assert parent is not None
    assert parent.trace_id != TRACE


async def test_a_sampled_request_is_exported_with_its_parent_and_attributes(
    upstream, gateway, client, collector
):
    otlp, up, gw = await traced_city(
        upstream, gateway, collector, ", sample_ratio: 0", "trusted_proxies: [127.0.0.1/32]\n"
    )
    headers = {"traceparent": SAMPLED, "tracestate": "vendor=abc"}
    async with client.get(gw.url + "/api/city/rooms?x=1", headers=headers) as response:
        assert response.status == 200
        request_id = response.headers["X-Request-ID"]
    await flushed(gw)
    [span] = otlp.spans
    sent = parse_traceparent(sent_traceparent(up))
    assert sent is not None
    assert span.trace_id.hex() == TRACE == sent.trace_id
    assert span.parent_span_id.hex() == CLIENT_SPAN
    assert span.span_id.hex() == sent.span_id  # the upstream's parent is the gateway's span
    assert sent.sampled
    assert span.kind == Span.SPAN_KIND_SERVER
    assert span.name == "GET city"
    assert span.trace_state == "vendor=abc"
    got = attributes(span.attributes)
    assert got["daarion.service"] == "city"
    assert got["daarion.route"] == "city"
    assert got["http.response.status_code"] == 200
    assert got["daarion.upstream.node"] == "noda1"
    assert got["url.path"] == "/api/city/rooms"
    assert got["daarion.request_id"] == request_id
    assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
    assert otlp.resources[0]["service.name"] == "daarion-gateway"
    metrics = await (await client.get(gw.url + "/metrics")).text()
    assert sample(metrics, "gateway_trace_spans_exported_total") == 1


async def test_an_untrusted_clients_sampled_flag_does_not_decide(
    upstream, gateway, client, collector
):
    """A client cannot make the gateway trace every request: its trace id is continued, but
    the ratio decides (0 here); a trusted proxy's unsampled parent is not sampled either."""
    otlp, up, gw = await traced_city(upstream, gateway, collector, ", sample_ratio: 0")
    async with client.get(gw.url + "/api/city/x", headers={"traceparent": SAMPLED}) as response:
        assert response.status == 200
    sent = parse_traceparent(sent_traceparent(up))
    assert sent is not None
    assert sent.trace_id == TRACE
    assert not sent.sampled
    await flushed(gw)
    assert otlp.spans == []


async def test_sampled_from_anyone_follows_a_clients_flag(upstream, gateway, client, collector):
    otlp, up, gw = await traced_city(
        upstream, gateway, collector, ", sample_ratio: 1, sampled_from: anyone"
    )
    for sent in (SAMPLED, UNSAMPLED):  # parent-based: an unsampled parent is not sampled
        async with client.get(gw.url + "/api/city/x", headers={"traceparent": sent}) as r:
            assert r.status == 200
    await flushed(gw)
    [span] = otlp.spans
    assert span.parent_span_id.hex() == CLIENT_SPAN
    flags = [parse_traceparent(sent_traceparent(up, i)) for i in (0, 1)]
    assert [p is not None and p.sampled for p in flags] == [True, False]


async def test_root_spans_at_sample_ratio_one(upstream, gateway, client, collector):
    otlp, up, gw = await traced_city(
        upstream, gateway, collector, ", sample_ratio: 1, service_name: edge-gw"
    )
    for _ in range(3):
        async with client.get(gw.url + "/api/city/x") as response:
            assert response.status == 200
    async with client.get(gw.url + "/api/nowhere") as response:
        assert response.status == 404
    await flushed(gw)
    assert len(otlp.spans) == 4
    for index, span in enumerate(otlp.spans[:3]):
        assert span.parent_span_id == b""  # a root span
        sent = parse_traceparent(sent_traceparent(up, index))
        assert sent is not None
        assert (span.trace_id.hex(), span.span_id.hex(), sent.sampled) == (
            sent.trace_id, sent.span_id, True,
        )  # fmt: skip
    lost = attributes(otlp.spans[3].attributes)
    assert lost["http.response.status_code"] == 404
    assert lost["error.type"] == "not_found"
    assert "daarion.upstream.node" not in lost
    assert otlp.resources[0]["service.name"] == "edge-gw"
    traced = {span.trace_id.hex() for span in otlp.spans}
    logged = {line["trace_id"] for line in gw.log_lines() if line.get("message") == "request"}
    assert traced == logged


async def test_a_websocket_handshake_carries_the_trace(upstream, gateway, client, collector):
    otlp = await collector()

    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws

    up = await upstream(NODA1, echo)
    gw = await gateway(
        tracing(otlp.url, ", sample_ratio: 0, sampled_from: anyone")
        + routes({"city": f"{{port: {up.port}, nodes: [noda1], websocket: true}}"}, noda1=NODA1)
    )
    async with client.ws_connect(
        gw.url + "/ws/city/rooms/general", headers={"traceparent": SAMPLED}
    ) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        session_open = time.time_ns()
    sent = parse_traceparent(sent_traceparent(up))
    assert sent is not None
    assert (sent.trace_id, sent.sampled) == (TRACE, True)
    deadline = time.monotonic() + 5
    while not otlp.spans:  # the handshake's span ends with the request's line
        assert time.monotonic() < deadline, "no span for the handshake"
        await flushed(gw)
        await asyncio.sleep(0.05)
    [span] = otlp.spans
    assert span.span_id.hex() == sent.span_id
    assert span.parent_span_id.hex() == CLIENT_SPAN
    got = attributes(span.attributes)
    assert got["http.response.status_code"] == 101
    assert got["daarion.upstream.node"] == "noda1"
    assert got["daarion.websocket"] == 1
    assert span.end_time_unix_nano < session_open  # the handshake's span, not the session's


async def test_a_failover_is_one_span_with_a_retry_event(upstream, gateway, client, collector):
    """noda2 refuses the connection; the retry goes to noda1: one span, the retry and the
    failover as its events, and the upstream's parent is that span."""
    otlp = await collector()
    up = await upstream(NODA1)
    dead = free_port(NODA2)
    service = f"{{port: {dead}, nodes: [noda2, {{node: noda1, port: {up.port}}}]}}"
    gw = await gateway(
        tracing(otlp.url, ", sample_ratio: 1")
        + routes({"search": service}, noda1=NODA1, noda2=NODA2)
    )
    async with client.get(gw.url + "/api/search/q", headers={"traceparent": UNSAMPLED}) as r:
        assert r.status == 200
    # An untrusted parent's flag does not decide: the ratio (1) does.
    sent = parse_traceparent(sent_traceparent(up))
    assert sent is not None
    assert (sent.trace_id, sent.sampled) == (TRACE, True)
    await flushed(gw)
    [span] = otlp.spans
    assert span.span_id.hex() == sent.span_id
    assert span.parent_span_id.hex() == CLIENT_SPAN  # the client's trace, continued
    assert attributes(span.attributes)["daarion.upstream.node"] == "noda1"
    events = [(event.name, attributes(event.attributes)) for event in span.events]
    assert events == [
        ("retry", {"failure": "connect", "from": f"noda2 {NODA2}:{dead}",
                   "to": f"noda1 {NODA1}:{up.port}"}),
        ("failover", {"node": "noda1", "tier": 1}),
    ]  # fmt: skip


async def test_a_dead_collector_changes_no_answer_and_its_drops_are_counted(
    upstream, gateway, client
):
    up = await upstream(NODA1)
    closed = f"http://127.0.0.1:{free_port()}/v1/traces"
    gw = await gateway(tracing(closed, ", sample_ratio: 1, export_timeout: 1") + city(up.port))
    slowest = 0.0
    for _ in range(20):
        started = time.monotonic()
        async with client.get(gw.url + "/api/city/x") as response:
            assert response.status == 200
            assert await response.json() == {"path": "/city/x", "method": "GET"}
        slowest = max(slowest, time.monotonic() - started)
    await flushed(gw)
    metrics = await (await client.get(gw.url + "/metrics")).text()
    dropped = sample(metrics, 'gateway_trace_spans_dropped_total{reason="export_failed"}')
    assert dropped == 20
    assert sample(metrics, "gateway_trace_spans_exported_total") == 0
    assert slowest < 0.5  # one that waited for an export would have taken 1 s


async def test_a_slow_collector_never_makes_a_request_wait(upstream, gateway, client, collector):
    """The collector takes 3 s to answer an export, which gives up after 1.5 s; the queue
    holds 4 spans: the rest are dropped and counted at once, and no answer waits."""
    otlp = await collector(delay=3.0)
    up = await upstream(NODA1)
    gw = await gateway(
        tracing(otlp.url, ", sample_ratio: 1, queue_size: 4, export_timeout: 1.5") + city(up.port)
    )
    slowest = 0.0
    for _ in range(40):
        started = time.monotonic()
        async with client.get(gw.url + "/api/city/x") as response:
            assert response.status == 200
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 0.5  # one that waited for an export would have taken 1.5 s
    await flushed(gw)
    metrics = await (await client.get(gw.url + "/metrics")).text()
    full = sample(metrics, 'gateway_trace_spans_dropped_total{reason="queue_full"}')
    failed = sample(metrics, 'gateway_trace_spans_dropped_total{reason="export_failed"}')
    exported = sample(metrics, "gateway_trace_spans_exported_total")
    assert exported == 0  # no export finished in time
    assert 0 < failed <= otlp.posts * 4  # the spans of each timed-out export (batches of 4)
    assert full == 40 - failed > 0  # every other span found the queue full: dropped at once


async def trickling(raw_upstream) -> tuple[str, list[float]]:
    """A collector (or a stuck proxy in front of it) that answers each export a byte of a
    header line at a time, one every 0.1 s, for as long as the connection stays open: each
    read is quick, the answer never ends. Its URL, and when each export reached it."""
    posts: list[float] = []

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        posts.append(time.monotonic())
        writer.write(b"HTTP/1.1 200 OK\r\n")
        while not reader.at_eof():
            await asyncio.sleep(0.1)
            writer.write(b"X")
            await writer.drain()

    port = await raw_upstream(respond, "127.0.0.1")
    return f"http://127.0.0.1:{port}/v1/traces", posts


def spans_counted(metrics: str) -> tuple[float, float, float]:
    """(exported, export_failed, queue_full) in a scrape."""
    return (
        sample(metrics, "gateway_trace_spans_exported_total"),
        sample(metrics, 'gateway_trace_spans_dropped_total{reason="export_failed"}'),
        sample(metrics, 'gateway_trace_spans_dropped_total{reason="queue_full"}'),
    )


async def test_export_timeout_bounds_an_export_whose_answer_trickles(
    upstream, raw_upstream, gateway, client
):
    """A socket timeout bounds each read only: an answer trickling in never times out. The
    export gives up export_timeout after it began, and its spans are counted as failed."""
    url, posts = await trickling(raw_upstream)
    up = await upstream(NODA1)
    gw = await gateway(
        tracing(url, ", sample_ratio: 1, export_timeout: 0.5")
        + "metrics_cache: 0\n"
        + city(up.port)
    )
    for _ in range(5):
        async with client.get(gw.url + "/api/city/x") as response:
            assert response.status == 200
    give_up = time.monotonic() + 4  # the first export starts within a second (its schedule)
    while True:
        metrics = await (await client.get(gw.url + "/metrics")).text()
        if spans_counted(metrics)[1] >= 5:  # (the scrapes are traced too)
            break
        assert time.monotonic() < give_up, f"the export is still under way: {posts}"
        await asyncio.sleep(0.05)
    failed_after = time.monotonic() - posts[0]
    assert failed_after < 0.5 + 0.4  # export_timeout, and the scrapes' 0.05 s steps
    assert spans_counted(metrics)[0::2] == (0, 0)  # none exported, none found the queue full
    assert [line for line in gw.log_lines() if line["level"] == "WARNING"] == []


async def test_a_stop_with_a_trickling_collector_ends_within_twice_export_timeout(
    upstream, raw_upstream, gateway, client
):
    """The stop exports what is queued within about twice export_timeout in all (the SDK's
    own shutdown would wait 30 s), and every span is counted: exported, export_failed or
    queue_full, none lost without a count."""
    url, posts = await trickling(raw_upstream)
    up = await upstream(NODA1)
    gw = await gateway(
        tracing(url, ", sample_ratio: 1, export_timeout: 0.5, queue_size: 8") + city(up.port)
    )
    for _ in range(3):
        async with client.get(gw.url + "/api/city/x") as response:
            assert response.status == 200
    give_up = time.monotonic() + 3
    while not posts:  # the first export is under way
        assert time.monotonic() < give_up, "no export reached the collector"
        await asyncio.sleep(0.02)
    for _ in range(20):  # 8 queued behind it, the rest find the queue full
        async with client.get(gw.url + "/api/city/x") as response:
            assert response.status == 200
    started = time.monotonic()
    await gw.gateway.stop()
    took = time.monotonic() - started
    assert took < 2 * 0.5 + 0.3, took
    metrics = gw.gateway.shared.metrics.render(None)[0].decode()
    exported, failed, full = spans_counted(metrics)
    assert exported == 0
    assert failed + full == 23
    assert failed >= 3 + 8  # the first export's, and the queue's at the stop


def redirect(count: int) -> web.Response:
    return web.Response(status=308, headers={"Location": "https://tempo.example/v1/traces"})


def login_page(count: int) -> web.Response:
    return web.Response(text="<html>sign in</html>", content_type="text/html")


async def traced(client: aiohttp.ClientSession, gw: RunningGateway, count: int) -> str:
    """``count`` requests answered, their spans' export over: the scrape then."""
    for _ in range(count):
        async with client.get(gw.url + "/api/city/x") as response:
            assert response.status == 200
    await flushed(gw)
    return await (await client.get(gw.url + "/metrics")).text()


@pytest.mark.parametrize(
    "case",
    [
        (redirect, "answered 308 Permanent Redirect (Location: https://tempo.example/v1/traces)"),
        (login_page, "answered with text/html, not an OTLP answer"),
    ],
    ids=["redirect", "web page"],
)
async def test_an_answer_that_takes_no_spans_counts_them_as_failed(
    upstream, collector, gateway, client, case
):
    """The SDK calls any status up to 399 a success, and never reads the body: spans a
    redirect (not followed) or a web page took are not exported, and an error line says why."""
    answer, logged = case
    otlp = await collector(answer=answer)
    up = await upstream(NODA1)
    gw = await gateway(tracing(otlp.url, ", sample_ratio: 1") + city(up.port))
    metrics = await traced(client, gw, 4)
    assert len(otlp.spans) == 4  # they were sent
    assert spans_counted(metrics) == (0, 4, 0)
    errors = [line["message"] for line in gw.log_lines() if line["level"] == "ERROR"]
    assert len(errors) == 1
    assert logged in errors[0]


async def test_spans_a_partial_success_rejects_count_as_failed(
    upstream, collector, gateway, client
):
    def reject_two(count: int) -> web.Response:
        answer = ExportTraceServiceResponse()
        answer.partial_success.rejected_spans = 2
        answer.partial_success.error_message = "2 spans over the tenant's limit"
        return web.Response(body=answer.SerializeToString(), content_type="application/x-protobuf")

    otlp = await collector(answer=reject_two)
    up = await upstream(NODA1)
    gw = await gateway(tracing(otlp.url, ", sample_ratio: 1") + city(up.port))
    metrics = await traced(client, gw, 5)
    assert otlp.posts == 1
    assert spans_counted(metrics) == (3, 2, 0)
    [warned] = [line for line in gw.log_lines() if line["level"] == "WARNING"]
    assert warned["message"] == "the collector rejected spans"
    assert (warned["rejected"], warned["reason"]) == (2, "2 spans over the tenant's limit")


async def test_tracing_settings_are_checked():
    with pytest.raises(ConfigError) as caught:
        parse_config(
            "tracing: {otlp_endpoint: 'tempo:4318', sample_ratio: 2, sampled_from: everyone}\n"
            + routes({"city": "{port: 1, nodes: [noda1]}"}, noda1=NODA1)
        )
    text = str(caught.value)
    assert "tracing.otlp_endpoint" in text
    assert "tracing.sample_ratio" in text
    assert "tracing.sampled_from" in text


def test_check_shows_the_tracing_settings(tmp_path, capsys):
    path = tmp_path / "routes.yaml"
    path.write_text(
        tracing("http://user:secret@127.0.0.1:4318/v1/traces", ", sample_ratio: 0.05")
        + routes({"city": "{port: 7001, nodes: [noda1]}"}, noda1=NODA1)
    )
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "tracing: spans to http://***@127.0.0.1:4318/v1/traces as daarion-gateway, "
        "sample_ratio 0.05, a parent's sampled flag followed from trusted_proxies"
    ) in out.splitlines()
    assert "secret" not in out


async def test_a_reload_that_changes_tracing_says_it_needs_a_restart(upstream, gateway, client):
    up = await upstream(NODA1)
    gw = await gateway(city(up.port))
    changed = tracing(f"http://127.0.0.1:{free_port()}/v1/traces") + city(up.port)
    gw.gateway.apply(parse_config(changed))
    warned = [line for line in gw.log_lines() if line.get("level") == "WARNING"]
    assert [line["message"] for line in warned] == [
        "a changed tracing takes effect only after a restart"
    ]
    assert gw.gateway.shared.tracer is None  # and nothing was started meanwhile
    async with client.get(gw.url + "/api/city/x") as response:
        assert response.status == 200


async def test_a_malformed_tracestate_is_passed_on_and_logs_nothing(
    upstream, gateway, client, collector
):
    otlp, up, gw = await traced_city(
        upstream, gateway, collector, ", sample_ratio: 0, sampled_from: anyone"
    )
    headers = {"traceparent": SAMPLED, "tracestate": "not a=valid,,==list"}
    async with client.get(gw.url + "/api/city/x", headers=headers) as response:
        assert response.status == 200
    assert up.seen[-1].header("tracestate") == "not a=valid,,==list"  # not the gateway's to fix
    await flushed(gw)
    [span] = otlp.spans
    assert span.trace_id.hex() == TRACE
    assert span.trace_state == ""
    assert [line for line in gw.log_lines() if line["level"] != "INFO"] == []


def test_the_json_schema_describes_tracing():
    schema = config_json_schema()
    section = next(s for s in schema["properties"]["tracing"]["anyOf"] if s.get("type"))
    assert section["required"] == ["otlp_endpoint"]
    assert section["properties"]["sampled_from"]["enum"] == ["trusted_proxies", "anyone"]
    assert section["properties"]["sample_ratio"]["default"] == 0.01
    good = {"nodes": {}, "services": {}, "tracing": {"otlp_endpoint": "http://c:4318/v1/traces"}}
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**good, "tracing": {"otlp_endpoint": "c:4318"}}, schema)
