"""Request bodies within their limits (nginx's client_max_body_size, client_body_timeout), and
a client's stall or excess never counted against a healthy upstream."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import orjson
import pytest
from aiohttp import web

from .helpers import NODA1, RawClient, RunningGateway, Upstream, raw_exchange, routes, untaken_bytes


async def upstreams_state(
    client: aiohttp.ClientSession, gw: RunningGateway, service: str
) -> list[str]:
    async with client.get(gw.url + "/gateway/upstreams") as response:
        body = await response.json()
    return [t["state"] for t in body["services"][service]["targets"]]


async def metrics_text(client: aiohttp.ClientSession, gw: RunningGateway) -> str:
    async with client.get(gw.url + "/metrics") as response:
        return await response.text()


class Waiting:
    """An upstream handler that notes each request as its head arrives, then reads the body
    (forever, if it never comes) and notes whether the gateway gave up on it."""

    def __init__(self) -> None:
        self.heads = 0
        self.arrived = asyncio.Event()
        self.cancelled = 0
        self.bodies: list[bytes] = []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.heads += 1
        self.arrived.set()
        try:
            self.bodies.append(await request.read())
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return web.json_response({"got": len(self.bodies[-1])})


def city(port: int, extra: str = "") -> str:
    return routes({"city": f"{{port: {port}, nodes: [noda1]{extra}}}"}, noda1=NODA1)


async def test_a_content_length_over_the_limit_is_413_before_anything_is_forwarded(
    upstream, gateway
):
    up: Upstream = await upstream(NODA1)
    gw = await gateway(city(up.port, ", limits: {client_max_body_size: 1k}"))
    head = b"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: 1025\r\n\r\n"
    answer = await raw_exchange(gw.port, head)  # no body sent: the gateway must not wait
    assert answer.status == 413
    assert answer.json()["error"] == "body_too_large"
    assert answer.header("Connection") == "close"
    small = await raw_exchange(
        gw.port, b"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\nabc"
    )  # fmt: skip
    assert small.status == 200
    assert [(s.method, s.body) for s in up.seen] == [("POST", b"abc")]


async def test_the_default_limit_is_nginxs_100m(upstream, gateway):
    up: Upstream = await upstream(NODA1)
    gw = await gateway(city(up.port))
    over = 100 * 1024 * 1024 + 1
    head = f"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: {over}\r\n\r\n"
    assert (await raw_exchange(gw.port, head.encode())).status == 413
    assert up.seen == []


async def test_a_chunked_body_that_grows_past_the_limit_ends_the_upstream_exchange(
    upstream, gateway, client
):
    waiting = Waiting()
    up: Upstream = await upstream(NODA1, waiting, record_body=False)
    gw = await gateway(city(up.port, ", limits: {client_max_body_size: 100k}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /api/city/up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 16384
    for _ in range(8):  # 128 KiB in all: over the limit part way
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert b'"body_too_large"' in raw
    # The upstream got the head and part of the body, then lost its connection: never a
    # complete request it could take for the client's.
    await asyncio.sleep(0.2)
    assert waiting.heads == 1
    assert waiting.bodies == []
    assert waiting.cancelled == 1
    assert 'kind="' not in "".join(
        line for line in (await metrics_text(client, gw)).splitlines() if "upstream_errors" in line
    )


async def test_a_stalled_body_gets_408_and_its_head_went_upstream_at_once(upstream, gateway):
    waiting = Waiting()
    up: Upstream = await upstream(NODA1, waiting, record_body=False)
    gw = await gateway(city(up.port, ", limits: {client_body_timeout: 0.5}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    # Big enough to be streamed (over the 64 KiB replay buffer), and never sent.
    writer.write(b"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
    await writer.drain()
    # The head reaches the upstream before any body byte: it is not left with a silent
    # connection that it would close as idle.
    await asyncio.wait_for(waiting.arrived.wait(), 2)
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 408 ")
    body = orjson.loads(raw.partition(b"\r\n\r\n")[2])
    assert body["error"] == "body_timeout"
    await asyncio.sleep(0.2)
    assert waiting.cancelled == 1  # the upstream exchange was ended, not left hanging
    lines = gw.log_lines()
    assert [line["error"] for line in lines if line.get("path") == "/api/city/up"] == [
        "body_timeout"
    ]


async def test_stalled_bodies_never_eject_a_healthy_upstream(upstream, gateway, client):
    # The attack of the issue: warm keep-alive connections, then POSTs whose bodies never
    # come, from one client; the target stays in use and other clients are served at once.
    waiting = Waiting()
    up: Upstream = await upstream(NODA1, waiting, record_body=False)
    gw = await gateway(city(up.port, ", limits: {client_body_timeout: 0.3}"))
    for _ in range(14):
        async with client.get(gw.url + "/api/city/warm") as response:
            assert response.status == 200

    async def stall() -> bytes:  # from another address than the control client's
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.port, local_addr=("127.0.0.5", 0)
        )
        writer.write(b"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\n")
        try:
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    answers = await asyncio.gather(*(stall() for _ in range(6)))
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
    assert await upstreams_state(client, gw, "city") == ["up"]
    metrics = await metrics_text(client, gw)
    assert "gateway_ejections_total{" not in metrics
    assert 'gateway_upstream_errors_total{kind="' not in metrics
    async with client.get(gw.url + "/api/city/control") as response:
        assert response.status == 200


async def test_a_client_gone_mid_body_is_not_the_upstreams_failure(upstream, gateway, client):
    waiting = Waiting()
    up: Upstream = await upstream(NODA1, waiting, record_body=False)
    gw = await gateway(city(up.port))
    for _ in range(4):  # more than fall (3)
        _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: 900000\r\n\r\n")
        writer.write(b"x" * 100000)
        await writer.drain()
        waiting.arrived.clear()
        await asyncio.wait_for(waiting.arrived.wait(), 2)
        writer.close()
        await asyncio.sleep(0.1)
    # Not "failing" nor "ejected": nothing was held against it (and no probe or answer yet).
    assert await upstreams_state(client, gw, "city") == ["unknown"]
    statuses = [line["status"] for line in gw.log_lines() if line.get("path") == "/api/city/up"]
    assert statuses == [499, 499, 499, 499]


async def test_a_reused_connection_closed_under_a_request_is_stale_not_a_failure(
    raw_upstream, gateway, client
):
    # Each connection answers its first request (keep-alive) and closes on the second one
    # without answering: what an upstream closing an idle connection just as the gateway
    # reuses it looks like.
    async def first_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request on this connection: dropped

    port = await raw_upstream(first_only)
    gw = await gateway(city(port))
    for _ in range(5):
        async with client.get(gw.url + "/api/city/x") as response:
            assert response.status == 200  # the retry on a fresh connection answers
            assert await response.read() == b"ok"
    assert await upstreams_state(client, gw, "city") == ["up"]
    metrics = await metrics_text(client, gw)
    assert 'gateway_retries_total{kind="stale",service="city"}' in metrics
    assert "gateway_ejections_total{" not in metrics


async def test_trickled_small_bodies_hold_no_upstream_slot(upstream, gateway, client):
    # The fourth attack: POSTs whose small bodies trickle in a byte at a time, from
    # one address, more of them than the service has slots. They are read before a slot is
    # taken, so another client is served at once meanwhile.
    up: Upstream = await upstream(NODA1)
    gw = await gateway(city(up.port, ", max_connections: 4"))
    writers = []
    for _ in range(12):
        _, writer = await asyncio.open_connection("127.0.0.1", gw.port, local_addr=("127.0.0.5", 0))
        writer.write(b"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nx")
        writers.append(writer)
    await asyncio.sleep(0.3)
    for _ in range(3):
        for writer in writers:
            writer.write(b"x")
        await asyncio.sleep(0.1)
    started = asyncio.get_running_loop().time()
    async with client.get(gw.url + "/api/city/control") as response:
        assert response.status == 200
    assert asyncio.get_running_loop().time() - started < 0.4  # not a wait for a slot (0.5 s)
    assert [s.raw_path for s in up.seen] == ["/city/control"]  # no trickler reached it yet
    for writer in writers:
        writer.close()


async def test_an_upload_longer_than_the_response_timeout_leaves_the_upstream_all_of_it(
    upstream, gateway
):
    # timeouts.response bounds each wait for the upstream; a body the client sends for
    # longer than it is the client's time, not the upstream's: the upstream still gets the
    # whole timeout after the body's last byte (nginx's proxy_read_timeout counts so too).
    async def slow_answer(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        await asyncio.sleep(0.6)
        return web.json_response({"got": len(body)})

    up: Upstream = await upstream(NODA1, slow_answer, record_body=False)
    gw = await gateway(city(up.port, ", timeouts: {response: 1}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    piece = b"x" * 20000  # 10 pieces, 200 kB: streamed (over the 64 KiB replay buffer)
    writer.write(b"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\n")
    for _ in range(10):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.2)  # 2 s in all: twice the response timeout
    raw = await asyncio.wait_for(reader.readuntil(b"}"), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200 "), raw
    assert orjson.loads(raw.partition(b"\r\n\r\n")[2]) == {"got": 200000}


@pytest.mark.parametrize("split", [False, True], ids=["same-read", "later-read"])
async def test_a_chunked_body_whose_framing_breaks_is_400_at_once(upstream, gateway, split):
    # A bad chunk size after a good chunk: refused when it comes, whether in the read that
    # began the body or in a later one (that one waited for client_body_timeout, 60 s, in
    # the upstream's slot, and then answered 408).
    waiting = Waiting()
    up: Upstream = await upstream(NODA1, waiting, record_body=False)
    gw = await gateway(city(up.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    head = b"POST /api/city/up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    good, bad = b"5\r\nhello\r\n", b"zz\r\nxx\r\n0\r\n\r\n"
    writer.write(head + good + (b"" if split else bad))
    if split:
        await asyncio.wait_for(waiting.arrived.wait(), 2)  # the body is being forwarded
        writer.write(bad)
    raw = await asyncio.wait_for(reader.read(), 2)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 400 "), raw
    assert orjson.loads(raw.partition(b"\r\n\r\n")[2])["error"] == "bad_request"
    await asyncio.sleep(0.2)
    assert waiting.bodies == []  # the upstream never took it as whole
    # The client's fault, not the upstream's: no upstream error, one line saying so.
    async with aiohttp.ClientSession() as client:
        text = await metrics_text(client, gw)
    assert 'kind="' not in "".join(line for line in text.splitlines() if "upstream_errors" in line)
    lines = [line for line in gw.log_lines() if line.get("status") == 400]
    assert [line["error"] for line in lines] == ["bad_request"]


async def test_an_upstream_that_answers_a_streamed_upload_early_keeps_the_client_served(
    raw_upstream, gateway
):
    # The upstream answers while the gateway is still streaming the client's body to it (a
    # 413 or 401 of its own, say). The rest of the body is drained, not read by two readers
    # at once (a RuntimeError dropped the connection), and the next request is answered.
    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nearl")
        await writer.drain()
        await asyncio.sleep(3)

    port = await raw_upstream(early)
    gw = await gateway(city(port, ", health: {enabled: false}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /api/city/x HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\n")
    writer.write(b"x" * 70_000)  # over the 64 KiB kept for retries: streamed
    first = await asyncio.wait_for(reader.readuntil(b"earl"), 5)
    assert first.startswith(b"HTTP/1.1 200")
    writer.write(b"x" * 130_000 + b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert rest.startswith(b"HTTP/1.1 200"), rest[:200]
    assert b'"status"' in rest
    assert [x for x in gw.log_lines() if x["message"] == "client connection failed"] == []


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_a_client_still_sending_when_refused_gets_its_answer_not_a_reset(
    upstream, gateway, framing
):
    # As urllib or http.client do: the whole body is sent before the answer is read. The
    # connection the 413 (or a 401 to a Connection: close upload) ends is closed lingering,
    # the rest of the body read and dropped, so the client reads the answer; closed at once,
    # the kernel reset it and the client saw EPIPE or ECONNRESET instead.
    up = await upstream(NODA1)
    limit = ", limits: {client_max_body_size: 1k}" if framing != "close" else ""
    auth = ", auth: required" if framing == "close" else ""
    text = city(up.port, limit + auth) + (
        "auth: {providers: {daarion: {algorithms: [HS256], secret: '" + "s" * 32 + "'}}}\n"
    )
    gw = await gateway(text)
    body = b"x" * (8 << 20)
    if framing == "chunked":
        head = b"Transfer-Encoding: chunked\r\n\r\n"
        body = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    else:
        head = b"Content-Length: %d\r\n" % len(body)
        head += b"Connection: close\r\n\r\n" if framing == "close" else b"\r\n"
    request = b"POST /api/city/up HTTP/1.1\r\nHost: a\r\n" + head + body

    def send_then_read() -> bytes:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    answer = await asyncio.to_thread(send_then_read)
    expected = b"HTTP/1.1 401" if framing == "close" else b"HTTP/1.1 413"
    assert answer.startswith(expected), answer[:100]
    assert up.seen == []


async def test_a_refusal_before_100_continue_closes_the_connection(upstream, gateway):
    # The client was sent no 100 Continue, so it sends no body, and would send its next
    # request where the body was due: that was read as the body (its 5 bytes), and the rest
    # answered 400. The refusal says Connection: close and ends the connection.
    up = await upstream(NODA1)
    gw = await gateway(city(up.port, ", limits: {client_max_body_size: 1k}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"POST /api/nothere/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 404")
    assert b"\r\nConnection: close\r\n" in head
    writer.write(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")  # as curl would, on a 1.1 answer
    writer.write_eof()
    rest = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    assert b"HTTP/1.1 400" not in rest
    # Forwarded, it gets its 100 Continue and then its answer.
    ok = await raw_exchange(
        gw.port, b"POST /api/city/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\nhello"
    )  # fmt: skip
    assert ok.status == 100
    assert ok.body.startswith(b"HTTP/1.1 200 OK\r\n")
    assert [s.body for s in up.seen] == [b"hello"]


async def test_pipelined_uploads_wait_in_the_kernel_not_in_the_worker(upstream, gateway):
    # While one request runs, the requests pipelined behind it were parsed ahead, 31 of
    # them, each body kept whole in memory (bodies under 128 KiB never paused the reading):
    # 4 MB a connection, 1 GB from one address's 256. A request with a body now waits
    # unparsed behind the one before it, in the kernel, as nginx's do.
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/city/slow":
            await release.wait()
        return web.Response(text=str(len(body)))

    up: Upstream = await upstream(NODA1, handler)
    gw = await gateway(city(up.port))
    raw = await RawClient.connect(gw.port)
    body = b"x" * 100_000
    upload = b"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + body
    raw.writer.write(b"GET /api/city/slow HTTP/1.1\r\nHost: a\r\n\r\n" + upload * 20)
    await asyncio.sleep(0.5)
    client_port = raw.writer.get_extra_info("sockname")[1]
    assert untaken_bytes(gw.port, client_port) > 1_500_000  # of the 2,000,000 sent
    release.set()
    raw.WAIT = 10.0
    answers = [await raw.response() for _ in range(21)]
    assert [(a.status, a.body) for a in answers] == [(200, b"0")] + [(200, b"100000")] * 20
    raw.writer.close()
