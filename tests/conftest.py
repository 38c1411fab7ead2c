"""Real parts for the tests: aiohttp upstreams on port 0 (on 127.0.0.2 for "NODA2" and
127.0.0.3 for "NODA1"), the gateway listening on 127.0.0.1:0, and raw sockets for what HTTP
client libraries would normalise away."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop
from aiohttp import web

from gateway.app import Gateway
from gateway.config import parse_config
from gateway.logs import flush, setup_logging

NODA1 = "127.0.0.3"
NODA2 = "127.0.0.2"


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


async def _echo(request: web.Request) -> web.StreamResponse:
    return web.json_response({"path": request.raw_path, "method": request.method})


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The tests run on uvloop, as the gateway does (``cli.serve``): its transports differ
    from asyncio's in ways the WebSocket relay sees."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    """Start a real aiohttp upstream: ``await upstream(host, handler=None, port=0)``.

    Every request it receives is recorded in ``.seen`` (body read whole, unless the handler
    is given ``record_body=False`` and streams it itself).
    """
    started: list[Upstream] = []

    async def start(
        host: str = NODA1, handler: Handler | None = None, port: int = 0, record_body: bool = True
    ) -> Upstream:
        holder: list[Upstream] = []

        async def entry(request: web.Request) -> web.StreamResponse:
            body = await request.read() if record_body else b""
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
            holder[0].seen.append(Seen(request.method, request.raw_path, headers, body))
            return await (handler or _echo)(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", entry)
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        up = Upstream(host, runner.addresses[0][1], runner)
        holder.append(up)
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


@dataclass
class RunningGateway:
    gateway: Gateway
    port: int
    logs: io.StringIO
    config_text: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, Any]]:
        flush()  # lines are written once per event-loop iteration
        return [orjson.loads(line) for line in self.logs.getvalue().splitlines() if line]


@pytest.fixture
async def gateway() -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """Start the gateway on 127.0.0.1:0 from a routes.yaml text: ``await gateway(yaml)``."""
    started: list[RunningGateway] = []

    async def start(config_text: str, config_path: str | None = None) -> RunningGateway:
        logs = io.StringIO()
        setup_logging(os.environ.get("TEST_LOG_LEVEL", "INFO"), logs)
        gw = Gateway(parse_config(config_text), config_path=config_path)
        addresses = await gw.start("127.0.0.1", 0)
        running = RunningGateway(gw, addresses[0][1], logs, config_text)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.gateway.stop()
    logging.getLogger().handlers.clear()


def routes(services: dict[str, str], probes: bool = False, **nodes: str) -> str:
    """A routes.yaml text: ``routes({"city": "{port: 1, nodes: [noda1]}"}, noda1=NODA1)``.

    Active health checks are off unless ``probes``: their requests would otherwise show up
    in what the upstreams of tests about other things receive.
    """
    node_lines = "\n".join(f"  {name}: {{host: {host}}}" for name, host in nodes.items())
    service_lines = "\n".join(f"  {name}: {body}" for name, body in services.items())
    health = "" if probes else "health: {enabled: false}\n"
    return f"{health}nodes:\n{node_lines}\nservices:\n{service_lines}\n"


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
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
    return RawResponse(int(status), " ".join(reason), headers, body, raw)  # type: ignore[arg-type]


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


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """A TCP server that answers with whatever bytes the test writes: ``await raw_upstream(fn)``.

    ``fn(reader, writer)`` is called per connection after the request head has been read.
    """
    servers: list[asyncio.Server] = []

    async def start(respond: RawHandler, host: str = NODA1) -> int:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await respond(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, host, 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def canned(data: bytes) -> RawHandler:
    """A raw upstream answer: write ``data`` and close."""

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return respond


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


@pytest.fixture(scope="session")
def shared_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``$REDIS_URL`` if it answers, else a redis-server started for the test session."""
    url = os.environ.get("REDIS_URL")
    if url and _redis_answers(url):
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


def _redis_answers(url: str) -> bool:
    parsed = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or 6379), 0.5
        ) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers this test may kill, pause or restart: ``own_redis(*args)``."""
    servers: list[RedisServer] = []

    def start(*extra: str, config: str | None = None, port: int | None = None) -> RedisServer:
        workdir = tmp_path / f"redis{len(servers)}"
        workdir.mkdir()
        servers.append(RedisServer(workdir, *extra, config=config, port=port))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own, so that tests never see each other's buckets."""
    return f"test:{uuid.uuid4().hex[:12]}:"


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
            cwd=Path(__file__).resolve().parent.parent,
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


@pytest.fixture
def node_process() -> Iterator[Callable[[str, str], NodeProcess]]:
    """Start ``tests/nodeserver.py`` processes: ``node_process(NODA2, "noda2")``."""
    started: list[NodeProcess] = []

    def start(host: str, name: str) -> NodeProcess:
        node = NodeProcess(host, name)
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


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
