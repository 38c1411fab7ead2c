"""The upstream client's framing, in raw bytes on both sides (issue 17): what an upstream may
send that is no valid HTTP/1.1 response, or one whose length is in doubt, and what must come
of it. Nothing here looks inside the client: each test asserts what the gateway's client got
(byte for byte where it matters) and what the raw upstream received, on which of its TCP
connections, and which of them the gateway closed.

The rules under test: a response whose framing is invalid or ambiguous is never relayed (502
while no byte of it has gone to the client; a reset of the client connection once one has,
never a clean end), and a connection with anything unaccounted for on it (an error, a
timeout, a body not read to its end, bytes past the response's end, ``Connection: close``) is
never used for another request, so that no request can get another's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import orjson
import pytest

from .helpers import NODA1, NODA2, RawClient, RawResponse, RawServers, RunningGateway, routes

WAIT = 2.0  # seconds any one step may take before the test fails instead of hanging


# -- the raw upstream --------------------------------------------------------------------------


@dataclass
class Received:
    """One request as the raw upstream read it off a connection."""

    conn: int  # the TCP connection it came on: 1, 2, ... in accept order
    line: bytes  # the request line
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def method(self) -> bytes:
        return self.line.split(b" ", 1)[0]

    @property
    def target(self) -> bytes:
        return self.line.split(b" ")[1]

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return b", ".join(values) if values else None


class Conn:
    """One connection of the raw upstream, as its script answers on it."""

    def __init__(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.number = number
        self.reader = reader
        self.writer = writer
        self.done = False  # the script closed or held it (no more requests are read)
        self.stray = b""  # bytes the gateway sent while the script held the connection
        self.closed_by_gateway = False  # the gateway closed it (EOF or reset)
        self.served: list[Received] = []  # the requests read off it so far

    async def send(self, *parts: bytes) -> None:
        """Write each part (a write and a drain of its own: separate segments, mostly)."""
        for part in parts:
            self.writer.write(part)
            await self.writer.drain()

    def close(self) -> None:
        """Close after what was written (a FIN)."""
        self.done = True
        self.writer.close()

    async def hold(self) -> None:
        """Keep the connection open, reading whatever comes (kept in ``stray``: a request the
        gateway should never have sent on it), until the gateway closes it, for at most
        ``WAIT``."""
        self.done = True
        try:
            async with asyncio.timeout(WAIT):
                while data := await self.reader.read(65536):
                    self.stray += data
        except TimeoutError:
            return
        except ConnectionError:
            pass
        self.closed_by_gateway = True


Script = Callable[[Received, Conn], Awaitable[None]]


@dataclass
class RawUpstream:
    """A TCP server on a node's address that reads request heads (and Content-Length or
    chunked bodies) off each connection and lets a script answer each request. After the
    script returns, the next request is read from the same connection (keep-alive) unless the
    script closed or held it."""

    script: Script
    host: str = NODA1
    port: int = 0
    received: list[Received] = field(default_factory=list)
    connections: list[Conn] = field(default_factory=list)
    closed_by_gateway: set[int] = field(default_factory=set)
    _closes: dict[int, asyncio.Event] = field(default_factory=dict)
    gateway_log: io.StringIO | None = None  # the log of the gateway in front (``through``)

    def story(self) -> tuple[list[Received], list[str]]:
        """What this upstream received, and the log lines of the gateway in front: a failed
        assertion's message."""
        log = self.gateway_log.getvalue().splitlines() if self.gateway_log is not None else []
        return self.received, log[-20:]

    def conns(self, target: bytes) -> list[int]:
        """The connections requests for ``target`` came on, in order."""
        return [r.conn for r in self.received if r.target == target]

    def targets(self) -> list[bytes]:
        return [r.target for r in self.received]

    async def closed(self, conn: int) -> bool:
        """Whether the gateway closed connection ``conn`` (within ``WAIT``)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closes[conn].wait(), WAIT)
        return conn in self.closed_by_gateway

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(self.connections) + 1
        self._closes[number] = asyncio.Event()
        conn = Conn(number, reader, writer)
        self.connections.append(conn)
        try:
            while not conn.done:
                try:
                    request = await _read_request(number, reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    conn.closed_by_gateway = True  # EOF or reset between requests
                    break
                self.received.append(request)
                conn.served.append(request)
                await self.script(request, conn)
        except ConnectionError:
            conn.closed_by_gateway = True  # while the script wrote
        except TimeoutError:
            pass  # a script's wait for the test ran out: the test fails on its own
        finally:
            writer.close()
            if conn.closed_by_gateway:
                self.closed_by_gateway.add(number)
            self._closes[number].set()


async def _read_request(number: int, reader: asyncio.StreamReader) -> Received:
    head = await reader.readuntil(b"\r\n\r\n")
    line, *lines = head[:-4].split(b"\r\n")
    headers = []
    for raw in lines:
        name, _, value = raw.partition(b":")
        headers.append((name, value.strip()))
    request = Received(number, line, headers, b"")
    length = request.header(b"Content-Length")
    if length is not None:
        request.body = await reader.readexactly(int(length))
    elif (request.header(b"Transfer-Encoding") or b"").lower() == b"chunked":
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # no trailers from the gateway
        request.body = b"".join(chunks)
    return request


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[RawUpstream]]]:
    """``await scripted(script, host=NODA1)``: a started ``RawUpstream``."""
    servers = RawServers()

    async def start(script: Script, host: str = NODA1) -> RawUpstream:
        up = RawUpstream(script, host)
        up.port = await servers.start(up.serve, host)
        return up

    yield start
    await servers.close()


def ok(body: bytes, headers: bytes = b"") -> bytes:
    """A 200 with a Content-Length body (kept alive)."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), headers, body)


def echo(request: Received) -> bytes:
    """The answer that says which request it answers: its method and target (the head
    alone, for a HEAD)."""
    answer = ok(request.method + b" " + request.target, b"X-Echo: 1\r\n")
    return answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" if request.method == b"HEAD" else answer


def bad_for(answer: bytes, path: bytes = b"/city/bad") -> Script:
    """Answer requests for ``path`` with ``answer`` and keep the connection open (reading the
    next request, which is the worst case: a client that reused it would be answered from
    what is left of ``answer``); answer every other request with its ``echo``."""

    async def script(request: Received, conn: Conn) -> None:
        await conn.send(answer if request.target == path else echo(request))

    return script


def bad_in_two(first: bytes, after: asyncio.Event, then: bytes) -> Script:
    """Answer requests for ``/city/bad`` with ``first``, then (if any) ``then`` once the test
    sets ``after``; answer every other request with its ``echo``."""

    async def script(request: Received, conn: Conn) -> None:
        if request.target != b"/city/bad":
            await conn.send(echo(request))
            return
        await conn.send(first)
        if then:
            await asyncio.wait_for(after.wait(), WAIT)
            await conn.send(then)

    return script


def closes_on(nth: int) -> Script:
    """Answer each request with its ``echo``, but close each connection on its ``nth``
    request without answering it: what an upstream closing an idle kept-alive connection just
    as it is reused looks like."""

    async def script(request: Received, conn: Conn) -> None:
        if len(conn.served) == nth:
            conn.close()
        else:
            await conn.send(echo(request))

    return script


def city(port: int, extra: str = "") -> str:
    return routes({"city": f"{{port: {port}, nodes: [noda1]{extra}}}"}, noda1=NODA1)


# -- the raw client ----------------------------------------------------------------------------


def get(path: str, method: str = "GET", headers: str = "", body: bytes | None = None) -> bytes:
    """A request for ``/api/city/<path>`` (the upstream sees ``/city/<path>``)."""
    head = f"{method} /api/city/{path} HTTP/1.1\r\nHost: a\r\n{headers}"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + (body or b"")


Started = tuple[RawUpstream, RunningGateway, RawClient]


@pytest.fixture
def through(scripted, gateway, connect) -> Callable[..., Awaitable[Started]]:
    """``await through(script, extra="")``: a ``RawUpstream`` running ``script`` as the
    ``city`` service (``extra``: more of its settings), a gateway in front, and a client
    connected to it."""

    async def start(script: Script, extra: str = "") -> Started:
        up = await scripted(script)
        gw = await gateway(city(up.port, extra))
        up.gateway_log = gw.logs
        return up, gw, await connect(gw)

    return start


def assert_refused(
    answer: RawResponse, codes: tuple[str, ...] = ("upstream_bad_response",)
) -> None:
    """The gateway's own 502, in JSON, naming the request."""
    assert answer.status == 502, answer.raw
    assert answer.header("Content-Type") == "application/json"
    body = orjson.loads(answer.body)
    assert body["error"] in codes, body
    assert body["request_id"] == answer.header("X-Request-ID")
    assert answer.header("X-Echo") is None  # nothing of the upstream's answer


async def assert_fresh_next(client: RawClient, up: RawUpstream, bad: bytes = b"/city/bad") -> None:
    """The next request is answered with its own answer, on a connection no request for
    ``bad`` used, and every connection ``bad`` used was closed by the gateway."""
    answer = await client.ask(get("next"))
    assert answer.status == 200, (answer.raw, answer.body, up.story())
    assert answer.body == b"GET /city/next"
    used = set(up.conns(bad))
    assert used
    assert not used & set(up.conns(b"/city/next")), up.story()
    for conn in used:
        assert await up.closed(conn), f"connection {conn} was left open"
    assert [c.stray for c in up.connections] == [b""] * len(up.connections)


async def refused_then_fresh(through, answer: bytes) -> None:
    """A GET answered with ``answer`` is refused with a 502; the next one is answered right."""
    up, _, client = await through(bad_for(answer))
    assert_refused(await client.ask(get("bad")))
    await assert_fresh_next(client, up)


async def assert_aborted(client: RawClient) -> None:
    """What a client gets of a response that failed after its head went out: a reset, never
    a clean end (a chunked terminator, or a close that would end a body read to its close)."""
    end = await client.end()
    assert end == "reset", (end, client.seen)


# -- 1, 2: length in doubt ---------------------------------------------------------------------

CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 15\r\n",  # the chunked body's length
    ],
    ids=["cl-te", "te-cl", "te-cl-whole"],
)
async def test_content_length_with_transfer_encoding_is_502_and_the_connection_dropped(
    through, head
):
    await refused_then_fresh(through, b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + CHUNKED_HELLO)


@pytest.mark.parametrize(
    "lengths",
    [
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: 6\r\nContent-Length: 5\r\n",
        b"Content-Length: 5, 6\r\n",
        # Identical values: RFC 9110 8.6 lets a recipient take them as one, or refuse. Refused,
        # as nginx does with its upstreams ("duplicate header line") and llhttp by default.
        b"Content-Length: 5\r\nContent-Length: 5\r\n",
        b"Content-Length: 5, 5\r\n",
        b"Content-Length: +5\r\n",
        b"Content-Length: -5\r\n",
        b"Content-Length: 0x5\r\n",
        b"Content-Length: 5 5\r\n",
        b"Content-Length: 99999999999999999999999\r\n",
    ],
    ids=["5-6", "6-5", "5,6", "5-5", "5,5", "plus", "minus", "hex", "space", "overflow"],
)
async def test_a_content_length_in_doubt_is_502(through, lengths):
    await refused_then_fresh(through, b"HTTP/1.1 200 OK\r\n" + lengths + b"\r\nhello!")


# -- 3: chunks ---------------------------------------------------------------------------------

BAD_CHUNKS = {
    "non-hex": b"zz\r\nhello\r\n0\r\n\r\n",
    "negative": b"-5\r\nhello\r\n0\r\n\r\n",
    "overflow": b"f" * 20 + b"\r\nhello\r\n0\r\n\r\n",
    "no-crlf-after-data": b"5\r\nhelloXX0\r\n\r\n",
    "lf-after-data": b"5\r\nhello\n0\r\n\r\n",
    "hex-prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "space-after-size": b"5 \r\nhello\r\n0\r\n\r\n",
    "empty-size": b"\r\nhello\r\n0\r\n\r\n",
    "ctl-in-ext-name": b"5;na\x01me=v\r\nhello\r\n0\r\n\r\n",
    "nul-in-ext-value": b"5;name=va\x00lue\r\nhello\r\n0\r\n\r\n",
    "del-in-ext-value": b"5;name=\x7f\r\nhello\r\n0\r\n\r\n",
    "ctl-in-quoted-ext": b'5;name="a\x01b"\r\nhello\r\n0\r\n\r\n',
}
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Echo: 1\r\n\r\n"


@pytest.mark.parametrize("chunks", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
async def test_a_bad_first_chunk_never_looks_like_a_response(through, connect, chunks):
    # Head and bad chunk in one write: whether the head went out before the chunk was read is
    # the client's own business. Either a 502 (head held) or a reset (head sent), never more.
    up, gw, client = await through(bad_for(CHUNKED_HEAD + chunks))
    client.writer.write(get("bad"))
    try:
        answer = await client.head()
    except ConnectionResetError:
        answer = None  # the reset came first (the kernel drops what was unread)
    if answer is not None and answer.status == 502:
        assert_refused(await client.body(answer))
        await assert_fresh_next(client, up)
        return
    if answer is not None:  # the head went out: the client connection must be reset
        assert answer.status == 200, answer.raw
        await assert_aborted(client)
    await assert_fresh_next(await connect(gw), up)


@pytest.mark.parametrize("chunks", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
async def test_a_bad_chunk_midway_resets_the_client(through, connect, chunks):
    # The head and a first chunk reach the client; then the bad chunk: its connection is
    # reset, never ended as if the body were whole.
    client_has_it = asyncio.Event()
    up, gw, client = await through(
        bad_in_two(CHUNKED_HEAD + b"6\r\nfirst-\r\n", client_has_it, chunks)
    )
    client.writer.write(get("bad"))
    answer = await client.head()
    assert answer.status == 200, answer.raw
    await client.until(b"first-")
    client_has_it.set()
    await assert_aborted(client)
    await assert_fresh_next(await connect(gw), up)


@pytest.mark.parametrize(
    "chunks",
    [
        b"5;name=value\r\nhello\r\n0\r\n\r\n",
        b"5;name\r\nhello\r\n0\r\n\r\n",
        b'5;name="quoted value"\r\nhello\r\n0\r\n\r\n',
        b"5;a=1;b=2\r\nhello\r\n0;last=yes\r\n\r\n",
        b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
        b"00005\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
    ],
    ids=["ext", "ext-no-value", "ext-quoted", "exts", "two-chunks", "zeros", "trailer"],
)
async def test_valid_chunked_bodies_pass_and_the_connection_is_reused(through, chunks):
    # Not here: "5 ;name=value". RFC 9112 7.1.1 allows BWS before the ';', but strict llhttp
    # refuses it as it refuses "5 " (which is invalid): either answer is safe.
    up, _, client = await through(bad_for(CHUNKED_HEAD + chunks, path=b"/city/good"))
    answer = await client.ask(get("good"))
    assert answer.status == 200, answer.raw
    assert answer.body == b"hello"
    assert (await client.ask(get("next"))).body == b"GET /city/next"
    assert up.conns(b"/city/good") == up.conns(b"/city/next") == [1]  # a whole body: reused


# -- 4, 8: bytes past the end of a response ----------------------------------------------------

SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Echo: 1\r\n\r\nSMUGGLED"


@pytest.mark.parametrize(
    "extra", [SMUGGLED, b"EXTRA-BYTES-" + SMUGGLED], ids=["response", "bytes-and-response"]
)
@pytest.mark.parametrize(
    "order",
    [(False, True), (False, False), (True, True), (True, False)],
    ids=["same-write", "same-write-new-client", "after-the-answer", "after-new-client"],
)
async def test_bytes_past_content_length_never_answer_another_request(
    through, connect, extra, order
):
    # "hello" is the body; what follows it is no answer to anything. ``later``: it comes once
    # the answer was relayed, on what is then an idle connection; the second request comes on
    # the same client connection or on another one.
    later, same_client = order
    relayed = asyncio.Event()

    async def script(request: Received, conn: Conn) -> None:
        if request.target != b"/city/bad":
            await conn.send(echo(request))
        elif later:
            await conn.send(ok(b"hello", b"X-Echo: 1\r\n"))
            await asyncio.wait_for(relayed.wait(), WAIT)
            await conn.send(extra)
        else:
            await conn.send(ok(b"hello", b"X-Echo: 1\r\n") + extra)

    up, gw, client = await through(script)
    answer = await client.ask(get("bad"))
    assert answer.status == 200, answer.raw
    assert answer.body == b"hello"
    relayed.set()
    if later:
        await asyncio.sleep(0.05)  # the late bytes reach the gateway's idle connection first
    second = client if same_client else await connect(gw)
    answer = await second.ask(get("next"))
    # (The message says what failed: the answer, what the upstream received, the gateway's log.)
    assert answer.body == b"GET /city/next", (answer.raw, answer.body, up.story())
    assert b"SMUGGLED" not in client.seen + second.seen
    assert up.conns(b"/city/next") == [2]
    assert await up.closed(1)


@pytest.mark.parametrize("body", [b"hello", SMUGGLED], ids=["body", "a-response"])
async def test_a_body_sent_with_a_head_answer_is_never_the_next_answer(through, body):
    async def script(request: Received, conn: Conn) -> None:
        if request.method == b"HEAD":
            await conn.send(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Head: 1\r\n\r\n" % len(body) + body
            )
        else:
            await conn.send(echo(request))

    up, _, client = await through(script)
    answer = await client.ask(get("bad", "HEAD"), head=True)
    assert answer.status == 200, answer.raw
    assert answer.header("X-Head") == "1"
    assert answer.header("Content-Length") == str(len(body))
    answer = await client.ask(get("next"))
    assert answer.status == 200, answer.raw
    assert answer.body == b"GET /city/next"
    assert client.seen.count(b"HTTP/1.1 ") == 2  # nothing between the two answers
    assert up.conns(b"/city/next") == [2]
    assert await up.closed(1)


async def test_a_head_answer_closes_its_connection(through):
    """A HEAD answer's connection is never pooled (client.py: whether a body follows it
    cannot be told, so none can reach the next request); the next request gets a new one."""

    async def script(request: Received, conn: Conn) -> None:
        if request.method == b"HEAD":
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        else:
            await conn.send(echo(request))

    up, _, client = await through(script)
    assert (await client.ask(get("x", "HEAD"), head=True)).header("Content-Length") == "5"
    assert (await client.ask(get("next"))).body == b"GET /city/next"
    assert up.conns(b"/city/next") == [2]
    assert await up.closed(1)


@pytest.mark.parametrize(
    ("head", "late", "reused"),
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 8\r\n", b"SMUGGLED", False),
        (b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n", SMUGGLED, False),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n", SMUGGLED, False),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n", b"", True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 8\r\n", b"", True),
    ],
    ids=["204-length", "204-chunked", "304-chunked", "204-length-0", "304-length"],
)
async def test_a_body_announced_with_204_or_304_never_answers_the_next_request(
    through, connect, head, late, reused
):
    # 204 and 304 have no body, whatever their head says; a body that one announced and
    # sends a moment later (once the answer was relayed, the connection back in the pool)
    # must not be the next request's answer: such a connection is closed. A 304's
    # Content-Length (the validated representation's) announces nothing: pooled.
    relayed = asyncio.Event()
    up, gw, client = await through(bad_in_two(head + b"X-Echo: 1\r\n\r\n", relayed, late))
    answer = await client.ask(get("bad"), head=True)
    assert answer.status in (204, 304), answer.raw
    assert answer.body == b""
    second = await connect(gw)
    second.writer.write(get("next"))  # on its way while the late bytes are
    relayed.set()
    answer = await second.response()
    assert answer.body == b"GET /city/next", (answer.raw, answer.body, up.story())
    assert b"SMUGGLED" not in client.seen + second.seen
    assert up.conns(b"/city/next") == ([1] if reused else [2])
    if not reused:
        assert await up.closed(1)


# -- 5, 6: informational answers ---------------------------------------------------------------

FINAL = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal"


@pytest.mark.parametrize(
    "interim",
    [
        [b"HTTP/1.1 100 Continue\r\n\r\n"],
        [b"HTTP/1.1 102 Processing\r\n\r\n"],
        [
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n"
            b"Link: </app.js>; rel=preload; as=script\r\n\r\n"
        ],
        [
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 102 Processing\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
        ],
    ],
    ids=["100", "102", "103", "several"],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "own-writes"])
async def test_informational_answers_before_the_final_one(through, interim, split):
    async def script(request: Received, conn: Conn) -> None:
        if request.target != b"/city/bad":
            await conn.send(echo(request))
        elif split:
            await conn.send(*interim, FINAL)
        else:
            await conn.send(b"".join(interim) + FINAL)

    _, _, client = await through(script)
    answer = await client.ask(get("bad"))
    assert answer.status == 201, answer.raw
    assert answer.header("X-Final") == "yes"
    assert answer.header("Link") is None  # the 103's fields are not the final answer's
    assert answer.body == b"final"
    assert (await client.ask(get("next"))).body == b"GET /city/next"


@pytest.mark.parametrize(
    "after",
    [b"", b"\x81\x05hello", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Echo: 1\r\n\r\nok"],
    ids=["nothing", "frames", "a-response"],
)
async def test_101_to_a_plain_request_is_502_and_the_connection_dropped(through, after):
    await refused_then_fresh(
        through,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"X-Echo: 1\r\n\r\n" + after,
    )


# -- 7: line endings and folding ---------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 5\r\nX-Echo: 1\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX-Echo: 1\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Echo: 1\r\n\nhello",
        b"HTTP/1.1 200 OK\nContent-Length: 5\nX-Echo: 1\n\nhello",
        b"HTTP/1.1 200 OK\r\nX-Echo: 1\rContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX-Echo: 1\r\n continued\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX-Echo: 1\r\n\tcontinued\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\n Content-Length: 5\r\nX-Echo: 1\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX-Echo: 1\r\nContent-Length: 5\r\n \r\n\r\nhello",
    ],
    ids=[
        "lf-status-line", "lf-header", "lf-end-of-head", "lf-only", "bare-cr",
        "fold-space", "fold-tab", "fold-first-line", "fold-empty",
    ],
)  # fmt: skip
async def test_bare_lf_bare_cr_and_obs_fold_are_502(through, answer):
    await refused_then_fresh(through, answer)


@pytest.mark.parametrize(
    "line",
    [
        b"X-Echo : 1\r\n",  # whitespace before the colon (RFC 9112 5.1: MUST reject)
        b"X-E\x01cho: 1\r\n",
        b"X Echo: 1\r\n",
        b": 1\r\nX-Echo: 1\r\n",
        b"X-Echo: 1\x00\r\n",
        b"X-Echo: a\x01b\r\n",
        b"X-Echo\r\n",
    ],
    ids=["space-before-colon", "ctl-in-name", "space-in-name", "empty-name", "nul-in-value",
         "ctl-in-value", "no-colon"],
)  # fmt: skip
async def test_an_invalid_header_line_is_502(through, line):
    await refused_then_fresh(
        through,
        b"HTTP/1.1 200 OK\r\n" + line + b"Content-Length: 5\r\n\r\nhello",
    )


# -- 9: a kept-alive connection closed under the next request ---------------------------------


# PUT's small body is buffered, so it can be sent again; POST and PATCH are not idempotent:
# never sent twice.
@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "PUT", "POST", "PATCH"])
async def test_a_pooled_connection_closed_under_a_request_is_retried_where_safe(through, method):
    body = b"small body" if method in ("PUT", "POST", "PATCH") else None
    retried = method not in ("POST", "PATCH")

    # Connection 1 answers its first request (kept alive) and closes on the second.
    up, _, client = await through(closes_on(2))
    assert (await client.ask(get("first"))).body == b"GET /city/first"
    answer = await client.ask(get("second", method, body=body), head=method == "HEAD")
    second = [(r.conn, r.method.decode(), r.body) for r in up.received[1:]]
    if retried:
        assert answer.status == 200, answer.raw
        if method != "HEAD":
            assert answer.body == f"{method} /city/second".encode()
        assert second == [(1, method, body or b""), (2, method, body or b"")]
    else:
        assert answer.status == 502, answer.raw
        assert orjson.loads(answer.body)["error"] == "upstream_disconnected"
        assert second == [(1, method, body or b"")]
    assert up.targets()[0] == b"/city/first"
    assert (await client.ask(get("next"))).body == b"GET /city/next"


async def test_answers_never_cross_between_requests_on_a_closing_upstream(through):
    # Every connection answers two requests and closes on the third, over and over: each
    # client request still gets its own answer.
    up, _, client = await through(closes_on(3))
    for i in range(12):
        answer = await client.ask(get(f"r{i}"))
        assert answer.body == f"GET /city/r{i}".encode()
    # Five connections closed under their third request (each retried on the next one).
    assert [len(c.served) for c in up.connections] == [3, 3, 3, 3, 3, 2]


# -- 10: pool hygiene --------------------------------------------------------------------------


async def test_concurrent_requests_never_share_a_connection(scripted, gateway, connect):
    n = 6
    arrived = asyncio.Event()

    async def script(request: Received, conn: Conn) -> None:
        if request.target.startswith(b"/city/c"):
            if len([r for r in up.received if r.target.startswith(b"/city/c")]) == n:
                arrived.set()
            with contextlib.suppress(TimeoutError):  # serialised requests: fail, not hang
                await asyncio.wait_for(arrived.wait(), 1.0)
        await conn.send(echo(request))

    up = await scripted(script)
    gw = await gateway(city(up.port))
    warm = await connect(gw)
    assert (await warm.ask(get("warm"))).body == b"GET /city/warm"  # one pooled connection
    clients = [await connect(gw) for _ in range(n)]
    answers = await asyncio.gather(*(c.ask(get(f"c{i}")) for i, c in enumerate(clients)))
    assert [a.body for a in answers] == [f"GET /city/c{i}".encode() for i in range(n)]
    conns = [r.conn for r in up.received if r.target.startswith(b"/city/c")]
    assert arrived.is_set(), up.received  # all n were in flight at once
    assert len(set(conns)) == n, conns


async def test_a_timed_out_connection_is_never_reused(through):
    # The late answer to the timed-out request must not become the next request's.
    async def script(request: Received, conn: Conn) -> None:
        if request.target == b"/city/bad":
            await asyncio.sleep(0.5)
            await conn.send(ok(b"LATE", b"X-Echo: 1\r\n"))
        else:
            await conn.send(echo(request))

    up, _, client = await through(script, ", timeouts: {response: 0.2}")
    answer = await client.ask(get("bad"))
    assert answer.status == 504, answer.raw
    assert orjson.loads(answer.body)["error"] == "upstream_timeout"
    await assert_fresh_next(client, up)
    assert b"LATE" not in client.seen


async def test_a_body_the_client_left_unread_closes_its_connection(scripted, gateway, connect):
    async def script(request: Received, conn: Conn) -> None:
        if request.target == b"/city/bad":
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\nX-Echo: 1\r\n\r\n")
            await conn.send(b"x" * 65536)
            await conn.hold()
        else:
            await conn.send(echo(request))

    up = await scripted(script)
    gw = await gateway(city(up.port))
    gone = await connect(gw)
    gone.writer.write(get("bad"))
    assert (await gone.head()).status == 200
    gone.close()  # before reading the body
    assert await up.closed(1)
    client = await connect(gw)
    await assert_fresh_next(client, up)
    assert (await client.ask(get("next"))).body == b"GET /city/next"


async def test_a_5xx_discarded_for_a_retry_closes_its_connection(scripted, gateway, connect):
    # The preferred node answers 503 with a body it has not finished: the gateway retries on
    # the other node, and never sends a request down the connection with the unread rest.
    async def preferred(request: Received, conn: Conn) -> None:
        if request.conn == 1:
            await conn.send(b"HTTP/1.1 503 Busy\r\nContent-Length: 100000\r\n\r\n" + b"b" * 1000)
            await conn.hold()
        else:
            await conn.send(echo(request))

    async def fallback(request: Received, conn: Conn) -> None:
        await conn.send(ok(b"fallback " + request.target))

    noda2 = await scripted(preferred, NODA2)
    noda1 = await scripted(fallback, NODA1)
    body = f"{{port: {noda2.port}, nodes: [noda2, {{node: noda1, port: {noda1.port}}}]}}"
    gw = await gateway(routes({"search": body}, noda1=NODA1, noda2=NODA2))
    client = await connect(gw)
    answer = await client.ask(b"GET /api/search/one HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.body == b"fallback /search/one"
    assert await noda2.closed(1)
    assert noda2.received[0].target == b"/search/one"
    answer = await client.ask(b"GET /api/search/two HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.body == b"GET /search/two"  # the preferred node again, on a new connection
    assert noda2.conns(b"/search/two") == [2]


@pytest.mark.parametrize(
    "connection", [b"Connection: close\r\n", b"Connection: keep-alive, close\r\n"]
)
async def test_connection_close_in_an_answer_is_honoured(through, connection):
    # The upstream says close but keeps the connection open: the gateway must close it.
    up, _, client = await through(bad_for(ok(b"done", b"X-Last: 1\r\n" + connection)))
    answer = await client.ask(get("bad"))
    assert answer.status == 200, answer.raw
    assert answer.body == b"done"
    await assert_fresh_next(client, up)


async def test_an_http_1_0_answer_is_not_kept_alive(through):
    up, _, client = await through(bad_for(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\ndone"))
    assert (await client.ask(get("bad"))).body == b"done"
    await assert_fresh_next(client, up)


async def test_an_answer_read_to_its_end_keeps_its_connection(through):
    # The control for the tests above: clean answers share one connection.
    up, _, client = await through(bad_for(b""))
    for i in range(5):
        assert (await client.ask(get(f"r{i}"))).body == f"GET /city/r{i}".encode()
    assert [r.conn for r in up.received] == [1] * 5


async def test_an_idle_pooled_connection_closes_after_the_keepalive_timeout(
    scripted, gateway, connect
):
    # Reused while fresh; never reused once idle for upstream_keepalive_timeout, and closed
    # by the gateway (the pool's sweep runs every second).
    up = await scripted(bad_for(b""))
    gw = await gateway(city(up.port) + "upstream_keepalive_timeout: 0.3\n")
    client = await connect(gw)
    assert (await client.ask(get("a"))).body == b"GET /city/a"
    assert (await client.ask(get("b"))).body == b"GET /city/b"
    await asyncio.sleep(0.4)  # past the timeout; the sweep (once a second) may not have run
    assert (await client.ask(get("c"))).body == b"GET /city/c"
    assert [r.conn for r in up.received] == [1, 1, 2]
    assert await up.closed(1)


# -- 11: truncation, close-delimited bodies, transfer codings, status lines, limits ------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Echo: 1\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Echo: 1\r\n\r",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 20",
        b"HTT",
    ],
    ids=["no-end", "half-end", "status-only", "status-no-crlf", "half-status", "half-version"],
)
async def test_an_unfinished_head_then_eof_is_502(through, answer):
    async def script(request: Received, conn: Conn) -> None:
        if request.target == b"/city/bad":
            await conn.send(answer)
            conn.close()
        else:
            await conn.send(echo(request))

    up, _, client = await through(script)
    assert_refused(await client.ask(get("bad")), ("upstream_bad_response", "upstream_disconnected"))
    assert (await client.ask(get("next"))).body == b"GET /city/next"
    assert not set(up.conns(b"/city/bad")) & set(up.conns(b"/city/next"))


@pytest.mark.parametrize(
    ("head", "part"),
    [
        (b"Content-Length: 10\r\n", b"01234"),
        (b"Transfer-Encoding: chunked\r\n", b"5\r\n01234\r\n"),
        (b"Transfer-Encoding: chunked\r\n", b"5\r\n01234\r\na\r\n012"),
    ],
    ids=["content-length", "chunked", "chunked-mid-chunk"],
)
async def test_a_body_cut_short_by_a_close_is_an_abort_for_the_client(through, head, part):
    client_has_it = asyncio.Event()

    async def script(request: Received, conn: Conn) -> None:
        await conn.send(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + part)
        await asyncio.wait_for(client_has_it.wait(), WAIT)
        conn.close()

    _, _, client = await through(script)
    client.writer.write(get("bad"))
    assert (await client.head()).status == 200
    await client.until(b"01234")
    client_has_it.set()
    await assert_aborted(client)
    assert b"56789" not in client.seen


async def test_a_body_delimited_by_close_is_relayed_whole(through):
    parts = [bytes([65 + i]) * 20000 for i in range(5)]

    async def script(request: Received, conn: Conn) -> None:
        await conn.send(b"HTTP/1.1 200 OK\r\nX-Echo: 1\r\n\r\n", *parts)
        conn.close()

    up, _, client = await through(script)
    answer = await client.ask(get("x"))
    assert answer.status == 200, answer.raw
    assert answer.body == b"".join(parts)
    assert len(up.received) == 1


@pytest.mark.parametrize(
    "coding",
    [
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked, gzip\r\n",
        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: x-unknown\r\n",
        b"Transfer-Encoding: identity\r\n",
        b"Transfer-Encoding: chunk\r\n",
        b"Transfer-Encoding: \r\n",
        b"Transfer-Encoding: \x0bchunked\r\n",
    ],
    ids=["gzip,chunked", "chunked,gzip", "gzip+chunked", "chunked+chunked", "chunked,chunked",
         "unknown", "identity", "chunk", "empty", "vt-chunked"],
)  # fmt: skip
async def test_a_transfer_coding_but_chunked_alone_is_502(through, coding):
    # The gateway removes the chunked coding and applies no other: a body under another
    # coding would reach the client undecoded and unlabelled.
    await refused_then_fresh(
        through, b"HTTP/1.1 200 OK\r\n" + coding + b"X-Echo: 1\r\n\r\n" + CHUNKED_HELLO
    )


@pytest.mark.parametrize(
    "status_line",
    [
        b"HTTP/1.1 abc OK",
        b"ICY 200 OK",
        b"HTTP/2 200",
        b"HTTP/2.0 200 OK",
        b"HTTP/1.2 200 OK",
        b"HTTP/0.9 200 OK",
        b"http/1.1 200 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 099 OK",
        b"HTTP/1.1 600 OK",
        b"HTTP/1.1  200 OK",
        b"HTTP/1.1 200 O\x01K",
        b"HTTP/1.1\t200 OK",
        b" HTTP/1.1 200 OK",
        b"200 OK",
    ],
    ids=["abc", "icy", "http2", "http2.0", "http1.2", "http0.9", "lowercase", "2000", "20",
         "099", "600", "two-spaces", "ctl-in-reason", "tab", "leading-space", "no-version"],
)  # fmt: skip
async def test_a_garbage_status_line_is_502(through, status_line):
    await refused_then_fresh(
        through, status_line + b"\r\nContent-Length: 5\r\nX-Echo: 1\r\n\r\nhello"
    )


@pytest.mark.parametrize(
    "fields",
    [
        b"X-Big: " + b"a" * 200 * 1024 + b"\r\n",
        b"".join(b"X-Field-%05d: %s\r\n" % (i, b"v" * 90) for i in range(2000)),
        b"".join(b"X-F%03d: v\r\n" % i for i in range(300)),  # 3.6 KiB, but 300 lines
    ],
    ids=["one-200k-field", "2000-fields", "300-short-fields"],
)
async def test_a_huge_header_section_is_a_quick_502(through, fields):
    loop = asyncio.get_running_loop()

    async def script(request: Received, conn: Conn) -> None:
        if request.target == b"/city/bad":
            with contextlib.suppress(ConnectionError):
                await conn.send(
                    b"HTTP/1.1 200 OK\r\nX-Echo: 1\r\n", fields, b"Content-Length: 0\r\n\r\n"
                )
            await conn.hold()
        else:
            await conn.send(echo(request))

    up, _, client = await through(script)
    started = loop.time()
    assert_refused(await client.ask(get("bad")))
    assert loop.time() - started < 1.0
    await assert_fresh_next(client, up)


@pytest.mark.parametrize(
    ("first", "more"),
    [
        (b"0\r\nX-Trailer: ", b"a" * 65536),  # one trailer field that never ends
        (b"0\r\n", b"X-Trailer: t\r\n" * 4096),  # trailer fields that never end
        (b"5;ext=", b"e" * 65536),  # a chunk extension that never ends
    ],
    ids=["endless-trailer-field", "endless-trailers", "endless-extension"],
)
async def test_framing_without_end_after_the_body_began_is_cut_at_the_head_limit(
    through, connect, first, more
):
    # After a first chunk, bytes that are no body bytes keep coming (the parser holds a
    # field's value whole, and nothing of it is body): the gateway stops reading them at
    # the head's 64 KiB bound, resets the client and closes the connection, instead of
    # holding what comes until the upstream stops.
    async def script(request: Received, conn: Conn) -> None:
        if request.target != b"/city/bad":
            await conn.send(echo(request))
            return
        await conn.send(CHUNKED_HEAD + b"6\r\nfirst-\r\n" + first)
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 4 MiB, unless the gateway closes the connection first
                await conn.send(more)
        await conn.hold()

    up, gw, client = await through(script)
    client.writer.write(get("bad"))
    answer = await client.head()
    assert answer.status == 200, answer.raw
    await assert_aborted(client)
    assert await up.closed(1)
    assert up.connections[0].stray == b""
    await assert_fresh_next(await connect(gw), up)
