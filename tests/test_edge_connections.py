"""What one client connection may hold (issue 10, the connection-level limits): a bounded
request head (431), a head timeout (408, slowloris), and connection caps per client address
and in all, with the longest-idle keep-alive connections closed to make room.

Real sockets and raw bytes; clients bind their own loopback source addresses (127.0.0.5 and
up) so that they are different clients from the admin peer 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from gateway.config import parse_config

from .helpers import (
    NODA1,
    RawResponse,
    RunningGateway,
    Seen,
    frame,
    parse_response,
    routes,
    sample,
)

ATTACKER = "127.0.0.5"
CONTROL = "127.0.0.6"
SMALL = (
    "{max_connections_per_client: 5, max_client_connections: 20, client_header_timeout: 1, "
    "client_header_buffer: 4k}"
)


def config(port: int, limits: str = SMALL) -> str:
    city = f"{{port: {port}, nodes: [noda1], websocket: true}}"
    # metrics_cache: 0, since the tests read counters in scrapes a moment apart.
    return routes({"city": city}, noda1=NODA1) + f"limits: {limits}\nmetrics_cache: 0\n"


class Backend:
    """A real aiohttp upstream as services run them (keepalive_timeout=5) that records what
    it receives; ``hold`` keeps requests waiting while it is set."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.port = 0
        self.hold: asyncio.Event | None = None
        self.waiting = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path.startswith("/ws/"):
            return await self.echo(request)
        if "/big/" in request.path:  # /big/<MiB>
            return await self.big(request, int(request.path.rpartition("/")[2]))
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

    async def big(self, request: web.BaseRequest, mib: int) -> web.StreamResponse:
        """``mib`` MiB of b"x", streamed (chunked) as fast as the gateway takes them."""
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(mib * 16):
            await response.write(b"x" * 65536)
        await response.write_eof()
        return response

    async def echo(self, request: web.BaseRequest) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_bytes(message.data)
        return ws


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

    async def closed_after(self, low: float, high: float) -> bool:
        """True when the server closes the connection between ``low`` and ``high`` seconds
        from now (and sends nothing more)."""
        began = time.monotonic()
        return await self.closed(timeout=high + 1) and low <= time.monotonic() - began < high

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


POST_5 = b"POST /api/city/p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.parametrize(
    ("before", "answered"),
    [(b"\r\n\r\n", 0), (get(), 1), (POST_5, 1)],
    ids=["after-empty-lines", "after-a-head", "after-a-body"],
)
async def test_a_head_over_the_buffer_is_431_whatever_comes_before_it_in_a_read(
    backend, gateway, connect, before, answered
):
    # One write: the big head is whole in the read, behind an end of a head (empty lines,
    # or a whole request) or a body's end; its size is measured all the same. (Each of its
    # lines is within the parser's own limits: only the whole-head limit refuses it.)
    gw = await gateway(config(backend.port))
    client = await connect(gw.port, ATTACKER)
    client.send(before + padded_head(40 * 1024))
    for _ in range(answered):
        assert (await client.response()).status == 200
    answer = await client.response()
    assert answer.status == 431, answer.raw
    assert await client.closed()
    assert len(backend.seen) == answered


async def test_without_a_head_limit_the_parsers_own_limits_still_hold(backend, gateway, connect):
    # client_header_buffer: 0 lifts the whole-head limit, not the parser's: 100 fields (and a
    # line of 8 KiB), so an endless head is refused at once instead of held until the
    # header timeout.
    gw = await gateway(config(backend.port, "{client_header_buffer: 0, client_header_timeout: 5}"))
    client = await connect(gw.port, ATTACKER)
    client.send(b"GET /api/city/x HTTP/1.1\r\nHost: a\r\n")
    began = time.monotonic()
    with contextlib.suppress(ConnectionError):  # the gateway may close while this sends
        for _ in range(200):
            client.send(b"X-Pad: " + b"p" * 1000 + b"\r\n")
            await client.writer.drain()
    answer = await client.response()
    assert answer.status == 431, answer.raw
    assert time.monotonic() - began < 2
    assert backend.seen == []
    # A big head within the parser's limits still passes, as the setting says.
    other = await connect(gw.port, CONTROL)
    other.send(padded_head(60 * 1024))
    assert (await other.response()).status == 200


async def test_a_client_still_sending_when_its_head_is_refused_reads_the_whole_answer(
    backend, gateway, connect
):
    """The answer ends with a FIN and the gateway reads (and drops) what the client still
    sends (nginx's lingering close): closing at once would make the kernel answer those bytes
    with a reset, and the client's kernel would then drop the 431 it had not read yet."""
    gw = await gateway(config(backend.port))
    client = await connect(gw.port, ATTACKER)
    client.send(padded_head(8 * 1024))  # over the 4 KiB buffer: answered at once
    await asyncio.sleep(0.2)  # the answer has arrived, unread; the gateway has "closed"
    for _ in range(20):  # the client goes on sending what it had (a big upload, say)
        client.send(b"x" * 16384)
        await client.writer.drain()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # had the gateway closed, its reset would have arrived by now
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


# -- the head timeout ------------------------------------------------------------------------


async def test_unfinished_heads_get_408_after_the_header_timeout(backend, gateway, connect):
    gw = await gateway(config(backend.port))
    table = gw.gateway.shared.connections
    partial = padded_head(4096)[:3500]  # most of the buffer, and no end
    stalled = [await connect(gw.port, source) for source in ("127.0.0.7", "127.0.0.8") * 4]
    began = time.monotonic()
    for client in stalled:
        client.send(partial)
    answers = await asyncio.gather(*(client.response(timeout=4) for client in stalled))
    waited = time.monotonic() - began
    assert 1.0 <= waited < 2.5
    for answer in answers:
        assert answer.status == 408
        assert answer.json()["error"] == "header_timeout"
        assert answer.json()["request_id"] == answer.header("X-Request-ID")
        assert answer.header("Connection") == "close"
    assert all(await asyncio.gather(*(client.closed() for client in stalled)))
    assert backend.seen == []
    await asyncio.sleep(0.1)
    assert (table.held_by("127.0.0.7"), table.held_by("127.0.0.8"), table.heads) == (0, 0, 0)
    assert len([line for line in gw.log_lines() if line.get("status") == 408]) == 8


async def test_slowloris_one_byte_every_300_ms_gets_408(backend, gateway, connect):
    gw = await gateway(config(backend.port))
    client = await connect(gw.port, ATTACKER)
    head = get()

    async def trickle() -> None:
        for byte in head:
            client.send(bytes([byte]))
            await asyncio.sleep(0.3)

    began = time.monotonic()
    writer = asyncio.create_task(trickle())
    try:
        answer = await client.response(timeout=4)
    finally:
        writer.cancel()
    assert answer.status == 408
    assert 1.0 <= time.monotonic() - began < 2.0
    assert await client.closed()
    assert backend.seen == []


async def test_idle_keepalive_connections_close_silently_and_a_head_outlives_keepalive(
    backend, gateway, connect
):
    limits = "{keepalive_timeout: 1, client_header_timeout: 2, client_header_buffer: 4k}"
    gw = await gateway(config(backend.port, limits))
    idle = await connect(gw.port, ATTACKER)
    idle.send(get())
    assert (await idle.response()).status == 200
    assert await idle.closed_after(0.9, 2.0)  # nothing sent: no 408
    # The same after a request whose body came after its head (read whole, the connection
    # is idle again).
    posted = await connect(gw.port, ATTACKER)
    posted.send(b"POST /api/city/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
    await asyncio.sleep(0.05)  # the body in a read of its own
    posted.send(b"hello")
    assert (await posted.response()).status == 200
    assert await posted.closed_after(0.9, 2.0)
    # A head begun before the keepalive time ends gets its full header timeout, then 408.
    slow = await connect(gw.port, ATTACKER)
    slow.send(get())
    assert (await slow.response()).status == 200
    await asyncio.sleep(0.5)
    slow.send(b"GET /api/city/x HTTP/1.1\r\n")
    began = time.monotonic()
    answer = await slow.response(timeout=4)
    assert answer.status == 408
    assert 2.0 <= time.monotonic() - began < 3.0


# -- connection caps -------------------------------------------------------------------------


async def test_the_per_client_cap_closes_the_next_connection_at_once(backend, gateway, connect):
    gw = await gateway(config(backend.port))
    held = [await connect(gw.port, ATTACKER) for _ in range(5)]
    await asyncio.sleep(0.05)
    sixth = await connect(gw.port, ATTACKER)
    assert await sixth.closed(timeout=1)
    control = await connect(gw.port, CONTROL)
    control.send(get())
    assert (await control.response(timeout=1)).status == 200
    for client in held:  # the first five still work
        client.send(get())
        assert (await client.response()).status == 200
    text = await metrics_text(gw)
    assert sample(text, 'gateway_connections_refused_total{reason="per_client"}') == 1
    assert sample(text, 'gateway_connections_refused_total{reason="max_connections"}') == 0
    more = [await connect(gw.port, ATTACKER) for _ in range(20)]
    assert all(await asyncio.gather(*(client.closed(timeout=1) for client in more)))
    text = await metrics_text(gw)
    assert sample(text, 'gateway_connections_refused_total{reason="per_client"}') == 21
    lines = refusal_lines(gw)
    assert len(lines) == 1  # one line per address per minute, not per connection
    assert {k: lines[0][k] for k in ("reason", "client", "limit", "refused")} == {
        "reason": "per_client",
        "client": ATTACKER,
        "limit": 5,
        "refused": 1,
    }
    assert lines[0]["level"] == "WARNING"
    assert gw.gateway.shared.connections.held_by(ATTACKER) == 5


async def test_refusals_are_logged_again_a_minute_later_with_their_count(backend, gateway):
    gw = await gateway(config(backend.port))
    table = gw.gateway.shared.connections
    now = table.clock()
    for _ in range(3):
        table._refuse("per_client", ATTACKER, 5)
    table.sweep(now + 30)
    assert len(refusal_lines(gw)) == 1
    table.sweep(now + 61)
    lines = refusal_lines(gw)
    assert [line["refused"] for line in lines] == [1, 2]
    table.sweep(now + 200)  # nothing refused since: forgotten, the next one logs at once
    table._refuse("per_client", ATTACKER, 5)
    assert [line["refused"] for line in refusal_lines(gw)] == [1, 2, 1]


async def test_at_the_global_cap_the_longest_idle_connection_makes_room(backend, gateway, connect):
    limits = "{max_connections_per_client: 100, max_client_connections: 20}"
    gw = await gateway(config(backend.port, limits))
    table = gw.gateway.shared.connections
    conns = []
    for i in range(20):
        client = await connect(gw.port, f"127.0.0.{10 + i % 4}")
        client.send(get())
        assert (await client.response()).status == 200
        conns.append(client)
    assert len(table) == 20
    # Two more: the two longest idle (the first two) are closed, silently.
    for _ in range(2):
        newcomer = await connect(gw.port, "127.0.0.20")
        newcomer.send(get())
        assert (await newcomer.response()).status == 200
        conns.append(newcomer)
    assert await conns[0].closed(timeout=1)
    assert await conns[1].closed(timeout=1)
    conns[2].send(get())  # the next is still open
    assert (await conns[2].response()).status == 200
    assert len(table) == 20
    text = await metrics_text(gw)
    assert sample(text, 'gateway_connections_refused_total{reason="max_connections"}') == 0


async def test_with_every_connection_busy_new_ones_are_refused_but_admin_gets_health(
    backend, gateway, connect
):
    limits = "{max_connections_per_client: 100, max_client_connections: 20}"
    gw = await gateway(config(backend.port, limits))
    backend.hold = asyncio.Event()
    busy = []
    for i in range(20):
        client = await connect(gw.port, f"127.0.0.{10 + i % 4}")
        client.send(get())
        busy.append(client)
    for _ in range(100):
        if backend.waiting == 20:
            break
        await asyncio.sleep(0.02)
    assert backend.waiting == 20
    refused = await connect(gw.port, "127.0.0.20")
    assert await refused.closed(timeout=1)
    async with aiohttp.ClientSession() as admin:  # from 127.0.0.1: the reserved slots
        for _ in range(3):
            async with admin.get(gw.url + "/health") as response:
                assert response.status == 200
        async with admin.get(gw.url + "/metrics") as response:
            text = await response.text()
    assert sample(text, 'gateway_connections_refused_total{reason="max_connections"}') == 1
    assert [line["reason"] for line in refusal_lines(gw)] == ["max_connections"]
    backend.hold.set()
    answers = await asyncio.gather(*(client.response() for client in busy))
    assert {answer.status for answer in answers} == {200}
    # Now idle: the next newcomer gets its room.
    newcomer = await connect(gw.port, "127.0.0.20")
    newcomer.send(get())
    assert (await newcomer.response()).status == 200


async def test_a_head_in_progress_is_not_idle(backend, gateway, connect):
    limits = (
        "{max_connections_per_client: 100, max_client_connections: 3, client_header_timeout: 5}"
    )
    gw = await gateway(config(backend.port, limits))
    heading = [await connect(gw.port, ATTACKER) for _ in range(3)]
    for client in heading:
        client.send(b"GET /api/city/x HTTP/1.1\r\n")
    await asyncio.sleep(0.1)
    assert gw.gateway.shared.connections.heads == 3
    refused = await connect(gw.port, CONTROL)
    assert await refused.closed(timeout=1)
    for client in heading:  # they finish their heads and are answered
        client.send(b"Host: a\r\n\r\n")
        assert (await client.response()).status == 200


async def test_the_caps_follow_a_reload_for_new_connections(backend, gateway, connect):
    gw = await gateway(config(backend.port))
    held = [await connect(gw.port, ATTACKER) for _ in range(3)]
    await asyncio.sleep(0.05)
    gw.gateway.apply(parse_config(config(backend.port, "{max_connections_per_client: 2}"), env={}))
    extra = await connect(gw.port, ATTACKER)
    assert await extra.closed(timeout=1)
    for client in held:  # those already open stay
        client.send(get())
        assert (await client.response()).status == 200


async def test_keepalive_timeout_follows_a_reload_from_each_connections_next_answer(
    backend, gateway, connect
):
    # Shortened: a connection idle under the old 30 s is closed 1 s after its next answer
    # (its timer, set for the old deadline, is made again for the nearer one).
    gw = await gateway(config(backend.port, "{keepalive_timeout: 30}"))
    kept = await connect(gw.port, ATTACKER)
    kept.send(get())
    assert (await kept.response()).status == 200
    gw.gateway.apply(parse_config(config(backend.port, "{keepalive_timeout: 1}"), env={}))
    kept.send(get())
    assert (await kept.response()).status == 200
    assert await kept.closed_after(0.9, 2.0)
    # Lengthened: a connection whose timer was set under the 1 s stays open past it once an
    # answer came after the reload (the timer, when it fires, moves on to the new deadline).
    longer = await connect(gw.port, ATTACKER)
    longer.send(get())
    assert (await longer.response()).status == 200
    gw.gateway.apply(parse_config(config(backend.port, "{keepalive_timeout: 30}"), env={}))
    longer.send(get())
    assert (await longer.response()).status == 200
    assert not await longer.closed(timeout=2)
    longer.send(get())
    assert (await longer.response()).status == 200


# -- clients that do not read ----------------------------------------------------------------


def held_slot_config(port: int, limits: str) -> str:
    """One upstream slot for the service: whoever holds it makes everyone else's 503."""
    city = f"{{port: {port}, nodes: [noda1], max_connections: 1}}"
    return routes({"city": city}, noda1=NODA1) + f"limits: {limits}\nmetrics_cache: 0\n"


async def unread(port: int, path: str) -> socket.socket:
    """A client that asks for ``path`` and never reads (a small receive buffer, so that the
    gateway's writes back up soon)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((ATTACKER, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    sock.send(get(path))
    return sock


async def test_a_client_that_takes_none_of_its_answer_is_closed_after_send_timeout(
    backend, gateway, connect
):
    gw = await gateway(held_slot_config(backend.port, "{send_timeout: 1}"))
    began = time.monotonic()
    sock = await unread(gw.port, "/api/city/big/64")
    try:
        await asyncio.sleep(0.5)  # its answer streams until the buffers fill, in the slot
        control = await connect(gw.port, CONTROL)
        control.send(get())
        busy = await control.response()
        assert busy.status == 503
        assert busy.json()["error"] == "upstream_busy"
        # send_timeout after the buffers filled, the gateway gives up on it: the slot is
        # free again.
        while True:
            control = await connect(gw.port, CONTROL)
            control.send(get())
            answer = await control.response()
            if answer.status == 200:
                break
            assert time.monotonic() - began < 4, "the slot was never released"
            await asyncio.sleep(0.1)
        assert time.monotonic() - began > 1
        # The client finds its connection ended (reset) after what the buffers held.
        assert await ended(sock)
    finally:
        sock.close()
    lines = [line for line in gw.log_lines() if line.get("path") == "/api/city/big/64"]
    assert [(line["status"], line["error"]) for line in lines] == [(499, "send_timeout")]


async def ended(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the connection ends (EOF or a reset) within ``timeout``, reading on."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            while await loop.sock_recv(sock, 1 << 20):
                pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def test_a_slow_reader_that_keeps_taking_its_answer_gets_all_of_it(backend, gateway, connect):
    # send_timeout bounds a pause of the client, not the whole answer: 16 MiB taken 2 MiB
    # every 0.4 s take over 3 s, three times the timeout. (A client must take enough for
    # the kernel to call the socket writable again, about a third of what it holds, within
    # send_timeout: nginx's wait for a write event is the same.)
    gw = await gateway(held_slot_config(backend.port, "{send_timeout: 1}"))
    began = time.monotonic()
    sock = await unread(gw.port, "/api/city/big/16")
    loop = asyncio.get_running_loop()
    received = bytearray()
    try:
        while not received.endswith(b"\r\n0\r\n\r\n"):
            await asyncio.sleep(0.4)
            step = len(received) + (2 << 20)
            while len(received) < step and not received.endswith(b"\r\n0\r\n\r\n"):
                chunk = await asyncio.wait_for(loop.sock_recv(sock, step - len(received)), 5)
                assert chunk, "the gateway closed the connection"
                received += chunk
    finally:
        sock.close()
    assert time.monotonic() - began > 3
    assert received.startswith(b"HTTP/1.1 200")
    assert received.partition(b"\r\n\r\n")[2].count(b"x") == 16 << 20
    assert not [line for line in gw.log_lines() if line.get("error") == "send_timeout"]


# -- WebSocket sessions ----------------------------------------------------------------------

HANDSHAKE = (
    b"GET /ws/city/echo HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


async def test_a_websocket_session_counts_against_the_per_client_cap_until_it_ends(
    backend, gateway, connect
):
    # A relayed session left the table: one address opened 190 sessions past a cap of 16
    # and filled the process's descriptors. It now counts, as nginx's limit_conn counts it,
    # until it ends; it is never an idle connection to close for room.
    gw = await gateway(config(backend.port))
    table = gw.gateway.shared.connections
    before = sample(await metrics_text(gw), "gateway_client_connections")
    sessions = []
    for _ in range(5):  # max_connections_per_client
        client = await connect(gw.port, ATTACKER)
        # Frames right behind the handshake, more than the head buffer: not a head.
        client.send(HANDSHAKE + frame(0x2, b"x" * 6000))
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        echoed = await asyncio.wait_for(client.reader.readexactly(4 + 6000), 5)
        assert echoed[4:] == b"x" * 6000
        sessions.append(client)
    assert table.held_by(ATTACKER) == 5
    assert sample(await metrics_text(gw), "gateway_client_connections") == before + 5
    refused = await connect(gw.port, ATTACKER)
    assert await refused.closed()  # the sixth, at the cap
    sessions.pop().close()
    for _ in range(100):
        if table.held_by(ATTACKER) == 4:
            break
        await asyncio.sleep(0.02)
    plain = await connect(gw.port, ATTACKER)
    plain.send(get())
    assert (await plain.response()).status == 200
    assert table.held_by(ATTACKER) == 5
    for client in sessions:
        client.close()
    plain.close()
    for _ in range(100):
        if sample(await metrics_text(gw), "gateway_client_connections") == before:
            break
        await asyncio.sleep(0.02)
    assert sample(await metrics_text(gw), "gateway_client_connections") == before
    assert table.held_by(ATTACKER) == 0


# -- memory ----------------------------------------------------------------------------------


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")  # pragma: no cover


async def test_unfinished_heads_hold_no_more_than_the_buffer(backend, gateway, connect):
    """300 connections with unfinished 30 KiB heads (the gateway and the clients both live in
    this process): RSS grows by at most 300 x (buffer + what a connection costs without a
    head, measured first), and everything is let go when the 408s close them."""
    limits = (
        "{max_connections_per_client: 1000, max_client_connections: 1000, "
        "client_header_timeout: 3, client_header_buffer: 32k}"
    )
    gw = await gateway(config(backend.port, limits))
    table = gw.gateway.shared.connections
    n, buffer = 300, 32 * 1024
    head = padded_head(30 * 1024 + 100)[: 30 * 1024]
    began = rss_kib()
    clients = [await connect(gw.port, f"127.0.1.{1 + i % 100}") for i in range(n)]
    for client in clients:
        client.send(head[:30])
    for _ in range(100):
        if table.heads == n:
            break
        await asyncio.sleep(0.02)
    assert table.heads == n
    bare = rss_kib()
    for client in clients:
        client.send(head[30:])
    await asyncio.sleep(0.5)
    held = rss_kib()
    assert table.heads == n  # all still waiting for the rest of their heads
    overhead = max(bare - began, 0) / n
    per_head = (held - bare) / n
    print(f"\nRSS {began} KiB; +{n} connections: {overhead:.1f} KiB each; "
          f"+30 KiB heads: {per_head:.1f} KiB each")  # fmt: skip
    assert held - began <= n * (buffer / 1024 + overhead) + 2048
    answers = await asyncio.gather(*(client.response(timeout=6) for client in clients))
    assert {answer.status for answer in answers} == {408}
    await asyncio.sleep(0.2)
    assert (table.heads, table.idle_count) == (0, 0)
    assert all(table.held_by(f"127.0.1.{i}") == 0 for i in range(1, 101))
    assert backend.seen == []
