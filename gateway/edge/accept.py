"""Accepting client connections: ``Acceptor`` serves a listening socket as
``loop.create_server(sock=...)`` does, but takes every connection waiting in its queue (up to
``ACCEPT_BATCH``) each time the socket is readable.

Why not uvloop's own server: libuv accepts one connection per poll of the event loop (since
libuv 1.45, libuv/libuv#3696), and a busy gateway's loop iteration lasts milliseconds. A
burst of new connections then waits in the kernel's queue for seconds: 200 connections opened
at once against a saturated worker were accepted over 1.5 s, their first requests answered
after up to 1.7 s while the others' took 60 ms (bench/run.py at c200: p99 0.9 s, 15 times
its p50). asyncio's own loop accepts up to its backlog per readiness; nginx accepts one per
event, but its iterations are microseconds. Taken in a batch, the same 200 are all accepted
within 90 ms.

Out of file descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), accepting pauses for
``ACCEPT_PAUSE`` seconds, with one log line: the connections wait in the queue (nothing is
reset) and are taken when descriptors free up. A connection that fails its TLS handshake, or
that its client reset before it was served, ends alone and quietly, as under uvloop's server.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Final

log = logging.getLogger("gateway")

ACCEPT_BATCH: Final = 100  # connections taken per readiness of the socket (asyncio: its backlog)
ACCEPT_PAUSE: Final = 0.5  # seconds without accepting when the process is out of resources
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor(asyncio.AbstractServer):
    """A listening socket served with ``factory``'s protocols (TLS with ``ssl``, whose
    handshake gets ``handshake_timeout`` seconds). ``close`` stops accepting and closes the
    socket, as ``asyncio.Server.close`` does; connections already accepted go on."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = sock
        self._factory = factory
        self._ssl = ssl_context
        self._handshake_timeout = handshake_timeout if ssl_context is not None else None
        self._reading = False
        self._pause: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[None]] = set()
        sock.setblocking(False)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._sock is None else (self._sock,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._reading

    async def start_serving(self) -> None:
        self._read()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._unread(sock)
        if self._pause is not None:
            self._pause.cancel()
            self._pause = None
        sock.close()

    async def wait_closed(self) -> None:
        """Nothing to wait for: the connections are the runner's (aiohttp shuts them down)."""

    async def serve_forever(self) -> None:
        """As ``asyncio.Server``'s: serve until cancelled, then close."""
        await self.start_serving()
        try:
            await self._loop.create_future()
        finally:
            self.close()

    def _read(self) -> None:
        self._pause = None
        if self._sock is not None and not self._reading:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._reading = True

    def _unread(self, sock: socket.socket) -> None:
        if self._reading:
            self._loop.remove_reader(sock.fileno())
            self._reading = False

    def _accept(self) -> None:
        sock = self._sock
        for _ in range(ACCEPT_BATCH):
            if sock is None:
                return
            try:
                connection, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.warning(
                        "cannot accept connections",
                        extra={"fields": {"error": str(exc), "paused_s": ACCEPT_PAUSE}},
                    )
                    self._unread(sock)
                    self._pause = self._loop.call_later(ACCEPT_PAUSE, self._read)
                    return
                continue  # that one connection is gone already (ECONNABORTED, EPROTO...)
            connection.setblocking(False)
            task = self._loop.create_task(self._serve(connection))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _serve(self, connection: socket.socket) -> None:
        # The transport owns the socket from here: it closes it (and detaches the object)
        # when the connection ends, a failed handshake included. Closing it here as well
        # could close a descriptor number the process has given to a newer connection.
        try:
            await self._loop.connect_accepted_socket(
                self._factory,
                connection,
                ssl=self._ssl,
                ssl_handshake_timeout=self._handshake_timeout,
            )
        except (OSError, TimeoutError):  # ssl.SSLError is an OSError: a failed handshake
            return
        except Exception:  # the gateway's own bug: its traceback, and the others go on
            log.exception("could not serve an accepted connection")
