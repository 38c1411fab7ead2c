"""WebSocket sessions through the gateway to real aiohttp WebSocket upstreams (echo and
broadcast rooms, like the city service) on 127.0.0.2 and 127.0.0.3."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from gateway.websocket.session import KEEPALIVE

from .helpers import (
    CLOSE_WAIT,
    NODA1,
    NODA2,
    RunningGateway,
    frame,
    raw_exchange,
    routes,
    stalled,
    tcp_sockets,
)


@dataclass
class WsUpstream:
    """What a WebSocket upstream saw."""

    handshakes: list[dict[str, str]] = field(default_factory=list)
    pings: list[bytes] = field(default_factory=list)
    closes: list[tuple[int | None, str]] = field(default_factory=list)
    rooms: dict[str, set[web.WebSocketResponse]] = field(default_factory=dict)
    ended: asyncio.Event = field(default_factory=asyncio.Event)


def ws_app(seen: WsUpstream, node: str) -> web.Application:
    async def room(request: web.Request) -> web.StreamResponse:
        """Echo and broadcast to the room, like the city service's rooms."""
        seen.handshakes.append(dict(request.headers))
        if request.match_info["room"] == "forbidden":
            return web.Response(status=403, text="no")
        ws = web.WebSocketResponse(protocols=("v2.chat", "v1.chat"), autoping=False)
        await ws.prepare(request)
        members = seen.rooms.setdefault(request.match_info["room"], set())
        members.add(ws)
        await ws.send_str(f"hello from {node}")
        try:
            async for msg in ws:
                if msg.type is WSMsgType.PING:
                    seen.pings.append(msg.data)
                    await ws.pong(msg.data)
                elif msg.type is WSMsgType.TEXT and msg.data.startswith("close:"):
                    _, code, reason = msg.data.split(":", 2)
                    await ws.close(code=int(code), message=reason.encode())
                elif msg.type is WSMsgType.TEXT and msg.data == "die":
                    assert request.transport is not None
                    request.transport.abort()  # the service crashes mid-session
                elif msg.type is WSMsgType.TEXT and msg.data == "ping me":
                    await ws.ping(b"from-upstream")
                elif msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    for member in list(members):
                        await member.send_frame(
                            msg.data if isinstance(msg.data, bytes) else msg.data.encode(),
                            msg.type,
                        )
        finally:
            members.discard(ws)
            seen.closes.append((ws.close_code, ""))
            seen.ended.set()
        return ws

    async def health(request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "healthy"})

    app = web.Application()
    app.router.add_get("/ws/city/rooms/{room}", room)
    app.router.add_get("/health", health)
    return app


@pytest.fixture
async def ws_upstream():
    runners = []

    async def start(host: str, node: str) -> tuple[WsUpstream, int]:
        seen = WsUpstream()
        runner = web.AppRunner(ws_app(seen, node), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        runners.append(runner)
        return seen, runner.addresses[0][1]

    yield start
    for runner in runners:
        await runner.cleanup()


def city(port: int, extra: str = "", nodes: str = "[noda1]") -> str:
    return routes(
        {"city": f"{{port: {port}, nodes: {nodes}, websocket: true{extra}}}"},
        noda1=NODA1,
        noda2=NODA2,
    )


HANDSHAKE = (
    b"GET /ws/city/rooms/general HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)


async def raw_handshake(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket session opened by hand: a client that can vanish, or stop reading."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HANDSHAKE + b"\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    return reader, writer


async def logged(gw, predicate, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The log lines matching ``predicate``, once there is at least one (a session's line is
    written when its handler ends, a moment after the client saw the close)."""
    deadline = time.monotonic() + timeout
    while not (lines := [line for line in gw.log_lines() if predicate(line)]):
        assert time.monotonic() < deadline, "no such log line"
        await asyncio.sleep(0.02)
    return lines


async def open_ws(
    client: aiohttp.ClientSession,
    gw: RunningGateway,
    path: str = "/ws/city/rooms/general",
    **kwargs: Any,
) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    ws = await client.ws_connect(gw.url + path, **kwargs)
    hello = await ws.receive(timeout=5)
    assert hello.type is WSMsgType.TEXT
    return ws, hello.data


async def test_frames_relay_both_ways_in_order_and_byte_exact(ws_upstream, gateway, client):
    _, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    ws, hello = await open_ws(client, gw)
    assert hello == "hello from noda1"
    rng = random.Random(5)
    sent: list[str | bytes] = [
        os.urandom(rng.randint(0, 2048)) if i % 2 else "ü" * rng.randint(0, 300) + str(i)
        for i in range(10_000)
    ]

    async def writer() -> None:
        for message in sent:
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            else:
                await ws.send_str(message)

    async def reader() -> list[str | bytes]:
        got: list[str | bytes] = []
        while len(got) < len(sent):
            msg = await ws.receive(timeout=10)
            got.append(msg.data)
        return got

    _, received = await asyncio.gather(writer(), reader())
    assert received == sent
    assert [type(m) for m in received] == [type(m) for m in sent]
    await ws.close()
    lines = await logged(gw, lambda line: line.get("status") == 101)
    assert len(lines) == 1
    summary = lines[0]["websocket"]
    assert summary["messages_up"] == 10_000
    assert summary["messages_down"] == 10_001  # with the upstream's hello
    assert lines[0]["route"] == "city"


async def test_upstream_broadcasts_reach_every_member(ws_upstream, gateway, client):
    _, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    first, _ = await open_ws(client, gw, "/ws/city/rooms/lobby")
    second, _ = await open_ws(client, gw, "/ws/city/rooms/lobby")
    await first.send_str("hi all")
    assert (await first.receive(timeout=5)).data == "hi all"
    assert (await second.receive(timeout=5)).data == "hi all"
    await first.close()
    await second.close()


async def test_handshake_forwards_subprotocol_cookies_auth_and_request_id(
    ws_upstream, gateway, client
):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    ws, _ = await open_ws(
        client,
        gw,
        protocols=("v1.chat", "v2.chat"),
        headers={"Cookie": "s=1", "Authorization": "Bearer t", "X-Request-ID": "ws-1"},
    )
    assert ws.protocol == "v1.chat"  # the upstream's choice, passed back
    (handshake,) = seen.handshakes
    offered = [p.strip() for p in handshake["Sec-WebSocket-Protocol"].split(",")]
    assert offered == ["v1.chat", "v2.chat"]
    assert handshake["Cookie"] == "s=1"
    assert handshake["Authorization"] == "Bearer t"
    assert handshake["X-Request-ID"] == "ws-1"
    assert handshake["X-Forwarded-For"] == "127.0.0.1"
    assert handshake["Host"] == f"{NODA1}:{port}"
    await ws.close()


async def test_close_codes_and_reasons_are_relayed_both_ways(ws_upstream, gateway, client):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    ws, _ = await open_ws(client, gw)
    await ws.close(code=4001, message=b"bye now")
    assert ws.close_code == 1000  # the upstream's answer (aiohttp answers 1000) came back
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert seen.closes == [(4001, "")]

    seen.ended.clear()
    ws, _ = await open_ws(client, gw)
    await ws.send_str("close:4002:later")
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4002, "later")
    await ws.close()
    await asyncio.wait_for(seen.ended.wait(), 5)
    deadline = time.monotonic() + 5
    while len(await logged(gw, lambda line: line.get("status") == 101)) < 2:  # both ended
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    async with client.get(gw.url + "/metrics") as response:
        text = await response.text()
    assert 'gateway_websocket_sessions_closed_total{code="4xxx",service="city"} 2.0' in text
    assert 'gateway_websocket_sessions{service="city"} 0.0' in text
    assert 'http_requests_total{method="GET",service="city",status="101"} 2.0' in text
    assert 'http_request_duration_seconds_count{service="city"}' not in text  # not latencies


async def test_upstream_dying_mid_session_closes_the_client_with_1014(ws_upstream, gateway, client):
    _, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    ws, _ = await open_ws(client, gw)
    started = time.monotonic()
    await ws.send_str("die")
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE
    assert msg.data == 1014
    assert time.monotonic() - started < 1.0
    await ws.close()
    (line,) = await logged(gw, lambda line: line.get("status") == 101)
    assert line["websocket"]["ended_by"] == "upstream"


async def test_a_vanished_client_closes_the_upstream_leg(ws_upstream, gateway):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    _, writer = await raw_handshake(gw.port)
    writer.transport.abort()  # gone: no close frame, no FIN handshake
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert seen.closes == [(1001, "")]
    await asyncio.sleep(0.2)
    assert tcp_sockets(local_port=gw.port, state=CLOSE_WAIT) == 0  # no half-closed leftovers


async def test_refused_upgrade_is_a_plain_http_answer(ws_upstream, gateway, client):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(gw.url + "/ws/city/rooms/forbidden")
    assert refused.value.status == 403
    assert len(seen.handshakes) == 1
    # Bytes sent after the handshake never reach an upstream when it is refused.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        HANDSHAKE.replace(b"/general", b"/forbidden")
        + b"\r\n"
        + b"\x81\x85\x00\x00\x00\x00hello"  # an early (masked) text frame
        b"GET /api/city/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 403")
    assert len(seen.handshakes) == 2


async def test_oversized_message_closes_the_session_with_1009(ws_upstream, gateway, client):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port, ", ws_max_message: 1024"))
    ws, _ = await open_ws(client, gw)
    await ws.send_bytes(b"x" * 1000)
    assert len((await ws.receive(timeout=5)).data) == 1000
    await ws.send_bytes(b"x" * 2000)
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert seen.closes == [(1009, "")]


async def test_origins_outside_the_list_are_refused_before_any_upstream(
    ws_upstream, gateway, client
):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port, ", ws_origins: [https://app.daarion.city]"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(
            gw.url + "/ws/city/rooms/general", headers={"Origin": "https://evil.example"}
        )
    assert refused.value.status == 403
    assert seen.handshakes == []
    ws, _ = await open_ws(client, gw, headers={"Origin": "https://app.daarion.city"})
    await ws.close()


async def test_handshake_fails_over_to_the_next_node(ws_upstream, gateway, client):
    _, port = await ws_upstream(NODA1, "noda1")
    dead = _dead_port(NODA2)
    gw = await gateway(city(dead, nodes=f"[noda2, {{node: noda1, port: {port}}}]"))
    ws, hello = await open_ws(client, gw)
    assert hello == "hello from noda1"
    await ws.close()


def _dead_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def test_no_reachable_node_is_502(gateway, client):
    gw = await gateway(city(_dead_port(NODA1)))
    with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
        await client.ws_connect(gw.url + "/ws/city/rooms/general")
    assert failed.value.status == 502


async def test_pings_flow_both_ways_with_their_payloads(ws_upstream, gateway, client):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    ws, _ = await open_ws(client, gw, autoping=False)
    await ws.ping(b"client-ping")
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.PONG, b"client-ping")
    assert seen.pings == [b"client-ping"]
    await ws.send_str("ping me")
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.PING, b"from-upstream")
    await ws.close()


async def test_silent_legs_are_pinged_and_dead_peers_dropped(ws_upstream, gateway):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port, ", ws_ping_interval: 0.3"))
    _, writer = await raw_handshake(gw.port)
    started = time.monotonic()
    # This client never answers pings: the gateway must give up on it within 2 intervals.
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert time.monotonic() - started < 0.6 + 0.3
    writer.close()
    assert KEEPALIVE in seen.pings  # the upstream leg was pinged by the gateway too


async def test_idle_sessions_are_closed_when_configured(ws_upstream, gateway, client):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port, ", ws_idle_timeout: 0.5"))
    ws, _ = await open_ws(client, gw)
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
    await asyncio.wait_for(seen.ended.wait(), 5)


async def test_shutdown_sends_1001_to_both_legs(ws_upstream, gateway, client):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    ws, _ = await open_ws(client, gw)
    stopping = asyncio.create_task(gw.gateway.stop())
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
    await ws.close()
    await asyncio.wait_for(stopping, 10)
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert seen.closes == [(1001, "")]


async def test_handshakes_count_toward_the_rate_limit(ws_upstream, gateway, client):
    _, port = await ws_upstream(NODA1, "noda1")
    text = city(port) + "rate_limits: {z: {rate: 1r/m, burst: 1}}\ndefault_rate_limit: z\n"
    gw = await gateway(text)
    first, _ = await open_ws(client, gw)
    second, _ = await open_ws(client, gw)
    with pytest.raises(aiohttp.WSServerHandshakeError) as limited:
        await client.ws_connect(gw.url + "/ws/city/rooms/general")
    assert limited.value.status == 429
    await first.close()
    await second.close()


async def test_not_a_websocket_route(ws_upstream, gateway, client):
    _, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(
        routes({"agents": f"{{port: {port}, nodes: [noda1]}}", "city": f"{{port: {port}, "
                "nodes: [noda1], websocket: true}"}, noda1=NODA1)
    )  # fmt: skip
    async with client.get(gw.url + "/ws/agents/events") as response:
        assert response.status == 404
    async with client.get(gw.url + "/ws/city/rooms/general") as response:
        assert response.status == 426  # a WebSocket route, but no handshake


async def test_a_slow_reader_slows_the_writer_on_the_other_side(gateway):
    sent = 0

    async def flood(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        chunk = b"z" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(100_000):  # far more than any buffer: 6.5 GB
                await ws.send_bytes(chunk)
                sent += len(chunk)
        return ws

    app = web.Application()
    app.router.add_get("/ws/city/rooms/{room}", flood)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, NODA1, 0).start()
    try:
        gw = await gateway(city(runner.addresses[0][1]))
        reader, writer = await raw_handshake(gw.port)
        await reader.readexactly(65536)  # the flood started; this client now reads no more
        plateau = await stalled(lambda: sent)
        assert plateau < 32 * 1024 * 1024, f"{plateau} bytes in flight for one session"
        writer.close()
    finally:
        await runner.cleanup()


async def test_an_invalid_handshake_is_400_before_any_upstream(ws_upstream, gateway):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    response = await raw_exchange(
        gw.port,
        b"GET /ws/city/rooms/general HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 7\r\n\r\n",  # no key, old version
    )
    assert response.status == 400
    assert response.json()["error"] == "bad_handshake"
    assert seen.handshakes == []


async def test_a_handshake_with_a_body_is_400_before_any_upstream(ws_upstream, gateway):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    for framing, body in (
        (b"Content-Length: 6\r\n", b"\x81\x80abcd"),
        (b"Transfer-Encoding: chunked\r\n", b"6\r\n\x81\x80abcd\r\n0\r\n\r\n"),
    ):
        response = await raw_exchange(gw.port, HANDSHAKE + framing + b"\r\n" + body)
        assert response.status == 400
        assert response.json()["error"] == "bad_handshake"
    assert seen.handshakes == []  # else the upstream would read frames as the body


async def test_keepalive_pongs_stay_in_the_gateway(ws_upstream, gateway, client):
    _, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port, ", ws_ping_interval: 0.2"))
    ws, _ = await open_ws(client, gw, autoping=False)
    pings = 0
    end = time.monotonic() + 1.0  # five intervals of silence from this client
    while (left := end - time.monotonic()) > 0:
        try:
            msg = await ws.receive(timeout=left)
        except TimeoutError:
            break
        assert msg.type is not WSMsgType.PONG  # the upstream's keepalive pongs are not ours
        assert msg.type is WSMsgType.PING
        assert msg.data == KEEPALIVE
        pings += 1
        await ws.pong(msg.data)  # answered: the session lives on
    assert pings >= 3
    await ws.send_str("still here")
    while (msg := await ws.receive(timeout=5)).type is WSMsgType.PING:
        await ws.pong(msg.data)
    assert msg.data == "still here"
    await ws.close()


# -- the frame relay on raw sockets: what a client library would smooth over --------------------

from gateway.websocket.frames import close_payload, control_frame  # noqa: E402
from gateway.websocket.upstream import accept_key  # noqa: E402 - kept with the tests that use it


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked frame from the gateway: (opcode, payload)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(n)


async def test_frames_in_the_handshake_packet_and_split_into_bytes_relay_whole(
    ws_upstream, gateway
):
    _, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(HANDSHAKE + b"\r\n" + frame(0x1, b"early"))  # a frame in the same packet
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    assert await read_frame(reader) == (0x1, b"hello from noda1")
    assert await read_frame(reader) == (0x1, b"early")
    big = os.urandom(70_000)
    stream = frame(0x2, big[:3], fin=False) + frame(0x9, b"p") + frame(0x0, big[3:])
    for i in range(0, 200):  # the first 200 bytes one by one, then the rest
        writer.write(stream[i : i + 1])
        await writer.drain()
    writer.write(stream[200:])
    assert await read_frame(reader) == (0xA, b"p")  # the upstream's answer to the ping
    assert await read_frame(reader) == (0x2, big)  # the upstream got the message whole
    writer.close()


async def test_a_protocol_violation_closes_both_legs_with_1002(ws_upstream, gateway):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    reader, writer = await raw_handshake(gw.port)
    assert await read_frame(reader) == (0x1, b"hello from noda1")
    writer.write(frame(0x1, b"unmasked", masked=False))  # RFC 6455: a client must mask
    assert await read_frame(reader) == (0x8, close_payload(1002))
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert seen.closes == [(1002, "")]
    writer.write(frame(0x8, close_payload(1002)))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then the gateway hangs up
    writer.close()


async def test_close_codes_that_may_not_be_sent_never_reach_the_other_side(ws_upstream, gateway):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    reader, writer = await raw_handshake(gw.port)
    assert await read_frame(reader) == (0x1, b"hello from noda1")
    writer.write(frame(0x8, b""))  # a close without a code: the other side would see 1005
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert seen.closes == [(1000, "")]
    writer.close()

    seen.ended.clear()
    reader, writer = await raw_handshake(gw.port)
    assert await read_frame(reader) == (0x1, b"hello from noda1")
    writer.write(frame(0x8, close_payload(1005)))  # never valid in a frame
    assert await read_frame(reader) == (0x8, close_payload(1002))
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert seen.closes[-1] == (1002, "")
    writer.close()


async def upgrading_upstream(handler) -> tuple[asyncio.Server, int]:
    """A raw upstream that gets the request head and the accept key the gateway expects."""

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        key = next(
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("sec-websocket-key:")
        )
        try:
            await handler(reader, writer, accept_key(key))
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, NODA1, 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_101_with_a_wrong_accept_key_is_502(gateway, client):
    async def wrong(reader, writer, accept: str) -> None:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept[::-1].encode() + b"\r\n\r\n"
        )
        await reader.read()

    server, port = await upgrading_upstream(wrong)
    async with server:
        gw = await gateway(city(port))
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(gw.url + "/ws/city/rooms/general")
        assert refused.value.status == 502
        metrics = await (await client.get(gw.url + "/metrics")).text()
        assert 'gateway_upstream_errors_total{kind="protocol",service="city"} 1.0' in metrics


async def test_frames_that_come_with_the_upstreams_101_reach_the_client(gateway, client):
    async def eager(reader, writer, accept: str) -> None:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Set-Cookie: s=2\r\nSec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
            + control_frame(0x1, b"first", masked=False)
            + control_frame(0x8, close_payload(4004, b"bye"), masked=False)
        )  # fmt: skip
        await writer.drain()
        await reader.read()

    server, port = await upgrading_upstream(eager)
    async with server:
        gw = await gateway(city(port))
        ws = await client.ws_connect(gw.url + "/ws/city/rooms/general")
        assert ws._response.cookies["s"].value == "2"  # the 101's end-to-end headers too
        assert (await ws.receive(timeout=5)).data == "first"
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4004, "bye")
