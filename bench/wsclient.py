"""The WebSocket clients of bench/ws.py (aiohttp + uvloop, one process; JSON lines on stdout).

``echo URL --conns C --window W --duration D``: throughput. Opens C sessions and keeps W
binary messages (``--size`` bytes, 1024) in flight on each: every echo that comes back is
counted and answered with the next message. After ``--warmup`` seconds it prints
``{"event": "start"}``, after D more seconds ``{"event": "stop", ...}`` with the echoes counted
in between, the exact seconds and this process's CPU seconds in that window; then it stops
sending, lets the messages in flight come back and closes the sessions (1000).

``hold URL``: capacity. Reads commands on stdin, one a line, and answers each with one JSON
line: ``open N`` opens N more sessions (``--concurrency`` handshakes at a time, from
``--sources`` source addresses 127.0.0.1, 127.0.0.2, ...); ``stats`` counts what the open
sessions have seen; ``close`` closes every session (1000) and ``quit`` ends the process. Held
sessions send nothing: they answer each ping with a pong by hand (``autoping=False``, so the
pings can be counted per session; aiohttp's autoping would do the same unseen) and count the
pongs they get (the backend's answers to the gateway's pings, relayed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson
import uvloop
from aiohttp import WSMsgType

Socket = aiohttp.ClientWebSocketResponse[Literal[True]]  # text is decoded (--compress sends it)
CLOSE_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 30.0


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(orjson.dumps({"event": event, **fields}).decode() + "\n")
    sys.stdout.flush()


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def new_session(source: str | None = None) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0, force_close=True, local_addr=(source, 0) if source else None
    )
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


def error_name(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:80] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- echo: throughput ----------------------------------------------------------------------


@dataclass
class Tally:
    echoed: int = 0
    sending: bool = True
    errors: Counter[str] = field(default_factory=Counter)


def json_like(size: int) -> str:
    """Text shaped like chat traffic (keys repeat, values vary), ``size`` characters."""
    rng = random.Random(size)  # noqa: S311 - message text, not secrets
    parts: list[str] = []
    while sum(map(len, parts)) < size:
        parts.append(
            f'{{"user":"u{rng.randint(1, 99_999)}","room":"general","seq":{len(parts)},'
            f'"text":"{rng.choice(("hi", "ok", "see you", "on my way"))}"}}'
        )
    return "".join(parts)[:size]


async def echo_leg(ws: Socket, window: int, payload: bytes | str, tally: Tally) -> None:
    """Keep ``window`` messages in flight on ``ws`` while ``tally.sending``; then drain.
    A ``str`` payload goes as text messages (their echoes are decoded), bytes as binary."""
    text = isinstance(payload, str)
    send: Any = ws.send_str if text else ws.send_bytes
    expected = WSMsgType.TEXT if text else WSMsgType.BINARY
    receive = ws.receive
    in_flight = window
    try:
        for _ in range(window):
            await send(payload)
        while in_flight:
            msg = await receive()
            if msg.type is not expected:
                tally.errors[f"unexpected {msg.type.name}"] += 1
                return
            tally.echoed += 1
            if tally.sending:
                await send(payload)
            else:
                in_flight -= 1
    except (aiohttp.ClientError, ConnectionError) as exc:
        tally.errors[error_name(exc)] += 1


async def echo(args: argparse.Namespace) -> None:
    # --compress: JSON-like text, permessage-deflate offered (level 15: aiohttp's full window)
    payload: bytes | str = json_like(args.size) if args.compress else os.urandom(args.size)
    tally = Tally()
    async with new_session() as session:
        legs: list[Socket] = [
            await session.ws_connect(args.url, compress=15 if args.compress else 0, max_msg_size=0)
            for _ in range(args.conns)
        ]
        if args.compress and not all(ws.compress for ws in legs):
            tally.errors["compression not agreed"] += 1
        tasks = [asyncio.create_task(echo_leg(ws, args.window, payload, tally)) for ws in legs]
        await asyncio.sleep(args.warmup)
        count0, time0, cpu0 = tally.echoed, time.perf_counter(), time.process_time()
        emit("start")
        await asyncio.sleep(args.duration)
        count1, time1, cpu1 = tally.echoed, time.perf_counter(), time.process_time()
        emit(
            "stop",
            echoed=count1 - count0,
            seconds=time1 - time0,
            cpu_seconds=cpu1 - cpu0,
            errors=dict(tally.errors),
        )
        tally.sending = False
        _, late = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
        for task in late:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in legs), return_exceptions=True)
    emit("closed", undrained=len(late), errors=dict(tally.errors))


# -- hold: capacity ------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Held:
    ws: Socket
    pings: int = 0
    pongs: int = 0
    ended: str = ""  # how the session ended, if it did
    closing: bool = False  # we are closing it


@dataclass
class Holder:
    url: str
    concurrency: int
    sessions: list[aiohttp.ClientSession]
    held: list[Held] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    failed: Counter[str] = field(default_factory=Counter)

    async def open(self, count: int) -> dict[str, Any]:
        started, before = time.perf_counter(), len(self.held)
        failed_before = sum(self.failed.values())
        gate = asyncio.Semaphore(self.concurrency)
        await asyncio.gather(*(self._open_one(before + i, gate) for i in range(count)))
        return {
            "opened": len(self.held) - before,
            "failed": sum(self.failed.values()) - failed_before,
            "seconds": time.perf_counter() - started,
            "failures": dict(self.failed),
            **self.stats(),
        }

    async def _open_one(self, number: int, gate: asyncio.Semaphore) -> None:
        session = self.sessions[number % len(self.sessions)]
        async with gate:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    ws = await session.ws_connect(
                        self.url,
                        autoping=False,
                        compress=0,
                        max_msg_size=0,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                    )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.failed[error_name(exc)] += 1
                return
        held = Held(ws)
        self.held.append(held)
        task = asyncio.create_task(watch(held))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def stats(self) -> dict[str, Any]:
        live = [h for h in self.held if not h.ended]
        pings = [h.pings for h in live] or [0]
        ended = Counter(h.ended for h in self.held if h.ended and not h.closing)
        return {
            "open": len(live),
            "pings": sum(h.pings for h in self.held),
            "pongs": sum(h.pongs for h in self.held),
            "min_pings_per_open": min(pings),
            "median_pings_per_open": statistics.median(pings),
            "ended_unasked": dict(ended),
            "rss_kib": rss_kib(),
        }

    async def close(self) -> dict[str, Any]:
        started = time.perf_counter()
        gate = asyncio.Semaphore(self.concurrency)

        async def close_one(held: Held) -> None:
            held.closing = True
            async with gate:
                await held.ws.close()

        await asyncio.gather(*(close_one(h) for h in self.held), return_exceptions=True)
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=CLOSE_TIMEOUT)
        codes = Counter(str(h.ws.close_code) for h in self.held)
        count = len(self.held)
        self.held.clear()
        return {"closed": count, "codes": dict(codes), "seconds": time.perf_counter() - started}


async def watch(held: Held) -> None:
    """Answer and count pings, count pongs, until the session ends."""
    ws = held.ws
    while True:
        msg = await ws.receive()
        kind = msg.type
        if kind is WSMsgType.PING:
            held.pings += 1
            await ws.pong(msg.data)
        elif kind is WSMsgType.PONG:
            held.pongs += 1
        elif kind is WSMsgType.CLOSE:
            held.ended = f"close {msg.data}"
            await ws.close()
            return
        elif kind in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            held.ended = held.ended or kind.name.lower()
            return


async def hold(args: argparse.Namespace) -> None:
    sources = [f"127.0.0.{i}" for i in range(1, args.sources + 1)]
    holder = Holder(args.url, args.concurrency, [new_session(s) for s in sources])
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit("ready", rss_kib=rss_kib())
    try:
        while line := (await reader.readline()).decode().split():
            command, rest = line[0], line[1:]
            if command == "open":
                emit("open", **await holder.open(int(rest[0])))
            elif command == "stats":
                emit("stats", **holder.stats())
            elif command == "close":
                emit("closed", **await holder.close())
            elif command == "quit":
                break
            else:
                emit("error", message=f"unknown command {command!r}")
    finally:
        await holder.close()
        for session in holder.sessions:
            await session.close()


# -- main ----------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="", help="a marker for pgrep; unused")
    sub = parser.add_subparsers(dest="mode", required=True)
    one = sub.add_parser("echo", help="throughput: echoed messages per second")
    one.add_argument("url")
    one.add_argument("--conns", type=int, default=8)
    one.add_argument("--window", type=int, default=16, help="messages in flight per session")
    one.add_argument("--size", type=int, default=1024, help="bytes per message")
    one.add_argument("--warmup", type=float, default=1.0)
    one.add_argument("--duration", type=float, default=5.0)
    one.add_argument(
        "--compress", action="store_true", help="JSON-like text messages, permessage-deflate"
    )
    two = sub.add_parser("hold", help="capacity: idle sessions, driven by stdin commands")
    two.add_argument("url")
    two.add_argument("--concurrency", type=int, default=200, help="handshakes at a time")
    two.add_argument("--sources", type=int, default=1, help="source addresses 127.0.0.1..N")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    uvloop.run(echo(args) if args.mode == "echo" else hold(args))


if __name__ == "__main__":
    main()
