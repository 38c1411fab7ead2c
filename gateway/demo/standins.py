"""Small stand-ins for DAARION's services, for the demo: real aiohttp servers on a node's
loopback address, answering the paths the real services serve (``/health`` as the standards
give it, the city's rooms with their WebSocket broadcast, a search, the agents' list).

Each stand-in says which node answered (``served_by``), so a client sees failover happen.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from aiohttp import WSMsgType, web

ROOM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
SEEDED_ROOMS = ("general", "dev")
USER = "X-User-Id"  # the identity header the gateway sets from a verified token


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Room:
    name: str
    created_by: str
    members: set[web.WebSocketResponse] = field(default_factory=set)
    messages: int = 0

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "members": len(self.members),
            "messages": self.messages,
            "created_by": self.created_by,
        }


@dataclass
class City:
    """The city service's state: its rooms and who is in them (one per demo)."""

    rooms: dict[str, Room] = field(
        default_factory=lambda: {name: Room(name, "demo") for name in SEEDED_ROOMS}
    )


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _problem(status: int, error: str, message: str) -> web.Response:
    return _json({"error": error, "message": message}, status)


class BadBody(Exception):
    """A request body that is not a JSON object: the answer says what was expected."""


async def _object(request: web.Request, example: str) -> dict[str, object]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise BadBody(f"the body must be a JSON object: {example}")
    return body


@web.middleware
async def _bad_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadBody as exc:
        return _problem(400, "bad_json", str(exc))


def health_app(service: str, node: str) -> web.Application:
    """An app with the standards' ``GET /health``; the stand-ins add their own paths."""
    started = time.monotonic()

    async def health(request: web.Request) -> web.Response:
        return _json(
            {
                "status": "healthy",
                "service": f"{service}-service",
                "version": "demo",
                "node": node,
                "uptime": round(time.monotonic() - started),
            }
        )

    app = web.Application(middlewares=[_bad_bodies])
    app.router.add_get("/health", health)
    return app


def city_app(node: str, city: City) -> web.Application:
    """``GET /city/rooms``, ``POST /city/rooms`` ({"name": ...}) and ``/ws/city/rooms/<room>``,
    which joins the room and sends each text message to every member (the sender too)."""
    app = health_app("city", node)

    async def rooms(request: web.Request) -> web.Response:
        listed = [room.summary() for room in city.rooms.values()]
        return _json({"rooms": listed, "served_by": node})

    async def create(request: web.Request) -> web.Response:
        name = (await _object(request, '{"name": "<room>"}')).get("name")
        if not isinstance(name, str) or not ROOM_NAME.fullmatch(name):
            return _problem(
                400, "bad_room_name", "name: 1-40 of a-z, 0-9, '_' and '-', starting alphanumeric"
            )
        if name in city.rooms:
            return _problem(409, "room_exists", f"room {name!r} exists")
        room = city.rooms[name] = Room(name, request.headers.get(USER, "anonymous"))
        return _json({"room": room.summary(), "served_by": node}, 201)

    async def join(request: web.Request) -> web.StreamResponse:
        name = request.match_info["room"]
        room = city.rooms.get(name)
        if room is None:
            return _problem(404, "no_such_room", f"no room {name!r} (POST /api/city/rooms)")
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        user = request.headers.get(USER, "anonymous")
        room.members.add(ws)
        await _broadcast(room, {"type": "joined", "room": name, "user": user})
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    room.messages += 1
                    await _broadcast(
                        room, {"type": "message", "room": name, "from": user, "text": message.data}
                    )
        finally:
            room.members.discard(ws)
            await _broadcast(room, {"type": "left", "room": name, "user": user})
        return ws

    app.router.add_get("/city/rooms", rooms)
    app.router.add_post("/city/rooms", create)
    app.router.add_get("/ws/city/rooms/{room}", join)
    return app


async def _broadcast(room: Room, event: dict[str, object]) -> None:
    event["members"] = len(room.members)
    text = orjson.dumps(event).decode()
    for member in list(room.members):
        if not member.closed:
            await member.send_str(text)


def search_app(node: str) -> web.Application:
    """``GET /search?q=...`` (and ``/search/<kind>?q=``: text, images, audio): a canned answer
    that names the node that served it."""
    app = health_app("search", node)

    async def search(request: web.Request) -> web.Response:
        query = request.query.get("q", "")
        if not query:
            return _problem(400, "missing_query", "add ?q=<words>")
        kind = request.match_info.get("kind", "text")
        if kind not in ("text", "images", "audio"):
            return _problem(404, "unknown_kind", "kinds: text, images, audio")
        results = [
            {"title": f"{query}: result {i} ({kind})", "score": round(1 - i / 10, 2)}
            for i in range(1, 4)
        ]
        return _json({"query": query, "kind": kind, "results": results, "served_by": node})

    app.router.add_get("/search", search)
    app.router.add_get("/search/{kind}", search)
    return app


AGENTS = ({"id": "ag_echo", "name": "Echo"}, {"id": "ag_helper", "name": "City helper"})


def agents_app(node: str) -> web.Application:
    """``GET /agents`` and ``POST /agents/invoke`` ({"agent": ..., "input": ...})."""
    app = health_app("agents", node)

    async def listing(request: web.Request) -> web.Response:
        return _json({"agents": AGENTS, "user": request.headers.get(USER), "served_by": node})

    async def invoke(request: web.Request) -> web.Response:
        body = await _object(request, '{"agent": "ag_echo", "input": "..."}')
        agent = body.get("agent")
        if agent not in {a["id"] for a in AGENTS}:
            return _problem(404, "unknown_agent", "agents: ag_echo, ag_helper")
        said = body.get("input", "")
        answer = {"agent": agent, "output": f"you said: {said}", "user": request.headers.get(USER)}
        return _json({**answer, "served_by": node})

    app.router.add_get("/agents", listing)
    app.router.add_post("/agents/invoke", invoke)
    return app


def frontend_app(node: str, page: Callable[[], str]) -> web.Application:
    """The web app's place (``/``): one page saying what the demo serves and how to try it."""
    app = health_app("frontend", node)

    async def index(request: web.Request) -> web.Response:
        if request.path != "/":
            return web.Response(status=404, text="not found (the demo's web app has one page)\n")
        return web.Response(text=page(), content_type="text/html")

    app.router.add_get("/{tail:.*}", index)
    return app
