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


@pytest.mark.parametrize(
    ("extra", "code"),
    [("", 1011), (", ws_upstream_gone_code: 1014", 1014)],
    ids=["default", "1014"],
)
async def test_upstream_dying_mid_session_closes_the_client_with_the_gone_code(
    ws_upstream, gateway, client, extra, code
):
    _, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port, extra))
    ws, _ = await open_ws(client, gw)
    started = time.monotonic()
    await ws.send_str("die")
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, code, "the upstream went away")
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
    start = b"GET /ws/city/rooms/general HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
    for rest in (
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 12\r\nSec-WebSocket-Key: "
        b"dGhlIHNhbXBsZSBub25jZQ==\r\n",  # a version the relay does not speak
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: a2V5\r\n",
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: !!!!\r\n",
        # obs-text in the key: aiohttp's check raised on it (a 500)
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: \xe9\xe9\r\n",
        b"Connection: keep-alive\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        b"dGhlIHNhbXBsZSBub25jZQ==\r\n",  # no Connection: upgrade
    ):
        response = await raw_exchange(gw.port, start + rest + b"\r\n")
        assert response.status == 400, rest
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


# -- extensions: permessage-deflate end to end ---------------------------------------------------

import zlib  # noqa: E402 - kept with the tests that use it

import websockets  # noqa: E402
from multidict import CIMultiDict  # noqa: E402
from websockets.extensions.permessage_deflate import (  # noqa: E402
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)

from gateway.websocket.frames import RSV1  # noqa: E402


@dataclass
class Tap:
    """A TCP relay in front of a port that keeps what went through each way."""

    port: int
    up: bytearray = field(default_factory=bytearray)  # toward the tapped port
    down: bytearray = field(default_factory=bytearray)

    def frames(self, direction: str) -> list[tuple[int, int, bool, int]]:
        """The frames after the HTTP head: (reserved bits, opcode, FIN, payload length)."""
        stream = bytes(self.up if direction == "up" else self.down)
        pos = stream.index(b"\r\n\r\n") + 4
        found = []
        while pos + 2 <= len(stream):
            b0, b1 = stream[pos], stream[pos + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                n, head = int.from_bytes(stream[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                n, head = int.from_bytes(stream[pos + 2 : pos + 10], "big"), 10
            head += 4 if b1 & 0x80 else 0
            found.append((b0 & 0x70, b0 & 0x0F, bool(b0 & 0x80), n))
            pos += head + n
        return found

    def header(self, direction: str, name: str) -> str | None:
        head = bytes(self.up if direction == "up" else self.down).split(b"\r\n\r\n")[0]
        for line in head.decode().split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


@pytest.fixture
async def tap():
    servers: list[asyncio.Server] = []

    async def start(host: str, port: int) -> Tap:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            target_reader, target_writer = await asyncio.open_connection(host, port)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, log: bytearray):
                with contextlib.suppress(ConnectionError):
                    while data := await src.read(65536):
                        log += data
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(
                pipe(reader, target_writer, seen.up), pipe(target_reader, writer, seen.down)
            )

        server = await asyncio.start_server(on_connect, host, 0)
        servers.append(server)
        seen = Tap(server.sockets[0].getsockname()[1])
        return seen

    yield start
    for server in servers:
        server.close()


def compressed_messages(frames: list[tuple[int, int, bool, int]]) -> list[bool]:
    """Per data message on the wire: whether its first frame carries RSV1 (and no frame of it
    carries another reserved bit, nor a continuation or control frame any)."""
    marks = []
    for rsv, opcode, _, _ in frames:
        if opcode in (0x1, 0x2):
            marks.append(rsv == RSV1)
        else:
            assert rsv == 0, "a reserved bit on a continuation or control frame"
    return marks


def json_like(size: int, rng: random.Random) -> str:
    """Text that compresses as chat traffic does: keys repeat, values vary."""
    parts: list[str] = []
    while sum(map(len, parts)) < size:
        parts.append(f'{{"user":"u{rng.randint(1, 999)}","room":"general","n":{len(parts)}}}')
    return "".join(parts)[:size]


SIZES = (0, 1, 125, 126, 1000, 65_535, 65_536, 300_000)


async def test_permessage_deflate_with_aiohttp_on_both_legs_stays_compressed(
    ws_upstream, gateway, client, tap
):
    seen, port = await ws_upstream(NODA1, "noda1")
    upstream_leg = await tap(NODA1, port)
    gw = await gateway(city(upstream_leg.port))
    client_leg = await tap("127.0.0.1", gw.port)
    ws = await client.ws_connect(
        f"http://127.0.0.1:{client_leg.port}/ws/city/rooms/general", compress=15
    )
    assert ws.compress == 15  # agreed with the upstream, through the gateway
    assert (await ws.receive(timeout=5)).data == "hello from noda1"
    rng = random.Random(7)
    sent: list[str | bytes] = []
    for size in SIZES:
        sent += [json_like(size, rng), os.urandom(size)]
    for message in sent:
        await (ws.send_str(message) if isinstance(message, str) else ws.send_bytes(message))
        assert (await ws.receive(timeout=5)).data == message
    await ws.close()
    await asyncio.wait_for(seen.ended.wait(), 5)
    # The offer went up as the client wrote it, the answer came back as the upstream wrote it.
    offer = client_leg.header("up", "Sec-WebSocket-Extensions")
    assert offer is not None
    assert "permessage-deflate" in offer
    assert seen.handshakes[0]["Sec-WebSocket-Extensions"] == offer
    answer = upstream_leg.header("down", "Sec-WebSocket-Extensions")
    assert answer is not None
    assert answer.startswith("permessage-deflate")
    assert client_leg.header("down", "Sec-WebSocket-Extensions") == answer
    for leg in (client_leg, upstream_leg):  # every message compressed, both ways, both legs
        assert compressed_messages(leg.frames("up")) == [True] * len(sent)
        assert compressed_messages(leg.frames("down")) == [True] * (len(sent) + 1)
    (line,) = await logged(gw, lambda line: line.get("status") == 101)
    # The log line counts the payload bytes that crossed: compressed ones.
    on_the_wire = sum(n for _, opcode, _, n in upstream_leg.frames("up") if opcode < 8)
    assert line["websocket"]["bytes_up"] == on_the_wire
    assert on_the_wire < sum(map(len, sent))


async def test_ws_max_message_counts_the_compressed_size(ws_upstream, gateway, client):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port, ", ws_max_message: 16384"))
    ws, _ = await open_ws(client, gw, compress=15)
    text = json_like(100_000, random.Random(1))  # ~12 KB compressed
    await ws.send_str(text)
    assert (await ws.receive(timeout=5)).data == text
    await ws.send_bytes(os.urandom(20_000))  # does not compress
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert seen.closes == [(1009, "")]


@dataclass
class WsLibUpstream:
    """A ``websockets`` service: the handshakes it saw; echoes, or sends a fragmented
    message when asked."""

    port: int
    requests: list[CIMultiDict[str]]


@pytest.fixture
async def websockets_upstream():
    servers = []

    async def start(**kwargs: Any) -> WsLibUpstream:
        requests: list[CIMultiDict[str]] = []

        async def handler(ws: Any) -> None:
            requests.append(CIMultiDict(ws.request.headers.raw_items()))
            async for message in ws:
                if message == "fragments please":
                    await ws.send(["frag-1 ", "frag-2 " * 500, "frag-3"])
                else:
                    await ws.send(message)

        server = await websockets.serve(handler, NODA1, 0, **kwargs)
        servers.append(server)
        return WsLibUpstream(server.sockets[0].getsockname()[1], requests)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_permessage_deflate_with_websockets_passes_parameters_and_fragments(
    websockets_upstream, gateway, tap
):
    service = await websockets_upstream(
        extensions=[ServerPerMessageDeflateFactory(server_max_window_bits=11)]
    )
    upstream_leg = await tap(NODA1, service.port)
    gw = await gateway(city(upstream_leg.port))
    offer = ClientPerMessageDeflateFactory(
        client_no_context_takeover=True, server_max_window_bits=11
    )
    async with websockets.connect(
        f"ws://127.0.0.1:{gw.port}/ws/city/rooms/general", extensions=[offer]
    ) as ws:
        for size in SIZES:
            text = json_like(size, random.Random(size))
            await ws.send(text)
            assert await ws.recv() == text
        fragments = ["part one, ", "part two " * 1000, "part three"]
        await ws.send(fragments)  # one message in three frames
        assert await ws.recv() == "".join(fragments)
        await ws.send("fragments please")
        assert await ws.recv() == "frag-1 " + "frag-2 " * 500 + "frag-3"
        assert ws.response is not None
        answer = ws.response.headers["Sec-WebSocket-Extensions"]
    (request,) = service.requests
    sent_offer = request["Sec-WebSocket-Extensions"]
    assert "client_no_context_takeover" in sent_offer
    assert "server_max_window_bits=11" in sent_offer
    assert upstream_leg.header("down", "Sec-WebSocket-Extensions") == answer
    assert "client_no_context_takeover" in answer
    assert "server_max_window_bits=11" in answer
    up, down = upstream_leg.frames("up"), upstream_leg.frames("down")
    messages = len(SIZES) + 2
    assert compressed_messages(up) == [True] * messages
    assert compressed_messages(down) == [True] * messages
    # The fragmented ones: RSV1 on the first frame, continuations (checked above) without.
    for frames in (up, down):
        assert (RSV1, 0x1, False) in [(rsv, opcode, fin) for rsv, opcode, fin, _ in frames]
        assert len([opcode for _, opcode, _, _ in frames if opcode == 0x0]) >= 2


async def test_a_service_that_declines_compression_gets_uncompressed_sessions(
    websockets_upstream, gateway, client, tap
):
    service = await websockets_upstream(compression=None)
    upstream_leg = await tap(NODA1, service.port)
    gw = await gateway(city(upstream_leg.port))
    ws = await client.ws_connect(gw.url + "/ws/city/rooms/general", compress=15)
    assert ws.compress == 0
    assert "Sec-WebSocket-Extensions" not in ws._response.headers
    await ws.send_str("plain " * 100)
    assert (await ws.receive(timeout=5)).data == "plain " * 100
    await ws.close()
    assert "permessage-deflate" in service.requests[0]["Sec-WebSocket-Extensions"]  # offered
    assert compressed_messages(upstream_leg.frames("up")) == [False]
    assert compressed_messages(upstream_leg.frames("down")) == [False]


async def test_ws_extensions_false_strips_the_offer(websockets_upstream, gateway, client):
    service = await websockets_upstream()  # would accept permessage-deflate
    gw = await gateway(city(service.port, ", ws_extensions: false"))
    ws = await client.ws_connect(gw.url + "/ws/city/rooms/general", compress=15)
    assert ws.compress == 0
    await ws.send_str("plain")
    assert (await ws.receive(timeout=5)).data == "plain"
    await ws.close()
    assert "Sec-WebSocket-Extensions" not in service.requests[0]


async def test_an_extension_the_client_did_not_offer_is_502(gateway, client):
    async def pushy(reader, writer, accept: str) -> None:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
            b"Sec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
        )
        await reader.read()

    server, port = await upgrading_upstream(pushy)
    async with server:
        gw = await gateway(city(port))
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(gw.url + "/ws/city/rooms/general")  # offers nothing
        assert refused.value.status == 502


def deflated(text: bytes) -> bytes:
    """A message's payload as permessage-deflate sends it (RFC 7692 7.2.1)."""
    compressor = zlib.compressobj(wbits=-15)
    return (compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


# -- order at a violation: what was in flight arrives before the close -------------------------

IN_FLIGHT = b"in flight"
HELLO = b"hello from noda1"


async def raw_session(
    port: int, extensions: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    offer = f"Sec-WebSocket-Extensions: {extensions}\r\n".encode() if extensions else b""
    writer.write(HANDSHAKE + offer + b"\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer, head


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(0x1, b"x", masked=False), 1002),  # a client must mask
        (frame(0x1, b"x", rsv=0x40), 1002),  # RSV1 without an extension
        (frame(0x3, b"x"), 1002),  # a reserved opcode
        (frame(0x9, b"x" * 126), 1002),  # an oversized control frame
        (frame(0x9, b"x", fin=False), 1002),  # a fragmented one
        (frame(0x0, b"x"), 1002),  # a continuation of nothing
        (frame(0x8, close_payload(1005)), 1002),  # a close code that may not be sent
        (frame(0x2, b"x" * 101), 1009),  # over ws_max_message
    ],
    ids=["unmasked", "rsv1", "opcode", "big ping", "fragmented ping", "continuation",
         "close 1005", "too big"],
)  # fmt: skip
async def test_the_echo_of_a_message_in_flight_arrives_before_the_close(
    ws_upstream, gateway, bad, code
):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port, ", ws_max_message: 100"))
    reader, writer, _ = await raw_session(gw.port)
    assert await read_frame(reader) == (0x1, HELLO)
    writer.write(frame(0x1, IN_FLIGHT) + bad)  # one write: the violation is read with it
    assert await read_frame(reader) == (0x1, IN_FLIGHT)  # the service's echo, first
    assert await read_frame(reader) == (0x8, close_payload(code))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then the gateway hangs up
    writer.close()
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert seen.closes == [(code, "")]
    (line,) = await logged(gw, lambda line: line.get("status") == 101)
    summary = line["websocket"]
    assert (summary["messages_up"], summary["bytes_up"]) == (1, len(IN_FLIGHT))
    assert (summary["messages_down"], summary["bytes_down"]) == (2, len(HELLO + IN_FLIGHT))
    assert (summary["ended_by"], summary["close_code"]) == ("client", code)


async def read_raw_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked frame from the gateway: (its first byte, payload)."""
    b0 = (await reader.readexactly(1))[0]
    n = (await reader.readexactly(1))[0] & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0, await reader.readexactly(n)


def inflated(payload: bytes) -> bytes:
    return zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff")


@pytest.mark.parametrize(
    "bad",
    [
        frame(0x9, b"p", rsv=0x40),
        frame(0x1, deflated(b"two "), fin=False, rsv=0x40) + frame(0x0, deflated(b""), rsv=0x40),
        frame(0x1, deflated(b"x"), rsv=0x60),
    ],
    ids=["rsv1 on a ping", "rsv1 on a continuation", "rsv2"],
)
async def test_with_permessage_deflate_only_first_frames_may_carry_rsv1(ws_upstream, gateway, bad):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    reader, writer, head = await raw_session(gw.port, "permessage-deflate")
    assert b"permessage-deflate" in head
    b0, payload = await read_raw_frame(reader)
    assert (b0, inflated(payload)) == (0xC1, HELLO)  # FIN, RSV1, text: compressed
    writer.write(frame(0x1, deflated(IN_FLIGHT), rsv=0x40) + bad)
    b0, payload = await read_raw_frame(reader)
    assert (b0, inflated(payload)) == (0xC1, IN_FLIGHT)  # its echo, compressed, first
    assert await read_frame(reader) == (0x8, close_payload(1002))
    writer.close()
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert seen.closes == [(1002, "")]


async def test_an_upstreams_violation_comes_after_its_good_frames(gateway, client):
    async def breaking(reader, writer, accept: str) -> None:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
            + frame(0x1, b"first", masked=False) + frame(0x2, b"second", masked=False)
            + frame(0x1, b"masked")  # a server must not mask
        )  # fmt: skip
        await reader.read()

    server, port = await upgrading_upstream(breaking)
    async with server:
        gw = await gateway(city(port))
        ws = await client.ws_connect(gw.url + "/ws/city/rooms/general")
        assert (await ws.receive(timeout=5)).data == "first"
        assert (await ws.receive(timeout=5)).data == b"second"
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1002)
        (line,) = await logged(gw, lambda line: line.get("status") == 101)
        summary = line["websocket"]
        assert (summary["messages_down"], summary["bytes_down"]) == (2, 11)
        assert (summary["ended_by"], summary["close_code"]) == ("upstream", 1002)


@pytest.mark.parametrize(
    ("extra", "code"),
    [("", 1011), (", ws_upstream_gone_code: 1014", 1014)],
    ids=["default", "1014"],
)
async def test_a_vanishing_upstreams_last_frames_arrive_before_the_close(
    gateway, client, extra, code
):
    async def last_words(reader, writer, accept: str) -> None:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
            + frame(0x1, b"last", masked=False) + frame(0x1, b"words", masked=False)
        )  # fmt: skip
        await writer.drain()  # and the connection ends: no close frame

    server, port = await upgrading_upstream(last_words)
    async with server:
        gw = await gateway(city(port, extra))
        ws = await client.ws_connect(gw.url + "/ws/city/rooms/general")
        assert (await ws.receive(timeout=5)).data == "last"
        assert (await ws.receive(timeout=5)).data == "words"
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, code, "the upstream went away")
        (line,) = await logged(gw, lambda line: line.get("status") == 101)
        summary = line["websocket"]
        assert (summary["messages_down"], summary["ended_by"], summary["close_code"]) == (
            2,
            "upstream",
            code,
        )


async def test_a_close_frame_inside_a_half_read_frame_is_the_senders_violation(
    ws_upstream, gateway
):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    reader, writer, _ = await raw_session(gw.port)
    assert await read_frame(reader) == (0x1, HELLO)
    writer.write(frame(0x2, b"z" * 1000)[:60])  # a frame of 1000 bytes, 54 of them sent
    await writer.drain()
    await asyncio.sleep(0.2)  # the close comes in a read of its own
    writer.write(frame(0x8, close_payload(1000)))  # gave up on the frame: closes
    assert await read_frame(reader) == (0x8, close_payload(1002))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert seen.closes[0][0] != 1000  # its frame was cut: it cannot have closed normally
    (line,) = await logged(gw, lambda line: line.get("status") == 101)
    assert (line["websocket"]["ended_by"], line["websocket"]["close_code"]) == ("client", 1002)


async def test_a_close_frame_in_the_same_read_as_a_frames_payload_is_payload(ws_upstream, gateway):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    reader, writer, _ = await raw_session(gw.port)
    assert await read_frame(reader) == (0x1, HELLO)
    close = frame(0x8, close_payload(1000))
    payload = b"x" * 10 + close
    # A frame masked with a zero key: the close's bytes go on the wire as they are.
    writer.write(bytes((0x82, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
    assert await read_frame(reader) == (0x2, payload)  # the service got it as payload
    writer.write(frame(0x1, b"still open"))
    assert await read_frame(reader) == (0x1, b"still open")
    writer.close()
    await asyncio.wait_for(seen.ended.wait(), 5)


async def test_an_invalid_answer_to_a_close_still_closes_both_legs(ws_upstream, gateway):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    reader, writer, _ = await raw_session(gw.port)
    assert await read_frame(reader) == (0x1, HELLO)
    writer.write(frame(0x1, b"close:4000:bye"))  # the service closes first
    assert await read_frame(reader) == (0x8, close_payload(4000, b"bye"))
    writer.write(frame(0x8, close_payload(1005)))  # an answer no endpoint may send
    # It has had its one close frame already: its connection is closed, nothing more sent.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await asyncio.wait_for(seen.ended.wait(), 5)  # and the service got an answer
    (line,) = await logged(gw, lambda line: line.get("status") == 101)
    assert line["websocket"]["ended_by"] == "upstream"
    assert line["websocket"]["client_close_code"] is None  # its answer was no valid close


async def test_a_vanishing_clients_last_frames_reach_the_service_before_its_1001(
    ws_upstream, gateway, client
):
    seen, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port))
    member, _ = await open_ws(client, gw)  # in the same room: it gets what the service got
    reader, writer = await raw_handshake(gw.port)
    assert await read_frame(reader) == (0x1, HELLO)
    writer.write(frame(0x1, b"last") + frame(0x1, b"words"))
    writer.close()  # gone: no close frame
    assert (await member.receive(timeout=5)).data == "last"
    assert (await member.receive(timeout=5)).data == "words"
    await asyncio.wait_for(seen.ended.wait(), 5)
    assert seen.closes == [(1001, "")]
    await member.close()


# -- clients that freeze, or stream one long frame ------------------------------------------


async def test_a_client_that_takes_nothing_mid_frame_is_dropped_as_dead(gateway):
    # A frozen client (or a half-open connection) while the upstream streams: it cannot be
    # pinged while a frame to it is half written, and the upstream is not read meanwhile, so
    # the session lived on forever; now taking nothing for two intervals is being dead.
    ended = asyncio.Event()

    async def streams(reader, writer, accept: str) -> None:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
        )
        frame = bytes([0x82, 127]) + (200_000).to_bytes(8, "big") + b"x" * 200_000
        try:
            for _ in range(1000):  # 200 MB: more than any buffer on the way
                writer.write(frame)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            ended.set()

    server, port = await upgrading_upstream(streams)
    async with server:
        gw = await gateway(city(port, ", ws_ping_interval: 0.5"))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", gw.port))
        await loop.sock_sendall(sock, HANDSHAKE + b"\r\n")
        assert (await loop.sock_recv(sock, 12)) == b"HTTP/1.1 101"
        began = time.monotonic()
        try:
            await asyncio.wait_for(ended.wait(), 5)  # this client reads nothing more
        finally:
            sock.close()
        assert time.monotonic() - began < 3  # two intervals, a sweep, the buffers filling
        lines = await logged(gw, lambda line: line.get("status") == 101)
        assert lines[0]["websocket"]["ended_by"] == "dead client"


async def test_a_session_streaming_one_long_frame_is_not_idle(ws_upstream, gateway):
    # ws_idle_timeout counts what moves, not frame headers: one 600 kB message sent over
    # ~3 s (three idle timeouts) reaches the upstream, which echoes it back.
    _, port = await ws_upstream(NODA1, "noda1")
    gw = await gateway(city(port, ", ws_idle_timeout: 1"))
    reader, writer = await raw_handshake(gw.port)
    assert (await read_frame(reader))[1] == b"hello from noda1"
    payload, mask = b"s" * 600_000, b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    writer.write(bytes([0x82, 0xFF]) + len(payload).to_bytes(8, "big") + mask)
    for at in range(0, len(masked), 20_000):
        writer.write(masked[at : at + 20_000])
        await writer.drain()
        await asyncio.sleep(0.1)
    opcode, echoed = await asyncio.wait_for(read_frame(reader), 5)
    writer.close()
    assert (opcode, echoed) == (0x2, payload)


# -- backpressure across the handover --------------------------------------------------------

from gateway.metrics import Metrics  # noqa: E402 - kept with the tests that use it
from gateway.snapshot import WsPolicy  # noqa: E402
from gateway.websocket.session import Session  # noqa: E402
from gateway.websocket.upstream import Upgraded, _Handshake  # noqa: E402


def binary_frame(size: int) -> bytes:
    return bytes([0x82, 127]) + size.to_bytes(8, "big") + b"u" * size


async def upstream_writes(sock: socket.socket, seconds: float) -> int:
    """How many bytes an upstream that writes frames as fast as it can gets rid of."""
    loop, written, frame = asyncio.get_running_loop(), 0, binary_frame(65536)
    deadline = loop.time() + seconds
    with contextlib.suppress(TimeoutError):
        while loop.time() < deadline:
            await asyncio.wait_for(loop.sock_sendall(sock, frame), deadline - loop.time())
            written += len(frame)
    return written


@pytest.mark.parametrize(
    "full_before", [False, True], ids=["filled-by-the-tail", "full-at-handover"]
)
async def test_a_client_full_at_the_handover_holds_the_upstream_back(full_before):
    # Real sockets, the gateway's end of the client's with a 4 KiB kernel buffer: what the
    # relay writes to it stays in the transport, past its high-water mark. Either the frames
    # that came with the 101 fill it (the session paused the upstream, then resumed it
    # regardless), or it was full before the session took it (its transport never says
    # pause again): the upstream went on being read into memory without bound.
    loop = asyncio.get_running_loop()
    client_gw, client_far = socket.socketpair()
    client_gw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    up_gw, up_far = socket.socketpair()
    up_far.setblocking(False)
    client, _ = await loop.connect_accepted_socket(asyncio.Protocol, client_gw)
    handshake = _Handshake(loop)
    upstream, _ = await loop.connect_accepted_socket(lambda: handshake, up_gw)
    upstream.pause_reading()  # as the handshake leaves it
    if full_before:
        client.write(b"h" * 300_000)  # answers the client has not taken, and the 101
    tail = b"" if full_before else binary_frame(300_000)
    policy = WsPolicy(None, False, 1 << 30, 60.0, None, True, 1011)
    session = Session(
        Metrics(), set(), service="city", policy=policy, request_id="r", client=client,
        upstream=Upgraded(upstream, None, None, CIMultiDict(), tail, handshake),
    )  # fmt: skip
    session.start(b"", client_full=client.get_write_buffer_size() > 65536)
    try:
        held = await upstream_writes(up_far, 1.0)
        assert held < 8 << 20, f"{held} bytes read from the upstream for a client taking none"
        # Once the client takes what it was sent, the upstream is read again.
        client_far.setblocking(False)

        async def drain() -> None:
            while True:
                await loop.sock_recv(client_far, 1 << 20)

        reading = asyncio.ensure_future(drain())
        assert await upstream_writes(up_far, 1.0) > 16 << 20
        reading.cancel()
    finally:
        for sock in (client_far, up_far):
            sock.close()
        client.abort()
        upstream.abort()
