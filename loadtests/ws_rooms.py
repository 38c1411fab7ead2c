"""Scenario `rooms`: WebSocket rooms. Each user joins one of a few rooms through the gateway
(`/ws/city/rooms/<room>`), sends messages that the city broadcasts to every member, and
leaves after a while; then joins again. In locust's stats:

  WS      join           the handshake (through the gateway's limiter and auth)
  WS-RTT  <room>         a message's round trip: sent, until the sender gets its own copy of
                         the broadcast back (gateway -> city -> every member -> gateway)
  WS      leave          the close handshake

    loadtests/run rooms
"""

from __future__ import annotations

import random
import socket
import time
import uuid
from urllib.parse import urlsplit

import orjson
import websocket
from common import DaarionUser
from locust import between, task

ROOMS = ("general", "dev")
MESSAGES = 5  # per visit


class RoomMember(DaarionUser):
    wait_time = between(0.5, 1.5)  # between visits

    def _fire(self, kind: str, name: str, started: float, length: int = 0,
              exception: Exception | None = None) -> None:  # fmt: skip
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )

    def _connect(self, room: str) -> websocket.WebSocket:
        url = urlsplit(self.host)
        sock = socket.create_connection(
            (url.hostname, url.port or 80), timeout=5, source_address=self.identity.source
        )
        headers = [f"{k}: {v}" for k, v in {**self.auth, **self.identity.headers}.items()]
        ws_url = f"ws://{url.netloc}/ws/city/rooms/{room}"
        return websocket.create_connection(ws_url, socket=sock, header=headers, timeout=5)

    @task
    def visit(self) -> None:
        room = random.choice(ROOMS)
        started = time.perf_counter()
        try:
            ws = self._connect(room)
        except (OSError, websocket.WebSocketException) as exc:
            self._fire("WS", "join", started, exception=exc)
            return
        self._fire("WS", "join", started)
        visited = False
        try:
            for _ in range(MESSAGES):
                if not self._round_trip(ws, room):
                    break
                time.sleep(random.uniform(0.1, 0.4))
            visited = True
        finally:
            if visited:
                self._leave(ws)
            else:  # stopped mid-visit (the run ended): no close handshake to wait for
                ws.shutdown()

    def _leave(self, ws: websocket.WebSocket) -> None:
        """The close handshake: 1000 sent, until the room's close frame comes back. (Not
        websocket-client's close(), whose bare `except:` would swallow the GreenletExit that
        locust stops a user with, and leave that user running after the run's end.)"""
        started = time.perf_counter()
        try:
            ws.send_close()
            while ws.recv_frame().opcode != websocket.ABNF.OPCODE_CLOSE:
                pass  # the room's last events
        except (OSError, websocket.WebSocketException) as exc:
            self._fire("WS", "leave", started, exception=exc)
        else:
            self._fire("WS", "leave", started)
        finally:
            ws.shutdown()

    def _round_trip(self, ws: websocket.WebSocket, room: str) -> bool:
        mark = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            ws.send(mark)
            while True:  # others' messages and joins arrive in between
                event = orjson.loads(ws.recv())
                if event.get("type") == "message" and event.get("text") == mark:
                    break
        except (OSError, websocket.WebSocketException, orjson.JSONDecodeError) as exc:
            self._fire("WS-RTT", f"/ws/city/rooms/{room}", started, exception=exc)
            return False
        self._fire("WS-RTT", f"/ws/city/rooms/{room}", started, length=len(mark))
        return True
