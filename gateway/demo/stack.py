"""``daarion-gateway demo``: the real gateway (``Gateway``, as ``serve`` runs it) in front of
stand-in DAARION services, all in this process and on loopback: each node is its own address
(noda1 127.0.0.3, noda2 127.0.0.2), each service its own listener there.

Taking a node offline (``POST /demo/<node>/offline``, or SIGUSR1 for noda2) really stops its
stand-ins' listeners and closes their connections; the gateway finds out the way it would
about a real node: refused connections, failed probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable
from importlib import resources
from typing import Any, TextIO

import jwt
import orjson
import yaml
from aiohttp import web

from ..app import Gateway
from ..config import parse_config
from ..logs import setup_logging
from .standins import City, agents_app, city_app, frontend_app, health_app, search_app

log = logging.getLogger("gateway")

CONFIG = "demo.yaml"  # beside this module
CONTROL_NODE = "noda1"  # where the demo's own controls run: that node cannot be taken down
DRILL_NODE = "noda2"  # the node SIGUSR1 takes offline and back
TOKEN_TTL = 24 * 3600
USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class StandIn:
    """One stand-in service on one node: an aiohttp server that can stop and start again on
    the same address."""

    def __init__(self, service: str, node: str, host: str, port: int,
                 app: Callable[[], web.Application]) -> None:  # fmt: skip
        self.service, self.node, self.host, self.port = service, node, host, port
        self._app = app
        self._runner: web.AppRunner | None = None

    @property
    def online(self) -> bool:
        return self._runner is not None

    @property
    def label(self) -> str:
        return f"{self.service} on {self.node} {self.host}:{self.port}"

    async def start(self) -> None:
        # A new app each time: an aiohttp app is frozen by its first runner.
        runner = web.AppRunner(
            self._app(), access_log=None, shutdown_timeout=0.5, handler_cancellation=True
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno,
                f"the {self.service} stand-in cannot listen on {self.host}:{self.port} "
                f"({exc.strerror}); `demo --free-ports` takes free ports",
            ) from None
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening and close every connection (an open WebSocket gets 1001)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


class Demo:
    def __init__(self, *, free_ports: bool = False, secret: str | None = None) -> None:
        self.free_ports = free_ports
        self.secret = secret or os.environ.get("DEMO_JWT_SECRET") or secrets.token_urlsafe(32)
        self.city = City()
        self.standins: list[StandIn] = []
        self.gateway: Gateway | None = None
        self.url = ""
        self._toggles: set[asyncio.Task[list[str]]] = set()

    async def start(self, host: str | None = None, port: int | None = None) -> str:
        """Start the stand-ins, then the gateway in front of them (``host``/``port`` override
        the config's listen, 0 takes a free port). Returns the gateway's URL."""
        text = resources.files(__package__).joinpath(CONFIG).read_text(encoding="utf-8")
        data: dict[str, Any] = yaml.safe_load(text)
        hosts = {name: node["host"] for name, node in data["nodes"].items()}
        try:
            for service, body in data["services"].items():
                placed = []
                for node in body["nodes"]:  # demo.yaml names nodes only (no tiers)
                    standin = StandIn(
                        service,
                        node,
                        hosts[node],
                        0 if self.free_ports else body["port"],
                        self._app_for(service, node),
                    )
                    await standin.start()
                    self.standins.append(standin)
                    placed.append({"node": node, "port": standin.port})
                body["nodes"] = placed  # the ports the stand-ins got
            env = {**os.environ, "DEMO_JWT_SECRET": self.secret}
            config = parse_config(yaml.safe_dump(data, sort_keys=False), CONFIG, env)
            self.gateway = Gateway(config)
            addresses = await self.gateway.start(host, port)
        except BaseException:
            await self.stop()
            raise
        bound_host, bound_port = addresses[0][:2]
        self.url = f"http://{bound_host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        # A drill under way ends first (a stand-in's stop takes at most its 0.5 s shutdown),
        # so that what it did is in the log: its node reads offline as soon as it stops
        # listening, before its line is written.
        if self._toggles:
            await asyncio.wait(list(self._toggles), timeout=2)
        for task in list(self._toggles):
            task.cancel()
        if self.gateway is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.gateway.stop()
        for standin in self.standins:
            await standin.stop()

    def _app_for(self, service: str, node: str) -> Callable[[], web.Application]:
        apps: dict[str, Callable[[], web.Application]] = {
            "city": lambda: city_app(node, self.city),
            "search": lambda: search_app(node),
            "agents": lambda: agents_app(node),
            "frontend": lambda: frontend_app(node, self.page),
            "demo": lambda: self._control_app(node),
        }
        return apps.get(service, lambda: health_app(service, node))

    # -- nodes -------------------------------------------------------------------------------

    def nodes(self) -> dict[str, str]:
        state: dict[str, str] = {}
        for s in self.standins:
            state[s.node] = "online" if s.online or state.get(s.node) == "online" else "offline"
        return state

    async def set_online(self, node: str, online: bool) -> list[str]:
        """Start or stop every stand-in on ``node``; the labels of those that changed."""
        changed = []
        for standin in self.standins:
            if standin.node == node and standin.online != online:
                await (standin.start() if online else standin.stop())
                changed.append(standin.label)
        if changed:
            log.warning(
                f"demo: {node} {'online' if online else 'offline'}",
                extra={"fields": {"node": node, "started" if online else "stopped": changed}},
            )
        return changed

    def toggle(self, node: str = DRILL_NODE) -> None:
        """Take ``node`` offline, or back online if it is offline (SIGUSR1)."""
        online = self.nodes().get(node) == "offline"
        task = asyncio.get_running_loop().create_task(self.set_online(node, online))
        self._toggles.add(task)
        task.add_done_callback(self._toggles.discard)

    # -- tokens --------------------------------------------------------------------------------

    def token(self, user: str = "demo-user") -> str:
        """An access token as auth-service would sign it, with the demo's secret."""
        now = int(time.time())
        claims = {"sub": user, "iss": "daarion-auth", "type": "access", "roles": ["member"],
                  "iat": now, "exp": now + TOKEN_TTL}  # fmt: skip
        return jwt.encode(claims, self.secret, algorithm="HS256")

    # -- the controls (behind the gateway, at /demo) ---------------------------------------------

    def _control_app(self, node: str) -> web.Application:
        app = health_app("demo", node)

        def answer(data: object, status: int = 200) -> web.Response:
            body = orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n"
            return web.Response(body=body, status=status, content_type="application/json")

        async def state(request: web.Request) -> web.Response:
            return answer({
                "nodes": self.nodes(),
                "standins": {s.label: "online" if s.online else "offline" for s in self.standins},
                "try": [f"POST /demo/{DRILL_NODE}/offline", f"POST /demo/{DRILL_NODE}/online",
                        "GET /demo/token?user=<name>", "GET /gateway/upstreams"],
            })  # fmt: skip

        async def token(request: web.Request) -> web.Response:
            user = request.query.get("user", "demo-user")
            if not USER_NAME.fullmatch(user):
                return answer({"error": "bad_user", "message": "user: 1-64 of A-Z a-z 0-9 _.@-"},
                              400)  # fmt: skip
            return answer({"user": user, "token": self.token(user), "expires_in": TOKEN_TTL})

        async def switch(request: web.Request) -> web.Response:
            node, wanted = request.match_info["node"], request.match_info["state"]
            if node not in self.nodes():
                return answer({"error": "unknown_node", "nodes": sorted(self.nodes())}, 404)
            if node == CONTROL_NODE:
                message = f"{node} runs the demo's controls (and the fallbacks); it stays online"
                return answer({"error": "node_kept", "message": message}, 409)
            try:
                changed = await self.set_online(node, wanted == "online")
            except OSError as exc:  # its port was taken meanwhile: it stays offline
                return answer({"error": "cannot_listen", "message": str(exc)}, 503)
            return answer({"node": node, "state": wanted, "changed": changed})

        app.router.add_get("/demo", state)
        app.router.add_get("/demo/", state)
        app.router.add_get("/demo/token", token)
        app.router.add_post("/demo/{node}/{state:online|offline}", switch)
        return app

    # -- what to try -----------------------------------------------------------------------------

    def instructions(self) -> str:
        url, token = self.url, self.token()
        ws = "ws" + url[4:]
        by_node: dict[str, list[str]] = {}
        for s in self.standins:
            by_node.setdefault(f"{s.node} {s.host}", []).append(f"{s.service} :{s.port}")
        nodes = "\n".join(f"  {where}: {', '.join(names)}" for where, names in by_node.items())
        chat = f"{sys.executable} -m gateway.demo.chat"
        return f"""
DAARION gateway demo: the gateway listens on {url}, in front of stand-in services
{nodes}

Try (in another terminal):
  curl {url}/api/city/rooms
  curl -X POST {url}/api/city/rooms -H 'Content-Type: application/json' -d '{{"name": "music"}}'
  export TOKEN={token}
  curl -H "Authorization: Bearer $TOKEN" '{url}/api/search?q=gateway'     # served_by: noda2
  curl '{url}/api/search?q=gateway'                                        # 401: no token
  curl -H "Authorization: Bearer $TOKEN" {url}/api/agents/agents

WebSocket rooms: run this in two terminals, type a line in one, both print it:
  {chat} general --url {ws}
  (or: websocat {ws}/ws/city/rooms/general)

Failover: take noda2 offline, search is then served by noda1; then bring it back:
  curl -X POST {url}/demo/{DRILL_NODE}/offline       # or: kill -USR1 {os.getpid()}
  curl -H "Authorization: Bearer $TOKEN" '{url}/api/search?q=gateway'     # served_by: noda1
  curl {url}/gateway/upstreams
  curl -X POST {url}/demo/{DRILL_NODE}/online
Rate limit (10 r/s, burst 20 per client address):
  for i in $(seq 30); do curl -s -o /dev/null -w '%{{http_code}} ' {url}/api/city/rooms; done
Also: {url}/ (a page with this text), {url}/health, {url}/metrics, {url}/demo
Ctrl-C stops the demo.
"""

    def page(self) -> str:
        from html import escape  # noqa: PLC0415 - the page only

        return (
            "<!doctype html><meta charset=utf-8><title>DAARION gateway demo</title>"
            f"<pre>{escape(self.instructions())}</pre>"
        )


async def serve(host: str | None, port: int | None, free_ports: bool, out: TextIO) -> None:
    loop = asyncio.get_running_loop()
    demo = Demo(free_ports=free_ports)
    await demo.start(host, port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, demo.toggle)
    log.info("demo started", extra={"fields": {"url": demo.url, "pid": os.getpid()}})
    out.write(demo.instructions())
    out.flush()
    try:
        await stop.wait()
    finally:
        log.info("demo stopping")
        await demo.stop()


def main(host: str | None, port: int | None, free_ports: bool, log_level: str) -> int:
    import uvloop  # noqa: PLC0415 - as serve runs; the demo needs POSIX signals anyway

    setup_logging(log_level)
    try:
        uvloop.run(serve(host, port, free_ports, sys.stdout))
    except OSError as exc:
        log.critical("cannot listen", extra={"fields": {"error": str(exc)}})
        return 1
    return 0
