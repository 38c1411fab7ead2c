"""The gateway's processes over their lives, as an operator drives them: SIGTERM under load,
restarts (SIGUSR2, ``daarion-gateway restart``) and upgrades to other code while clients
keep sending, reloads with several workers, and new generations that cannot start. Real
processes, real sockets; the counts are what clients wrote and what was answered."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from gateway.lifecycle.channel import Channel

from .helpers import NODA1, QUICK_STOP, free_port, routes
from .processes import GATEWAY, Load, Process, health

ROOT = Path(__file__).resolve().parent.parent
Serve = Callable[..., Awaitable[tuple[Process, Path]]]


async def restart(proc: Process, *args: str) -> tuple[int, str, str]:
    """``daarion-gateway restart`` for this gateway: (exit status, stdout, stderr)."""
    command = await asyncio.create_subprocess_exec(
        *GATEWAY, "restart", "--pid-file", str(proc.pid_file), "--timeout", "60", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(command.communicate(), 90)
    assert command.returncode is not None
    return command.returncode, out.decode(), err.decode()


def city(port: int, lifecycle: str = "{drain_delay: 0.5}") -> str:
    text = routes({"city": f"{{port: {port}, nodes: [noda1]}}"}, noda1=NODA1)
    return text.replace(QUICK_STOP, f"lifecycle: {lifecycle}\n")


def assert_nothing_lost(kept: tuple[int, int, set[int]], fresh: tuple[int, int, set[int]]) -> None:
    written, answered, statuses = kept
    assert answered > 100
    assert written == answered, ("written and never answered", written - answered)
    assert statuses == {200}
    attempts, accepted, fresh_statuses = fresh
    assert attempts > 10
    assert attempts == accepted, ("connection attempts not answered", attempts - accepted)
    assert fresh_statuses == {200}


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_restart_loses_no_request_and_refuses_no_connection(
    serve: Serve, upstream, workers: str
) -> None:
    up = await upstream(NODA1)
    proc, _ = await serve(city(up.port), "--workers", workers)
    count = int(workers)
    first = await proc.wait_for_all("gateway started", count)
    port = await proc.port()
    load = Load(port)
    await asyncio.sleep(0.5)
    code, out, err = await restart(proc)
    assert (code, err) == (0, ""), out
    assert "restarted: generation 2 serves" in out
    await asyncio.sleep(0.5)  # clients go on against the new generation
    kept, fresh = await load.results()
    assert_nothing_lost(kept, fresh)
    started = await proc.wait_for_all("gateway started", 2 * count)
    new = [line for line in started if line["generation"] == 2]
    assert sorted(line["worker"] for line in new) == list(range(count))
    assert {line["pid"] for line in new}.isdisjoint(line["pid"] for line in first)
    assert (await health(port))["generation"] == 2
    handing_over = (
        "handing over: a newer generation accepts; this one closes each connection after its "
        "next answer"
    )
    handed = await proc.wait_for_all(handing_over, count)
    assert {line["generation"] for line in handed} == {1}
    stopped = await proc.wait_for_all("gateway stopped", count)
    assert {line["pid"] for line in stopped} == {line["pid"] for line in first}
    restarted = await proc.wait_for("restarted: the new generation accepts, the old one hands over")
    assert restarted["pid"] == proc.proc.pid  # the same supervisor, its program replaced
    assert restarted["worker"] is None
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 20) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_under_load_loses_no_request_written(
    serve: Serve, upstream, workers: str
) -> None:
    up = await upstream(NODA1)
    proc, _ = await serve(city(up.port, "{drain_delay: 1.0}"), "--workers", workers)
    await proc.wait_for_all("gateway started", int(workers))
    port = await proc.port()
    load = Load(port, fresh=0)
    await asyncio.sleep(0.5)
    proc.proc.send_signal(signal.SIGTERM)
    # Every worker's line: the kernel may give the request below to any of them.
    await proc.wait_for_all(
        "draining: still serving, every answer closes its connection", int(workers)
    )
    async with (
        aiohttp.ClientSession() as fresh,
        fresh.get(f"http://127.0.0.1:{port}/gateway/upstreams") as r,
    ):
        report = await r.json()
    assert report["draining"] is True
    assert 0 < report["drain_left"] <= 1.0
    assert await asyncio.wait_for(proc.proc.wait(), 20) == 0
    (written, answered, statuses), _ = await load.results()
    assert answered > 100
    assert written == answered, ("written and never answered", written - answered)
    assert statuses == {200}


async def test_a_head_begun_during_drain_delay_is_answered_after_it(serve: Serve, upstream) -> None:
    """A client that begins its request during drain_delay and finishes it once the stop
    closes connections gets its answer (Connection: close), as the drain promises, instead of
    a close under a half-written head."""
    up = await upstream(NODA1)
    proc, _ = await serve(city(up.port, "{drain_delay: 0.5, shutdown_timeout: 5}"))
    port = await proc.port()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        proc.proc.send_signal(signal.SIGTERM)
        await proc.wait_for("draining: still serving, every answer closes its connection")
        await asyncio.sleep(0.3)
        writer.write(b"GET /api/city/late HTTP/1.1\r\nHost: a\r\n")
        await asyncio.sleep(0.5)  # drain_delay is over: the stop is closing connections
        writer.write(b"X-Late: 1\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200 "), raw
    assert b"\r\nConnection: close\r\n" in raw
    assert [s.raw_path for s in up.seen] == ["/city/late"]
    assert await asyncio.wait_for(proc.proc.wait(), 20) == 0


def release(root: Path, version: str) -> Path:
    """A second copy of the gateway's code, reporting ``version``: what ``pip install -U``
    or a new checkout puts in place."""
    shutil.copytree(
        ROOT / "gateway", root / "gateway", ignore=shutil.ignore_patterns("__pycache__")
    )
    init = root / "gateway" / "__init__.py"
    init.write_text(re.sub(r'__version__ = ".*"', f'__version__ = "{version}"', init.read_text()))
    return root


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_an_upgrade_to_other_code_loses_nothing(
    serve: Serve, upstream, tmp_path: Path, workers: str
) -> None:
    """The deploy layout of symlinked releases: ``current`` points at the running code; the
    upgrade points it at the next one and restarts."""
    up = await upstream(NODA1)
    old = release(tmp_path / "release-1", "1.0.0")
    new = release(tmp_path / "release-2", "2.0.0")
    current = tmp_path / "current"
    current.symlink_to(old)
    env = {"PYTHONPATH": str(current)}
    # Not from the repository's directory, whose gateway/ python -m would import first.
    proc, _ = await serve(city(up.port), "--workers", workers, env=env, cwd=tmp_path)
    await proc.wait_for_all("gateway started", int(workers))
    port = await proc.port()
    assert (await health(port))["version"] == "1.0.0"
    load = Load(port)
    await asyncio.sleep(0.5)
    swap = tmp_path / "current.next"
    swap.symlink_to(new)
    os.replace(swap, current)  # atomically, as deploy tools do
    code, out, _ = await restart(proc)
    assert code == 0, out
    await asyncio.sleep(0.5)
    kept, fresh = await load.results()
    assert_nothing_lost(kept, fresh)
    after = await health(port)
    assert (after["version"], after["generation"]) == ("2.0.0", 2)
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 20) == 0


async def test_websocket_sessions_stay_on_the_old_generation_until_ws_drain(
    serve: Serve, upstream, client: aiohttp.ClientSession
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(f"echo {message.data}")
        return ws

    up = await upstream(NODA1, echo)
    text = routes({"city": f"{{port: {up.port}, nodes: [noda1], websocket: true}}"}, noda1=NODA1)
    proc, _ = await serve(text.replace(QUICK_STOP, "lifecycle: {drain_delay: 0.5, ws_drain: 2}\n"))
    port = await proc.port()
    ws = await client.ws_connect(f"http://127.0.0.1:{port}/ws/city/rooms/general")
    await ws.send_str("before")
    assert (await ws.receive_str(timeout=5)) == "echo before"
    code, out, _ = await restart(proc)
    assert code == 0, out
    handed = await proc.wait_for("gateway stopping: draining requests in flight")
    assert handed["generation"] == 1
    for i in range(5):  # the session goes on, on the old generation, through ws_drain
        await ws.send_str(f"during {i}")
        assert (await ws.receive_str(timeout=5)) == f"echo during {i}"
        await asyncio.sleep(0.2)
    closing = await ws.receive(timeout=10)
    assert closing.type is WSMsgType.CLOSE
    assert ws.close_code == 1001  # going away, once ws_drain has run out
    stopped = await proc.wait_for("gateway stopped")
    assert stopped["generation"] == 1
    fresh = await client.ws_connect(f"http://127.0.0.1:{port}/ws/city/rooms/general")
    await fresh.send_str("after")  # a new session: the new generation's
    assert (await fresh.receive_str(timeout=5)) == "echo after"
    await fresh.close()


async def test_a_new_generation_that_cannot_start_leaves_the_old_one_serving(
    serve: Serve, upstream, client: aiohttp.ClientSession
) -> None:
    up = await upstream(NODA1)
    good = city(up.port)
    proc, config = await serve(good)
    port = await proc.port()
    url = f"http://127.0.0.1:{port}/api/city/x"

    config.write_text(good + "  search: {port: 1, nodes: [noda9]}\n")  # broken
    code, _, err = await restart(proc)
    assert code == 1
    assert "unknown node 'noda9'" in err
    failed = await proc.wait_for("restart failed; the running generation keeps serving")
    assert failed["pid"] == proc.proc.pid
    assert any("unknown node 'noda9'" in p for p in failed["problems"])
    async with client.get(url) as r:
        assert r.status == 200
    assert (await health(port))["generation"] == 1

    taken = free_port()  # an admin listener on a port another program holds
    with socket_on(taken):
        config.write_text(good + f"admin: {{listen: {{host: 127.0.0.1, port: {taken}}}}}\n")
        code, _, err = await restart(proc)
    assert code == 1
    assert "cannot listen" in err
    async with client.get(url) as r:
        assert r.status == 200
    assert (await health(port))["generation"] == 1  # the program was replaced, not the workers
    assert len([line for line in proc.lines if line["message"] == "gateway started"]) == 1

    config.write_text(good)
    code, out, _ = await restart(proc)  # and a good one after the failures
    assert code == 0, out
    assert (await health(port))["generation"] == 2
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 20) == 0


async def test_a_second_gateway_with_workers_on_the_same_port_refuses_to_start(
    serve: Serve, upstream, tmp_path: Path
) -> None:
    # Workers share a port through SO_REUSEPORT, which lets another process of the same user
    # bind it too: a second `serve --workers 2` started by mistake took half the connections
    # of the first (and its pid file). It now fails as a single socket's bind would.
    up = await upstream(NODA1)
    proc, config = await serve(city(up.port), "--workers", "2")
    await proc.wait_for_all("gateway started", 2)
    port = await proc.port()
    pid_file = proc.pid_file.read_text()
    second = await asyncio.create_subprocess_exec(
        *GATEWAY, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "2", "--pid-file", str(tmp_path / "second.pid"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 1, (out, err)
    assert b"cannot listen" in out + err
    assert b"in use" in out + err
    assert not (tmp_path / "second.pid").exists()
    assert proc.pid_file.read_text() == pid_file
    assert (await health(port))["status"] == "healthy"  # the first serves on


@contextlib.contextmanager
def socket_on(port: int) -> Iterator[None]:
    """A listening socket on 127.0.0.1:port for the block's length."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        yield


async def scrape(port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        return await response.text()


def per_worker(text: str, series: str) -> dict[str, str]:
    """``series{...,worker="i"} value`` by worker, for a series with no other label but
    ``hash``: worker -> the hash (gateway_config_info) or the value."""
    found = {}
    for labels, value in re.findall(rf"^{series}\{{(.*?)\}} (\S+)$", text, re.MULTILINE):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        found[fields["worker"]] = fields.get("hash", value)
    return found


async def test_with_workers_a_reload_is_every_worker_or_none_and_a_respawn_serves_it(
    serve: Serve, upstream
) -> None:
    up = await upstream(NODA1)
    first = "metrics_cache: 0\n" + city(up.port)  # each scrape below must be fresh
    proc, config = await serve(first, "--workers", "2")
    started = await proc.wait_for_all("gateway started", 2)
    port = await proc.port()
    hashes = per_worker(await scrape(port), "gateway_config_info")
    assert len(hashes) == 2
    assert len(set(hashes.values())) == 1
    original = next(iter(hashes.values()))
    assert {line["hash"] for line in started} == {original}

    config.write_text(first + "  search: {port: 1, nodes: [noda9]}\n")
    proc.proc.send_signal(signal.SIGHUP)
    rejected = await proc.wait_for("config reload rejected; still serving the previous config")
    assert (rejected["pid"], rejected["worker"]) == (proc.proc.pid, None)  # said once
    assert "generation" in rejected
    await asyncio.sleep(0.3)
    text = await scrape(port)
    assert per_worker(text, "gateway_config_last_reload_successful") == {"0": "0.0", "1": "0.0"}
    assert per_worker(text, "gateway_config_info") == {"0": original, "1": original}
    assert len([line for line in proc.lines if line["message"] == "config reloaded"]) == 0
    # A worker started after the broken edit serves the config the others serve, and says
    # the last reload failed, as they do.
    by_worker = {line["worker"]: line for line in started}  # the lines come in either order
    os.kill(by_worker[1]["pid"], signal.SIGKILL)
    await proc.wait_for("worker exited; starting another")
    respawned = (await proc.wait_for_all("gateway started", 3))[2]
    assert (respawned["worker"], respawned["hash"]) == (1, original)
    for _ in range(3):
        text = await scrape(port)
        assert per_worker(text, "gateway_config_last_reload_successful") == {"0": "0.0", "1": "0.0"}

    second = first + f"  search: {{port: {up.port}, nodes: [noda1]}}\n"
    config.write_text(second)
    proc.proc.send_signal(signal.SIGHUP)
    reloaded = await proc.wait_for_all("config reloaded", 2)
    assert sorted(line["worker"] for line in reloaded) == [0, 1]
    assert {line["generation"] for line in reloaded} == {1}
    new_hash = reloaded[0]["hash"]
    assert new_hash != original
    assert reloaded[1]["hash"] == new_hash
    await proc.wait_for("config reloaded by every worker")

    # The file changes again, unannounced (no SIGHUP): a worker started now serves what the
    # others serve, not the file as it is.
    config.write_text(first)
    victim = by_worker[0]
    os.kill(victim["pid"], signal.SIGKILL)
    await proc.wait_for_all("worker exited; starting another", 2)
    replacement = (await proc.wait_for_all("gateway started", 4))[3]
    assert replacement["worker"] == victim["worker"]
    assert replacement["hash"] == new_hash
    for _ in range(3):  # whichever worker answers
        text = await scrape(port)
        assert per_worker(text, "gateway_config_info") == {"0": new_hash, "1": new_hash}
        # every worker serves search now (the replacement too): new connections spread
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/api/search/q") as r,
        ):
            assert r.status == 200
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 20) == 0


async def test_without_pidfd_the_supervisor_still_sees_a_worker_die_and_replaces_it(
    serve: Serve, upstream, tmp_path: Path
) -> None:
    """A Python without ``os.pidfd_open`` (built where the kernel had none), or a kernel or
    sandbox that refuses it (Linux before 5.3, gVisor, valgrind: ENOSYS), still starts,
    replaces a worker that died, and stops. ``sitecustomize`` takes the call away in the
    supervisor, as such a Python would not have it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    marker = tmp_path / "no-pidfd"
    (hook / "sitecustomize.py").write_text(
        f"import os\ndel os.pidfd_open\nopen({str(marker)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
    )
    up = await upstream(NODA1)
    proc, _ = await serve(city(up.port), env={"PYTHONPATH": str(hook)})
    first = await proc.wait_for("gateway started")
    assert str(proc.proc.pid) in marker.read_text().split()  # the supervisor had no pidfd
    port = await proc.port()
    assert (await health(port))["status"] in ("healthy", "degraded")
    os.kill(first["pid"], signal.SIGKILL)
    died = await proc.wait_for("worker exited; starting another")
    assert (died["pid"], died["status"]) == (first["pid"], -signal.SIGKILL)
    second = (await proc.wait_for_all("gateway started", 2))[1]
    assert second["pid"] != first["pid"]
    assert (await health(port))["status"] in ("healthy", "degraded")
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 20) == 0
    assert "Traceback" not in "".join(str(line) for line in proc.lines)


async def test_two_restarts_in_a_row_both_happen_even_with_a_large_config(
    serve: Serve, upstream
) -> None:
    """The second SIGUSR2 comes while the first restart runs: it is carried across the exec
    and done after it. The config is larger than one environment string may be (128 KiB)."""
    up = await upstream(NODA1)
    text = city(up.port) + "".join(f"# {'x' * 90} {i}\n" for i in range(1600))
    assert len(text) > 150_000
    proc, _ = await serve(text)
    port = await proc.port()
    first = asyncio.create_task(restart(proc))
    await asyncio.sleep(0.3)
    second = asyncio.create_task(restart(proc))
    assert (await first)[0] == 0
    assert (await second)[0] == 0
    for _ in range(100):  # the carried restart may still be under way when both have said
        if (await health(port))["generation"] == 3:
            break
        await asyncio.sleep(0.1)
    assert (await health(port))["generation"] == 3
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 20) == 0


async def test_restart_signals_only_a_gateway_supervisor(tmp_path: Path) -> None:
    """A stale pid file whose pid now belongs to another program: restart refuses, and the
    program is not signalled (SIGUSR2 would kill it)."""
    other = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        pid_file = tmp_path / "gateway.pid"
        pid_file.write_text(f"{other.pid}\n")
        (tmp_path / "gateway.pid.json").write_text(f'{{"pid": {other.pid}}}')
        command = await asyncio.create_subprocess_exec(
            *GATEWAY, "restart", "--pid-file", str(pid_file), "--timeout", "2",
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await command.communicate()
        assert command.returncode == 1
        assert b"is not a gateway's supervisor" in err
        await asyncio.sleep(0.2)
        assert other.returncode is None  # still running: never signalled
    finally:
        other.kill()
        await other.wait()


async def test_a_sighup_during_the_first_start_waits_for_it(serve: Serve, upstream) -> None:
    """The first start waits for its health probes; a reload asked for meanwhile runs once the
    workers serve, instead of reading their start-up messages (which broke the start)."""

    async def slow_health(request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            await asyncio.sleep(0.8)
        return web.json_response({"status": "healthy"})

    up = await upstream(NODA1, slow_health)
    text = routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, probes=True, noda1=NODA1)
    proc, _ = await serve(text.replace(QUICK_STOP, "lifecycle: {drain_delay: 0}\n"))
    await proc.handling_signals()  # (a SIGHUP before that ends it: flaky when start is slow)
    await asyncio.sleep(0.3)  # the worker is waiting for its first probe's answer
    proc.proc.send_signal(signal.SIGHUP)
    started = await proc.wait_for("gateway started")
    reloaded = await proc.wait_for("config reloaded by every worker")
    assert reloaded["pid"] == proc.proc.pid
    assert started["generation"] == 1
    assert (await health(await proc.port()))["status"] in ("healthy", "degraded")
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 20) == 0


async def test_workers_run_the_installed_gateway_whatever_the_current_directory(
    tmp_path: Path, upstream
) -> None:
    # A "gateway" folder in the directory serve starts from (a checkout, another release):
    # "python -m gateway" would import it first; the workers must run what is installed.
    up = await upstream(NODA1)
    here = tmp_path / "elsewhere"
    decoy = here / "gateway"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("")
    (decoy / "__main__.py").write_text("raise SystemExit('the decoy ran')\n")
    config = tmp_path / "routes.yaml"
    config.write_text(city(up.port))
    program = Path(sys.executable).parent / "daarion-gateway"  # the console script, as deployed
    proc = await asyncio.create_subprocess_exec(
        str(program), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0",
        "--pid-file", str(tmp_path / "gateway.pid"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=here,
    )  # fmt: skip
    served = Process(proc, tmp_path / "gateway.pid")
    try:
        await served.wait_for("gateway started")
        port = await served.port()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/api/city/x") as response,
        ):
            assert response.status == 200
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        stderr = await proc.stderr.read() if proc.stderr is not None else b""
        assert b"the decoy ran" not in stderr


def test_a_reload_to_a_shorter_shutdown_timeout_does_not_shorten_the_kill_grace(tmp_path):
    # A worker keeps the shutdown_timeout it started with (a change needs a restart): the
    # supervisor's kill timer for a stopping worker must not follow a reload down to the
    # new value, or it kills requests the worker is still allowed to finish.
    from gateway.config import parse_config  # noqa: PLC0415
    from gateway.lifecycle.supervisor import KILL_MARGIN, Options, Supervisor  # noqa: PLC0415

    def text(seconds: int) -> str:
        return (
            f"nodes: {{noda1: {{host: {NODA1}}}}}\n"
            "services: {city: {port: 1, nodes: [noda1]}}\n"
            f"lifecycle: {{drain_delay: 1, ws_drain: 2, shutdown_timeout: {seconds}}}\n"
        )

    options = Options(str(tmp_path / "routes.yaml"), 1, None, None, "INFO", None)
    supervisor = Supervisor(options, text(25), parse_config(text(25)))
    assert supervisor.grace() == 1 + 2 + 25 + KILL_MARGIN
    supervisor.config = parse_config(text(0))
    assert supervisor.grace() == 1 + 2 + 25 + KILL_MARGIN
    supervisor.config = parse_config(text(40))
    assert supervisor.grace() == 1 + 2 + 40 + KILL_MARGIN
    # A restart to a shorter ws_drain: the old generation, handing over, drains with its own.
    supervisor.config = parse_config(text(40).replace("ws_drain: 2", "ws_drain: 0"))
    assert supervisor.grace() == 1 + 2 + 40 + KILL_MARGIN
    shutil.rmtree(supervisor.run_dir)


async def _channel_pair() -> tuple[Channel, Channel, socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    for end in (ours, theirs):
        end.setblocking(False)
    return await Channel.over(ours), await Channel.over(theirs), ours, theirs


async def test_a_late_answer_to_one_reload_is_never_taken_for_the_next_ones(tmp_path):
    # A worker that answered a prepare after ANSWER_TIMEOUT (its loop held up) left that
    # answer in the channel: the next reload read it as its own and committed a config the
    # worker had refused.
    from gateway.config import parse_config  # noqa: PLC0415
    from gateway.lifecycle.supervisor import Child, Options, Supervisor  # noqa: PLC0415

    text = f"nodes: {{noda1: {{host: {NODA1}}}}}\nservices: {{city: {{port: 1, nodes: [noda1]}}}}\n"
    options = Options(str(tmp_path / "routes.yaml"), 1, None, None, "INFO", None)
    supervisor = Supervisor(options, text, parse_config(text))
    supervisor_end, worker_end, *sockets = await _channel_pair()
    child = Child(os.getpid(), 0, supervisor.generation, supervisor_end, sockets[0], 0.0)
    supervisor.children.add(child)
    await worker_end.send("prepared", seq=0, ok=True, problems=[])  # the late one

    async def worker() -> None:
        message = await worker_end.receive()
        assert message["op"] == "prepare"
        await worker_end.send("prepared", seq=message["seq"], ok=False, problems=["refused"])

    answering = asyncio.ensure_future(worker())
    assert await supervisor._prepare(text) == ["refused"]
    await answering

    async def worker_of_older_code() -> None:  # after a failed upgrade: it says no number
        assert (await worker_end.receive())["op"] == "prepare"
        await worker_end.send("prepared", ok=False, problems=["old code refused"])

    answering = asyncio.ensure_future(worker_of_older_code())
    assert await supervisor._prepare(text) == ["old code refused"]  # taken, not waited out
    await answering
    for end in (supervisor_end, worker_end):
        end.close()
    shutil.rmtree(supervisor.run_dir)


async def test_a_worker_never_dies_of_a_commit_it_did_not_prepare(upstream, gateway, client):
    from gateway.lifecycle.worker import _orders  # noqa: PLC0415

    up = await upstream(NODA1)
    before = routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1)
    gw = await gateway(before)
    supervisor_end, worker_end, *_ = await _channel_pair()
    orders = asyncio.ensure_future(_orders(worker_end, gw.gateway, [], 0, []))
    await supervisor_end.send("commit", seq=7)  # nothing prepared under 7
    after = routes({"agents": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1)
    await supervisor_end.send("prepare", text=after, seq=8)
    answer = await asyncio.wait_for(supervisor_end.receive(), 5)
    assert (answer["op"], answer["seq"], answer["ok"]) == ("prepared", 8, True)
    async with client.get(gw.url + "/api/city/x") as response:
        assert response.status == 200  # still the first config: the stray commit did nothing
    await supervisor_end.send("commit", seq=8)
    async with client.get(gw.url + "/api/agents/x") as response:
        assert response.status == 200  # the config it prepared, committed
    # A supervisor of code before numbers (the workers it starts after an upgrade, until
    # it restarts): its prepare and commit carry none, and are done.
    await supervisor_end.send("prepare", text=before)
    answer = await asyncio.wait_for(supervisor_end.receive(), 5)
    assert (answer["op"], answer["ok"]) == ("prepared", True)
    await supervisor_end.send("commit")
    await supervisor_end.send("handover")
    assert await asyncio.wait_for(orders, 5) is True  # alive to the end
    async with client.get(gw.url + "/api/city/x") as response:
        assert response.status == 200
    assert any("has not prepared" in line["message"] for line in gw.log_lines())
    for end in (supervisor_end, worker_end):
        end.close()


def _blocked(pid: int) -> int:
    """The signals a process blocks (its SigBlk mask, from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)
    return 0


async def test_a_signal_during_the_start_waits_for_it_instead_of_killing_it(serve):
    # Before the supervisor's handlers are in, a SIGHUP (a `systemctl reload` right after a
    # start) took its default action: the gateway died. The command blocks it first thing.
    proc, _ = await serve(routes({"city": "{port: 1, nodes: [noda1]}"}, noda1=NODA1))
    pid = proc.proc.pid
    deadline = asyncio.get_running_loop().time() + 10
    while not _blocked(pid) & (1 << (signal.SIGHUP - 1)):
        assert asyncio.get_running_loop().time() < deadline, "SIGHUP was never blocked"
        await asyncio.sleep(0.001)
    os.kill(pid, signal.SIGHUP)
    await proc.wait_for("workers started")
    await proc.wait_for("config reloaded by every worker")  # done once it could be
    assert proc.proc.returncode is None


async def test_a_generation_that_fails_after_accepting_leaves_every_socket_taking_connections(
    serve: Serve, upstream, tmp_path: Path
) -> None:
    # The new code's last worker dies just as it starts accepting; the one before it had
    # accepted, and was stopped the ordinary way: its SYN filter went on the listening
    # socket its slot shares with the running generation, whose new connections there then
    # hung (9 of 20 in a review) while the log said the old generation kept serving.
    up = await upstream(NODA1)
    old = release(tmp_path / "release-1", "1.0.0")
    new = release(tmp_path / "release-2", "2.0.0")
    worker = new / "gateway" / "lifecycle" / "worker.py"
    accept = "            await gateway.accept()\n"
    dies = "            if gateway.shared.worker.index == 1:\n                os._exit(3)\n"
    assert accept in worker.read_text()
    worker.write_text(worker.read_text().replace(accept, accept + dies))
    current = tmp_path / "current"
    current.symlink_to(old)
    proc, _ = await serve(
        city(up.port), "--workers", "2", env={"PYTHONPATH": str(current)}, cwd=tmp_path
    )
    await proc.wait_for_all("gateway started", 2)
    port = await proc.port()
    swap = tmp_path / "current.next"
    swap.symlink_to(new)
    os.replace(swap, current)
    code, _, _ = await restart(proc)
    assert code != 0
    await proc.wait_for("restart failed; the running generation keeps serving")
    await asyncio.sleep(1.0)  # the failed worker has stopped by now
    answered = 0
    for _ in range(20):  # fresh connections: the kernel spreads them over both slots
        with contextlib.suppress(TimeoutError, OSError):
            answered += (await asyncio.wait_for(health(port), 2))["version"] == "1.0.0"
    assert answered == 20
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 20) == 0


async def test_a_worker_started_again_after_a_reload_binds_no_listener_of_its_own(
    serve: Serve, upstream
) -> None:
    # A reload that adds a listener (it needs a restart) became the text a worker started
    # again runs: that worker bound the new port itself, and with the port taken it failed
    # and was started again forever, its slot's connections hanging.
    up = await upstream(NODA1)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    proc, config = await serve(city(up.port))
    first = await proc.wait_for("gateway started")
    port = await proc.port()
    taken = blocker.getsockname()[1]
    config.write_text(
        config.read_text() + f"admin: {{listen: {{host: 127.0.0.1, port: {taken}}}}}\n"
    )
    proc.proc.send_signal(signal.SIGHUP)
    await proc.wait_for("config reloaded by every worker")
    os.kill(first["pid"], signal.SIGKILL)
    second = (await proc.wait_for_all("gateway started", 2))[1]
    assert second["pid"] != first["pid"]
    warned = await proc.wait_for(
        "admin is not served until the next restart: the supervisor binds it then"
    )
    assert warned["pid"] == second["pid"]
    assert (await health(port))["status"] in ("healthy", "degraded")
    assert not [line for line in proc.lines if "did not start" in line["message"]]
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 20) == 0
    blocker.close()
