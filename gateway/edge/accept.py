"""Accepting client connections: ``Acceptor`` serves a listening socket as
``loop.create_server(sock=...)`` does, but takes every connection waiting in its queue (up to
``ACCEPT_BATCH``) each time the socket is readable.

Why not uvloop's own server: libuv accepts one connection per poll of the event loop (since
libuv 1.45, libuv/libuv#3696), and a busy gateway's loop iteration lasts milliseconds. A
burst of new connections then waits in the kernel's queue for seconds: 200 connections opened
at once against a saturated worker were accepted over 1.5 s, their first requests answered
after up to 1.7 s while the others' took 60 ms (bench/run.py at c200: p99 0.9 s, 15 times
its p50). asyncio's own loop accepts up to its backlog per readiness; nginx accepts one per
event, but its iterations are microseconds. Taken in a batch, the same 200 were all accepted
within 90 ms in a test server on uvloop (3 s with its own accept).

When ``accept`` fails for the process rather than for one connection (out of descriptors or
memory: EMFILE, ENFILE, ENOBUFS, ENOMEM; or any error that is not one connection's), accepting
pauses for ``ACCEPT_PAUSE`` seconds and is tried again, with one log line until it succeeds:
the connections wait in the queue (nothing is reset) and are taken when it works again. A
connection that failed before it was taken (ECONNABORTED...), or that fails its TLS
handshake, ends alone and quietly, as under uvloop's server.

A stop takes what the queue still holds before it closes the socket: connections the kernel
completed, whose clients may have written a request already, are served rather than reset.
First a socket filter goes on the listening socket (``refuse_new``) that drops every SYN:
new clients get no handshake (one whose SYN is dropped sends it again ~1 s later and then
finds the port closed, refused, so it may try elsewhere; or, with several workers on the
port, another worker's socket). Every other packet passes, so a handshake already under way
completes: its client was sent the SYN-ACK, counts itself connected and may be writing its
request. The stop then waits for those (``handshakes_done``: until the kernel lists none of
them, at most ``HANDSHAKE_GRACE``), accepting as usual, before its last accept
(``close(take_queue=True)``); ``wait_closed`` returns once every connection taken is the
server's (its ``connection_made`` ran; a TLS one's after its handshake, bounded by the
handshake timeout), so that a shutdown that follows sees all of them. nginx's stop resets
both: what completes between its last accept and the close, and the handshakes under way.
(The supervisor holds every listening socket too, so a worker's close leaves it listening:
a worker that starts accepting takes such a filter off, ``accept_new``, so that one that
replaces a stopped worker is not left refusing.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable, Collection
from typing import Final

log = logging.getLogger("gateway")

ACCEPT_BATCH: Final = 100  # connections taken per readiness of the socket (asyncio: its backlog)
ACCEPT_PAUSE: Final = 0.5  # seconds without accepting when accept fails for the process
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept(2)'s errors that concern the one connection it would have returned (Linux passes on
# the new socket's pending network errors): the next one is taken.
_ONE_CONNECTIONS: Final = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
})  # fmt: skip


# Linux's SO_ATTACH_FILTER (asm-generic/socket.h), which Python's socket module does not name,
# and classic BPF: a socket filter sees a TCP segment from its TCP header on (byte 13 holds
# the flags); each instruction is (code, jump if true, jump if false, k).
_SO_ATTACH_FILTER: Final = 26
_SO_DETACH_FILTER: Final = 27
BPF_LOAD_FLAGS: Final = (0x30, 0, 0, 13)  # BPF_LD | BPF_B | BPF_ABS: the flags byte
BPF_IF_SYN: Final = (0x45, 0, 1, 0x02)  # BPF_JMP | BPF_JSET | BPF_K: SYN? next, else skip one
BPF_DROP: Final = (0x06, 0, 0, 0)  # BPF_RET | BPF_K: keep 0 bytes
BPF_KEEP: Final = (0x06, 0, 0, 0xFFFFFFFF)  # BPF_RET | BPF_K: keep it whole
_DROP_SYN: Final = (BPF_LOAD_FLAGS, BPF_IF_SYN, BPF_DROP, BPF_KEEP)
HANDSHAKE_GRACE: Final = 1.0  # seconds a stop waits at most for handshakes under way
_SYN_RECV: Final = b"03"  # the state column of /proc/net/tcp for a handshake under way


def attach_filter(sock: socket.socket, program: tuple[tuple[int, int, int, int], ...]) -> None:
    """Put the classic BPF ``program`` on ``sock`` (Linux), replacing any filter it had.
    Raises ``OSError`` when the kernel refuses it."""
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}, natively aligned;
    # the kernel copies the program during the call.
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def refuse_new(sock: socket.socket) -> None:
    """From now on the kernel drops every SYN that reaches the listening ``sock``: it starts
    no new handshake, completes those under way, and what its queue holds can still be
    taken. (Connections taken before are sockets of their own: untouched.) Where there are
    no socket filters (not Linux), or the kernel refuses this one, a stop keeps the old
    window: the moment between its last accept and the close."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            attach_filter(sock, _DROP_SYN)


def accept_new(sock: socket.socket) -> None:
    """Undo ``refuse_new``, if it was done: the supervisor holds every listening socket too, and
    a worker that stopped left its filter on the socket its replacement then serves."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):  # ENOENT: there was none
            sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)


def handshakes_under_way(ports: Collection[int]) -> int:
    """How many handshakes to local ``ports`` the kernel has under way (SYN received, SYN-ACK
    sent, the client's ACK not in yet), from ``/proc/net/tcp`` and ``tcp6``; 0 where those
    tables are not (not Linux). The tables list every socket of the network namespace: read
    at a stop only."""
    count = 0
    if not ports:
        return count
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, "rb") as rows:
                lines = rows.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split(None, 4)  # sl, local address, remote address, state, ...
            if len(fields) > 3 and fields[3] == _SYN_RECV:
                port = int(fields[1].rpartition(b":")[2], 16)
                count += port in ports
    return count


async def handshakes_done(ports: Collection[int], grace: float = HANDSHAKE_GRACE) -> None:
    """Until the kernel has no handshake to ``ports`` under way, at most ``grace`` seconds: a
    stop that refused new ones (``refuse_new``) lets those complete and be accepted."""
    ends = time.monotonic() + grace
    while handshakes_under_way(ports) and time.monotonic() < ends:  # noqa: ASYNC110 - at a stop
        await asyncio.sleep(0.01)


class Acceptor(asyncio.AbstractServer):
    """A listening socket served with ``factory``'s protocols (TLS with ``ssl_context``, whose
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
        if ssl_context is not None and not (handshake_timeout is None or handshake_timeout > 0):
            raise ValueError("a TLS handshake timeout must be positive")  # at start, not later
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = sock
        self._factory = factory
        self._ssl = ssl_context
        self._handshake_timeout = handshake_timeout if ssl_context is not None else None
        self._reading = False
        self._failing = False  # accept fails for the process: logged once, until it works
        self._pause: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[None]] = set()
        sock.setblocking(False)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._sock is None else (self._sock,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._sock is not None

    @property
    def port(self) -> int | None:
        """The TCP port it listens on (None once closed)."""
        if self._sock is None or self._sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return int(self._sock.getsockname()[1])

    def refuse_new(self) -> None:
        """Start no new handshake; go on accepting (``refuse_new``, the function): a stop's
        first step, before ``handshakes_done`` and ``close(take_queue=True)``."""
        if self._sock is not None:
            refuse_new(self._sock)

    async def start_serving(self) -> None:
        if self._sock is not None:
            accept_new(self._sock)
        self._read()

    def close(self, *, take_queue: bool = False) -> None:
        """Stop accepting and close the socket; ``take_queue``: take every connection its
        queue holds first (a stop; not a handover, where another process goes on accepting
        from the same queue)."""
        sock = self._sock
        if sock is None:
            return
        if take_queue:
            refuse_new(sock)  # no handshake starts between the last accept and the close
        while take_queue and self._take(sock) == ACCEPT_BATCH:
            pass
        self._sock = None
        self._unread(sock)
        if self._pause is not None:
            self._pause.cancel()
            self._pause = None
        sock.close()

    async def wait_closed(self) -> None:
        """Until every connection taken is the server's (its protocol's ``connection_made``
        ran, or it failed). The connections are then the runner's: aiohttp shuts them down."""
        while self._connecting:
            await asyncio.wait(set(self._connecting))

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
        if self._sock is not None:
            self._take(self._sock)

    def _take(self, sock: socket.socket) -> int:
        """Take up to ACCEPT_BATCH connections off the queue; how many it tried to."""
        for tried in range(ACCEPT_BATCH):
            try:
                connection, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return tried  # the queue is empty
            except OSError as exc:
                if exc.errno in _ONE_CONNECTIONS:
                    continue  # that one connection is gone already
                self._failed(sock, exc)
                return tried
            self._failing = False
            connection.setblocking(False)
            task = self._loop.create_task(self._serve(connection))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
        return ACCEPT_BATCH

    def _failed(self, sock: socket.socket, exc: OSError) -> None:
        """accept failed for the process, not for one connection: pause, then try again."""
        if not self._failing:
            self._failing = True
            out_of = exc.errno in _OUT_OF_RESOURCES
            log.log(
                logging.WARNING if out_of else logging.ERROR,
                "cannot accept connections",
                extra={"fields": {"error": str(exc), "paused_s": ACCEPT_PAUSE}},
            )
        self._unread(sock)
        if self._pause is None and self._sock is not None:
            self._pause = self._loop.call_later(ACCEPT_PAUSE, self._read)

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
