"""The attackers of bench/flood.py: hold idle and slow-body connections open to a server.

    python bench/flooder.py --port PORT [--idle 5000] [--slow 500] [--interval 3]

Opens ``--idle`` connections that send nothing (even ones) or a partial request head (odd
ones: the request line and one header, never the blank line), and ``--slow`` connections that
send a whole POST head with ``Content-Length: 1000000`` and then one body byte every
``--interval`` seconds (staggered, so the writes are spread over the interval). Every
connection is bound to a loopback source address from ``--first-source`` (127.0.0.10) on,
``--per-source`` (250) at most on each, so that no address reaches the gateway's per-address
cap (256); as many addresses are used as that takes (5,500 connections: 127.0.0.10 to
127.0.0.31). It only ever connects from and to 127.0.0.0/8.

A connection the server closes (EOF, reset) or answers (a slow body answered early, e.g. 408
or 413) is counted and opened again after ``--reopen-delay`` seconds, until the end.

Commands on stdin, one a line; answers on stdout, one JSON object a line with an ``event``:

- (at start) ``{"event": "opened", ...}`` once every connection was tried once;
- ``stats``: ``{"event": "stats", ...}`` the counts now;
- ``stop`` (or end of stdin, SIGTERM, SIGINT): closes everything, prints
  ``{"event": "closed", ...}`` with the final counts and exits.

Counts: ``open`` (now, by kind), ``opened`` (successful connects, reopens included),
``connect_failed`` (by error), ``closed_by_server`` (by kind), ``answered`` (status lines the
server sent, by status), ``body_bytes`` (slow-body bytes sent), ``cpu_seconds``.

Standalone: imports nothing from bench/lib (uvloop if it is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import random
import resource
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any

KINDS = ("idle", "partial", "slow")
LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")


def loopback(text: str) -> str:
    if ipaddress.ip_address(text) not in LOOPBACK_NET:
        raise argparse.ArgumentTypeError(f"only 127.0.0.0/8 addresses: {text}")
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/flooder.py")
    p.add_argument("--host", type=loopback, default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--idle", type=int, default=5000, help="idle connections (half partial heads)")
    p.add_argument("--slow", type=int, default=500, help="slow-body POST connections")
    p.add_argument("--interval", type=float, default=3.0, help="seconds between body bytes")
    p.add_argument("--path", default="/api/bench/", help="of the partial heads")
    p.add_argument("--slow-path", default="/api/bench/upload/", help="of the slow POSTs")
    p.add_argument("--first-source", type=loopback, default="127.0.0.10")
    p.add_argument("--per-source", type=int, default=250, help="connections per source address")
    p.add_argument("--concurrency", type=int, default=100, help="connects in flight at once")
    p.add_argument("--reopen-delay", type=float, default=0.5)
    p.add_argument("--connect-timeout", type=float, default=5.0)
    args = p.parse_args(argv)
    last = ipaddress.ip_address(args.first_source) + max(0, sources_needed(args) - 1)
    if last not in LOOPBACK_NET:
        p.error(f"too many connections for 127.0.0.0/8 from {args.first_source}")
    return args


def sources_needed(args: argparse.Namespace) -> int:
    return int(-(-(args.idle + args.slow) // args.per_source))


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Flood:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stopping = asyncio.Event()
        self.gate = asyncio.Semaphore(args.concurrency)
        self.open: Counter[str] = Counter()
        self.opened: Counter[str] = Counter()
        self.connect_failed: Counter[str] = Counter()
        self.closed_by_server: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.body_bytes = 0
        self.started = time.monotonic()
        first = ipaddress.ip_address(args.first_source)
        self.sources = [str(first + i) for i in range(sources_needed(args))]
        host = args.host
        self.head = {
            "partial": f"GET {args.path} HTTP/1.1\r\nHost: {host}\r\n".encode(),
            "slow": (
                f"POST {args.slow_path} HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
            ).encode(),
        }

    def counts(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "open": {k: self.open[k] for k in KINDS},
            "opened": {k: self.opened[k] for k in KINDS},
            "connect_failed": dict(self.connect_failed),
            "closed_by_server": {k: self.closed_by_server[k] for k in KINDS},
            "answered": dict(self.answered),
            "body_bytes": self.body_bytes,
            "sources": [self.sources[0], self.sources[-1], len(self.sources)],
            "seconds": round(time.monotonic() - self.started, 3),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
        }

    async def connect(self, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind((source, 0))
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(
                loop.sock_connect(sock, (self.args.host, self.args.port)),
                self.args.connect_timeout,
            )
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=65536)

    async def one(self, kind: str, source: str, first: asyncio.Future[None]) -> None:
        """One connection slot: open it, hold it, open it again when the server drops it."""
        while not self.stopping.is_set():
            try:
                async with self.gate:
                    reader, writer = await self.connect(source)
            except (OSError, TimeoutError) as exc:
                self.connect_failed[type(exc).__name__] += 1
                if not first.done():
                    first.set_result(None)
                await self.pause(self.args.reopen_delay)
                continue
            self.opened[kind] += 1
            self.open[kind] += 1
            if not first.done():
                first.set_result(None)
            try:
                await self.hold(kind, reader, writer)
            finally:
                self.open[kind] -= 1
                writer.transport.abort()
            if not self.stopping.is_set():
                await self.pause(self.args.reopen_delay)

    async def hold(
        self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Until the server closes or answers (counted) or the flood stops."""
        if kind in self.head:
            writer.write(self.head[kind])
        dripping = (
            asyncio.ensure_future(self.drip(writer)) if kind == "slow" else None
        )  # the body, byte by byte
        reading = asyncio.ensure_future(reader.read(65536))
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            done, _ = await asyncio.wait(
                [f for f in (reading, stopping, dripping) if f is not None],
                return_when=asyncio.FIRST_COMPLETED,
            )
            if stopping in done:
                return
            if dripping is not None and dripping in done:
                dripping.exception()  # retrieved: the server reset the connection
            data = b""
            if reading in done and reading.exception() is None:
                data = reading.result()
            if data.startswith(b"HTTP/"):
                parts = data.split(b" ", 2)
                self.answered[parts[1].decode(errors="replace") if len(parts) > 1 else "?"] += 1
            self.closed_by_server[kind] += 1
        finally:
            for f in (reading, stopping, dripping):
                if f is not None and not f.done():
                    f.cancel()

    async def drip(self, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(random.uniform(0, self.args.interval))  # noqa: S311 - spreading
        while True:
            writer.write(b"x")
            await writer.drain()  # raises once the server has reset the connection
            self.body_bytes += 1
            await asyncio.sleep(self.args.interval)

    async def pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        kinds = ["slow"] * self.args.slow + [
            "idle" if i % 2 == 0 else "partial" for i in range(self.args.idle)
        ]
        firsts: list[asyncio.Future[None]] = []
        tasks = []
        for i, kind in enumerate(kinds):  # round-robin over the sources: even spread
            first = loop.create_future()
            firsts.append(first)
            source = self.sources[i % len(self.sources)]
            tasks.append(asyncio.ensure_future(self.one(kind, source, first)))
        commands = asyncio.ensure_future(self.commands())
        waits: list[asyncio.Future[Any]] = [
            asyncio.gather(*firsts),
            asyncio.ensure_future(self.stopping.wait()),
        ]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        emit("opened", **self.counts())
        await self.stopping.wait()
        commands.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        emit("closed", **self.counts())

    async def commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = line.decode().strip()
            if command == "stats":
                emit("stats", **self.counts())
            elif command == "stop":
                break
            elif command:
                emit("error", message=f"unknown command {command!r}")
        self.stopping.set()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = raise_nofile()
    needed = args.idle + args.slow + 64
    if limit < needed:
        emit("error", message=f"open-files limit {limit} < {needed} needed")
        return 1
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415 - optional

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(Flood(args).run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
