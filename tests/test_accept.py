"""Accepting client connections (``edge/accept.py``): a burst waiting in the kernel's queue is
taken at once, not one connection per loop iteration as uvloop's own server does; out of
file descriptors, accepting pauses and the waiting connections are served afterwards, none
reset; a stop serves what the queue holds. Real sockets on loopback, on uvloop (as every test
here); errors of accept(2) that a test cannot make happen come from a socket subclass."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import pytest

from gateway.edge import accept
from gateway.edge.accept import Acceptor

BURST = 60


class Counting(asyncio.Protocol):
    """Answers each read with b"ok"; adds itself to ``made`` when it is given a connection."""

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


@dataclass
class Queued:
    """A listening socket with ``clients`` connections the kernel has completed, waiting in
    its queue; ``made``: the connections its server's protocol has been given."""

    sock: socket.socket
    clients: list[socket.socket]
    made: list[Counting] = field(default_factory=list)
    servers: list[asyncio.AbstractServer] = field(default_factory=list)

    def protocol(self) -> Counting:
        connection = Counting()
        connection.made = self.made
        return connection

    def acceptor(self) -> Acceptor:
        server = Acceptor(self.sock, self.protocol)
        self.servers.append(server)
        return server


@contextlib.contextmanager
def queued(n: int, sock: socket.socket | None = None) -> Iterator[Queued]:
    """``n`` connections waiting on ``sock`` (a new listening socket by default); its servers,
    the clients and what was made of them are closed at the end."""
    sock = sock if sock is not None else listening()
    port = sock.getsockname()[1]
    waiting = Queued(sock, [socket.create_connection(("127.0.0.1", port)) for _ in range(n)])
    for client in waiting.clients:
        client.setblocking(False)
    try:
        yield waiting
    finally:
        for server in waiting.servers:
            server.close()
        for connection in waiting.made:
            connection.transport.close()
        for client in waiting.clients:
            client.close()
        sock.close()


async def answered(client: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(client, b"hi")
    return await asyncio.wait_for(loop.sock_recv(client, 2), 5)


async def iterations(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_burst_of_connections_is_accepted_within_a_few_loop_iterations():
    with queued(BURST) as waiting:
        await waiting.acceptor().start_serving()
        await iterations(6)
        assert len(waiting.made) == BURST
        waiting.servers[0].close()
        assert waiting.sock.fileno() == -1  # closed with the server, as asyncio.Server.close
    # uvloop's own server, on the same burst and the same iterations: a few only.
    with queued(BURST) as waiting:
        loop = asyncio.get_running_loop()
        waiting.servers.append(await loop.create_server(waiting.protocol, sock=waiting.sock))
        await iterations(6)
        assert len(waiting.made) < BURST / 4  # why Acceptor exists (libuv: one per poll)


async def test_out_of_descriptors_it_pauses_then_serves_every_waiting_connection(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(accept, "ACCEPT_PAUSE", 0.2)
    with queued(5) as waiting:
        server = waiting.acceptor()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        probe = socket.socket()
        lowest_free = probe.fileno()  # every descriptor below it is taken
        probe.close()
        with caplog.at_level(logging.WARNING, logger="gateway"):
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                await server.start_serving()
                await iterations(6)  # accept() fails with EMFILE: nothing taken, no crash
                assert waiting.made == []
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await asyncio.sleep(0.3)  # the pause ends: the queue is taken whole
        assert len(waiting.made) == 5
        lines = [r for r in caplog.records if r.getMessage() == "cannot accept connections"]
        assert len(lines) == 1
        assert lines[0].levelno == logging.WARNING
        assert "Too many open files" in lines[0].fields["error"]  # type: ignore[attr-defined]
        for client in waiting.clients:  # each one is served: none was reset while it waited
            assert await answered(client) == b"ok"


class Failing(socket.socket):
    """A listening socket whose accept() first raises the errors it is given."""

    def __init__(self, *errors: int) -> None:
        super().__init__()
        self.errors = list(errors)
        self.calls = 0
        self.bind(("127.0.0.1", 0))
        self.listen(1024)
        self.setblocking(False)

    def accept(self) -> tuple[socket.socket, object]:
        self.calls += 1
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, errno.errorcode[code])
        return super().accept()


async def test_an_error_of_one_connection_costs_only_that_one():
    with queued(3, Failing(errno.ECONNABORTED, errno.EPROTO)) as waiting:
        await waiting.acceptor().start_serving()
        await iterations(6)
        assert len(waiting.made) == 3  # taken in the same round as the two errors
        for client in waiting.clients:
            assert await answered(client) == b"ok"


async def test_an_error_of_the_socket_pauses_accepting_with_one_line_not_a_busy_loop(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(accept, "ACCEPT_PAUSE", 0.2)
    sock = Failing(errno.EINVAL, errno.EINVAL)
    with queued(2, sock) as waiting, caplog.at_level(logging.WARNING, logger="gateway"):
        await waiting.acceptor().start_serving()
        await iterations(20)
        assert sock.calls == 1  # then paused: not 100 failing calls per iteration
        await asyncio.sleep(0.25)  # tried again: EINVAL again, still one line
        assert sock.calls == 2
        await asyncio.sleep(0.25)  # and then it works
        assert len(waiting.made) == 2
    lines = [r for r in caplog.records if r.getMessage() == "cannot accept connections"]
    assert [r.levelno for r in lines] == [logging.ERROR]


async def test_a_stop_serves_what_the_queue_holds_before_it_returns():
    with queued(8) as waiting:
        server = waiting.acceptor()  # never started: all 8 wait in the queue
        server.close(take_queue=True)
        assert waiting.sock.fileno() == -1
        assert waiting.made == []  # taken, not yet the server's
        await server.wait_closed()
        assert len(waiting.made) == 8  # every one is, before wait_closed returns
        for client in waiting.clients:
            assert await answered(client) == b"ok"


async def connects(port: int) -> bool:
    """Whether a new connection to ``port`` completes within 0.5 s (its SYN answered)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


async def test_a_stop_completes_no_new_handshake_while_another_process_holds_the_socket():
    # The supervisor holds every listening socket too (here: a second descriptor of it), so a
    # worker's close leaves it listening: a connection completed after the worker's last
    # accept would wait in the queue and be reset when the supervisor exits, after its
    # client was told it was connected and had written its request. After a stop none is
    # completed; one that replaces the stopped worker on that socket accepts again.
    supervisor = listening()
    port = supervisor.getsockname()[1]
    with contextlib.closing(supervisor), queued(3, supervisor.dup()) as waiting:
        assert await connects(port)  # the 4th: in the queue with the three
        server = waiting.acceptor()
        server.close(take_queue=True)
        await server.wait_closed()
        assert len(waiting.made) == 4
        for client in waiting.clients:
            assert await answered(client) == b"ok"
        assert not await connects(port)  # its SYN dropped: not queued to be reset
        replacement = Acceptor(supervisor, waiting.protocol)
        waiting.servers.append(replacement)
        await replacement.start_serving()
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        writer.write(b"hi")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
        writer.close()


def hold_back_acks(sock: socket.socket) -> None:
    """A socket filter on the listening ``sock`` that keeps SYNs alone: a client's handshake
    stays under way (its ACK, and what it writes, dropped) while it counts itself connected,
    as one a round trip away is when a stop begins. A filter put on later replaces it."""
    accept.attach_filter(
        sock, (accept.BPF_LOAD_FLAGS, accept.BPF_IF_SYN, accept.BPF_KEEP, accept.BPF_DROP)
    )


async def half_connected(waiting: Queued, port: int) -> socket.socket:
    """A client whose handshake is under way and which has written b"hi"."""
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    waiting.clients.append(client)
    await asyncio.wait_for(loop.sock_connect(client, ("127.0.0.1", port)), 2)  # SYN-ACK in
    await loop.sock_sendall(client, b"hi")
    return client


async def test_a_stop_completes_the_handshakes_under_way_and_serves_them():
    # A client sent the SYN-ACK before the stop counts itself connected and writes its
    # request: a stop that dropped its ACK (or closed before it came) would reset it.
    with queued(0) as waiting:
        port = waiting.sock.getsockname()[1]
        server = waiting.acceptor()
        await server.start_serving()
        hold_back_acks(waiting.sock)
        client = await half_connected(waiting, port)
        assert accept.handshakes_under_way({port}) == 1
        assert waiting.made == []
        server.refuse_new()
        assert not await connects(port)  # a new one is refused meanwhile
        await accept.handshakes_done({port})
        assert accept.handshakes_under_way({port}) == 0
        server.close(take_queue=True)
        await server.wait_closed()
        assert len(waiting.made) == 1
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(client, 2), 5) == b"ok"


async def test_a_stop_waits_for_handshakes_under_way_no_longer_than_its_grace():
    with queued(0) as waiting:
        port = waiting.sock.getsockname()[1]
        hold_back_acks(waiting.sock)  # and kept on: this handshake never completes
        await half_connected(waiting, port)
        started = time.monotonic()
        await accept.handshakes_done({port}, grace=0.3)
        assert 0.3 <= time.monotonic() - started < 0.6
        assert accept.handshakes_under_way({port}) == 1
        assert accept.handshakes_under_way({port + 1}) == 0  # another port's are not counted


async def test_a_tls_handshake_timeout_must_be_positive():
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with listening() as sock, pytest.raises(ValueError, match="positive"):
        Acceptor(sock, Counting, ssl_context=context, handshake_timeout=0)
