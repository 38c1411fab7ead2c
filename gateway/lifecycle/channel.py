"""The messages between the supervisor and a worker: one JSON object per line over a Unix
socket pair the supervisor makes for each worker (the worker gets its end as an inherited
file descriptor). Every message has an ``op``:

supervisor to worker
    ``setup``     the config text and its hash, the worker's index, generation and peers, its
                  listening sockets' descriptors: the first message
    ``serve``     start accepting (a worker starts everything else first, then waits for this)
    ``prepare``   a reload's config text and its number (``seq``): parse and compile it,
                  answer ``prepared`` with the same number
    ``commit``    swap in the config prepared under ``seq`` (every worker prepared it)
    ``abort``     drop it (a worker could not): say the reload failed
    ``handover``  a newer generation serves the sockets: stop accepting, drain, exit
worker to supervisor
    ``ready``     started, not accepting yet; or ``failed`` with the error
    ``serving``   accepting
    ``prepared``  ``seq``, ``ok`` and, when not, ``problems`` (an answer that came too late
                  for its reload has an older ``seq``: never taken for the next one's; one
                  with none is from a worker of code before numbers, and taken)

The end of the stream means the other side is gone: a worker whose supervisor is gone stops.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Final

import orjson

LIMIT: Final = 16 * 1024 * 1024  # a line holds a config file's text
# How long a send waits for the other side to take its bytes before going on with them still
# buffered: a worker that does not read (stopped, its loop blocked) must not hold up the
# supervisor, which then finds it silent (no answer in time) rather than waiting forever.
DRAIN_TIMEOUT: Final = 5.0


class Closed(Exception):
    """The other side has gone."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def over(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LIMIT)
        return cls(reader, writer)

    async def send(self, op: str, **fields: Any) -> None:
        if self._writer.is_closing():
            raise Closed(op)
        self._writer.write(orjson.dumps({"op": op, **fields}) + b"\n")
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await self._writer.drain()
        except TimeoutError:
            pass  # buffered: it goes when the other side reads again
        except OSError as exc:
            raise Closed(op) from exc

    async def receive(self) -> dict[str, Any]:
        try:
            line = await self._reader.readline()
        except (OSError, ValueError) as exc:  # ValueError: a line over LIMIT
            raise Closed(str(exc)) from exc
        if not line.endswith(b"\n"):
            raise Closed("end of stream")
        message: dict[str, Any] = orjson.loads(line)
        return message

    def close(self) -> None:
        self._writer.close()
