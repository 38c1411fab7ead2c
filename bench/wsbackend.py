"""The WebSocket backend of bench/ws.py: `python bench/wsbackend.py --port P`.

An aiohttp + uvloop server on 127.0.0.1 (the anchors' "direct-aiohttp" ``/ws``):

- any path with a WebSocket handshake: a session that echoes every binary (and text) message
  back as it came, and otherwise just stays open. ``autoping=False``: the pings it receives
  (the gateway's keepalive on its upstream legs) are counted per session and answered with a
  pong by hand; the pongs it receives (relayed from the clients) are counted too;
- ``GET /health``: ``{"status": "ok"}``, for the gateway's active health checks;
- ``GET /stats``: JSON counts: sessions open and opened, pings and pongs received (in all, and
  the fewest and median per open session), messages echoed, close codes received.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import uvloop
from aiohttp import WSMsgType, web


@dataclass(slots=True, eq=False)
class Leg:
    """Counts for one open session."""

    pings: int = 0
    pongs: int = 0


@dataclass
class Book:
    """What the backend has seen, for ``GET /stats``."""

    open: set[Leg] = field(default_factory=set)
    opened: int = 0
    pings: int = 0
    pongs: int = 0
    echoed: int = 0
    closes: Counter[str] = field(default_factory=Counter)

    def stats(self) -> dict[str, Any]:
        pings = [leg.pings for leg in self.open] or [0]
        return {
            "open": len(self.open),
            "opened": self.opened,
            "pings": self.pings,
            "pongs": self.pongs,
            "echoed": self.echoed,
            "min_pings_per_open": min(pings),
            "median_pings_per_open": statistics.median(pings),
            "closes": dict(self.closes),
        }


BOOK = Book()


async def session(request: web.Request) -> web.StreamResponse:
    """Echo data messages, answer and count pings, count pongs; until the peer closes."""
    # compress: permessage-deflate when the client offers it (the compressed runs), else none
    ws: web.WebSocketResponse[Literal[False]] = web.WebSocketResponse(
        autoping=False, compress=True, max_msg_size=0, decode_text=False
    )
    await ws.prepare(request)
    leg = Leg()
    BOOK.open.add(leg)
    BOOK.opened += 1
    try:
        await _serve(ws, leg)
    finally:
        BOOK.open.discard(leg)
    return ws


async def _serve(ws: web.WebSocketResponse[Literal[False]], leg: Leg) -> None:
    receive, send_frame = ws.receive, ws.send_frame
    while True:
        msg = await receive()
        kind = msg.type
        if kind is WSMsgType.BINARY or kind is WSMsgType.TEXT:
            BOOK.echoed += 1
            await send_frame(msg.data, kind)
        elif kind is WSMsgType.PING:
            leg.pings += 1
            BOOK.pings += 1
            await ws.pong(msg.data)
        elif kind is WSMsgType.PONG:
            leg.pongs += 1
            BOOK.pongs += 1
        else:  # CLOSE (already answered: autoclose), CLOSING, CLOSED, ERROR
            BOOK.closes[str(msg.data if kind is WSMsgType.CLOSE else kind.name)] += 1
            return


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def stats(_request: web.Request) -> web.Response:
    return web.json_response(BOOK.stats())


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    app.router.add_get("/{path:.*}", session)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tag", default="", help="a marker for pgrep; unused")
    args = parser.parse_args()
    web.run_app(
        make_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=1024,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
