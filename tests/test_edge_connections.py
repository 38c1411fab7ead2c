"""What one client connection may hold (issue 10, the connection-level limits): a bounded
request head (431), a head timeout (408, slowloris), and connection caps per client address
and in all, with the longest-idle keep-alive connections closed to make room.

Real sockets and raw bytes; clients bind their own loopback source addresses (127.0.0.5 and
up) so that they are different clients from the admin peer 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from .helpers import NODA1, RawResponse, RunningGateway, Seen, parse_response, routes

ATTACKER = "127.0.0.5"
CONTROL = "127.0.0.6"
SMALL = (
    "{max_connections_per_client: 5, max_client_connections: 20, client_header_timeout: 1, "
    "client_header_buffer: 4k}"
)


def config(port: int, limits: str = SMALL) -> str:
    return routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1) + (
        f"limits: {limits}\n"
    )


class Backend:
    """A real aiohttp upstream as services run them (keepalive_timeout=5) that records what
    it receives; ``hold`` keeps requests waiting while it is set."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.port = 0
        self.hold: asyncio.Event | None = None
        self.waiting = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        self.seen.append(Seen(request.method, request.raw_path, headers, body))
        if self.hold is not None:
            self.waiting += 1
            try:
                await self.hold.wait()
            finally:
                self.waiting -= 1
        return web.json_response({"got": len(body)})


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    up = Backend()
    server = web.Server(up.handle)
    runner = web.ServerRunner(server, keepalive_timeout=5, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, NODA1, 0)
    await site.start()
    up.port = runner.addresses[0][1]
    yield up
    if up.hold is not None:
        up.hold.set()
    await runner.cleanup()


class Client:
    """One raw connection from a chosen source address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, timeout: float = 5.0) -> RawResponse:
        """One response with a Content-Length body (the connection may stay open)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        answer = parse_response(head)
        length = int(answer.header("Content-Length") or 0)
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return parse_response(head + body)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection (EOF or reset) within ``timeout``
        without sending anything more."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionError:
            return True
        except TimeoutError:
            return False
        return rest == b""

    def close(self) -> None:
        self.writer.close()


Connect = Callable[[int, str], Awaitable[Client]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """``await connect(port, source)``: a raw connection to the gateway from ``source``."""
    opened: list[Client] = []

    async def open_one(port: int, source: str) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        opened.append(Client(reader, writer))
        return opened[-1]

    yield open_one
    for client in opened:
        client.close()


def get(path: str = "/api/city/x", extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a\r\n".encode() + extra + b"\r\n"


def padded_head(size: int, extra: bytes = b"") -> bytes:
    """A GET head of exactly ``size`` bytes (``extra`` header lines first), padded in headers
    of 7000 bytes at most."""
    need = size - len(get(extra=extra))
    lines: list[bytes] = []
    while need > 0:
        name = f"X-Pad-{len(lines)}: ".encode()
        room = need - len(name) - 2
        if room < 1:
            break
        lines.append(name + b"a" * min(7000, room) + b"\r\n")
        need -= len(lines[-1])
    head = get("/api/city/x" + "a" * need, extra + b"".join(lines))
    assert len(head) == size, (len(head), size)
    return head


def sample(text: str, series: str) -> float:
    """The value of one series in a Prometheus text scrape: ``name{labels}`` as written."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.partition(" ")[0] == series
    ]
    assert len(values) == 1, (series, values)
    return values[0]


async def metrics_text(gw: RunningGateway) -> str:
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as response:
        return await response.text()


def refusal_lines(gw: RunningGateway) -> list[dict[str, object]]:
    return [line for line in gw.log_lines() if line["message"] == "client connections refused"]


# -- bounded heads ---------------------------------------------------------------------------


async def test_a_head_over_the_buffer_is_431_and_nothing_is_forwarded(backend, gateway, connect):
    gw = await gateway(config(backend.port))
    for pieces in (1, 8):  # in one write, and in several (the count runs across reads)
        head = padded_head(5000)
        client = await connect(gw.port, ATTACKER)
        step = len(head) // pieces + 1
        for at in range(0, len(head), step):
            client.send(head[at : at + step])
            await asyncio.sleep(0.02)
        answer = await client.response()
        assert answer.status == 431
        body = answer.json()
        assert body["error"] == "headers_too_large"
        assert body["request_id"] == answer.header("X-Request-ID")
        assert body["message"]
        assert answer.header("Connection") == "close"
        assert answer.header("Content-Type") == "application/json"
        assert await client.closed()
    assert backend.seen == []
    lines = [line for line in gw.log_lines() if line.get("status") == 431]
    assert len(lines) == 2
    assert lines[0]["client"] == ATTACKER


async def test_the_785_kib_head_of_the_issue_is_refused_after_the_buffer(backend, gateway, connect):
    gw = await gateway(config(backend.port))
    client = await connect(gw.port, ATTACKER)
    head = padded_head(785 * 1024 + 1)
    client.send(head)  # the gateway answers and closes long before it has all of it
    answer = await client.response()
    assert answer.status == 431
    assert await client.closed()
    assert backend.seen == []


async def test_a_head_of_exactly_the_limit_passes_however_it_is_cut(backend, gateway, connect):
    gw = await gateway(config(backend.port))
    # With a body in the same reads, so that the count passes the limit and the head's end
    # must be found: whole; cut inside the final empty line; cut just before or after it.
    request = padded_head(4096, b"Content-Length: 100\r\n") + b"b" * 100
    cuts_tried = ((), (4094,), (4093,), (4095,), (4092,), (4096,), (2000, 4094))
    for cuts in cuts_tried:
        client = await connect(gw.port, CONTROL)
        start = 0
        for cut in (*cuts, len(request)):
            client.send(request[start:cut])
            start = cut
            await asyncio.sleep(0.02)
        answer = await client.response()
        assert (answer.status, answer.json()) == (200, {"got": 100}), cuts
        client.close()
    assert len(backend.seen) == len(cuts_tried)
    for cuts in ((), (4094,), (4095,)):
        client = await connect(gw.port, CONTROL)
        request = padded_head(4097, b"Content-Length: 100\r\n") + b"b" * 100
        start = 0
        for cut in (*cuts, len(request)):
            client.send(request[start:cut])
            start = cut
            await asyncio.sleep(0.02)
        assert (await client.response()).status == 431, cuts
    assert len(backend.seen) == len(cuts_tried)


async def test_a_body_bigger_than_the_buffer_is_no_head(backend, gateway, connect):
    gw = await gateway(config(backend.port))
    client = await connect(gw.port, CONTROL)
    body = b"b" * (1024 * 1024)
    post = b"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
    # The POST and a GET behind it in one write: the GET's head is counted from its start.
    client.send(post + body + get())
    first, second = await client.response(), await client.response()
    assert (first.status, first.json()) == (200, {"got": len(body)})
    assert second.status == 200
    chunked = b"POST /api/city/up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    client.send(chunked)
    for _ in range(16):
        client.send(b"%x\r\n" % 65536 + b"c" * 65536 + b"\r\n")
        await asyncio.sleep(0)
    client.send(b"0\r\n\r\n")
    third = await client.response()
    assert (third.status, third.json()) == (200, {"got": 16 * 65536})
    assert [len(s.body) for s in backend.seen] == [len(body), 0, 16 * 65536]
