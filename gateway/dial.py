"""Outgoing TCP connections with a connect timeout that a stalled event loop cannot fake.

``asyncio.timeout`` around ``loop.create_connection`` is judged by the loop, not by the
network: when the loop is held up past the deadline (a CPU-starved process, a long garbage
collection), the timer and the finished connect are seen in the same pass, and the timer
wins on both uvloop and asyncio: a connection the kernel made in a millisecond is thrown away
and the request answered 502 ``upstream_connect_timeout``. Here the deadline asks the kernel
instead: a socket connected by then is used (``getpeername`` answers only once the
handshake is done), and only one still connecting is a timeout. The upstream pool, the
WebSocket relay and the Redis client all connect through ``open_connection``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl as tls
from collections.abc import Callable
from typing import TypeVar

P = TypeVar("P", bound=asyncio.BaseProtocol)


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
        else:
            async with asyncio.timeout_at(deadline):
                transport, protocol = await loop.create_connection(
                    factory, sock=sock, ssl=ssl, server_hostname=server_hostname
                )
    except BaseException:
        sock.close()  # a no-op once the loop closed it (it detaches it then)
        raise
    return transport, protocol


async def dial(host: str, port: int, deadline: float) -> socket.socket:
    """A non-blocking socket connected to ``host``:``port`` by ``deadline`` (loop time),
    trying each address of a name in turn as ``create_connection`` does. An IP address is
    used as is, without the resolver."""
    loop = asyncio.get_running_loop()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:  # a name
        async with asyncio.timeout_at(deadline):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await _connect(loop, sock, address, deadline)
        except TimeoutError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"connect to {host}:{port} failed: " + "; ".join(map(str, errors)))


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
