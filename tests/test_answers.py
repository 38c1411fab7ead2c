"""The heads of answers written whole (``aiohttp_private.Whole``: the gateway's own answers and
relayed ones that came whole with their head), in raw bytes: framing that lets the next
pipelined answer on the connection be read right, HEAD, the empty statuses, HTTP/1.0
keep-alive, and ``Connection: close`` exactly when the connection closes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.aiohttp_private import Whole
from gateway.request import Request, for_aiohttp
from gateway.server import Handler, Server

from .helpers import NODA1, RawClient, RawResponse, Upstream, canned, routes, stalled


def city(port: int) -> str:
    return routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1)


async def answers(client: RawClient, *methods: str) -> list[RawResponse]:
    """The next answers on ``client``, one per request of ``methods``, each read by its head's
    framing: a body by its Content-Length (an answer written whole is never chunked, nor
    ended by a close), none for HEAD, 204 and 304."""
    got = []
    for method in methods:
        answer = await client.head()
        if method != "HEAD" and answer.status not in (204, 304):
            assert answer.header("Content-Length") is not None, answer.raw
            assert answer.header("Transfer-Encoding") is None, answer.raw
            answer = await client.body(answer)
        got.append(answer)
    return got


async def through_city(
    upstream: Any, gateway: Any, connect: Any, data: bytes, handler: Any = None
) -> tuple[Upstream, RawClient]:
    """A gateway in front of an upstream for ``city`` on NODA1, and a raw client that has sent
    it ``data``."""
    up = await upstream(NODA1, handler=handler)
    gw = await gateway(city(up.port))
    client = await connect(gw)
    client.writer.write(data)
    return up, client


async def test_pipelined_whole_answers_are_framed_for_the_next(upstream, gateway, connect):
    up, client = await through_city(
        upstream,
        gateway,
        connect,
        b"HEAD /nope HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /api/city/x HTTP/1.1\r\nHost: a\r\n\r\n"
        b"HEAD /api/city/y HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    head404, relayed, head_relayed, get404 = await answers(client, "HEAD", "GET", "HEAD", "GET")
    assert await client.closed()
    assert (head404.status, get404.status) == (404, 404)
    assert head404.body == b""
    # HEAD's Content-Length is that of the body GET gets (its request id differs, not its size).
    assert head404.header("Content-Length") == str(len(get404.body))
    assert get404.json()["error"] == "not_found"
    assert get404.header("Content-Type") == "application/json"
    assert relayed.status == 200
    assert relayed.json() == {"path": "/city/x", "method": "GET"}
    assert relayed.header("Content-Length") == str(len(relayed.body))
    assert head_relayed.status == 200
    assert head_relayed.body == b""
    # The upstream's Content-Length for HEAD (its GET's body) is kept, not made 0.
    assert head_relayed.header("Content-Length") == str(
        len(b'{"path": "/city/y", "method": "HEAD"}')
    )
    for answer in (head404, relayed, head_relayed, get404):
        assert answer.raw.startswith(b"HTTP/1.1 ")
        assert answer.header("Date") is not None
        assert answer.header("X-Request-ID") is not None
    assert [a.header("Connection") for a in (head404, relayed, head_relayed)] == [None] * 3
    assert get404.header("Connection") == "close"
    assert [s.method for s in up.seen] == ["GET", "HEAD"]


async def test_http_1_0_keep_alive_is_answered_in_kind(upstream, gateway, connect):
    _, client = await through_city(
        upstream,
        gateway,
        connect,
        b"GET /api/city/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        b"GET /nope HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    )
    relayed, own = await answers(client, "GET", "GET")
    for answer in (relayed, own):
        assert answer.raw.startswith(b"HTTP/1.0 ")
        assert answer.header("Connection") == "keep-alive"
    assert (relayed.status, own.status) == (200, 404)
    # Both asked to be kept alive: the connection still serves.
    client.writer.write(b"GET /api/city/z HTTP/1.0\r\n\r\n")
    (again,) = await answers(client, "GET")
    assert again.status == 200
    # Without keep-alive, HTTP/1.0 closes after the answer (and says nothing of it).
    assert await client.closed()
    assert again.header("Connection") is None


async def test_empty_statuses_from_an_upstream_carry_no_body(upstream, gateway, connect):
    async def empty(request: web.Request) -> web.StreamResponse:
        status = int(request.path.rsplit("/", 1)[1])
        return web.Response(status=status, headers={"ETag": '"v1"'})

    _, client = await through_city(
        upstream,
        gateway,
        connect,
        b"GET /api/city/204 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /api/city/304 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /api/city/200 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        handler=empty,
    )
    no_content, not_modified, ok = await answers(client, "GET", "GET", "GET")
    assert await client.closed()
    assert (no_content.status, not_modified.status, ok.status) == (204, 304, 200)
    for answer in (no_content, not_modified):
        assert answer.header("Content-Length") is None
        assert answer.header("Transfer-Encoding") is None
        assert answer.header("ETag") == '"v1"'
    assert ok.header("Content-Length") == "0"
    assert ok.body == b""


async def test_a_client_that_pipelines_and_reads_nothing_is_pushed_back_on(upstream, gateway):
    # Each answer comes whole with its head (one write); the handling of the next request
    # waits while the connection's buffer is full, as for a streamed body: a client that only
    # sends requests cannot make the gateway hold its answers.
    body = b"x" * 16384

    async def sized(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body)

    up = await upstream(NODA1, handler=sized)
    gw = await gateway(city(up.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    requests = b"GET /api/city/x HTTP/1.1\r\nHost: a\r\n\r\n" * 20_000  # 320 MiB of answers

    async def send() -> None:
        writer.write(requests)
        await writer.drain()  # waits once the gateway stops reading

    sending = asyncio.create_task(send())
    try:
        plateau = await stalled(lambda: len(up.seen))
        assert plateau < 2_000, f"{plateau} answers ({plateau * 16} KiB) for a client reading none"
        await reader.readexactly(len(body))  # it is served, once it reads
    finally:
        sending.cancel()
        writer.close()


async def test_empty_statuses_lose_an_upstreams_content_length(raw_upstream, gateway, connect):
    # RFC 9110: 204 has no Content-Length; aiohttp's rule, kept, drops it from 304 too.
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: "v1"\r\n\r\n')
        await writer.drain()

    port = await raw_upstream(answer)
    gw = await gateway(city(port))
    client = await connect(gw)
    client.writer.write(
        b"GET /api/city/a HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    not_modified, after = await answers(client, "GET", "GET")
    assert await client.closed()
    assert not_modified.status == 304
    assert not_modified.header("Content-Length") is None
    assert not_modified.header("ETag") == '"v1"'
    assert after.status == 404  # framed right: the next answer is read as one


@pytest.fixture
async def served(gateway) -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    """``await served(handler)``: the gateway's own ``server.Server`` (its protocol, limits
    and error answers) running ``handler`` instead of the pipeline; its port."""
    gw = await gateway(city(1))
    shared = gw.gateway.shared
    runners: list[web.ServerRunner] = []

    async def start(handler: Handler) -> int:
        server = Server(handler, shared.metrics, shared.connections)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_an_error_after_a_whole_answer_drops_the_connection(served, connect):
    # A failure after the answer went out (in the log line, the metrics, a release) must not
    # become a second answer on the connection: a pipelining client would take that 500 for
    # its next request's answer.
    async def answered_then_failed(request: web.BaseRequest) -> web.StreamResponse:
        answer = Whole(status=200, headers={"Server": "test"}, body=b"hello")
        await answer.prepare(request)
        raise RuntimeError("after the answer")

    client = await connect(await served(answered_then_failed))
    client.writer.write(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    (only,) = await answers(client, "GET")
    assert only.status == 200
    assert only.body == b"hello"
    assert await client.closed()  # and nothing after the answer: no 500, no answer to /b


async def test_a_whole_answer_without_a_body_is_framed_as_empty(served, connect):
    # No body given, to a GET: Content-Length 0, never a body left to the connection's end.
    async def bodiless(request: web.BaseRequest) -> web.StreamResponse:
        return Whole(status=200, headers={"Server": "test"})

    client = await connect(await served(bodiless))
    client.writer.write(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    first, second = await answers(client, "GET", "GET")
    assert (first.header("Content-Length"), first.body) == ("0", b"")
    assert second.status == 200  # the connection stayed usable


async def test_pipelined_requests_split_at_random_are_answered_in_order(served, connect):
    # The connection's queue of pipelined requests, the parser's pause when it is full and
    # the reads that resume it: 300 requests, every third with a body, written in pieces of
    # 1-700 bytes, each answer with what its request carried.
    async def echo(request: Request) -> web.StreamResponse:
        body = await request.content.read()
        return Whole(status=200, headers={"Server": "test"}, body=request.raw_path.encode() + body)

    count = 300
    data = b"".join(
        b"POST /p%d HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc" % i
        if i % 3 == 0
        else b"GET /g%d HTTP/1.1\r\nHost: a\r\n\r\n" % i
        for i in range(count)
    )
    client = await connect(await served(echo))
    rng = random.Random(3)

    async def send() -> None:
        at = 0
        while at < len(data):
            size = rng.randint(1, 700)
            client.writer.write(data[at : at + size])
            at += size
            await client.writer.drain()
            if rng.random() < 0.3:
                await asyncio.sleep(0.001)

    sending = asyncio.ensure_future(send())
    got = await answers(client, *(["GET"] * count))
    await sending
    assert [a.body for a in got] == [
        b"/p%dabc" % i if i % 3 == 0 else b"/g%d" % i for i in range(count)
    ]


async def test_answers_written_at_the_turns_end_keep_their_order_and_connection(served, connect):
    # Whole answers wait for the end of the loop's turn (server.write_soon); streamed ones are
    # written as they come. 20 clients pipelining 12 requests each, alternating the two kinds:
    # every client gets its own answers, in its order, the last one before the close.
    async def mixed(request: Request) -> web.StreamResponse:
        tag = request.raw_path.encode()
        if request.raw_path.endswith("s"):
            streamed = web.StreamResponse(headers={"Server": "test"})
            streamed.enable_chunked_encoding()
            await streamed.prepare(for_aiohttp(request))
            await streamed.write(tag)
            await streamed.write_eof()
            return streamed
        return Whole(status=200, headers={"Server": "test"}, body=tag)

    port = await served(mixed)
    clients = [await connect(port) for _ in range(20)]
    for n, client in enumerate(clients):
        paths = [f"/c{n}r{i}{'s' if i % 2 else 'w'}" for i in range(12)]
        client.writer.write(
            b"".join(f"GET {p} HTTP/1.1\r\nHost: a\r\n\r\n".encode() for p in paths[:-1])
            + f"GET {paths[-1]} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
        )

    async def read_all(n: int, client: RawClient) -> list[bytes]:
        got = []
        for i in range(12):
            answer = await client.head()
            framing = answer.header("Transfer-Encoding") or answer.header("Content-Length")
            assert framing == ("chunked" if i % 2 else str(len(f"/c{n}r{i}w"))), answer.raw
            got.append((await client.body(answer)).body)
        assert await client.closed()
        return got

    results = await asyncio.gather(*(read_all(n, c) for n, c in enumerate(clients)))
    for n, got in enumerate(results):
        assert got == [f"/c{n}r{i}{'s' if i % 2 else 'w'}".encode() for i in range(12)]


UNKNOWN_LENGTH = [
    # (what follows the upstream's status line, the body, its chunks as an HTTP/1.1 client
    # gets them)
    pytest.param(
        (
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"hello",
            b"5\r\nhello\r\n0\r\n\r\n",
        ),
        id="chunked",
    ),
    pytest.param(
        (
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n",
            b"hello",
            b"5\r\nhello\r\n0\r\n\r\n",  # the upstream's chunks and extensions are not kept
        ),
        id="two-chunks",
    ),
    pytest.param((b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"", b"0\r\n\r\n"), id="empty"),
    pytest.param(
        (b"Connection: close\r\n\r\nhello", b"hello", b"5\r\nhello\r\n0\r\n\r\n"), id="close"
    ),
]


async def unknown_length(
    raw_upstream: Any, gateway: Any, connect: Any, answer: bytes, data: bytes
) -> tuple[RawClient, RawResponse]:
    """A raw upstream on NODA1 whose answer is its status line and ``answer``, a gateway in
    front, and a raw client that has sent it ``data``: the client and the first answer's head.
    """
    port = await raw_upstream(canned(b"HTTP/1.1 200 OK\r\n" + answer))
    client = await connect(await gateway(city(port)))
    client.writer.write(data)
    return client, await client.head()


@pytest.mark.parametrize("case", UNKNOWN_LENGTH)
async def test_an_answer_of_unknown_length_is_chunked_or_ended_by_the_close(
    raw_upstream, gateway, connect, case: tuple[bytes, bytes, bytes]
) -> None:
    answer, body, chunks = case
    # To HTTP/1.1: chunked (one that came whole with its head is written whole: one chunk and
    # the last); the next pipelined answer is read right after it.
    client, relayed = await unknown_length(
        raw_upstream, gateway, connect, answer,
        b"GET /api/city/a HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )  # fmt: skip
    assert relayed.status == 200
    assert relayed.header("Transfer-Encoding") == "chunked", relayed.raw
    assert relayed.header("Content-Length") is None
    assert relayed.header("Connection") is None
    assert (await client.body(relayed)).body == body
    assert client.seen.endswith(b"\r\n\r\n" + chunks)
    (after,) = await answers(client, "GET")
    assert after.status == 404
    assert await client.closed()
    # To HTTP/1.0, even when the client asked for keep-alive: no chunks in HTTP/1.0, the body
    # ends with the connection. (The build before kept it open: the client could never tell
    # where the body ended.)
    client, relayed = await unknown_length(
        raw_upstream, gateway, connect, answer,
        b"GET /api/city/a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    )  # fmt: skip
    assert relayed.raw.startswith(b"HTTP/1.0 200 ")
    assert relayed.header("Transfer-Encoding") is None
    assert relayed.header("Content-Length") is None
    assert (await client.body(relayed)).body == body  # read up to the close


async def refusing(shared: Any, lingering: tuple[float, float]) -> tuple[web.ServerRunner, int]:
    """The gateway's Server answering every request 413 before its body, closing lingering
    as ``lingering`` says (at most, without data); its runner (a stop: 10 s) and port."""

    async def refused(request: Request) -> web.StreamResponse:
        answer = Whole(status=413, headers={"Server": "test"}, body=b"too large")
        answer.force_close()
        return answer

    server = Server(refused, shared.metrics, shared.connections, lingering=lingering)
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=10)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


async def test_a_lingering_close_reads_while_the_client_sends_and_ends_when_it_stops(gateway):
    # nginx's lingering_close: after an answer given before its body was read, the body is
    # read and dropped while it keeps coming (each pause under lingering_timeout), for
    # lingering_time at most; the answer (and its FIN) readable the whole time.
    shared = (await gateway(city(1))).gateway.shared
    runner, port = await refusing(shared, (4.0, 1.0))
    loop = asyncio.get_running_loop()

    def open_connections() -> float:
        return shared.metrics.registry.get_sample_value("gateway_client_connections") or 0.0

    async def sending(every: float, seconds: float) -> tuple[bytes, float, float]:
        """Send a body piece ``every`` seconds for ``seconds``: (the answer, when the
        pieces stopped, when the gateway's connection ended), from the first byte."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        begun = loop.time()
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 2)  # the answer, then the FIN
        begun = loop.time()  # the lingering starts about here
        while loop.time() - begun < seconds and open_connections():
            writer.write(b"x" * 1000)
            await asyncio.sleep(every)
        stopped = loop.time() - begun
        for _ in range(500):  # 10 s at most
            if not open_connections():
                break
            await asyncio.sleep(0.02)
        writer.close()
        return answer, stopped, loop.time() - begun

    try:
        answer, stopped, closed = await sending(0.1, 1.5)
        assert answer.startswith(b"HTTP/1.1 413")
        assert answer.endswith(b"too large")
        assert stopped >= 1.5  # pieces for 1.5 s, over the 1 s allowed without one
        assert closed - stopped < 1.8  # and the connection ended about 1 s after the last,
        assert closed < 3.6  # well before lingering_time (4 s)
        _, stopped, closed = await sending(0.1, 6.0)
        assert 3.6 < closed < 5.5  # lingering_time bounds it, however long the client sends
    finally:
        await runner.cleanup()


async def test_a_stop_waits_for_a_trickling_lingering_client_one_pause_at_most(gateway):
    # A client that got its answer and trickles its body on (or sends nothing) does not hold
    # a stop for all of shutdown_timeout: one lingering pause at most.
    runner, port = await refusing((await gateway(city(1))).gateway.shared, (30.0, 0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 2)).startswith(b"HTTP/1.1 413")

    async def trickle() -> None:
        while True:
            writer.write(b"x")
            await asyncio.sleep(0.1)

    trickling = asyncio.create_task(trickle())
    loop = asyncio.get_running_loop()
    begun = loop.time()
    try:
        await runner.cleanup()
        assert loop.time() - begun < 2.0  # 0.5 s, give or take; not the 10 s
    finally:
        trickling.cancel()
        writer.close()
