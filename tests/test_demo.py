"""``daarion-gateway demo``: the real gateway in front of its stand-ins, on free ports. What a
client gets through the gateway (rooms, a WebSocket broadcast, search failing over when the
demo's own control takes noda2 offline) and what ``/gateway/upstreams`` says meanwhile."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from gateway.demo.stack import Demo
from gateway.logs import setup_logging

from .helpers import NODA1, NODA2, ROOT, free_port


@pytest.fixture
async def demo() -> AsyncIterator[tuple[Demo, io.StringIO]]:
    logs = io.StringIO()
    setup_logging("INFO", logs)
    running = Demo(free_ports=True)
    await running.start("127.0.0.1", 0)
    yield running, logs
    await running.stop()
    logging.getLogger().handlers.clear()


def bearer(demo: Demo, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {demo.token(user)}"}


async def upstreams(client: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with client.get(f"{url}/gateway/upstreams") as response:
        assert response.status == 200
        view: dict[str, object] = await response.json()
        return view


def search_targets(view: dict[str, object]) -> dict[str, str]:
    services = view["services"]
    assert isinstance(services, dict)
    return {t["node"]: t["state"] for t in services["search"]["targets"]}


async def test_the_standins_run_on_their_nodes_addresses(demo):
    running, _ = demo
    placed = {(s.service, s.node, s.host) for s in running.standins}
    assert ("city", "noda1", NODA1) in placed
    assert {("search", "noda2", NODA2), ("search", "noda1", NODA1)} <= placed
    text = running.instructions()
    assert f"curl {running.url}/api/city/rooms" in text
    assert f"curl -X POST {running.url}/demo/noda2/offline" in text


async def test_the_web_app_page_says_what_to_try(demo, client):
    running, _ = demo
    async with client.get(f"{running.url}/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
    assert "DAARION gateway demo" in page
    assert f"curl {running.url}/api/city/rooms" in page
    async with client.get(f"{running.url}/nowhere") as response:
        assert response.status == 404  # the web app's own 404, through the gateway


async def test_rooms_are_listed_and_created_through_the_gateway(demo, client):
    running, _ = demo
    url = running.url
    async with client.get(f"{url}/api/city/rooms") as response:
        assert response.status == 200
        body = await response.json()
    assert {r["name"] for r in body["rooms"]} == {"general", "dev"}
    assert body["served_by"] == "noda1"

    new = {"name": "music"}
    async with client.post(
        f"{url}/api/city/rooms", json=new, headers=bearer(running, "olena")
    ) as r:
        assert r.status == 201
        created = await r.json()
    # The city got the user from the gateway's verified token (X-User-Id), not from the client.
    assert created["room"] == {"name": "music", "members": 0, "messages": 0, "created_by": "olena"}
    async with client.post(f"{url}/api/city/rooms", json={"name": "Bad Name!"}) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "bad_room_name"
    async with client.post(f"{url}/api/city/rooms", data=b"music") as r:
        assert r.status == 400
        assert (await r.json())["error"] == "bad_json"
    async with client.post(f"{url}/api/city/rooms", json=new) as r:
        assert r.status == 409
    async with client.get(f"{url}/api/city/rooms") as response:
        assert "music" in {r["name"] for r in (await response.json())["rooms"]}
    # A token the gateway does not accept never reaches the city.
    forged = {"Authorization": "Bearer " + Demo(secret="x" * 43).token("mallory")}
    async with client.post(f"{url}/api/city/rooms", json={"name": "x1"}, headers=forged) as r:
        assert r.status == 401
        assert (await r.json())["error"] == "invalid_token"


async def next_event(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, object]:
    while True:
        message = await asyncio.wait_for(ws.receive(), 5)
        assert message.type is aiohttp.WSMsgType.TEXT, message
        event: dict[str, object] = orjson.loads(message.data)
        if event["type"] == kind:
            return event


async def test_a_room_broadcasts_each_message_to_its_members(demo, client):
    running, _ = demo
    ws_url = "ws" + running.url[4:] + "/ws/city/rooms/general"
    alice = await client.ws_connect(ws_url, params={"access_token": running.token("alice")})
    assert (await next_event(alice, "joined"))["user"] == "alice"
    bob = await client.ws_connect(ws_url, headers=bearer(running, "bob"))
    joined = await next_event(alice, "joined")
    assert (joined["user"], joined["members"]) == ("bob", 2)

    await alice.send_str("hello, city")
    expected = {"type": "message", "room": "general", "from": "alice", "text": "hello, city",
                "members": 2}  # fmt: skip
    assert await next_event(bob, "message") == expected
    assert await next_event(alice, "message") == expected
    await bob.close()
    left = await next_event(alice, "left")
    assert (left["user"], left["members"]) == ("bob", 1)
    await alice.close()
    async with client.get(f"{running.url}/api/city/rooms") as response:
        rooms = {r["name"]: r for r in (await response.json())["rooms"]}
    assert rooms["general"]["messages"] == 1
    async with client.get(f"{running.url}/ws/city/rooms/nowhere") as response:
        assert response.status == 426  # a plain GET on a WebSocket route


async def test_search_fails_over_to_noda1_while_noda2_is_offline(demo, client):
    running, logs = demo
    url, token = running.url, bearer(running, "ivan")
    search = f"{url}/api/search?q=gateway"

    async def served_by() -> str:
        async with client.get(search, headers=token) as response:
            assert response.status == 200
            body = await response.json()
            assert body["query"] == "gateway"
            return str(body["served_by"])

    assert await served_by() == "noda2"
    async with client.post(f"{url}/demo/noda2/offline") as response:
        assert response.status == 200
        changed = (await response.json())["changed"]
    assert changed == [f"search on noda2 {NODA2}:{search_port(running, 'noda2')}"]
    # noda2's listener is really gone: connections are refused.
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(NODA2, search_port(running, "noda2"))
    # Every request is still answered, by noda1; three refusals eject noda2.
    assert [await served_by() for _ in range(5)] == ["noda1"] * 5
    view = await upstreams(client, url)
    assert search_targets(view) == {"noda2": "ejected", "noda1": "up"}
    assert view["nodes"] == {"noda1": "online", "noda2": "offline"}
    assert any('"demo: noda2 offline"' in line for line in logs.getvalue().splitlines())

    async with client.post(f"{url}/demo/noda2/online") as response:
        assert response.status == 200
    deadline = time.monotonic() + 15  # rise: 2 probes, every 2 s
    while search_targets(await upstreams(client, url))["noda2"] != "up":
        assert time.monotonic() < deadline, await upstreams(client, url)
        await asyncio.sleep(0.2)
    assert await served_by() == "noda2"


def search_port(demo: Demo, node: str) -> int:
    return next(s.port for s in demo.standins if s.service == "search" and s.node == node)


async def test_the_controls_keep_noda1_and_refuse_unknown_nodes(demo, client):
    running, _ = demo
    async with client.post(f"{running.url}/demo/noda1/offline") as response:
        assert response.status == 409
    async with client.post(f"{running.url}/demo/noda9/offline") as response:
        assert response.status == 404
    async with client.get(f"{running.url}/demo/token", params={"user": "a b"}) as response:
        assert response.status == 400
    async with client.get(f"{running.url}/demo") as response:
        assert (await response.json())["nodes"] == {"noda1": "online", "noda2": "online"}


async def test_the_demo_command_runs_prints_what_to_try_and_takes_sigusr1(client):
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "demo", "--port", str(port), "--free-ports",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = [(await proc.stdout.readline()).decode() for _ in range(6)]
        assert f"the gateway listens on http://127.0.0.1:{port}" in "".join(banner)
        url = f"http://127.0.0.1:{port}"
        async with client.get(f"{url}/demo") as response:
            assert (await response.json())["nodes"]["noda2"] == "online"
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while True:
            async with client.get(f"{url}/demo") as response:
                if (await response.json())["nodes"]["noda2"] == "offline":
                    break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output = await asyncio.wait_for(proc.stdout.read(), 10)
        assert await proc.wait() == 0
        assert b'"message":"demo: noda2 offline"' in output
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_chat_client_sends_what_is_typed_and_prints_the_room(demo, client):
    running, _ = demo
    ws_url = "ws" + running.url[4:]
    listener = await client.ws_connect(f"{ws_url}/ws/city/rooms/dev")
    assert (await next_event(listener, "joined"))["user"] == "anonymous"  # itself: no token
    chat = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.demo.chat", "dev", "--url", ws_url,
        "--token", running.token("taras"),
        cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert chat.stdin is not None
        assert chat.stdout is not None
        assert (await next_event(listener, "joined"))["user"] == "taras"
        chat.stdin.write("привіт, dev\n".encode())
        await chat.stdin.drain()
        said = await next_event(listener, "message")
        assert (said["from"], said["text"]) == ("taras", "привіт, dev")
        await listener.send_str("hello back")
        while True:  # the chat prints every event of the room: its join, its line, the answer
            line = orjson.loads(await asyncio.wait_for(chat.stdout.readline(), 5))
            if line.get("text") == "hello back":
                break
        chat.stdin.close()  # Ctrl-D: the client leaves
        assert await asyncio.wait_for(chat.wait(), 10) == 0
        assert (await next_event(listener, "left"))["user"] == "taras"
        await listener.close()
    finally:
        if chat.returncode is None:
            chat.kill()
            await chat.wait()


async def test_a_node_whose_port_was_taken_meanwhile_stays_offline_with_the_reason(demo, client):
    running, _ = demo
    async with client.post(f"{running.url}/demo/noda2/offline") as response:
        assert response.status == 200
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind((NODA2, search_port(running, "noda2")))
    squatter.listen()
    try:
        async with client.post(f"{running.url}/demo/noda2/online") as response:
            assert response.status == 503
            body = await response.json()
        assert body["error"] == "cannot_listen"
        assert "the search stand-in cannot listen on 127.0.0.2" in body["message"]
        async with client.get(f"{running.url}/demo") as response:
            assert (await response.json())["nodes"]["noda2"] == "offline"
    finally:
        squatter.close()
    async with client.post(f"{running.url}/demo/noda2/online") as response:
        assert response.status == 200
