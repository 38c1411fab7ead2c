"""Strict HTTP at the edge (issue 10), in raw bytes on both sides: transfer codings, request-line
versions, header bytes, header names with underscores; and the cached /metrics scrape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.edge import strict

from .helpers import (
    NODA1,
    RawResponse,
    RawServers,
    RunningGateway,
    parse_response,
    raw_exchange,
    routes,
)

CHUNKED_BODY = b"3\r\nabc\r\n0\r\n\r\n"


def city(port: int, extra: str = "", top: str = "") -> str:
    return routes({"city": f"{{port: {port}, nodes: [noda1]{extra}}}"}, noda1=NODA1) + top


@dataclass
class Heads:
    """A raw upstream: every request head it received, byte for byte."""

    port: int
    heads: list[bytes] = field(default_factory=list)

    def header_lines(self, index: int = 0) -> list[bytes]:
        return self.heads[index].split(b"\r\n")[1:]


@pytest.fixture
async def heads() -> AsyncIterator[Callable[[bytes], Awaitable[Heads]]]:
    """``await heads(answer)``: a TCP server on NODA1 that records each request head, answers
    ``answer`` and closes."""
    servers = RawServers()

    async def start(answer: bytes) -> Heads:
        recorder = Heads(0)

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                recorder.heads.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(answer)
                await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        recorder.port = await servers.start(on_connect, NODA1)
        return recorder

    yield start
    await servers.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def assert_refused(response: RawResponse, status: int, code: str) -> None:
    """The gateway's own JSON answer, on an HTTP/1.1 status line, closing the connection
    (``raw_exchange`` reads until the gateway closes: the requests here do not ask it to)."""
    assert response.raw.startswith(f"HTTP/1.1 {status} ".encode()), response.raw[:80]
    assert response.status == status
    body = response.json()
    assert body["error"] == code
    assert body["request_id"] == response.header("X-Request-ID")
    assert response.header("Connection") == "close"
    assert response.header("Content-Type") == "application/json"


def one_line(gw: RunningGateway, request_id: str) -> dict[str, Any]:
    """The one log line of the request ``request_id``."""
    lines = [line for line in gw.log_lines() if line.get("request_id") == request_id]
    assert len(lines) == 1, lines
    return lines[0]


# -- transfer codings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        b"Transfer-Encoding: gzip, chunked\r\n",  # llhttp takes it; gzip was silently dropped
        b"Transfer-Encoding: identity\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: gzip\r\n",
        b"Transfer-Encoding: chunked;q=1\r\n",
        b"Transfer-Encoding: \r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
    ],
    ids=["gzip,chunked", "identity", "chunked,chunked", "gzip", "params", "empty", "two", "two2"],
)
async def test_a_transfer_coding_but_chunked_is_501_and_reaches_nobody(heads, gateway, fields):
    up = await heads(OK)
    gw = await gateway(city(up.port))
    # No body: the answer is due once the head is in (and a body sent with a head that has no
    # chunked framing would be read as the next request, and refused on its own).
    response = await raw_exchange(
        gw.port, b"POST /api/city/x HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n"
    )
    assert_refused(response, 501, "unsupported_transfer_coding")
    assert up.heads == []
    line = one_line(gw, response.json()["request_id"])
    assert line["status"] == 501
    assert line["error"] == "unsupported_transfer_coding"
    assert line["level"] == "INFO"  # the client's fault: no traceback


async def test_transfer_encoding_with_content_length_stays_a_400(heads, gateway):
    up = await heads(OK)
    gw = await gateway(city(up.port))
    response = await raw_exchange(
        gw.port,
        b"POST /api/city/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 3\r\n\r\n" + CHUNKED_BODY,
    )
    assert_refused(response, 400, "bad_request")  # a smuggling attempt, not a coding
    assert up.heads == []


async def test_transfer_encoding_in_http_1_0_is_a_400(heads, gateway):
    up = await heads(OK)
    gw = await gateway(city(up.port))
    response = await raw_exchange(
        gw.port,
        b"POST /api/city/x HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + CHUNKED_BODY,
    )
    assert response.raw.startswith(b"HTTP/1.0 400 ")  # RFC 9112 6.1: faulty framing
    assert response.json()["error"] == "bad_request"
    assert response.header("Connection") == "close"
    assert up.heads == []


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"CHUNKED"])
async def test_a_chunked_body_still_reaches_the_upstream(upstream, gateway, coding):
    up = await upstream(NODA1)
    gw = await gateway(city(up.port))
    response = await raw_exchange(
        gw.port,
        b"POST /api/city/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        b"Transfer-Encoding: " + coding + b"\r\n\r\n" + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    assert response.status == 200
    assert [s.body for s in up.seen] == [b"hello world"]
    assert up.seen[0].header("Transfer-Encoding") == "chunked"


# -- versions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"GET /api/city/x HTTP/2.0\r\n",  # llhttp takes it (aiohttp answered HTTP/2.0 200)
        b"GET /api/city/x HTTP/0.9\r\n",  # llhttp takes it
        b"GET /api/city/x HTTP/1.2\r\n",  # llhttp refuses it: "Invalid HTTP version"
        b"GET /api/city/x HTTP/3.0\r\n",
        b"GET /api/city/x HTTP/9.9\r\n",
        b"GET /api/city/x\r\n",  # no version: HTTP/0.9 to llhttp
    ],
    ids=["2.0", "0.9", "1.2", "3.0", "9.9", "none"],
)
async def test_a_version_but_1_0_and_1_1_is_505_on_an_http_1_1_status_line(heads, gateway, line):
    up = await heads(OK)
    gw = await gateway(city(up.port))
    response = await raw_exchange(gw.port, line + b"Host: a\r\n\r\n")
    assert_refused(response, 505, "http_version_not_supported")
    assert up.heads == []
    line_logged = one_line(gw, response.json()["request_id"])
    assert line_logged["status"] == 505
    assert line_logged["level"] == "INFO"


async def test_an_http_0_9_request_without_headers_is_505(heads, gateway):
    up = await heads(OK)
    gw = await gateway(city(up.port))
    response = await raw_exchange(gw.port, b"GET /api/city/x\r\n\r\n")
    assert_refused(response, 505, "http_version_not_supported")
    assert up.heads == []


@pytest.mark.parametrize("version", [b"HTTP/11", b"FOO/1.1", b"HTTP/1.", b"http/1.1"])
async def test_a_malformed_version_is_400(heads, gateway, version):
    up = await heads(OK)
    gw = await gateway(city(up.port))
    response = await raw_exchange(gw.port, b"GET /api/city/x " + version + b"\r\nHost: a\r\n\r\n")
    assert_refused(response, 400, "bad_request")
    assert up.heads == []


async def test_http_1_0_still_passes(upstream, gateway):
    up = await upstream(NODA1)
    gw = await gateway(city(up.port))
    response = await raw_exchange(gw.port, b"GET /api/city/x HTTP/1.0\r\nHost: a\r\n\r\n")
    assert response.raw.startswith(b"HTTP/1.0 200 ")
    assert [s.raw_path for s in up.seen] == ["/city/x"]


@pytest.mark.parametrize(
    "first",
    [
        b"GET /api/city/a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        b"POST /api/city/a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: TLS/1.0\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        # Its body in a later read than its head: still read whole and forwarded.
        b"POST /api/city/a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: TLS/1.0\r\n"
        b"Content-Length: 5\r\n\r\n",
    ],
    ids=["h2c", "tls-with-a-body", "tls-with-a-later-body"],
)
async def test_an_upgrade_the_gateway_does_not_make_ends_the_connection_after_its_answer(
    upstream, gateway, first
):
    # The request is served as a plain one (Upgrade is hop-by-hop), and the connection ends
    # with its answer: the parser does not read on past an upgrade it does not make, and a
    # request pipelined behind it used to wait, unanswered, until keepalive_timeout.
    up = await upstream(NODA1)
    gw = await gateway(city(up.port))
    then = b"GET /api/city/b HTTP/1.1\r\nHost: a\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        if first.endswith(b"\r\n\r\n") and first.startswith(b"POST"):
            writer.write(first)
            await asyncio.sleep(0.2)  # the head is in, its body not yet
            writer.write(b"hello" + then)
        else:
            writer.write(first + then)
        raw = await asyncio.wait_for(reader.read(), 2)
    finally:
        writer.close()
    assert raw.count(b"HTTP/1.1 ") == 1, raw
    answer = parse_response(raw)
    assert answer.status == 200, raw
    assert answer.header("Connection") == "close"
    assert [s.raw_path for s in up.seen] == ["/city/a"]
    assert up.seen[0].header("Upgrade") is None
    assert up.seen[0].body == (b"hello" if first.startswith(b"POST") else b"")


# -- header bytes ------------------------------------------------------------------------------

CTLS = [b for b in range(0x20) if b != 0x09] + [0x7F]


@pytest.mark.parametrize("byte", CTLS, ids=[f"0x{b:02x}" for b in CTLS])
async def test_a_control_byte_in_a_header_value_is_400(heads, gateway, byte):
    up = await heads(OK)
    gw = await gateway(city(up.port))
    response = await raw_exchange(
        gw.port,
        b"GET /api/city/x HTTP/1.1\r\nHost: a\r\nX-Name: a" + bytes([byte]) + b"b\r\n\r\n",
    )
    assert_refused(response, 400, "bad_header")
    assert up.heads == []


@pytest.mark.parametrize(
    "value",
    [
        b"caf\xe9",  # Latin-1 obs-text: not UTF-8 (it reached the upstream as "caf")
        b"caf\xc3\xa9",  # UTF-8
        b"\x80\xff\xc3(\xfe",  # any obs-text, including broken UTF-8
        b"a\tb",  # HTAB inside a value
        b'"quoted", (comment) ~!#$%&*+-.^_`|',
    ],
    ids=["latin1", "utf8", "obs-text", "htab", "vchar"],
)
async def test_allowed_header_values_reach_the_upstream_byte_for_byte(heads, gateway, value):
    up = await heads(OK)
    gw = await gateway(city(up.port))
    response = await raw_exchange(
        gw.port,
        b"GET /api/city/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Name: "
        + value
        + b"\r\n\r\n",
    )
    assert response.status == 200
    assert b"X-Name: " + value in up.header_lines()


async def test_obs_text_in_a_response_header_reaches_the_client_byte_for_byte(heads, gateway):
    up = await heads(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Name: caf\xe9\r\nConnection: close\r\n\r\nok"
    )
    gw = await gateway(city(up.port))
    response = await raw_exchange(
        gw.port, b"GET /api/city/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 200
    assert b"\r\nX-Name: caf\xe9\r\n" in response.raw


# -- underscores -------------------------------------------------------------------------------

UNDERSCORED = b"X_Trace_Tag: 10.9.9.9\r\nx_app_name: city\r\nFoo_Bar: baz\r\n"
# Spellings of headers the gateway states itself, or that say who the client is: removed
# whatever the option says, from a peer that is no trusted proxy.
SPOOFS = b"X_Forwarded_For: 10.9.9.9\r\nx_real_ip: 10.9.9.9\r\nX_User_Id: admin\r\n"


async def test_header_names_with_underscores_are_dropped_by_default(heads, gateway):
    up = await heads(OK)
    gw = await gateway(city(up.port))
    response = await raw_exchange(
        gw.port,
        b"GET /api/city/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        + UNDERSCORED
        + b"X-Kept: 1\r\n\r\n",
    )
    assert response.status == 200
    lines = up.header_lines()
    assert not any(b"_" in line.partition(b":")[0] for line in lines), lines
    assert b"X-Kept: 1" in lines
    assert b"X-Forwarded-For: 127.0.0.1" in lines  # the gateway's own


@pytest.mark.parametrize(
    ("extra", "top"),
    [
        (", limits: {underscores_in_headers: true}", ""),
        ("", "limits: {underscores_in_headers: true}\n"),
    ],
    ids=["service", "top-level"],
)
async def test_underscores_pass_byte_for_byte_with_the_option_on(heads, gateway, extra, top):
    up = await heads(OK)
    gw = await gateway(city(up.port, extra, top))
    response = await raw_exchange(
        gw.port,
        b"GET /api/city/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        + UNDERSCORED
        + SPOOFS
        + b"\r\n",
    )
    assert response.status == 200
    lines = up.header_lines()
    for line in UNDERSCORED.split(b"\r\n")[:-1]:
        assert line in lines
    for line in SPOOFS.split(b"\r\n")[:-1]:
        assert line not in lines
    assert b"X-Forwarded-For: 127.0.0.1" in lines


async def test_a_service_can_turn_underscores_off_again(heads, gateway):
    up = await heads(OK)
    config = city(
        up.port,
        ", limits: {underscores_in_headers: false}",
        "limits: {underscores_in_headers: true}\n",
    )
    gw = await gateway(config)
    await raw_exchange(
        gw.port,
        b"GET /api/city/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + UNDERSCORED + b"\r\n",
    )
    assert not any(b"_" in line.partition(b":")[0] for line in up.header_lines())


WS_HANDSHAKE = (
    b"GET /ws/city/rooms/general HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)
REFUSED = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("allowed", [False, True])
async def test_websocket_handshakes_drop_underscores_the_same_way(heads, gateway, allowed):
    up = await heads(REFUSED)  # only what the upstream received matters here
    option = f", limits: {{underscores_in_headers: {str(allowed).lower()}}}"
    gw = await gateway(city(up.port, ", websocket: true" + option))
    response = await raw_exchange(gw.port, WS_HANDSHAKE + UNDERSCORED + b"\r\n")
    assert response.status == 403
    lines = up.header_lines()
    assert up.heads[0].startswith(b"GET /ws/city/rooms/general HTTP/1.1")
    underscored = [line for line in lines if b"_" in line.partition(b":")[0]]
    assert underscored == (UNDERSCORED.split(b"\r\n")[:-1] if allowed else [])


# -- the parser's phrases ----------------------------------------------------------------------


def test_the_parsers_phrases_are_the_ones_strict_matches() -> None:
    """``strict.parse_error`` reads llhttp's English: the locked aiohttp's must still match."""
    from aiohttp.http_exceptions import BadHttpMessage  # noqa: PLC0415
    from aiohttp.http_parser import HttpRequestParser  # noqa: PLC0415

    loop = asyncio.new_event_loop()
    try:

        def refused(data: bytes) -> BaseException:
            parser = HttpRequestParser(None, loop, 2**16)
            with pytest.raises(BadHttpMessage) as caught:
                parser.feed_data(data)
            return caught.value

        def answer(data: bytes) -> str | None:
            err = strict.parse_error(refused(data))
            return None if err is None else err.code

        head = b"POST / HTTP/1.1\r\nHost: a\r\n"
        assert answer(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n") == "http_version_not_supported"
        assert answer(b"GET / HTTP/11\r\nHost: a\r\n\r\n") is None
        assert answer(head + b"Transfer-Encoding: gzip\r\n\r\n") == "unsupported_transfer_coding"
        assert answer(head + b"Transfer-Encoding: chunked, chunked\r\n\r\n") == (
            "unsupported_transfer_coding"
        )
        assert answer(head + b"Transfer-Encoding: a\r\nTransfer-Encoding: chunked\r\n\r\n") == (
            "unsupported_transfer_coding"
        )
        assert answer(head + b"Transfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n") is None
        assert answer(head + b"X: a\x01\r\n\r\n") == "bad_header"
        assert answer(head + b"X\xe9: a\r\n\r\n") == "bad_header"
    finally:
        loop.close()


# -- /metrics ----------------------------------------------------------------------------------


async def _scrape(port: int, accept: bytes = b"") -> bytes:
    accept_line = b"Accept: " + accept + b"\r\n" if accept else b""
    response = await raw_exchange(
        port, b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + accept_line + b"\r\n"
    )
    assert response.status == 200
    return response.body


async def _proxied(port: int) -> None:
    response = await raw_exchange(
        port, b"GET /api/city/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 200


OPENMETRICS = b"application/openmetrics-text; version=1.0.0"


async def test_scrapes_within_metrics_cache_get_the_same_text(upstream, gateway):
    up = await upstream(NODA1)
    gw = await gateway(city(up.port, top="metrics_cache: 0.5\n"))
    first = await _scrape(gw.port)
    first_open = await _scrape(gw.port, OPENMETRICS)
    await _proxied(gw.port)  # counters move between the scrapes
    assert await _scrape(gw.port) == first
    assert await _scrape(gw.port, OPENMETRICS) == first_open
    assert first_open != first  # each format its own
    assert first_open.endswith(b"# EOF\n")
    assert b'service="city",status="200"' not in first
    await asyncio.sleep(0.6)
    later = await _scrape(gw.port)
    assert later != first
    assert b'http_requests_total{method="GET",service="city",status="200"} 1.0' in later


async def test_metrics_cache_0_renders_every_scrape(upstream, gateway):
    up = await upstream(NODA1)
    gw = await gateway(city(up.port, top="metrics_cache: 0\n"))
    first = await _scrape(gw.port)
    await _proxied(gw.port)
    second = await _scrape(gw.port)
    assert second != first
    assert b'http_requests_total{method="GET",service="city",status="200"} 1.0' in second


async def test_the_default_cache_is_one_second(upstream, gateway):
    up = await upstream(NODA1)
    gw = await gateway(city(up.port))
    assert gw.gateway.shared.snapshot.config.metrics_cache == 1.0
    first = await _scrape(gw.port)
    await _proxied(gw.port)
    assert await _scrape(gw.port) == first


def test_the_scrape_cache_keeps_each_format_for_its_window() -> None:
    from gateway.metrics import ScrapeCache  # noqa: PLC0415

    cache = ScrapeCache()
    assert cache.get("text/plain", 10.0, 1.0) is None
    cache.put("text/plain", 10.0, b"a")
    assert cache.get("text/plain", 10.9, 1.0) == b"a"
    assert cache.get("application/openmetrics-text", 10.5, 1.0) is None
    assert cache.get("text/plain", 11.0, 1.0) is None  # the window is over
    assert cache.get("text/plain", 9.0, 1.0) is None  # a clock that went back: render
