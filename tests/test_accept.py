"""Accepting client connections (``edge/accept.py``): a burst waiting in the kernel's queue is
taken at once, not one connection per loop iteration as uvloop's own server does; out of
file descriptors, accepting pauses and the waiting connections are served afterwards, none
reset. Real sockets on loopback, on uvloop (as every test here)."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from typing import cast

import pytest

from gateway.edge import accept
from gateway.edge.accept import Acceptor

BURST = 60


class Counting(asyncio.Protocol):
    """Answers each read with b"ok", and counts the connections made."""

    made: list[Counting]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # a stream's
        self.made.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"ok")


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def factory() -> tuple[list[Counting], type[Counting]]:
    made: list[Counting] = []
    return made, type("Protocol", (Counting,), {"made": made})


def clients(port: int, n: int) -> list[socket.socket]:
    """``n`` connections the kernel has completed: they wait in the listener's queue."""
    opened = []
    for _ in range(n):
        client = socket.create_connection(("127.0.0.1", port))
        client.setblocking(False)
        opened.append(client)
    return opened


async def answered(client: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(client, b"hi")
    return await asyncio.wait_for(loop.sock_recv(client, 2), 5)


async def iterations(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_burst_of_connections_is_accepted_within_a_few_loop_iterations():
    loop = asyncio.get_running_loop()
    sock = listening()
    made, protocol = factory()
    waiting = clients(sock.getsockname()[1], BURST)
    server = Acceptor(sock, protocol)
    try:
        await server.start_serving()
        await iterations(6)
        assert len(made) == BURST
    finally:
        server.close()
        for client in waiting:
            client.close()
    assert sock.fileno() == -1  # closed with the server, as asyncio.Server.close does
    # uvloop's own server, on the same burst and the same iterations: a few only.
    sock = listening()
    made, protocol = factory()
    waiting = clients(sock.getsockname()[1], BURST)
    theirs = await loop.create_server(protocol, sock=sock)
    try:
        await iterations(6)
        assert len(made) < BURST / 4  # why Acceptor exists (libuv accepts one per poll)
    finally:
        theirs.close()
        for client in waiting:
            client.close()


async def test_out_of_descriptors_it_pauses_then_serves_every_waiting_connection(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(accept, "ACCEPT_PAUSE", 0.2)
    sock = listening()
    made, protocol = factory()
    waiting = clients(sock.getsockname()[1], 5)
    server = Acceptor(sock, protocol)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = socket.socket()
    lowest_free = probe.fileno()  # every descriptor below it is taken
    probe.close()
    try:
        with caplog.at_level(logging.WARNING, logger="gateway"):
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                await server.start_serving()
                await iterations(6)  # accept() fails with EMFILE: nothing taken, no crash
                assert made == []
                assert not server.is_serving()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await asyncio.sleep(0.3)  # the pause ends: the queue is taken whole
        assert len(made) == 5
        assert server.is_serving()
        lines = [r for r in caplog.records if r.getMessage() == "cannot accept connections"]
        assert len(lines) == 1
        assert "Too many open files" in lines[0].fields["error"]  # type: ignore[attr-defined]
        for client in waiting:  # each one is served: none was reset while it waited
            assert await answered(client) == b"ok"
    finally:
        server.close()
        for client in waiting:
            client.close()


async def test_a_connection_reset_in_the_queue_costs_only_itself():
    sock = listening()
    made, protocol = factory()
    port = sock.getsockname()[1]
    reset = socket.create_connection(("127.0.0.1", port))
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    reset.close()  # RST while it waits to be accepted
    waiting = clients(port, 3)
    server = Acceptor(sock, protocol)
    try:
        await server.start_serving()
        await asyncio.sleep(0.1)
        assert server.is_serving()
        for client in waiting:
            assert await answered(client) == b"ok"
        assert 3 <= len(made) <= 4  # the reset one may have been accepted before its RST
    finally:
        server.close()
        for client in waiting:
            client.close()
