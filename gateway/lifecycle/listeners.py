"""The listening sockets. The supervisor binds them once and every worker of every
generation inherits them, so that a restart hands over the same sockets (their accept queues
included) instead of binding new ones: there is no moment without a listener, and no
connection the kernel completed is reset by a closing queue."""

from __future__ import annotations

import socket
from typing import Final

BACKLOG: Final = 1024


def bind(
    host: str, port: int, *, reuse_port: bool = False, listen: bool = True
) -> list[socket.socket]:
    """Listening sockets on ``host:port``, as asyncio's ``create_server`` makes them: one per
    address the name resolves to (IPv6 ones IPv6-only), ``SO_REUSEADDR`` set. Port 0 takes a
    free port, the same for every address. ``reuse_port``: other sockets may bind the same
    port (each worker's slot has its own; the kernel spreads connections over them).
    ``listen``: False for a bind that only checks the address is free."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, resolved in infos:
            if (family, resolved[0]) in seen:
                continue
            seen.add((family, resolved[0]))
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            where = resolved
            if port == 0 and len(bound) > 1:  # the port the first address got
                where = (resolved[0], bound[0].getsockname()[1], *resolved[2:])
            sock.bind(where)
            if listen:
                sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in bound:
            sock.close()
        raise
    return bound


def unclaimed(host: str, port: int) -> None:
    """Raises ``OSError`` (EADDRINUSE) when another socket listens on ``host:port``. Sockets
    bound with ``SO_REUSEPORT`` bind beside another process's that set it too (of the same
    user: a second gateway started by mistake) and share its connections, where one socket's
    bind would fail: a bind without it (not listening: no connection is queued to it),
    closed at once, finds such a listener first."""
    for sock in bind(host, port, listen=False):
        sock.close()


def address(sock: socket.socket) -> tuple[str, int]:
    """Where a listening socket listens: (host, port)."""
    name = sock.getsockname()
    return name[0], name[1]
