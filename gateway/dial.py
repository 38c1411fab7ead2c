"""Outgoing connections with timeouts that a stalled event loop cannot fake.

``asyncio.timeout`` is judged by the loop, not by the network: when the loop is held up past
a deadline (a CPU-starved process, a long garbage collection), the timer and the I/O that
came in time are seen in the same pass, and the timer wins on both uvloop and asyncio. A
connection the kernel made in a millisecond is thrown away and the request answered 502
``upstream_connect_timeout``; a Redis answer that came back in time becomes the limiter's
fallback. Here a deadline asks the kernel instead:

- ``open_connection``: a socket connected by the deadline is used (``getpeername`` answers
  only once the handshake is done); only one still connecting is a timeout. A TLS handshake
  then has the rest of the time as a ``read_timeout``: a flight of the peer's that came in
  time is read. The upstream pool, the WebSocket relay and the Redis client connect
  through it.
- ``read_timeout`` (``ReadDeadline`` for a wait made of callbacks): at the deadline, while the
  socket holds bytes the loop has not read yet (``unread``), the loop gets ``READ_GRACE``
  more to read them, a few times at most; only a wait with nothing come in is a timeout.
  The limiter's Redis calls wait this way.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import ssl as tls
from collections.abc import Callable, Sequence
from contextvars import Context
from types import TracebackType
from typing import Final, TypeVar

P = TypeVar("P", bound=asyncio.BaseProtocol)

READ_GRACE: Final = 0.01  # seconds more for the loop to read what came in time
MAX_GRACES: Final = 3  # at most this many: a socket kept readable cannot stretch a deadline


async def open_connection(
    factory: Callable[[], P],
    host: str,
    port: int,
    timeout: float,
    *,
    ssl: tls.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[asyncio.Transport, P]:
    """``loop.create_connection(factory, host, port)`` within ``timeout`` seconds, the TLS
    handshake (with ``ssl``, for ``server_hostname``) included. Raises ``TimeoutError`` when
    the connect (or the handshake) did not complete in time, ``OSError`` (``ssl.SSLError``
    for TLS) when it failed; the socket is closed on any failure or cancellation."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sock = await dial(host, port, deadline)
    try:
        if ssl is None:  # no I/O to wait for: the socket is connected
            transport, protocol = await loop.create_connection(factory, sock=sock)
        else:  # the handshake's flights: a late loop gets its graces for what came in time
            async with read_timeout(max(deadline - loop.time(), 0.0), lambda: _readable(sock)):
                transport, protocol = await loop.create_connection(
                    factory, sock=sock, ssl=ssl, server_hostname=server_hostname
                )
    except BaseException:
        sock.close()  # a no-op once the loop closed it (it detaches it then)
        raise
    return transport, protocol


async def dial(host: str, port: int, deadline: float) -> socket.socket:
    """A non-blocking socket connected to ``host``:``port`` by ``deadline`` (loop time). An IP
    address is used as is, without the resolver; a name's addresses are tried in turn."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:  # a name
        async with asyncio.timeout_at(deadline):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
    return await connect_first(infos, deadline)


# What a connect fails with when this machine, not the upstream, is short of something: the
# process's or the system's descriptors, buffers, memory. Never the target's fault.
LOCAL_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class OutOfResources(OSError):
    """A connection could not be made for want of this machine's resources (``LOCAL_ERRNOS``)."""


AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[object, ...]]


async def connect_first(infos: Sequence[AddrInfo], deadline: float) -> socket.socket:
    """The first of ``infos`` (as ``getaddrinfo`` gives them) that connects by ``deadline``,
    each tried in turn as ``create_connection`` does: a refused one does not end the
    attempt, a timeout does (the deadline is spent)."""
    loop = asyncio.get_running_loop()
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            if exc.errno in LOCAL_ERRNOS:
                raise OutOfResources(exc.errno, exc.strerror) from exc
            raise
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await _connect(loop, sock, address, deadline)
        except TimeoutError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            if exc.errno in LOCAL_ERRNOS:
                raise OutOfResources(exc.errno, exc.strerror) from exc
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if len(errors) == 1:
        raise errors[0]
    raise OSError("every address failed: " + "; ".join(map(str, errors)))


async def _connect(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    address: tuple[object, ...],  # as getaddrinfo gives it
    deadline: float,
) -> None:
    try:
        sock.connect(address)
    except (BlockingIOError, InterruptedError):  # EINPROGRESS: the handshake is under way
        pass
    else:
        return  # connected at once
    done = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _settle, done)
    try:
        async with asyncio.timeout_at(deadline):
            await done
    except TimeoutError:
        if not _connected(sock):
            raise
    finally:
        loop.remove_writer(fd)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, f"connect to {address[0]}:{address[1]} failed: {os.strerror(error)}")


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _connected(sock: socket.socket) -> bool:
    """Whether the kernel finished the socket's connect (a failed one has no peer either)."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


class ReadDeadline:
    """Calls ``expire`` once ``seconds`` have passed, judged by the kernel: when the time
    comes while ``unread()`` says the socket holds bytes the loop has not read yet, the
    answer came in time and the loop was late. It then gets ``READ_GRACE`` more (a timer
    fires only after the loop has polled its sockets again), at most ``MAX_GRACES`` times,
    before ``expire`` is called. For a wait made of callbacks, without a task to cancel (the
    limiter's Redis calls); ``read_timeout`` is the same for a coroutine."""

    __slots__ = ("_expire", "_graces", "_loop", "_timer", "_unread")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        seconds: float,
        unread: Callable[[], bool],
        expire: Callable[[], object],
        context: Context | None = None,
    ) -> None:
        self._loop = loop
        self._unread = unread
        self._expire = expire
        self._graces = 0
        self._timer = loop.call_later(seconds, self._due, context=context)

    def _due(self) -> None:
        if self._graces < MAX_GRACES and self._unread():
            self._graces += 1
            self._timer = self._loop.call_later(READ_GRACE, self._due)  # (in this context)
        else:
            expire = self._expire
            self.cancel()
            expire()

    def cancel(self) -> None:
        """No ``expire`` from now on. Its callables are let go: a wait that holds its deadline
        (and whose ``expire`` refers to the wait) would otherwise be a reference cycle,
        garbage only the cyclic collector finds, once per call."""
        self._timer.cancel()
        self._expire = self._unread = _nothing


def _nothing() -> bool:
    return False


class read_timeout:  # lowercase: used as asyncio.timeout is, async with read_timeout(...)
    """``asyncio.timeout(seconds)`` around a wait for an answer on a socket, judged by the
    kernel as ``ReadDeadline`` judges it. (A class rather than a generator-based context
    manager: it runs once per Redis call.)"""

    __slots__ = ("_deadline", "_seconds", "_timeout", "_unread")

    def __init__(self, seconds: float, unread: Callable[[], bool]) -> None:
        self._seconds = seconds
        self._unread = unread

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        self._timeout = timeout = asyncio.timeout(None)
        await timeout.__aenter__()
        self._deadline = ReadDeadline(
            loop, self._seconds, self._unread, lambda: timeout.reschedule(loop.time())
        )  # (expires now: the wait is cancelled)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._deadline.cancel()
        await self._timeout.__aexit__(kind, exc, traceback)  # raises TimeoutError if it expired


def unread(transport: asyncio.BaseTransport | None) -> bool:
    """Whether the kernel holds bytes (or an end) on ``transport``'s socket that the loop has
    not read yet."""
    sock = (
        None if transport is None or transport.is_closing() else transport.get_extra_info("socket")
    )
    return sock is not None and _readable(sock)


def _readable(sock: socket.socket) -> bool:
    fd = sock.fileno()
    if fd < 0:  # closed (or handed over and detached)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
