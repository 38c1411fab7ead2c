"""The command line as users run it: check, schema, and serve as a real process (reload on
SIGHUP, graceful stop on SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from .helpers import BROKEN, NODA1, NODA2, QUICK_STOP, SHIPPED, routes
from .processes import GATEWAY, get_on_new_connections, keep_alive_client


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [*GATEWAY, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=30,
        check=False,
    )


def test_check_summarises_the_shipped_table():
    result = run("check", "--config", str(SHIPPED), env={"NODA2_HOST": "10.0.0.2", "REDIS_URL": ""})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{SHIPPED}: OK, 14 services on 2 nodes")
    table = {line.split("->")[0].strip(): line.split("->")[1].strip() for line in lines[1:-2]}
    assert table["/api/search"] == (
        "http://10.0.0.2:8897/search (noda2), http://127.0.0.1:8897/search (noda1)"
        "  [limit: api_limit]  [auth: required]"
    )
    assert table["/api/city/"] == (
        "http://127.0.0.1:7001/city/ (noda1)  [route city#2]  [limit: api_limit]  [auth: optional]"
    )
    assert "[auth: required (admin)]" in table["/api/city/admin/"]
    assert table["/ws/events (exact)"] == (
        "ws://127.0.0.1:7001/ws/events (noda1)  [route city#8]  [websocket]  [limit: api_limit]"
        "  [auth: optional]"
    )
    assert table["/api/auth/login"].endswith("[route auth#0]  [limit: login]")  # no auth
    assert lines[-3].split("->")[0].strip() == "/"  # the web app: matched last
    assert lines[-2] == (
        "/metrics and /gateway/* answer 127.0.0.0/8, ::1/128, 127.0.0.0/8 on 127.0.0.1:9101 only"
    )
    assert lines[-1] == (
        "rate limits api_limit, login, strict are kept through redis://127.0.0.1:6379/0 "
        "(on_error: local)"
    )
    assert len(table) == 26
    assert not [line for line in lines if line.startswith("warning:")]


def test_check_lists_every_problem_and_exits_2(tmp_path):
    broken = tmp_path / "routes.yaml"
    broken.write_text(BROKEN)
    result = run("check", "--config", str(broken))
    assert result.returncode == 2
    assert "13 problem(s)" in result.stderr
    assert "services.search.nodes[1] (line 12): unknown node 'noda9'" in result.stderr
    assert result.stdout == ""


def test_config_path_comes_from_flag_then_env_then_cwd(tmp_path):
    (tmp_path / "routes.yaml").write_text(SHIPPED.read_text())
    other = tmp_path / "other.yaml"
    other.write_text("nodes: {a: {host: x}}\nservices: {only: {port: 1, nodes: [a]}}\n")
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    plain = subprocess.run(
        [*GATEWAY, "check"], capture_output=True, text=True, cwd=tmp_path, env=env, check=False
    )
    assert "14 services" in plain.stdout
    assert "1 services" in run("check", cwd=tmp_path, env={"GATEWAY_CONFIG": str(other)}).stdout
    flagged = run("check", "--config", str(other), cwd=tmp_path, env={"GATEWAY_CONFIG": "nope"})
    assert "1 services" in flagged.stdout
    missing = run("check", "--config", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2
    assert "cannot read the file" in missing.stderr


def test_schema_prints_json_schema():
    result = run("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["required"]) == {"nodes", "services"}


def test_console_script_is_the_same_program():
    script = Path(sys.executable).parent / "daarion-gateway"
    result = subprocess.run(
        [str(script), "check", "--config", str(SHIPPED)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0
    assert result.stdout == run("check", "--config", str(SHIPPED)).stdout


async def test_serve_reloads_on_sighup_and_keeps_the_last_good_config(serve, upstream, client):
    city = await upstream(NODA1)
    search = await upstream(NODA2)
    first = routes({"city": f"{{port: {city.port}, nodes: [noda1]}}"}, noda1=NODA1, noda2=NODA2)
    proc, config = await serve(first)
    url = f"http://127.0.0.1:{await proc.port()}"
    started = await proc.wait_for("gateway started")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert started["open_files_limit"] in (hard, 1_048_576)  # lifted to the hard limit
    async with client.get(url + "/api/city/a") as r:
        assert r.status == 200

    config.write_text(first + "  search: {port: 1, nodes: [noda9]}\n")
    proc.proc.send_signal(signal.SIGHUP)
    rejected = await proc.wait_for("config reload rejected; still serving the previous config")
    assert rejected["pid"] == proc.proc.pid  # which process said it
    assert rejected["worker"] is None
    assert rejected["level"] == "ERROR"
    assert any("unknown node 'noda9'" in p for p in rejected["problems"])
    async with client.get(url + "/api/city/b") as r:
        assert r.status == 200
    async with client.get(url + "/metrics") as r:
        assert "gateway_config_last_reload_successful 0.0" in await r.text()

    config.write_text(first + f"  search: {{port: {search.port}, nodes: [noda2]}}\n")
    proc.proc.send_signal(signal.SIGHUP)
    await proc.wait_for("config reloaded")
    async with client.get(url + "/api/search/q") as r:
        assert r.status == 200
    assert [s.raw_path for s in search.seen] == ["/search/q"]


async def test_sigterm_lets_requests_in_flight_finish(serve, upstream, client):
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.wait_for(release.wait(), 10)
        return web.Response(text="finished")

    up = await upstream(NODA1, slow)
    proc, _ = await serve(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    url = f"http://127.0.0.1:{await proc.port()}"
    in_flight = asyncio.create_task(client.get(url + "/api/city/slow"))
    await asyncio.wait_for(arrived.wait(), 10)
    proc.proc.send_signal(signal.SIGTERM)
    await proc.wait_for("gateway stopping: draining requests in flight")
    for _ in range(100):  # the listener closes just after that line: soon, no new connection
        try:
            async with aiohttp.ClientSession() as fresh, fresh.get(url + "/health"):
                pass
        except aiohttp.ClientConnectionError:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("new connections were still accepted while requests drained")
    release.set()
    response = await in_flight
    assert response.status == 200
    assert await response.text() == "finished"
    response.release()
    assert await asyncio.wait_for(proc.proc.wait(), 15) == 0
    await proc.wait_for("gateway stopped")


async def test_sigterm_drains_keep_alive_clients_without_losing_a_request(serve, upstream):
    up = await upstream(NODA1)
    config = routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1)
    proc, _ = await serve(config.replace(QUICK_STOP, "lifecycle: {drain_delay: 1.0}\n"))
    port = await proc.port()
    stop = asyncio.Event()
    clients = [asyncio.create_task(keep_alive_client(port, stop)) for _ in range(10)]
    await asyncio.sleep(0.5)
    proc.proc.send_signal(signal.SIGTERM)
    await proc.wait_for("draining: still serving, every answer closes its connection")
    async with aiohttp.ClientSession() as fresh, fresh.get(f"http://127.0.0.1:{port}/health") as r:
        assert r.status == 503  # a load balancer sees the gateway go, not a dead host
        body = await r.json()
        assert r.headers["Connection"] == "close"
    assert body["status"] == "unhealthy"
    assert body["draining"] is True
    results = await asyncio.wait_for(asyncio.gather(*clients), 20)
    written = sum(r[0] for r in results)
    answered = sum(r[1] for r in results)
    assert answered > 100
    # Each client's last request may be one it wrote to a listener already closed (refused,
    # so never written) -- but nothing written on a connection the kernel completed went
    # unanswered (a stop completes no handshake after its last accept: edge/accept.py).
    assert written == answered, (written, answered)
    assert {s for r in results for s in r[2]} == {200}
    assert await asyncio.wait_for(proc.proc.wait(), 15) == 0


async def test_healthcheck_command_follows_the_health_status(gateway, upstream, tmp_path):
    gw = await gateway(routes({"city": "{port: 9, nodes: [noda1]}"}, noda1=NODA1))
    config = tmp_path / "routes.yaml"
    config.write_text(gw.config_text)
    args = ("healthcheck", "--config", str(config), "--port", str(gw.port))
    healthy = await asyncio.to_thread(run, *args)
    assert (healthy.returncode, healthy.stdout.split()[-1]) == (0, "200")
    gw.gateway.shared.draining = True  # /health answers 503
    draining = await asyncio.to_thread(run, *args)
    assert (draining.returncode, draining.stdout.split()[-1]) == (1, "503")
    gw.gateway.shared.draining = False
    # The file mid-edit (or wrong, not reloaded): the gateway serves on, and so says the
    # check, on the port it is given (Docker's HEALTHCHECK used to fail the container).
    config.write_text(gw.config_text + "listen: {port: 170010}\n")
    editing = await asyncio.to_thread(run, *args)
    assert (editing.returncode, editing.stdout.split()[-1]) == (0, "200")
    assert "not valid now" in editing.stderr
    from_env = await asyncio.to_thread(
        run, "healthcheck", "--config", str(config), env={"GATEWAY_PORT": str(gw.port)}
    )
    assert (from_env.returncode, from_env.stdout.split()[-1]) == (0, "200")
    # A gateway on an address of its own ($GATEWAY_HOST, as the shipped routes.yaml takes
    # it): probed there, not on 127.0.0.1.
    elsewhere = await upstream(NODA1)  # answers /health 200 too
    there = {"GATEWAY_HOST": NODA1, "GATEWAY_PORT": str(elsewhere.port)}
    probed = await asyncio.to_thread(run, "healthcheck", "--config", str(config), env=there)
    assert (probed.returncode, probed.stdout.split()[-1]) == (0, "200"), probed.stderr


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"GATEWAY_WORKERS": "two"}, "argument --workers: 'two' is not a whole number"),
        ({"GATEWAY_WORKERS": "0"}, "argument --workers: must be at least 1"),
        ({"GATEWAY_LOG_LEVEL": "verbose"}, "argument --log-level: 'verbose' is not one of"),
    ],
)
def test_a_wrong_setting_from_the_environment_gets_a_usage_line_not_a_traceback(env, said):
    result = run("serve", "--config", str(SHIPPED), env=env)
    assert result.returncode == 2
    assert said in result.stderr
    assert "Traceback" not in result.stderr


def test_an_empty_setting_from_an_env_file_is_its_default():
    # `docker run --env-file` passes VAR= as an empty string: .env.example says that means
    # the default. `check` builds the same parser: it failed with a traceback.
    empty = {"GATEWAY_WORKERS": "", "GATEWAY_LOG_LEVEL": ""}
    result = run("check", "--config", str(SHIPPED), env={**empty, "JWT_SECRET": "s" * 40})
    assert result.returncode == 0, result.stderr


async def test_workers_share_one_port_and_any_scrape_counts_them_all(serve, upstream, client):
    up = await upstream(NODA1)
    proc, _ = await serve(
        routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1), "--workers", "2"
    )
    started = await proc.wait_for_all("gateway started", 2)
    assert sorted(line["worker"] for line in started) == [0, 1]
    assert len({line["pid"] for line in started}) == 2
    url = f"http://127.0.0.1:{await proc.port()}"
    assert await get_on_new_connections(url + "/api/city/x", 40) == [200] * 40
    assert len(up.seen) == 40
    for _ in range(2):  # whichever worker answers the scrape
        async with client.get(url + "/metrics") as r:
            text = await r.text()
        counts = re.findall(
            r'^http_requests_total\{method="GET",service="city",status="200",worker="([01])"\}'
            r" (\S+)$",
            text,
            re.MULTILINE,
        )
        assert sorted(worker for worker, _ in counts) == ["0", "1"]  # both, each its own
        assert sum(float(value) for _, value in counts) == 40
        assert "gateway_workers_reporting 2.0" in text
        for worker in "01":
            assert f'gateway_config_last_reload_successful{{worker="{worker}"}} 1.0' in text
    lines = await proc.wait_for_all("request", 40)
    ids = [line["request_id"] for line in lines if line["path"] == "/api/city/x"]
    assert len(set(ids)) == 40  # no worker repeats another's request ids
    assert len({i[:16] for i in ids}) == 2  # both workers answered (each has its prefix)


async def test_workers_share_the_https_and_admin_ports_too(serve, upstream, tmp_path):
    import ssl  # noqa: PLC0415 - only this test speaks TLS

    import trustme  # noqa: PLC0415

    from .helpers import free_port, write_cert  # noqa: PLC0415

    up = await upstream(NODA1)
    ca = trustme.CA()
    files = write_cert(ca, tmp_path / "tls", "127.0.0.1")
    https, admin = free_port(), free_port()
    text = routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1) + (
        f"tls:\n  listen: {{host: 127.0.0.1, port: {https}}}\n  certificates: [{files.yaml()}]\n"
        f"admin: {{listen: {{host: 127.0.0.1, port: {admin}}}}}\n"
    )
    proc, _ = await serve(text, "--workers", "2")
    started = await proc.wait_for_all("gateway started", 2)
    assert {line["listeners"]["https"] for line in started} == {f"127.0.0.1:{https}"}
    assert {line["listeners"]["admin"] for line in started} == {f"127.0.0.1:{admin}"}
    context = ssl.create_default_context()
    ca.configure_trust(context)
    statuses = []
    for _ in range(20):
        async with (
            aiohttp.ClientSession() as fresh,
            fresh.get(f"https://127.0.0.1:{https}/api/city/x", ssl=context) as response,
        ):
            statuses.append(response.status)
    assert statuses == [200] * 20
    async with (
        aiohttp.ClientSession() as fresh,
        fresh.get(f"http://127.0.0.1:{admin}/metrics") as response,
    ):
        text = await response.text()
    assert "gateway_workers_reporting 2.0" in text
    lines = await proc.wait_for_all("request", 20)
    assert len({line["request_id"][:16] for line in lines}) == 2  # both workers served HTTPS


async def test_a_dead_worker_is_replaced_and_sigterm_stops_them_all(serve, upstream):
    up = await upstream(NODA1)
    search = await upstream(NODA2)
    table = routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1, noda2=NODA2)
    proc, config = await serve(table, "--workers", "2")
    first, second = await proc.wait_for_all("gateway started", 2)
    config.write_text(table + f"  search: {{port: {search.port}, nodes: [noda2]}}\n")
    proc.proc.send_signal(signal.SIGHUP)  # the supervisor passes it on to every worker
    await proc.wait_for_all("config reloaded", 2)
    os.kill(first["pid"], signal.SIGKILL)
    exited = await proc.wait_for("worker exited; starting another")
    assert (exited["pid"], exited["worker"]) == (first["pid"], first["worker"])
    replacement = (await proc.wait_for_all("gateway started", 3))[2]
    assert replacement["worker"] == first["worker"]
    url = f"http://127.0.0.1:{await proc.port()}"
    # The replacement serves the config as reloaded, not the one the gateway started with.
    assert await get_on_new_connections(url + "/api/search/q", 20) == [200] * 20
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 15) == 0
    assert len(await proc.wait_for_all("gateway stopped", 2)) == 2
    for pid in (second["pid"], replacement["pid"]):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_worker_stopped_on_its_own_is_replaced_by_one_that_accepts(serve, upstream):
    # A worker that stops (SIGTERM to it alone) has the kernel complete no new handshake on
    # its listening socket, which the supervisor holds too: the worker that replaces it on
    # that socket must take that back, or the port would take no connection again.
    up = await upstream(NODA1)
    proc, _ = await serve(routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1))
    (first,) = await proc.wait_for_all("gateway started", 1)
    os.kill(first["pid"], signal.SIGTERM)
    await proc.wait_for("worker exited; starting another")
    replacement = (await proc.wait_for_all("gateway started", 2))[1]
    assert replacement["pid"] != first["pid"]
    url = f"http://127.0.0.1:{await proc.port()}"
    statuses = await asyncio.wait_for(get_on_new_connections(url + "/api/city/q", 5), 10)
    assert statuses == [200] * 5
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 15) == 0


def test_check_explains_a_missing_jwt_secret():
    env = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
    result = subprocess.run(
        [*GATEWAY, "check", "--config", str(SHIPPED)],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "auth.providers.daarion.secret" in result.stderr
    assert "JWT_SECRET is not set: it is the secret the tokens are signed with" in result.stderr
