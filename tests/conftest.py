"""Real parts for the tests: aiohttp upstreams on port 0 (on 127.0.0.2 for "NODA2" and
127.0.0.3 for "NODA1"), the gateway listening on 127.0.0.1:0, and raw sockets for what HTTP
client libraries would normalise away. The fixtures live here; what they are built on (and
what test modules import) lives in ``helpers.py``."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web

from gateway.app import Gateway
from gateway.config import parse_config
from gateway.logs import setup_logging

from .helpers import (
    NODA1,
    SHIPPED_ENV,
    Handler,
    NodeProcess,
    RawClient,
    RawHandler,
    RawServers,
    RedisServer,
    RunningGateway,
    Seen,
    Upstream,
    quick_stop,
    redis_answers,
)
from .processes import GATEWAY, Process


async def _echo(request: web.Request) -> web.StreamResponse:
    return web.json_response({"path": request.raw_path, "method": request.method})


def pytest_configure(config: pytest.Config) -> None:
    for name, value in SHIPPED_ENV.items():
        os.environ.setdefault(name, value)


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
    is given ``record_body=False`` and streams it itself). With ``ssl_context`` it serves
    HTTPS.
    """
    started: list[Upstream] = []

    async def start(
        host: str = NODA1,
        handler: Handler | None = None,
        port: int = 0,
        record_body: bool = True,
        ssl_context: ssl.SSLContext | None = None,
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
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        up = Upstream(host, runner.addresses[0][1], runner)
        holder.append(up)
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Each phase's report kept on its test (``item.stash[FAILED]``: whether the test itself
    failed), for fixtures that add to a failure's report."""
    report: pytest.TestReport = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


FAILED = pytest.StashKey[bool]()


@pytest.fixture
async def gateway(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """Start the gateway on 127.0.0.1:0 from a routes.yaml text: ``await gateway(yaml)``. When
    the test fails, each gateway's log goes to the report ("Captured stdout teardown"): a
    502 says there which upstream failure it was."""
    started: list[RunningGateway] = []

    async def start(config_text: str, config_path: str | None = None) -> RunningGateway:
        logs = io.StringIO()
        setup_logging(os.environ.get("TEST_LOG_LEVEL", "INFO"), logs)
        config_text = quick_stop(config_text)
        gw = Gateway(parse_config(config_text), config_path=config_path)
        # Every listener on a free port (the HTTPS and admin ones when configured).
        addresses = await gw.start("127.0.0.1", 0, ports={"https": 0, "admin": 0})
        running = RunningGateway(gw, addresses[0][1], logs, config_text)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.gateway.stop()
    logging.getLogger().handlers.clear()
    if request.node.stash.get(FAILED, False):
        for running in started:
            print(f"-- the log of the gateway on port {running.port} --")
            print(running.logs.getvalue()[-20_000:])


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[RunningGateway | int], Awaitable[RawClient]]]:
    """``await connect(gw)`` (or a port): a ``RawClient`` connected to it, closed at the end."""
    opened: list[RawClient] = []

    async def open_one(to: RunningGateway | int) -> RawClient:
        opened.append(await RawClient.connect(to if isinstance(to, int) else to.port))
        return opened[-1]

    yield open_one
    for client in opened:
        client.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """A TCP server that answers with whatever bytes the test writes: ``await raw_upstream(fn)``.

    ``fn(reader, writer)`` is called per connection after the request head has been read.
    """
    servers = RawServers()

    async def start(respond: RawHandler, host: str = NODA1) -> int:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await respond(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        return await servers.start(on_connect, host)

    yield start
    await servers.close()


# -- Redis -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``$REDIS_URL`` if it answers, else a redis-server started for the test session."""
    url = os.environ.get("REDIS_URL")
    if url and redis_answers(url):
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


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


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[tuple[Process, Path]]]]:
    procs: list[Process] = []

    async def start(
        config_text: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> tuple[Process, Path]:
        """``serve`` with this config (and these arguments, this environment besides the
        tests', in ``cwd``), on a free plain port, its pid file in tmp_path."""
        env = env or {}
        config = tmp_path / "routes.yaml"
        config.write_text(quick_stop(config_text))
        proc = await asyncio.create_subprocess_exec(
            *GATEWAY, "--config", str(config), "--host", "127.0.0.1", "--port", "0",
            "--pid-file", str(tmp_path / "gateway.pid"), *args,
            stdout=asyncio.subprocess.PIPE, env={**os.environ, **env}, cwd=cwd,
        )  # fmt: skip
        procs.append(Process(proc, tmp_path / "gateway.pid"))
        return procs[-1], config

    yield start
    for p in procs:
        if p.proc.returncode is None:
            p.proc.terminate()  # a stop that cleans up (pid file, the workers' sockets)
            try:
                await asyncio.wait_for(p.proc.wait(), 15)
            except TimeoutError:
                p.proc.kill()  # workers (serve --workers) follow their supervisor
        await p.proc.wait()
        await asyncio.wait_for(p.finished(), 15)  # every process writing to the pipe is gone
