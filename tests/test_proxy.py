"""End to end through the gateway to real upstreams: mapping, headers, bodies, errors."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from .helpers import NODA1, NODA2, RawHandler, canned, raw_exchange, routes, stalled


async def test_path_and_query_reach_the_upstream_byte_for_byte(upstream, gateway, client):
    # Byte for byte but the unreserved escape (%41 is "A", RFC 3986 6.2.2.2, decoded so that
    # routes see what the upstream does): other escapes keep their case, the query is whole.
    up = await upstream(NODA1)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    target = "/api/city/rooms/caf%C3%a9/%41b%20c?x=1&y=%2F&z=a+b&e=&e=2&w=%41"
    response = await raw_exchange(
        gw.port, f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    assert response.status == 200
    assert [s.raw_path for s in up.seen] == [
        "/city/rooms/caf%C3%a9/Ab%20c?x=1&y=%2F&z=a+b&e=&e=2&w=%41"
    ]


@pytest.mark.parametrize(
    ("prefix", "path", "expected"),
    [
        (None, "/api/city", "/city"),
        (None, "/api/city/", "/city/"),
        ('"/rooms"', "/api/city/general?a=b", "/rooms/general?a=b"),
        ('""', "/api/city", "/"),
        ('""', "/api/city/x/y", "/x/y"),
        (None, "/api/city/a//b", "/city/a/b"),  # slashes merged, as nginx's merge_slashes
        (None, "/api/city/.well-known/x", "/city/.well-known/x"),
        (None, "/api/city/x#fragment", "/city/x"),
    ],
)
async def test_http_prefix_mapping(upstream, gateway, prefix, path, expected):
    up = await upstream(NODA1)
    extra = f", http_prefix: {prefix}" if prefix is not None else ""
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]{extra}}}"}, noda1=NODA1))
    response = await raw_exchange(
        gw.port, f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    assert response.status == 200
    assert [s.raw_path for s in up.seen] == [expected]


@pytest.mark.parametrize(
    "path",
    ["/api/nope/x", "/api/", "/api", "/", "/city/x", "/API/city/x", "/api/City/x", "/apix/city"],
)
async def test_unknown_service_or_path_is_404_and_reaches_nobody(upstream, gateway, client, path):
    up = await upstream(NODA1)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    async with client.get(gw.url + path) as response:
        body = await response.json()
        assert response.status == 404
        assert response.headers["Server"] == "daarion-gateway"
        assert body["error"] == "not_found"
        assert body["request_id"] == response.headers["X-Request-ID"]
    assert up.seen == []


HOP_BY_HOP_REQUEST = (
    b"GET /api/city/h HTTP/1.1\r\n"
    b"Host: public.example\r\n"
    b"Connection: close, X-Hop-Secret\r\n"
    b"X-Hop-Secret: 1\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
    b"TE: trailers\r\n"
    b"Trailer: X-Checksum\r\n"
    b"Upgrade: h2c\r\n"
    b"X-Forwarded-For: 203.0.113.7\r\n"
    b"X-Real-IP: 198.51.100.1\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"Forwarded: for=198.51.100.1\r\n"
    b"X-End-To-End: kept\r\n"
    b"Authorization: Bearer abc\r\n"
    b"Cookie: a=1\r\n"
    b"\r\n"
)


async def test_request_hop_by_hop_headers_are_dropped_and_forwarding_headers_set(upstream, gateway):
    up = await upstream(NODA1)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    response = await raw_exchange(gw.port, HOP_BY_HOP_REQUEST)
    assert response.status == 200
    (seen,) = up.seen
    names = {name.lower() for name, _ in seen.headers}
    for hop in (
        "connection",
        "x-hop-secret",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
        "forwarded",
    ):
        assert hop not in names, hop
    assert seen.header("X-End-To-End") == "kept"
    assert seen.header("Authorization") == "Bearer abc"
    assert seen.header("Cookie") == "a=1"
    assert seen.header("Host") == f"{NODA1}:{up.port}"
    # The peer is no trusted proxy: its own X-Forwarded-For is not believed, nor passed on.
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Real-IP") == "127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == "public.example"
    assert seen.header("X-Request-ID") == response.header("X-Request-ID")


async def test_response_hop_by_hop_headers_are_dropped(raw_upstream, gateway):
    port = await raw_upstream(
        canned(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Length: 2\r\n"
            b"Connection: keep-alive, X-Upstream-Secret\r\n"
            b"X-Upstream-Secret: s\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Authenticate: Basic\r\n"
            b"Trailer: X-Sum\r\n"
            b"Upgrade: h2c\r\n"
            b"Set-Cookie: a=1\r\n"
            b"Set-Cookie: b=2\r\n"
            b"X-Kept: yes\r\n"
            b"\r\nok"
        )
    )
    gw = await gateway(routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1))
    response = await raw_exchange(
        gw.port, b"GET /api/city/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 200
    assert response.body == b"ok"
    names = [name.lower() for name, _ in response.headers]
    for hop in ("x-upstream-secret", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
        assert hop not in names, hop
    assert response.header("Connection") == "close"  # the gateway's own, for this client
    assert response.header("X-Kept") == "yes"
    assert response.header("Server") == "daarion-gateway"  # not aiohttp's, with its version
    assert [v for k, v in response.headers if k.lower() == "set-cookie"] == ["a=1", "b=2"]


async def test_request_id_is_made_kept_or_replaced(upstream, gateway, client):
    up = await upstream(NODA1)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    async with client.get(gw.url + "/api/city/a") as response:
        made = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    async with client.get(gw.url + "/api/city/b", headers={"X-Request-ID": "req-789.abc"}) as r:
        assert r.headers["X-Request-ID"] == "req-789.abc"
    for unsafe in ("a b", "x" * 129, "<script>", "a\tb"):
        async with client.get(gw.url + "/api/city/c", headers={"X-Request-ID": unsafe}) as r:
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])
    assert [s.header("X-Request-ID") for s in up.seen][:2] == [made, "req-789.abc"]
    logged = [line["request_id"] for line in gw.log_lines() if line["message"] == "request"]
    assert logged[:2] == [made, "req-789.abc"]


async def test_methods_status_and_bodies_pass_through(upstream, gateway, client):
    async def handler(request: web.Request) -> web.StreamResponse:
        body = up.seen[-1].body
        return web.Response(
            status=201, reason="Made", body=body[::-1], headers={"X-M": request.method}
        )

    up = await upstream(NODA1, handler)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"):
        async with client.request(method, gw.url + "/api/city/m", data=b"abc") as response:
            assert response.status == 201
            assert response.reason == "Made"
            assert response.headers["X-M"] == method
            assert await response.read() == b"cba"
    assert [s.method for s in up.seen] == ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"]


async def test_head_and_no_content_answers_have_no_body(raw_upstream, gateway):
    port = await raw_upstream(
        canned(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n")
    )
    gw = await gateway(routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1))
    response = await raw_exchange(
        gw.port, b"HEAD /api/city/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 200
    assert response.header("Content-Length") == "1234"
    assert response.body == b""


TYPED = b"Content-Type: text/x-odd\r\n"
CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"
ANSWERS = [
    # (the upstream's answer, the Content-Type the client should see), by how it is relayed:
    # whole (came with its head), a length streamed, chunked, delimited by the close
    pytest.param(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"), [], id="whole"),
    pytest.param(
        canned(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hello"), [], id="length"
    ),
    pytest.param(
        canned(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", CHUNKED_HELLO),
        [],
        id="chunked",
    ),
    pytest.param(
        canned(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"hello"), [], id="to-close"
    ),
    pytest.param(
        canned(b"HTTP/1.1 200 OK\r\n" + TYPED + b"Content-Length: 5\r\n\r\nhello"),
        ["text/x-odd"],
        id="whole-typed",
    ),
    pytest.param(
        canned(
            b"HTTP/1.1 200 OK\r\n" + TYPED + b"Transfer-Encoding: chunked\r\n\r\n", CHUNKED_HELLO
        ),
        ["text/x-odd"],
        id="chunked-typed",
    ),
]


@pytest.mark.parametrize(("answer", "types"), ANSWERS)
async def test_a_content_type_reaches_the_client_as_the_upstream_sent_it_or_not_at_all(
    raw_upstream, gateway, client, answer: RawHandler, types: list[str]
) -> None:
    """As nginx does: a body the upstream gave no type gets none on its way (aiohttp's
    writer would add application/octet-stream, which keeps a client from sniffing one)."""
    port = await raw_upstream(answer)
    gw = await gateway(routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1))
    async with client.get(f"{gw.url}/api/city/x") as response:
        assert response.status == 200
        assert await response.read() == b"hello"
        assert response.headers.getall("Content-Type", []) == types


async def test_compressed_bodies_are_not_touched(upstream, gateway, client):
    packed = gzip.compress(b"hello " * 1000)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=packed, headers={"Content-Encoding": "gzip"})

    up = await upstream(NODA1, handler)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    async with client.get(gw.url + "/api/city/z", headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert await response.read() == packed
    assert up.seen[0].header("Accept-Encoding") == "gzip"


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_compressed_request_body_reaches_the_upstream_as_sent(
    raw_upstream, gateway, framing
):
    # aiohttp's server decompressed a gzip request body and the gateway forwarded the result
    # still labelled gzip: the upstream got plain bytes it would then fail to gunzip. (A raw
    # upstream: an aiohttp one would decompress it again itself.)
    packed = gzip.compress(b"hello " * 1000)
    received = bytearray()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while len(received) < len(packed) and not received.endswith(b"0\r\n\r\n"):
            received.extend(await reader.read(65536) or b"")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    port = await raw_upstream(answer)
    gw = await gateway(routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1))
    if framing == "length":
        body = packed
        framed = f"Content-Length: {len(packed)}\r\n".encode()
    else:
        body = f"{len(packed):x}\r\n".encode() + packed + b"\r\n0\r\n\r\n"
        framed = b"Transfer-Encoding: chunked\r\n"
    head = b"POST /api/city/z HTTP/1.1\r\nHost: a\r\nContent-Encoding: gzip\r\n"
    answered = await raw_exchange(
        gw.port, head + b"Connection: close\r\n" + framed + b"\r\n" + body
    )
    assert answered.status == 200
    assert bytes(received) == packed or dechunked(bytes(received)) == packed


def dechunked(data: bytes) -> bytes:
    """A chunked body's bytes (no extensions, no trailers)."""
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


async def test_gateway_adds_no_client_headers_of_its_own(upstream, gateway):
    up = await upstream(NODA1)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    await raw_exchange(gw.port, b"GET /api/city/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    names = {name.lower() for name, _ in up.seen[0].headers}
    assert names == {
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "x-request-id",
        "traceparent",  # W3C Trace Context: the gateway's span is the upstream's parent
    }


async def test_expect_100_continue_is_answered_by_the_gateway(upstream, gateway):
    up = await upstream(NODA1)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"PUT /api/city/e HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert rest.startswith(b"HTTP/1.1 200")
    assert up.seen[0].body == b"hello"
    assert up.seen[0].header("Expect") is None


# -- streaming -------------------------------------------------------------------------------


async def test_response_body_is_streamed_not_buffered(upstream, gateway, client):
    first_seen = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        await asyncio.wait_for(first_seen.wait(), 5)  # only continues once the client has it
        await response.write(b"second")
        return response

    up = await upstream(NODA1, handler)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    async with client.get(gw.url + "/api/city/s") as response:
        assert await response.content.readexactly(5) == b"first"
        first_seen.set()
        assert await response.read() == b"second"


async def test_request_body_is_streamed_not_buffered(upstream, gateway, client):
    first_arrived = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        assert await request.content.readexactly(5) == b"first"
        first_arrived.set()
        rest = await request.content.read()
        return web.Response(text=f"got {rest.decode()}")

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.wait_for(first_arrived.wait(), 5)  # the upstream has it before we go on
        yield b"second"

    up = await upstream(NODA1, handler, record_body=False)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    async with client.post(gw.url + "/api/city/u", data=body()) as response:
        assert await response.text() == "got second"


async def test_slow_client_pushes_back_on_a_fast_upstream(upstream, gateway):
    written = 0
    chunk = b"x" * 65536

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal written
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(64 * 1024):  # up to 4 GiB: far more than any buffer
                await response.write(chunk)
                written += len(chunk)
        except ConnectionError:
            pass
        return response

    up = await upstream(NODA1, handler)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /api/city/big HTTP/1.1\r\nHost: a\r\n\r\n")
    await reader.readexactly(1024)  # the response started; now stop reading
    plateau = await stalled(lambda: written)
    assert plateau < 64 * 1024 * 1024, f"{plateau} bytes buffered for a client that reads nothing"
    writer.close()


async def test_slow_upstream_pushes_back_on_a_fast_client(upstream, gateway):
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(release.wait(), 10)
        total = 0
        async for data in request.content.iter_any():
            total += len(data)
        return web.Response(text=str(total))

    up = await upstream(NODA1, handler, record_body=False)
    # No body size limit here: the 1 GiB upload is what must be pushed back on.
    service = f"{{port: {up.port}, nodes: [noda1], limits: {{client_max_body_size: 0}}}}"
    gw = await gateway(routes({"city": service}, noda1=NODA1))
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    size = 1024 * 1024 * 1024
    writer.write(
        f"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n".encode()
    )
    sent = 0
    chunk = b"y" * 65536

    async def push() -> None:
        nonlocal sent
        while True:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(push(), 1.5)
    assert sent < 64 * 1024 * 1024, f"{sent} bytes accepted while the upstream read nothing"
    writer.close()
    release.set()


# -- errors ----------------------------------------------------------------------------------


async def test_refused_upstream_is_502(gateway, client):
    # Bind and close a socket to get a port where nothing listens.
    server = await asyncio.start_server(lambda r, w: None, NODA1, 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    gw = await gateway(routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1))
    async with client.get(gw.url + "/api/city/x") as response:
        body = await response.json()
    assert response.status == 502
    assert body == {
        "error": "upstream_unavailable",
        "message": body["message"],
        "request_id": response.headers["X-Request-ID"],
    }


async def test_silent_upstream_is_504_at_its_response_timeout(raw_upstream, gateway, client):
    async def respond(reader, writer):
        await asyncio.sleep(30)

    port = await raw_upstream(respond)
    gw = await gateway(
        routes(
            {"city": f"{{port: {port}, nodes: [noda1], timeouts: {{response: 0.3}}}}"}, noda1=NODA1
        )
    )
    async with client.get(gw.url + "/api/city/slow") as response:
        assert response.status == 504
        assert (await response.json())["error"] == "upstream_timeout"


def timed_out_at(port: int, seconds: float) -> str:
    return routes(
        {"city": f"{{port: {port}, nodes: [noda1], timeouts: {{response: {seconds}}}}}"},
        noda1=NODA1,
    )


async def test_a_client_slow_to_send_its_body_is_not_an_upstream_timeout(upstream, gateway):
    # A streamed body (over 64 KiB) that pauses for twice the response timeout: the upstream
    # waits on the gateway, which waits on the client; nobody's fault but the client's, who
    # is within its body timeout.
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text=str(len(await request.read())))

    up = await upstream(NODA1, handler, record_body=False)
    gw = await gateway(timed_out_at(up.port, 0.3))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    size = 200_000
    writer.write(
        f"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n".encode()
        + b"x" * (size // 2)
    )
    await writer.drain()
    await asyncio.sleep(0.7)
    writer.write(b"x" * (size - size // 2))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert await reader.readexactly(len(str(size))) == str(size).encode()
    writer.close()


async def test_a_client_slow_to_read_the_answer_is_not_an_upstream_timeout(upstream, gateway):
    # The client stops reading a big answer for twice the response timeout: the gateway
    # stops reading from the upstream meanwhile, which is no stall of the upstream's.
    size = 64 * 1024 * 1024  # far more than the sockets' buffers hold

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"z" * size)

    up = await upstream(NODA1, handler)
    gw = await gateway(timed_out_at(up.port, 0.3))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /api/city/big HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 "), head
    await asyncio.sleep(0.8)
    body = await asyncio.wait_for(reader.readexactly(size), 10)
    assert body == b"z" * size
    writer.close()


async def test_an_upstream_that_stops_taking_the_body_is_504_at_its_timeout(raw_upstream, gateway):
    # The upstream reads the head and then nothing: the gateway's writes stall, and after
    # the response timeout the client gets 504 (not a wait for ever).
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    port = await raw_upstream(respond)
    gw = await gateway(
        routes(
            {
                "city": f"{{port: {port}, nodes: [noda1], timeouts: {{response: 0.5}}, "
                "limits: {client_max_body_size: 0}}"
            },
            noda1=NODA1,
        )
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    size = 256 * 1024 * 1024
    writer.write(
        f"POST /api/city/up HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n".encode()
    )

    async def push() -> None:
        chunk = b"y" * 65536
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(chunk)
                await writer.drain()

    pushing = asyncio.create_task(push())
    started = asyncio.get_running_loop().time()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    waited = asyncio.get_running_loop().time() - started
    pushing.cancel()
    assert head.startswith(b"HTTP/1.1 504 "), head
    assert 0.4 < waited < 3, waited
    writer.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    ],
)
async def test_invalid_upstream_response_is_502_not_400(raw_upstream, gateway, client, garbage):
    port = await raw_upstream(canned(garbage))
    gw = await gateway(routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1))
    async with client.get(gw.url + "/api/city/x") as response:
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_bad_response"


async def test_upstream_closing_before_answering_is_502(raw_upstream, gateway, client):
    async def respond(reader, writer):
        return  # close without a byte

    port = await raw_upstream(respond)
    gw = await gateway(routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1))
    async with client.get(gw.url + "/api/city/x") as response:
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_disconnected"


async def test_upstream_dying_mid_body_aborts_the_client(raw_upstream, gateway, client):
    port = await raw_upstream(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 50))
    gw = await gateway(routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1))
    async with client.get(gw.url + "/api/city/x") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_truncated_chunked_body_resets_a_read_to_close_client(raw_upstream, gateway):
    port = await raw_upstream(
        canned(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    )
    gw = await gateway(routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    # HTTP/1.0: the body ends when the connection closes, so a clean close would lie.
    writer.write(b"GET /api/city/x HTTP/1.0\r\nHost: a\r\n\r\n")
    received = b""

    async def read_all() -> None:
        nonlocal received
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            received += chunk

    with pytest.raises(ConnectionResetError):
        await read_all()
    assert received.startswith(b"HTTP/1.0 200")
    assert received.endswith(b"hello")
    writer.close()
    lines = [line for line in gw.log_lines() if line["message"] == "request"]
    assert lines[-1]["error"] == "upstream_aborted"


async def test_one_stalled_service_does_not_starve_another(upstream, gateway, client):
    stall = asyncio.Event()

    async def stuck(request: web.Request) -> web.StreamResponse:
        await stall.wait()
        return web.Response(text="late")

    slow = await upstream(NODA1, stuck)
    fast = await upstream(NODA2)
    gw = await gateway(
        routes(
            {
                "slow": f"{{port: {slow.port}, nodes: [noda1], max_connections: 2, "
                "timeouts: {connect: 0.5}}",
                "fast": f"{{port: {fast.port}, nodes: [noda2]}}",
            },
            noda1=NODA1,
            noda2=NODA2,
        )
    )

    async def get(path: str) -> int:
        async with client.get(gw.url + path) as response:
            await response.read()
            return int(response.status)

    stuck_requests = [asyncio.create_task(get("/api/slow/x")) for _ in range(4)]
    await asyncio.sleep(0.1)
    assert [await get("/api/fast/y") for _ in range(20)] == [200] * 20
    done, pending = await asyncio.wait(stuck_requests, timeout=2)
    assert sorted(t.result() for t in done) == [503, 503]  # no slot within the connect timeout
    stall.set()
    assert sorted([await t for t in pending]) == [200, 200]


async def test_client_leaving_frees_the_upstream_slot(upstream, gateway, client):
    cancelled = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/hang"):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return web.Response(text="ok")

    up = await upstream(NODA1, handler)
    gw = await gateway(
        routes({"city": f"{{port: {up.port}, nodes: [noda1], max_connections: 1}}"}, noda1=NODA1)
    )
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /api/city/hang HTTP/1.1\r\nHost: a\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()  # the client gives up
    await asyncio.wait_for(cancelled.wait(), 5)  # the upstream request is dropped too
    async with client.get(gw.url + "/api/city/next") as response:
        assert response.status == 200  # and the only slot is free again
    statuses = [line["status"] for line in gw.log_lines() if line["message"] == "request"]
    assert statuses[0] == 499


async def test_a_redirect_to_the_upstreams_own_address_gets_the_public_url(
    upstream, gateway, client
):
    async def slash(request: web.Request) -> web.StreamResponse:
        # As frameworks do: an absolute URL built from the Host the upstream was sent.
        own = f"http://{request.host}{request.path}/"
        raise web.HTTPMovedPermanently(own, headers={"Content-Location": own})

    up = await upstream(NODA1, slash)
    gw = await gateway(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    async with client.get(
        gw.url + "/api/city/rooms", allow_redirects=False, headers={"Host": "gw.example:8443"}
    ) as response:
        assert response.status == 301
        assert response.headers["Location"] == "http://gw.example:8443/api/city/rooms/"
        assert response.headers["Content-Location"] == "http://gw.example:8443/api/city/rooms/"
    assert up.seen[0].header("Host") == f"{NODA1}:{up.port}"  # what the upstream built it from


async def test_behind_a_trusted_proxy_the_host_it_was_asked_for_is_kept_and_used_in_redirects(
    upstream, gateway, client
):
    async def slash(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently(f"http://{request.host}{request.path}/")

    up = await upstream(NODA1, slash)
    config = routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1)
    gw = await gateway(config + "trusted_proxies: [127.0.0.0/8]\n")
    forwarded = {
        "Host": "inner.lan:8080",
        "X-Forwarded-Host": "public.example",
        "X-Forwarded-Proto": "https",
    }
    async with client.get(
        gw.url + "/api/city/rooms", allow_redirects=False, headers=forwarded
    ) as response:
        assert response.status == 301
        # The client used https://public.example: the proxy in front said so, both halves.
        assert response.headers["Location"] == "https://public.example/api/city/rooms/"
    assert up.seen[0].header("X-Forwarded-Host") == "public.example"
    assert up.seen[0].header("X-Forwarded-Proto") == "https"
