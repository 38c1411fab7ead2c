"""The gateway as a real process (``daarion-gateway serve``: the supervisor and its
workers), and clients that count what they wrote and what was answered."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

GATEWAY = [sys.executable, "-m", "gateway"]


class Process:
    """A ``daarion-gateway serve`` child whose JSON log lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, pid_file: Path) -> None:
        self.proc = proc
        self.pid_file = pid_file
        self.lines: list[dict[str, Any]] = []
        self._new = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            async with self._new:
                self.lines.append(orjson.loads(raw))
                self._new.notify_all()

    async def finished(self) -> None:
        """The output's end: once every process holding the pipe has exited."""
        await self._reader

    async def wait_for(self, message: str, timeout: float = 10) -> dict[str, Any]:
        return (await self.wait_for_all(message, 1, timeout))[0]

    async def wait_for_all(
        self, message: str, count: int, timeout: float = 10
    ) -> list[dict[str, Any]]:
        """The first ``count`` lines with this message, once there are that many."""

        async def find() -> list[dict[str, Any]]:
            async with self._new:
                while True:
                    found = [line for line in self.lines if line["message"] == message]
                    if len(found) >= count:
                        return found[:count]
                    await self._new.wait()

        return await asyncio.wait_for(find(), timeout)

    async def handling_signals(self, timeout: float = 10) -> None:
        """Once the supervisor handles signals: it writes its pid file after installing its
        handlers, and a signal before them ends it (their default action)."""
        async with asyncio.timeout(timeout):
            while not self.pid_file.exists():  # noqa: ASYNC110 - another process writes it
                await asyncio.sleep(0.01)

    async def port(self) -> int:
        started = await self.wait_for("gateway started")
        return int(started["listen"][0].rsplit(":", 1)[1])


async def keep_alive_client(port: int, stop: asyncio.Event) -> tuple[int, int, list[int]]:
    """Requests back to back on keep-alive connections that honour ``Connection: close`` (and
    then reconnect) until ``stop`` or a refused connection: (written, answered, statuses)."""
    written = answered = 0
    statuses: list[int] = []
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return written, answered, statuses  # the listener has closed
        try:
            while not stop.is_set():
                writer.write(b"GET /api/city/x HTTP/1.1\r\nHost: gw\r\n\r\n")
                written += 1
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return written, answered, statuses  # closed under a request: lost
                length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
                await reader.readexactly(length)
                answered += 1
                statuses.append(int(head.split()[1]))
                if re.search(rb"(?i)\r\nconnection: close\r\n", head):
                    break  # the gateway said so: a new connection for the next request
        finally:
            writer.close()
    return written, answered, statuses


async def get_on_new_connections(url: str, times: int) -> list[int]:
    """Each GET on a connection of its own: the kernel spreads connections over workers."""
    statuses = []
    for _ in range(times):
        async with aiohttp.ClientSession() as fresh, fresh.get(url) as response:
            statuses.append(response.status)
    return statuses


async def fresh_connections(port: int, stop: asyncio.Event) -> tuple[int, int, list[int]]:
    """A new connection for every request until ``stop``: (attempts, answered, statuses). An
    attempt refused, reset or closed without an answer is not answered."""
    attempts = answered = 0
    statuses: list[int] = []
    while not stop.is_set():
        attempts += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            continue
        try:
            writer.write(b"GET /api/city/fresh HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.read()
            answered += 1
            statuses.append(int(head.split()[1]))
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()
    return attempts, answered, statuses


class Load:
    """Keep-alive clients and fresh-connection clients against a port, counted."""

    def __init__(self, port: int, keep_alive: int = 10, fresh: int = 2) -> None:
        self.stop = asyncio.Event()
        self._kept = [asyncio.create_task(keep_alive_client(port, self.stop)) for _ in
                      range(keep_alive)]  # fmt: skip
        self._fresh = [asyncio.create_task(fresh_connections(port, self.stop)) for _ in
                       range(fresh)]  # fmt: skip

    async def results(self) -> tuple[tuple[int, int, set[int]], tuple[int, int, set[int]]]:
        """(written, answered, statuses) of the keep-alive clients; (attempts, answered,
        statuses) of the fresh-connection ones."""
        self.stop.set()
        kept = await asyncio.wait_for(asyncio.gather(*self._kept), 30)
        fresh = await asyncio.wait_for(asyncio.gather(*self._fresh), 30)
        return (
            (sum(r[0] for r in kept), sum(r[1] for r in kept), {s for r in kept for s in r[2]}),
            (sum(r[0] for r in fresh), sum(r[1] for r in fresh), {s for r in fresh for s in r[2]}),
        )


async def health(port: int) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/health") as response,
    ):
        body: dict[str, Any] = await response.json()
        return body
