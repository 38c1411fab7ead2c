"""Python stand-ins for wrk and nginx, used by ``bench/run.py`` only when those are missing.

``load``: a closed-loop HTTP/1.1 load generator like ``wrk -t1 --latency``: N keep-alive
connections, each with one GET in flight at a time, on one asyncio loop (uvloop when
installed), raw sockets via ``asyncio.Protocol``. Every response's latency is recorded; one
slower than ``--timeout`` counts as a timeout error and is left out of the latencies, as wrk
does. Prints one JSON object: requests, seconds, req/s, p50/p75/p90/p99 in ms, non-2xx/3xx
count and socket errors. It is several times slower than wrk, so a target faster than it
(nginx, the direct backend) is measured as the load generator's ceiling, not its own.

``backend``: a minimal server answering every request with ``200 {"ok":true}``, the
stand-in for the nginx backend.

Both bind or connect to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, cast

LOOPBACK: Final = "127.0.0.1"
BODY: Final = b'{"ok":true}'
RESPONSE: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(BODY), BODY)
)
END_OF_HEAD: Final = b"\r\n\r\n"


# -- HTTP/1.1 response framing -------------------------------------------------------------


def _chunked_end(buf: bytes, start: int) -> int | None:
    """Index just past a complete chunked body starting at ``start``, or None if incomplete."""
    pos = start
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(buf[pos:line_end].split(b";", 1)[0], 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = buf.find(END_OF_HEAD, pos - 2)
            return None if trailer_end < 0 else trailer_end + 4
        pos += size + 2
        if pos > len(buf):
            return None


def parse_response(buf: bytes) -> tuple[int, int, bool] | None:
    """(status, bytes consumed, server closes) for the first complete response in ``buf``."""
    head_end = buf.find(END_OF_HEAD)
    if head_end < 0:
        return None
    head = buf[:head_end].lower()
    status = int(head[9:12])
    body_start = head_end + 4
    closes = b"\r\nconnection: close" in head
    if status in (204, 304) or 100 <= status < 200:
        return status, body_start, closes
    marker = head.find(b"\r\ncontent-length:")
    if marker >= 0:
        value_end = head.find(b"\r\n", marker + 2)
        length = int(head[marker + 17 : value_end if value_end >= 0 else len(head)])
        end = body_start + length
        return (status, end, closes) if end <= len(buf) else None
    if b"\r\ntransfer-encoding: chunked" in head:
        chunked_end = _chunked_end(buf, body_start)
        return None if chunked_end is None else (status, chunked_end, closes)
    return None  # a body delimited by close: not produced by the servers under test


# -- the load generator --------------------------------------------------------------------


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    non2xx: int = 0
    errors: dict[str, int] = field(
        default_factory=lambda: {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    )
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # connecting, kept alive


@dataclass(frozen=True)
class Plan:
    port: int
    request: bytes
    deadline: float
    timeout: float


class _Client(asyncio.Protocol):
    """One keep-alive connection with one request in flight; reconnects when closed."""

    def __init__(self, plan: Plan, stats: Stats, reconnect: Callable[[], None]) -> None:
        self.plan = plan
        self.stats = stats
        self.reconnect = reconnect
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.sent_at = 0.0
        self.in_flight = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._send()

    def _send(self) -> None:
        if self.transport is None or time.perf_counter() >= self.plan.deadline:
            self._close()
            return
        self.sent_at = time.perf_counter()
        self.in_flight = True
        self.transport.write(self.plan.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        parsed = parse_response(self.buf)
        if parsed is None:
            return
        status, used, closes = parsed
        self.buf = self.buf[used:]
        self._record(status)
        if closes:
            self._close()
        else:
            self._send()

    def _record(self, status: int) -> None:
        self.in_flight = False
        latency = time.perf_counter() - self.sent_at
        if latency > self.plan.timeout:
            self.stats.errors["timeout"] += 1
            return
        self.stats.latencies.append(latency)
        if not 200 <= status < 400:
            self.stats.non2xx += 1

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.in_flight and time.perf_counter() < self.plan.deadline:
            self.stats.errors["read"] += 1
        if time.perf_counter() < self.plan.deadline:
            self.reconnect()


def _spawn(plan: Plan, stats: Stats, loop: asyncio.AbstractEventLoop) -> None:
    task = loop.create_task(_connection(plan, stats, loop))
    stats.tasks.add(task)
    task.add_done_callback(stats.tasks.discard)


async def _connection(plan: Plan, stats: Stats, loop: asyncio.AbstractEventLoop) -> None:
    def reconnect() -> None:
        _spawn(plan, stats, loop)

    try:
        await loop.create_connection(lambda: _Client(plan, stats, reconnect), LOOPBACK, plan.port)
    except OSError:
        stats.errors["connect"] += 1
        await asyncio.sleep(0.01)
        if time.perf_counter() < plan.deadline:
            reconnect()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    index = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[index]


async def run_load(
    port: int, path: str, conns: int, duration: float, timeout: float
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n\r\n".encode()
    started = time.perf_counter()
    plan = Plan(port, request, started + duration, timeout)
    stats = Stats()
    for _ in range(conns):
        _spawn(plan, stats, loop)
    await asyncio.sleep(duration)
    seconds = time.perf_counter() - started
    latencies = sorted(stats.latencies)
    done = len(latencies) + stats.errors["timeout"]
    return {
        "requests": done,
        "seconds": seconds,
        "rps": done / seconds,
        **{f"p{q}_ms": percentile(latencies, q / 100) * 1000 for q in (50, 75, 90, 99)},
        "non2xx": stats.non2xx,
        "errors": stats.errors,
    }


# -- the stand-in backend ------------------------------------------------------------------


class _Backend(asyncio.Protocol):
    """Answers every request on the connection with the fixed JSON response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        answers = 0
        while True:
            head_end = self.buf.find(END_OF_HEAD)
            if head_end < 0:
                break
            used = head_end + 4 + _content_length(self.buf[:head_end])
            if used > len(self.buf):
                break
            self.buf = self.buf[used:]
            answers += 1
        if answers and self.transport is not None:
            self.transport.write(RESPONSE * answers)


def _content_length(head: bytes) -> int:
    marker = head.lower().find(b"\r\ncontent-length:")
    if marker < 0:
        return 0
    value_end = head.find(b"\r\n", marker + 2)
    return int(head[marker + 17 : value_end if value_end >= 0 else len(head)])


async def serve_backend(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Backend, LOOPBACK, port, backlog=1024)
    async with server:
        await server.serve_forever()


# -- command line --------------------------------------------------------------------------


def _runner() -> Callable[..., object]:
    try:
        import uvloop  # noqa: PLC0415 - optional, as in the gateway
    except ImportError:
        return asyncio.run
    return uvloop.run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="load http://127.0.0.1:PORT/PATH and print JSON")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--path", default="/")
    load.add_argument("--conns", type=int, default=50)
    load.add_argument("--duration", type=float, default=8.0)
    load.add_argument("--timeout", type=float, default=2.0, help="as wrk's default, seconds")
    backend = sub.add_parser("backend", help="answer 200 {'ok':true} on 127.0.0.1:PORT")
    backend.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    run = _runner()
    if args.command == "backend":
        run(serve_backend(args.port))
        return 0
    result = run(run_load(args.port, args.path, args.conns, args.duration, args.timeout))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
