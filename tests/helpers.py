"""What the tests share: addresses, routes.yaml builders, raw HTTP and WebSocket bytes, real
Redis and node processes, socket counts. Fixtures live in ``conftest.py`` (built on these);
test modules import from here, never from ``conftest`` or from one another."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
from aiohttp import web
from cryptography import x509

from gateway.app import Gateway
from gateway.certs import names_of
from gateway.config import parse_config
from gateway.logs import flush
from gateway.snapshot import Route, compile_snapshot
from gateway.websocket.frames import unmask

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "routes.yaml"
PACKAGE = ROOT / "gateway"

# The shipped routes.yaml needs auth-service's JWT_SECRET (conftest sets this one for the run,
# so the processes the tests start inherit it).
SHIPPED_ENV = {"JWT_SECRET": "a-test-secret-of-at-least-32-bytes-long"}

NODA1 = "127.0.0.3"
NODA2 = "127.0.0.2"


# -- upstreams and the gateway -----------------------------------------------------------------


@dataclass
class Seen:
    """One request as an upstream received it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None


@dataclass
class Upstream:
    host: str
    port: int
    runner: web.AppRunner
    seen: list[Seen] = field(default_factory=list)

    async def stop(self) -> None:
        await self.runner.cleanup()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class RunningGateway:
    gateway: Gateway
    port: int
    logs: io.StringIO
    config_text: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def https_port(self) -> int:
        return int(self.gateway.bound["https"][1])

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.bound['admin'][1]}"

    def log_lines(self) -> list[dict[str, Any]]:
        flush()  # lines are written once per event-loop iteration
        return [orjson.loads(line) for line in self.logs.getvalue().splitlines() if line]


def routes(services: dict[str, str], probes: bool = False, **nodes: str) -> str:
    """A routes.yaml text: ``routes({"city": "{port: 1, nodes: [noda1]}"}, noda1=NODA1)``.
    A node is its host, or its whole mapping (``"{host: 127.0.0.2, tls: {ca: ...}}"``).

    Active health checks are off unless ``probes``: their requests would otherwise show up
    in what the upstreams of tests about other things receive.
    """
    node_lines = "\n".join(
        f"  {name}: {node if node.startswith('{') else f'{{host: {node}}}'}"
        for name, node in nodes.items()
    )
    service_lines = "\n".join(f"  {name}: {body}" for name, body in services.items())
    health = "" if probes else "health: {enabled: false}\n"
    # First, so that texts which get services appended (and reloaded) keep it.
    return f"{health}{QUICK_STOP}nodes:\n{node_lines}\nservices:\n{service_lines}\n"


# No drain phase at a stop: the gateways of the tests stop often. The tests about draining
# replace it with their own.
QUICK_STOP = "lifecycle: {drain_delay: 0}\n"


def quick_stop(config_text: str) -> str:
    """A config text (one not made by ``routes``) without a drain phase at its stop, unless it
    sets lifecycle itself."""
    return config_text if "lifecycle:" in config_text else QUICK_STOP + config_text


def sample(text: str, series: str) -> float:
    """The value of one series in a Prometheus text scrape: ``name{labels}`` as written."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.partition(" ")[0] == series
    ]
    assert len(values) == 1, (series, values)
    return values[0]


def compiled_routes(config_text: str) -> Mapping[str, Route]:
    """The routes a routes.yaml text compiles to, as a request sees them (no gateway runs)."""
    return compile_snapshot(parse_config(config_text, env={})).routes


def gateway_modules() -> dict[str, Path]:
    """Every module of the gateway package by its dotted name (a package by its own name,
    for its ``__init__.py``), in a stable order."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


class FakeClock:
    """A clock that moves only when told: ``clock()`` reads it, ``clock.advance(s)`` moves it
    (backwards too, for the limiter's rule about that)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# A routes.yaml with a problem on almost every line (test_config checks each is reported).
BROKEN = """\
listen: {host: 0.0.0.0, port: 70000}
nodes:
  noda1: {host: "${NODA1_HOST}"}
  noda2: {host: "http://node2"}
services:
  agents:
    port: 7002
    nodes: [noda1]
    wallpaper: red
  search:
    port: 8897
    nodes: [noda2, {node: noda9, port: 18897}]
    http_prefix: /search/../admin
  city:
    port: "7001/tcp"
    nodes: []
    timeouts: {connect: -1, response: soon}
  Bad_Name: {port: 1, nodes: [noda1]}
  gateway: {port: 5, nodes: [noda1]}
  dup: {port: 7002, nodes: [noda1]}
  dup: {port: 7003, nodes: [noda1]}
"""


# -- raw HTTP ----------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)


def parse_response(raw: bytes) -> RawResponse:
    """Parse one HTTP/1.x response with a Content-Length (or read-to-close) body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    _, status, *reason = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return RawResponse(int(status), " ".join(reason), headers, body, raw)


class Silent(AssertionError):
    """The server sent nothing more within ``RawClient.WAIT`` (a hang, to the client)."""


class RawClient:
    """One raw connection to a server (the gateway), its answers read one at a time by their
    framing, each step within ``WAIT`` seconds (else ``Silent``)."""

    WAIT = 2.0

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.seen = b""  # every byte read so far

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        return cls(*await asyncio.open_connection(host, port))

    async def ask(self, data: bytes, *, head: bool = False) -> RawResponse:
        self.writer.write(data)
        return await self.response(head=head)

    async def _read(self, what: Awaitable[bytes]) -> bytes:
        try:
            async with asyncio.timeout(self.WAIT):
                data = await what
        except TimeoutError:
            raise Silent(f"nothing more within {self.WAIT} s after {self.seen!r}") from None
        self.seen += data
        return data

    async def head(self) -> RawResponse:
        """The next final response's head (informational ones are skipped), body unread."""
        while True:
            answer = parse_response(await self._read(self.reader.readuntil(b"\r\n\r\n")))
            if not 100 <= answer.status < 200 or answer.status == 101:
                return answer

    async def response(self, *, head: bool = False) -> RawResponse:
        """The next final response, its body read by its framing (none for ``head``)."""
        answer = await self.head()
        if head or answer.status in (101, 204, 304):
            return answer
        return await self.body(answer)

    async def body(self, answer: RawResponse) -> RawResponse:
        """``answer`` (a head just read) with its body read by its framing."""
        if (answer.header("Transfer-Encoding") or "").lower() == "chunked":
            chunks = []
            while size := int((await self._read(self.reader.readuntil(b"\r\n"))).strip(), 16):
                chunks.append(await self._read(self.reader.readexactly(size)))
                assert await self._read(self.reader.readexactly(2)) == b"\r\n"
            while await self._read(self.reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailer fields
            answer.body = b"".join(chunks)
        elif (length := answer.header("Content-Length")) is not None:
            answer.body = await self._read(self.reader.readexactly(int(length)))
        else:
            answer.body = await self._read(self.reader.read())
        return answer

    async def until(self, data: bytes) -> None:
        """Read until ``data`` has been seen."""
        while data not in self.seen:
            chunk = await self._read(self.reader.read(65536))
            assert chunk, (data, self.seen)

    async def closed(self) -> bool:
        """True when the server closes the connection before sending another byte; False when
        it keeps it open (nothing within ``WAIT``). A byte instead fails the test."""
        try:
            data = await self._read(self.reader.read(65536))
        except Silent:
            return False
        except ConnectionResetError:
            return True
        assert data == b"", f"more than the answers: {self.seen!r}"
        return True

    async def end(self) -> str:
        """Read on to the end of the response under way: ``reset`` (the connection was reset),
        ``close`` (closed cleanly), ``complete`` (a chunked body's terminator came) or
        ``hang`` (nothing of these within ``WAIT``)."""
        try:
            while not self.seen.endswith(b"\r\n0\r\n\r\n"):
                if not await self._read(self.reader.read(65536)):
                    return "close"
        except ConnectionResetError:
            return "reset"
        except Silent:
            return "hang"
        return "complete"

    def close(self) -> None:
        self.writer.close()


async def stalled(count: Callable[[], int]) -> int:
    """What ``count()`` stops at while nothing reads the other end: read 1 s in, then checked
    unchanged 0.5 s later (backpressure reached the writer)."""
    await asyncio.sleep(1.0)
    plateau = count()
    await asyncio.sleep(0.5)
    assert count() == plateau, "the writer kept writing though nothing was read"
    return plateau


async def raw_exchange(
    port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 5.0
) -> RawResponse:
    """Send raw bytes, read until the server closes (send ``Connection: close``), parse."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    return parse_response(raw)


@contextlib.contextmanager
def unanswered_port(host: str) -> Iterator[int]:
    """A port on ``host`` whose SYNs are dropped: a listening socket that never accepts, its
    tiny backlog full. On loopback that is what a powered-off node looks like (connects time
    out)."""
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen(0)
    fillers = [socket.socket() for _ in range(3)]
    try:
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(listener.getsockname())
        yield listener.getsockname()[1]
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServers:
    """TCP servers on port 0 for a test's raw upstreams, and the end of them: ``close`` stops
    listening, cancels the connection handlers still running and waits for them, then for
    the servers. (A handler blocked on a read would otherwise outlive its test, and from
    Python 3.12 on ``Server.wait_closed`` waits for every handler: the teardown would hang.)"""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task[object]] = set()

    async def start(self, handler: RawHandler, host: str) -> int:
        """Serve ``handler(reader, writer)`` per connection on ``host``; return the port."""

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)
            await handler(reader, writer)

        server = await asyncio.start_server(tracked, host, 0)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()


def canned(*parts: bytes, pause: float = 0.05) -> RawHandler:
    """A raw upstream answer: write ``parts`` (``pause`` seconds apart: a body after its
    head is streamed, not whole) and close."""

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()

    return respond


# -- WebSocket frames --------------------------------------------------------------------------


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0
) -> bytes:
    """A frame as a peer would send it (any length); ``rsv``: its reserved bits (0x40 RSV1)."""
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    if n < 126:
        head = bytes((first, n | (0x80 if masked else 0)))
    elif n < 1 << 16:
        head = bytes((first, 126 | (0x80 if masked else 0))) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 127 | (0x80 if masked else 0))) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + unmask(payload, key)


# -- rate limits -------------------------------------------------------------------------------

# The standards' zone. A burst sent through real sockets is not simultaneous: at 10r/s every
# 100 ms it takes lets one more through. Tests that count exactly use STEADY, whose burst is the
# same but which drains one request a minute, so that a slow machine cannot change the count.
STANDARD = "{rate: 10r/s, burst: 20}"
STEADY = "{rate: 1r/m, burst: 20}"


def limited(port: int, redis_url: str, prefix: str, zone: str = STEADY, *, extra: str = "",
            services: tuple[str, ...] = ("city",), redis_timeout: float = 1.0) -> str:  # fmt: skip
    """routes.yaml: ``services`` (default: ``city``) on noda1, all behind the zone ``z``.

    A generous Redis timeout by default: on a loaded machine a 50 ms hiccup of the test
    process's event loop switches the gateway to its local fallback, whose fresh buckets let
    a burst's count through twice (what the tests of faults test, with the production
    default of 50 ms: ``redis_timeout=0.05``)."""
    return (
        routes({name: f"{{port: {port}, nodes: [noda1]}}" for name in services}, noda1=NODA1)
        + f"redis: {{url: '{redis_url}', prefix: '{prefix}', timeout: {redis_timeout}}}\n"
        + f"rate_limits: {{z: {zone}}}\ndefault_rate_limit: z\n"
        + extra
    )


async def burst(
    url: str,
    count: int,
    *,
    source: str = "127.0.0.1",
    headers: list[dict[str, str]] | None = None,
) -> list[aiohttp.ClientResponse]:
    """``count`` simultaneous GETs from ``source`` (a loopback address), bodies read."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> aiohttp.ClientResponse:
            extra = headers[i] if headers else {}
            async with session.get(url, headers=extra) as response:
                await response.read()
                return response

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def statuses(responses: list[aiohttp.ClientResponse]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in responses:
        out[r.status] = out.get(r.status, 0) + 1
    return out


# -- Redis -------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A real ``redis-server`` this test run started on a free port (and may kill, pause,
    restart), never the machine's shared one."""

    def __init__(
        self, workdir: Path, *extra: str, config: str | None = None, port: int | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed: install it (apt-get install redis-server) "
                "or set REDIS_URL to a Redis the tests may use"
            )
        self.binary = binary
        self.port = port or free_port()
        self.workdir = workdir
        self.extra = extra
        self.config = workdir / "redis.conf"
        # A file, not flags: sentinel mode needs a config file it may rewrite.
        self.config.write_text('save ""\nappendonly no\n' if config is None else config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, str(self.config), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.workdir), *self.extra],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.answers():
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def command(self, *args: str, password: str | None = None) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            if password is not None:
                s.sendall(f"AUTH {password}\r\n".encode())
                assert s.recv(64) == b"+OK\r\n"
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(65536)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.kill()


def redis_answers(url: str) -> bool:
    """Whether a Redis answers PING at ``url``."""
    parsed = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or 6379), 0.5
        ) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


# -- node processes and sockets ----------------------------------------------------------------


class NodeProcess:
    """``tests/nodeserver.py`` as a real process: a node that can be killed and restarted."""

    def __init__(self, host: str, name: str) -> None:
        self.host = host
        self.name = name
        self.port = free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.nodeserver", "--host", self.host,
             "--port", str(self.port), "--name", self.name],
            cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start") from None
                time.sleep(0.02)
            else:
                return

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


ESTABLISHED = "01"
CLOSE_WAIT = "08"


def tcp_sockets(
    *, state: str, local_port: int | None = None, remote_port: int | None = None
) -> int:
    """IPv4 TCP sockets on this machine in ``state`` (from /proc/net/tcp), by port."""
    count = 0
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local = int(fields[1].split(":")[1], 16)
            remote = int(fields[2].split(":")[1], 16)
            if fields[3] == state and local_port in (None, local) and remote_port in (None, remote):
                count += 1
    return count


def socket_queues(local_port: int, remote_port: int) -> tuple[int, int]:
    """What the kernel holds for the socket from ``local_port`` to ``remote_port``: bytes
    not yet sent (or not acknowledged), and bytes its process has not read (from
    /proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local = int(fields[1].split(":")[1], 16)
            remote = int(fields[2].split(":")[1], 16)
            if (local, remote) == (local_port, remote_port):
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    raise LookupError(f"no socket {local_port} -> {remote_port}")


def untaken_bytes(server_port: int, client_port: int) -> int:
    """What a client sent a server, on one loopback connection, that the server's process
    has not read: in the server's receive queue, and still in the client's send queue."""
    return socket_queues(server_port, client_port)[1] + socket_queues(client_port, server_port)[0]


# -- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertFiles:
    """A certificate (its chain) and key written as PEM files, for a config to name."""

    cert: Path
    key: Path

    def yaml(self) -> str:
        return f"{{cert: {self.cert}, key: {self.key}}}"


def write_cert(
    ca: trustme.CA, directory: Path, *names: str, not_after: datetime.datetime | None = None
) -> CertFiles:
    """Issue a certificate for ``names`` from ``ca`` and write it under ``directory``."""
    leaf = ca.issue_cert(*names, not_after=not_after)
    directory.mkdir(parents=True, exist_ok=True)
    stem = names[0].replace("*", "star")
    files = CertFiles(directory / f"{stem}.pem", directory / f"{stem}.key")
    files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    files.key.write_bytes(leaf.private_key_pem.bytes())
    return files


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts ``ca`` (and checks host names)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@dataclass(frozen=True)
class Handshake:
    names: tuple[str, ...]  # the DNS names of the certificate served
    alpn: str | None
    version: str | None


async def tls_handshake(
    port: int,
    server_name: str | None,
    context: ssl.SSLContext,
    host: str = "127.0.0.1",
) -> Handshake:
    """Connect, finish a TLS handshake with ``server_name`` as SNI (None: none sent), and say
    what the server chose."""
    _, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname=server_name or ""
    )
    try:
        tls = writer.get_extra_info("ssl_object")
        # The certificate's own bytes: getpeercert() says nothing of one it did not verify.
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        return Handshake(names_of(cert), tls.selected_alpn_protocol(), tls.version())
    finally:
        writer.close()
