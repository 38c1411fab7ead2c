"""Failover under load: `.venv/bin/python bench/failover.py`.

The acceptance criterion it measures: under a benchmark-harness load (keep-alive GETs at 50
connections), killing the preferred node loses ZERO idempotent requests, and the preferred
node is back in use within ``interval x rise + 1 s`` of returning.

On loopback only (127.0.0.0/8):

- two backends that answer every path with their node's name: ``noda2`` (the preferred node)
  on 127.0.0.2 and ``noda1`` (the fallback) on 127.0.0.3, each its own process group (nginx,
  one worker; or a tiny aiohttp server when nginx is missing), so that it can be SIGKILLed and
  started again on the same address and port;
- the gateway (``daarion-gateway serve``, log level INFO, stdout to a file) with one service
  ``search`` that prefers noda2 and falls back to noda1, and ``health: {interval, rise, fall}``
  (options; ``--shipped-defaults`` leaves the section out);
- ``wrk -t1 -c50 --latency`` on ``GET /api/search/`` with a Lua script that counts answers by
  status, by node (the body) and by second;
- meanwhile a separate client polls ``/gateway/upstreams`` and ``/metrics`` every 100 ms and
  sends its own ``GET /api/search/`` every 50 ms, so the moments the preferred target leaves
  ``up``, comes back ``up`` and answers again are known to within those periods; the
  gateway's log (one line per request, millisecond timestamps) gives the same moments for
  the load itself;
- at ``--kill-at`` the noda2 backend's process group gets SIGKILL, at ``--restart-at`` it is
  started again on the same address and port; the load stops at ``--duration``.

Servers (backends, gateway) run on one CPU and wrk on another, like bench/run.py's "pin"
layout. Every process is stopped at the end, also on errors and Ctrl-C, and a ``pgrep`` check
says whether any is left. When a run loses requests, its work directory (gateway log, wrk
output, configs) is kept and the gateway's error lines are printed. See bench/failover.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

import aiohttp
from lib import load, process, report, servers, tools
from lib.process import BUSY_CORES, LOOPBACK, Layout, Server
from lib.tools import Tools

PREFERRED: Final = "noda2"
FALLBACK: Final = "noda1"
NODE_HOSTS: Final = {PREFERRED: "127.0.0.2", FALLBACK: "127.0.0.3"}
SERVICE: Final = "search"
REQUEST_PATH: Final = f"/api/{SERVICE}/"
GATEWAY_HOST: Final = LOOPBACK
UPSTREAMS_PERIOD: Final = 0.1
METRICS_PERIOD: Final = 0.1
PROBE_PERIOD: Final = 0.05
CLIENT_TIMEOUT: Final = 5.0
SHOWN_ERROR_LINES: Final = 12
REPORTED_METRICS: Final = (
    "gateway_retries_total",
    "gateway_failovers_total",
    "gateway_ejections_total",
    "gateway_upstream_errors_total",
)
FALLBACK_HEALTH: Final = (5.0, 2, 3)  # README "Config reference", if gateway.config moved

# -- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    interval: float
    rise: int
    fall: int
    shipped: bool  # True: no `health` section in the config (the gateway's defaults)

    @property
    def bound(self) -> float:
        """The criterion: the preferred node is back in use this long after returning."""
        return self.interval * self.rise + 1.0


@dataclass(frozen=True)
class Options:
    health: Health
    conns: int
    kill_at: float
    restart_at: float
    duration: int
    runs: int
    python_backend: bool
    keep: bool


def shipped_health() -> Health:
    """The gateway's defaults (README: interval 5, rise 2, fall 3), read from its code."""
    try:
        from gateway.config import DEFAULT_HEALTH  # noqa: PLC0415 - only for this option

        interval, rise, fall = DEFAULT_HEALTH.interval, DEFAULT_HEALTH.rise, DEFAULT_HEALTH.fall
    except (ImportError, AttributeError):
        interval, rise, fall = FALLBACK_HEALTH
    return Health(float(interval or 5.0), int(rise or 2), int(fall or 3), shipped=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/failover.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    add = parser.add_argument
    add("--interval", type=float, default=1.0, help="health.interval, seconds (default 1)")
    add("--rise", type=int, default=2, help="health.rise (default 2)")
    add("--fall", type=int, default=3, help="health.fall (default 3)")
    add(
        "--shipped-defaults",
        action="store_true",
        help="no health section in the config: the gateway's defaults (interval 5, rise 2, "
        "fall 3); the schedule is stretched to fit",
    )
    add("--conns", type=int, default=50, help="wrk connections (default 50)")
    add("--kill-at", type=float, default=5.0, help="SIGKILL noda2 at this second (default 5)")
    add(
        "--restart-at",
        type=float,
        help="start noda2 again at this second (default 12, later if probes need longer to "
        "mark it down: kill-at + fall x interval + 2)",
    )
    add(
        "--duration",
        type=int,
        help="seconds of load (default 22, longer if the bound needs it: restart-at + "
        "interval x rise + 5)",
    )
    add("--runs", type=int, default=1, help="repeat the whole scenario (default 1)")
    add("--python-backend", action="store_true", help="aiohttp backends even if nginx exists")
    add("--keep", action="store_true", help="keep every run's work directory (logs)")
    return parser


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.shipped_defaults:
        health = shipped_health()
    else:
        health = Health(args.interval, args.rise, args.fall, shipped=False)
    if health.interval <= 0 or min(health.rise, health.fall, args.runs, args.conns) < 1:
        parser.error("--interval must be > 0; --rise, --fall, --runs and --conns at least 1")
    restart_at = args.restart_at
    if restart_at is None:
        restart_at = max(12.0, args.kill_at + health.fall * health.interval * 1.05 + 2)
    duration = args.duration
    if duration is None:
        duration = max(22, math.ceil(restart_at + health.interval * health.rise * 1.05 + 5))
    if not 0 < args.kill_at < restart_at < duration:
        parser.error("need 0 < --kill-at < --restart-at < --duration")
    return Options(
        health=health,
        conns=args.conns,
        kill_at=args.kill_at,
        restart_at=restart_at,
        duration=duration,
        runs=args.runs,
        python_backend=args.python_backend,
        keep=args.keep,
    )


# -- tools ---------------------------------------------------------------------------------


def ensure_tools(python_backend: bool) -> Tools:
    """nginx and wrk, installed with apt-get (as bench/run.py does) when missing."""
    if missing := tools.install_missing(["wrk"] if python_backend else ["nginx", "wrk"]):
        print(f"could not install {', '.join(missing)} (need root and apt-get)", flush=True)
    found = Tools.found(nginx=not python_backend)
    if found.wrk is None:
        raise SystemExit("wrk is required (its Lua script counts answers by node): install it")
    if found.nginx is None:
        found.notes.append("backends: bench/failover.py's aiohttp server (nginx not used)")
    return found


# -- backends ------------------------------------------------------------------------------

BACKEND_BODY: Final = """\
    server {
        listen %(host)s:%(port)d backlog=1024;
        default_type text/plain;
        location / { return 200 '%(name)s'; }
    }"""


def serve_backend(host: str, port: int, name: str) -> None:
    """The aiohttp stand-in for nginx: ``name`` for every path (``failover.py backend``)."""
    from aiohttp import web  # noqa: PLC0415 - only in the backend process

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host=host, port=port, print=None, access_log=None)


@dataclass
class Backend:
    """One node's backend: a process group that can be SIGKILLed and started again."""

    name: str
    host: str
    port: int
    workdir: Path
    tools: Tools
    layout: Layout
    sessions: list[int]  # every process group ever started (the stack's list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / f"backend-{self.name}.log"

    def _command(self) -> list[str]:
        if self.tools.nginx is None:
            script = str(Path(__file__).resolve())
            return [sys.executable, script, "backend", self.host, str(self.port), self.name]
        body = BACKEND_BODY % {"host": self.host, "port": self.port, "name": self.name}
        return servers.nginx_command(self.tools.nginx, self.workdir / f"nginx-{self.name}", body)

    def start(self) -> None:
        """Start it (again): its log is appended to."""
        pin = process.pin_prefix(self.tools.taskset, self.layout.servers)
        with self.log.open("a") as out:
            self.proc = process.spawn([*pin, *self._command()], stdout=out)
        self.sessions.append(self.proc.pid)

    def wait_ready(self) -> None:
        assert self.proc is not None  # noqa: S101 - started first
        server = Server(self.name, self.proc, self.port, self.log)
        process.wait_ready(server, lambda: process.port_open(self.port, self.host))
        process.pin_tree(self.proc.pid, self.layout.servers)

    def kill(self) -> None:
        """SIGKILL the whole process group (nginx's master and worker) and reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            process.stop(self.proc)
            self.proc = None


# -- the gateway ---------------------------------------------------------------------------

GATEWAY_CONFIG: Final = """\
# Made by bench/failover.py: {preferred} preferred, {fallback} as the fallback.
listen: {{host: {gateway}, port: 8080}}
nodes:
  {preferred}: {{host: {preferred_host}}}
  {fallback}: {{host: {fallback_host}}}
services:
  {service}:
    port: {preferred_port}
    nodes: [{preferred}, {{node: {fallback}, port: {fallback_port}}}]
    http_prefix: ""
"""


def gateway_config(backends: dict[str, Backend], health: Health) -> str:
    text = GATEWAY_CONFIG.format(
        gateway=GATEWAY_HOST,
        preferred=PREFERRED,
        fallback=FALLBACK,
        preferred_host=backends[PREFERRED].host,
        fallback_host=backends[FALLBACK].host,
        preferred_port=backends[PREFERRED].port,
        fallback_port=backends[FALLBACK].port,
        service=SERVICE,
    )
    if not health.shipped:
        text += (
            f"health: {{interval: {health.interval:g}, rise: {health.rise}, fall: {health.fall}}}\n"
        )
    return text


# -- the stack -----------------------------------------------------------------------------


class Stack(servers.Stack):
    """Two backends and the gateway; ``close()`` stops every process it started."""

    def __init__(self, found: Tools, layout: Layout, workdir: Path) -> None:
        super().__init__(found, layout, workdir)
        self.backends = {
            name: Backend(
                name, host, process.free_port(host), workdir, found, layout, self.sessions
            )
            for name, host in NODE_HOSTS.items()
        }
        self.gateway: Server | None = None

    def start_all(self, health: Health) -> str:
        """Start the backends and the gateway; return ``check``'s summary."""
        for backend in self.backends.values():
            backend.start()
        for backend in self.backends.values():
            backend.wait_ready()
        config = self.workdir / "routes.yaml"
        config.write_text(gateway_config(self.backends, health))
        summary = servers.check_config(config)
        gateway = self.gateway_server("gateway", config, "INFO", host=GATEWAY_HOST)
        self.ready(gateway, lambda: servers.http_status(gateway.port, REQUEST_PATH) == 200)
        self.gateway = gateway
        return summary

    @property
    def url(self) -> str:
        assert self.gateway is not None  # noqa: S101 - started first
        return f"http://{GATEWAY_HOST}:{self.gateway.port}"

    def close(self) -> None:
        super().close()  # wrk, the gateway
        for backend in self.backends.values():
            backend.close()


# -- the load: wrk with a counting script ---------------------------------------------------

WRK_SCRIPT: Final = """\
-- Made by bench/failover.py: count answers by status, by node (the body) and by second.
statuses, nodes, errors, timeline = {}, {}, {}, {}
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local function bump(counts, key)
  counts[key] = (counts[key] or 0) + 1
end

function response(status, headers, body)
  bump(statuses, tostring(status))
  local who = body
  if body ~= "noda1" and body ~= "noda2" then
    who = "other"
    local code = string.match(body or "", '"error":%s*"([^"]*)"') or "-"
    bump(errors, tostring(status) .. "/" .. code)
  end
  bump(nodes, who)
  bump(timeline, os.time() .. " " .. who)
end

function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for _, name in ipairs({"statuses", "nodes", "errors", "timeline"}) do
      for key, n in pairs(thread:get(name)) do
        io.write(string.format("FAILOVER %s %s %d\\n", name, key, n))
      end
    end
  end
end
"""


@dataclass
class WrkCounts:
    statuses: Counter[str] = field(default_factory=Counter)
    nodes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # "status/error code"
    timeline: Counter[tuple[int, str]] = field(default_factory=Counter)  # (epoch second, who)


def parse_counts(output: str) -> WrkCounts:
    counts = WrkCounts()
    for line in output.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[0] != "FAILOVER":
            continue
        name, key, n = parts[1], " ".join(parts[2:-1]), int(parts[-1])
        if name == "timeline":
            second, who = key.split(" ", 1)
            counts.timeline[int(second), who] += n
        else:
            getattr(counts, name)[key] += n
    return counts


def wrk_command(stack: Stack, script: Path, conns: int, seconds: int) -> list[str]:
    assert stack.tools.wrk is not None  # noqa: S101 - ensure_tools checked it
    url, pin = stack.url + REQUEST_PATH, stack.prefix(stack.layout.load)
    return load.wrk_command(stack.tools.wrk, url, conns, seconds, script=script, pin=pin)


# -- the observer: a separate client polling the gateway --------------------------------------


@dataclass
class Observations:
    probes: list[tuple[float, str]] = field(default_factory=list)  # (answered at, who/what)
    states: list[tuple[float, str, str]] = field(default_factory=list)  # (t, noda2, noda1)
    node_up: list[tuple[float, float]] = field(default_factory=list)  # (t, gateway_node_up)
    poll_errors: Counter[str] = field(default_factory=Counter)

    def probe_failures(self) -> list[tuple[float, str]]:
        return [(t, what) for t, what in self.probes if what not in (PREFERRED, FALLBACK)]


class Observer:
    """Polls the gateway on its own keep-alive connections while the load runs."""

    def __init__(self, session: aiohttp.ClientSession, url: str, t0: float) -> None:
        self.session = session
        self.url = url
        self.t0 = t0
        self.seen = Observations()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def probe(self) -> None:
        try:
            async with self.session.get(self.url + REQUEST_PATH) as response:
                body = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.seen.probes.append((self.now(), f"error {type(exc).__name__}"))
            return
        ok = response.status == 200 and body in (PREFERRED, FALLBACK)
        self.seen.probes.append((self.now(), body if ok else f"status {response.status} {body}"))

    async def upstreams(self) -> None:
        try:
            async with self.session.get(self.url + "/gateway/upstreams") as response:
                answer = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.seen.poll_errors[f"upstreams {type(exc).__name__}"] += 1
            return
        targets = {t["node"]: t["state"] for t in answer["services"][SERVICE]["targets"]}
        self.seen.states.append((self.now(), targets[PREFERRED], targets[FALLBACK]))

    async def metrics(self) -> None:
        try:
            text = await scrape(self.session, self.url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.seen.poll_errors[f"metrics {type(exc).__name__}"] += 1
            return
        found = servers.select(servers.parse_metrics(text), "gateway_node_up", node=PREFERRED)
        if found:
            self.seen.node_up.append((self.now(), found[0].value))


async def every(
    period: float, stopped: asyncio.Event, action: Callable[[], Awaitable[None]]
) -> None:
    """Run ``action`` every ``period`` seconds (no catching up after a slow one) until stopped."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    while not stopped.is_set():
        await action()
        due = max(due + period, loop.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), due - loop.time())


async def scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/metrics") as response:
        return await response.text()


# -- one scenario --------------------------------------------------------------------------


@dataclass
class Events:
    """Moments of the scenario, in seconds since the load started (``wall0`` is that moment)."""

    wall0: float
    kill: float = math.nan
    restart: float = math.nan
    ready: float = math.nan  # the restarted backend accepts connections
    end: float = math.nan  # wrk exited


@dataclass
class Outcome:
    events: Events
    wrk_output: str
    seen: Observations
    final_metrics: list[servers.Sample]


async def _sleep_until(t0: float, at: float) -> None:
    await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))


def _early_end(wrk: subprocess.Popen[bytes], output: Path, end: float) -> RuntimeError:
    return RuntimeError(
        f"wrk ended (exit {wrk.returncode}) at {end:.1f} s, before the restart was done:\n"
        + output.read_text()
    )


async def _load_with_faults(
    stack: Stack,
    opts: Options,
    wrk: subprocess.Popen[bytes],
    *,
    output: Path,
    t0: float,
    events: Events,
) -> None:
    """Wait for wrk while the faults happen; fail fast if either goes wrong."""
    faults = asyncio.create_task(_faults(stack, opts, t0, events))
    deadline = t0 + opts.duration + 30
    try:
        while wrk.poll() is None:
            if faults.done() and faults.exception() is not None:
                faults.result()  # raises the failure of the kill or the restart
            if time.monotonic() > deadline:
                raise RuntimeError("wrk did not finish in time")
            await asyncio.sleep(0.05)
        events.end = time.monotonic() - t0
        if not faults.done():
            raise _early_end(wrk, output, events.end)
        faults.result()
    finally:
        faults.cancel()


async def _faults(stack: Stack, opts: Options, t0: float, events: Events) -> None:
    """SIGKILL the preferred backend, then start it again on the same address and port."""
    preferred = stack.backends[PREFERRED]
    await _sleep_until(t0, opts.kill_at)
    events.kill = time.monotonic() - t0
    preferred.kill()
    await _sleep_until(t0, opts.restart_at)
    events.restart = time.monotonic() - t0
    preferred.start()
    await asyncio.to_thread(preferred.wait_ready)
    events.ready = time.monotonic() - t0


async def _both_up(session: aiohttp.ClientSession, url: str) -> None:
    """Wait for the first probes: both targets ``up`` before the load starts."""
    deadline = time.monotonic() + process.READY_TIMEOUT
    while time.monotonic() < deadline:
        async with session.get(url + "/gateway/upstreams") as response:
            answer = await response.json()
        if all(t["state"] == "up" for t in answer["services"][SERVICE]["targets"]):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the targets are not both up: {answer}")


async def scenario(stack: Stack, opts: Options) -> Outcome:
    script = stack.workdir / "count.lua"
    script.write_text(WRK_SCRIPT)
    output = stack.workdir / "wrk.out"
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _both_up(session, stack.url)
        with output.open("w") as out:
            wrk = process.spawn(wrk_command(stack, script, opts.conns, opts.duration), stdout=out)
        stack.adopt(wrk)
        t0, events = time.monotonic(), Events(wall0=time.time())
        observer = Observer(session, stack.url, t0)
        stopped = asyncio.Event()
        polls = [
            asyncio.create_task(every(PROBE_PERIOD, stopped, observer.probe)),
            asyncio.create_task(every(UPSTREAMS_PERIOD, stopped, observer.upstreams)),
            asyncio.create_task(every(METRICS_PERIOD, stopped, observer.metrics)),
        ]
        try:
            await _load_with_faults(stack, opts, wrk, output=output, t0=t0, events=events)
        finally:
            stopped.set()
            await asyncio.gather(*polls, return_exceptions=True)
        final = servers.parse_metrics(await scrape(session, stack.url))
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed ({wrk.returncode}):\n{output.read_text()}")
    return Outcome(events, output.read_text(), observer.seen, final)


# -- the gateway's log ---------------------------------------------------------------------


@dataclass
class LogFacts:
    answers: Counter[str] = field(default_factory=Counter)  # search answers by node, status
    error_lines: list[str] = field(default_factory=list)  # "t=... line" with an error/level
    # (status, error, upstream) of the gateway's error answers -> times
    error_answers: dict[tuple[object, object, object], list[float]] = field(default_factory=dict)
    transitions: list[tuple[float, str]] = field(default_factory=list)  # noda2 state changes
    first_fallback: float | None = None  # first noda1 answer after the kill
    first_back: float | None = None  # first noda2 answer after the restart
    last_fallback: float | None = None  # last noda1 answer
    fallback_before_kill: int = 0
    client_closed: list[float] = field(default_factory=list)  # 499s: the client went away


def _log_time(stamp: str, wall0: float) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - wall0


def _is_error(line: dict[str, object]) -> bool:
    return "error" in line or line.get("level") in ("ERROR", "CRITICAL")


def read_log(path: Path, events: Events) -> LogFacts:
    facts = LogFacts()
    for raw in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
            t = _log_time(line["timestamp"], events.wall0)
        except (ValueError, KeyError):
            facts.error_lines.append(f"(not JSON) {raw[:300]}")
            continue
        if line.get("error") == "client_closed":
            facts.client_closed.append(t)
        elif line.get("message") == "request" and "error" in line:
            key = (line.get("status"), line.get("error"), line.get("upstream", "-"))
            facts.error_answers.setdefault(key, []).append(t)
            facts.error_lines.append(f"t={t:7.3f}s {raw[:400]}")
        elif _is_error(line) or line.get("level") == "WARNING":
            facts.error_lines.append(f"t={t:7.3f}s {raw[:400]}")
        if (
            line.get("message", "").startswith("upstream target is")
            and line.get("node") == PREFERRED
        ):
            facts.transitions.append((t, str(line["message"]).removeprefix("upstream target is ")))
        if line.get("message") == "request" and line.get("route") == SERVICE:
            _count_answer(facts, line, t, events)
    return facts


def _count_answer(facts: LogFacts, line: dict[str, object], t: float, events: Events) -> None:
    node = str(line.get("upstream", "-")).split(" ")[0]
    facts.answers[f"{node} {line.get('status')}"] += 1
    if line.get("status") != 200:
        return
    if node == FALLBACK:
        facts.last_fallback = t
        if t < events.kill:
            facts.fallback_before_kill += 1
        elif facts.first_fallback is None:
            facts.first_fallback = t
    elif node == PREFERRED and t >= events.restart and facts.first_back is None:
        facts.first_back = t


# -- the verdict ---------------------------------------------------------------------------


@dataclass
class Result:
    """One run's figures; times in seconds, relative to the event they are measured from."""

    requests: int
    non2xx: int
    socket_errors: dict[str, int]
    probe_requests: int
    probe_failures: list[tuple[float, str]]
    by_node: dict[str, int]
    statuses: dict[str, int]
    wrk_errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    kill_to_fallback_probe: float | None
    kill_to_fallback_log: float | None
    kill_to_not_up: float | None
    not_up_state: str | None
    restart_to_ready: float
    restart_to_up: float | None
    restart_to_back_probe: float | None
    restart_to_back_log: float | None
    last_fallback_after_restart: float | None
    bound: float
    metrics: dict[str, float]
    log: LogFacts
    events: Events
    seen: Observations
    timeline: Counter[tuple[int, str]]

    @property
    def lost(self) -> int:
        return self.non2xx + sum(self.socket_errors.values()) + len(self.probe_failures)

    @property
    def back_in_use(self) -> float | None:
        """When the preferred node answered again: the later of the probe's and the log's."""
        found = [x for x in (self.restart_to_back_probe, self.restart_to_back_log) if x is not None]
        return max(found) if found else None

    @property
    def bound_held(self) -> bool:
        return self.back_in_use is not None and self.back_in_use <= self.bound


def _first(
    samples: Sequence[tuple[float, str]], since: float, want: Callable[[str], bool]
) -> float | None:
    return next((t - since for t, what in samples if t >= since and want(what)), None)


def _since(t: float | None, since: float) -> float | None:
    return None if t is None else t - since


def evaluate(outcome: Outcome, log: LogFacts, health: Health) -> Result:
    done = load.parse_wrk(outcome.wrk_output)
    counts = parse_counts(outcome.wrk_output)
    ev, seen = outcome.events, outcome.seen
    states = [(t, preferred) for t, preferred, _ in seen.states]
    not_up = next(((t, s) for t, s in states if t >= ev.kill and s != "up"), None)
    metrics = {
        _metric_key(s.name, s.labels): s.value
        for s in outcome.final_metrics
        if s.name in REPORTED_METRICS
    }
    return Result(
        requests=done.requests,
        non2xx=done.non2xx,
        socket_errors=done.socket_errors,
        probe_requests=len(seen.probes),
        probe_failures=seen.probe_failures(),
        by_node=dict(counts.nodes),
        statuses=dict(counts.statuses),
        wrk_errors=dict(counts.errors),
        p50_ms=done.p50_ms,
        p99_ms=done.p99_ms,
        kill_to_fallback_probe=_first(seen.probes, ev.kill, lambda w: w == FALLBACK),
        kill_to_fallback_log=_since(log.first_fallback, ev.kill),
        kill_to_not_up=None if not_up is None else not_up[0] - ev.kill,
        not_up_state=None if not_up is None else not_up[1],
        restart_to_ready=ev.ready - ev.restart,
        restart_to_up=_first(states, ev.restart, lambda s: s == "up"),
        restart_to_back_probe=_first(seen.probes, ev.restart, lambda w: w == PREFERRED),
        restart_to_back_log=_since(log.first_back, ev.restart),
        last_fallback_after_restart=_since(log.last_fallback, ev.restart),
        bound=health.bound,
        metrics=metrics,
        log=log,
        events=ev,
        seen=seen,
        timeline=counts.timeline,
    )


def _metric_key(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


# -- the report ----------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f} s"


def _row(label: str, value: object) -> None:
    print(f"  {label:<30}{value}")


def print_result(number: int, result: Result) -> None:
    ev = result.events
    kinds = ", ".join(f"{k} {v}" for k, v in result.socket_errors.items())
    probes = f"{result.probe_requests} requests, {len(result.probe_failures)} failed"
    print(f"\nRun {number}: kill at {ev.kill:.3f} s, restart at {ev.restart:.3f} s")
    _row("requests (wrk)", result.requests)
    _row("non-2xx (wrk)", f"{result.non2xx}   (target 0)")
    _row("socket errors (wrk)", f"{sum(result.socket_errors.values())} ({kinds})   (target 0)")
    _row("probe client", f"{probes}   (target 0 failed)")
    _row("answered by (wrk, body)", _counts(result.by_node))
    _row("statuses (wrk)", _counts(result.statuses))
    if result.wrk_errors:
        _row("error answers (wrk)", _counts(result.wrk_errors))
    _row("answered by (gateway log)", _counts(dict(result.log.answers)))
    if result.log.fallback_before_kill:
        _row("noda1 answers before kill", result.log.fallback_before_kill)
    _row("client closed (499, log)", _closed(result))
    _print_times(result)
    _row("latency (wrk)", f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms")
    for key, value in sorted(result.metrics.items()):
        print(f"  {key} {value:g}")
    _print_transitions(result)
    if result.lost:
        _print_loss(result)


def _print_times(result: Result) -> None:
    fallback = f"probe {_s(result.kill_to_fallback_probe)}, load {_s(result.kill_to_fallback_log)}"
    back = f"probe {_s(result.restart_to_back_probe)}, load {_s(result.restart_to_back_log)}"
    verdict = "held" if result.bound_held else "MISSED"
    _row("kill -> first noda1 answer", f"{fallback} (load: from the gateway log)")
    _row("kill -> noda2 not 'up'", f"{_s(result.kill_to_not_up)} ({result.not_up_state})")
    _row("restart -> accepting", _s(result.restart_to_ready))
    _row("restart -> noda2 'up'", f"{_s(result.restart_to_up)} (/gateway/upstreams)")
    _row("restart -> first noda2 answer", back)
    _row("restart -> last noda1 answer", f"{_s(result.last_fallback_after_restart)} (log)")
    _row(
        "bound interval x rise + 1",
        f"{result.bound:g} s: {verdict} (back in use after {_s(result.back_in_use)})",
    )


def _closed(result: Result) -> str:
    """wrk stops with requests in flight: the gateway logs those as 499, which is no loss."""
    closed, stop = result.log.client_closed, result.events.end - 0.5
    if not closed:
        return "0"
    late = sum(t >= stop for t in closed)
    first = min(closed)
    where = "all" if late == len(closed) else f"{late} of {len(closed)}"
    return f"{len(closed)}: {where} as wrk stopped (t >= {stop:.1f} s; first at {first:.3f} s)"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def _print_transitions(result: Result) -> None:
    log = ", ".join(f"{state} at {t:.3f}" for t, state in result.log.transitions)
    print(f"  noda2 target (gateway log)  {log or '-'}")
    changes, last = [], None
    for t, state, _ in result.seen.states:
        if state != last:
            changes.append(f"{state} at {t:.2f}")
            last = state
    print(f"  noda2 target (polled)       {', '.join(changes) or '-'}")
    node_up, last_up = [], None
    for t, up in result.seen.node_up:
        if up != last_up:
            node_up.append(f"{up:g} at {t:.2f}")
            last_up = up
    print(f"  gateway_node_up{{noda2}}      {', '.join(node_up) or '-'}")
    if result.seen.poll_errors:
        print(f"  poll errors                 {_counts(dict(result.seen.poll_errors))}")


def _print_loss(result: Result) -> None:
    print("  LOST REQUESTS: evidence (t = seconds since the load started)")
    wall0 = result.events.wall0
    bad = sorted((s, n) for (s, who), n in result.timeline.items() if who == "other")
    for second, n in bad:
        print(f"    wrk: {n} error answers in t = {second - wall0:.1f} .. {second + 1 - wall0:.1f}")
    for t, what in result.probe_failures[:SHOWN_ERROR_LINES]:
        print(f"    observer request answered at t={t:.3f}: {what[:160]}")
    for (status, error, upstream), times in sorted(result.log.error_answers.items(), key=str):
        span = f"t = {min(times):.3f} .. {max(times):.3f}"
        print(f"    gateway log: {len(times)} x {status} {error} via {upstream}, {span}")
    lines = result.log.error_lines
    print(f"    gateway log: {len(lines)} warning or error lines; the first ones:")
    for line in lines[:SHOWN_ERROR_LINES]:
        print(f"      {line}")


SUMMARY_HEAD: Final = (
    "run", "requests", "non-2xx", "sock err", "probe fail", "noda2", "noda1",
    "kill->noda1", "restart->up", "restart->noda2", "bound", "p50 ms", "p99 ms",
)  # fmt: skip


def _summary_row(number: int, r: Result) -> tuple[str, ...]:
    return (
        str(number), str(r.requests), str(r.non2xx), str(sum(r.socket_errors.values())),
        str(len(r.probe_failures)), str(r.by_node.get(PREFERRED, 0)),
        str(r.by_node.get(FALLBACK, 0)), _num(r.kill_to_fallback_probe),
        _num(r.restart_to_up), _num(r.back_in_use),
        f"{r.bound:g} {'ok' if r.bound_held else 'MISSED'}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
    )  # fmt: skip


def print_summary(results: list[Result], opts: Options) -> None:
    print("\nSummary (times in seconds; bound = interval x rise + 1):")
    rows = [SUMMARY_HEAD, *(_summary_row(i, r) for i, r in enumerate(results, 1))]
    report.print_table(rows, left=0, rule=False)
    lost = sum(r.lost for r in results)
    held = sum(r.bound_held for r in results)
    zero = "PASS" if not lost else f"FAIL ({lost} lost)"
    print(f"\nCriterion: zero lost requests: {zero}; back in use within {opts.health.bound:g} s")
    print(f"of returning: {held}/{len(results)} runs")


def _num(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f}"


# -- main ----------------------------------------------------------------------------------


def describe(opts: Options, layout: Layout, found: Tools) -> None:
    h = opts.health
    where = "the shipped defaults: no health section" if h.shipped else "health section"
    print(f"health: interval {h.interval:g} s, rise {h.rise}, fall {h.fall} ({where})")
    print(f"bound: interval x rise + 1 = {h.bound:g} s")
    print(f"schedule: wrk -t1 -c{opts.conns} -d{opts.duration}s; SIGKILL {PREFERRED} at ", end="")
    print(f"{opts.kill_at:g} s, restart it at {opts.restart_at:g} s")
    print(f"layout: {layout.note}; gateway code {tools.gateway_code()}")
    for note in found.notes:
        print(f"NOTE: {note}")


def one_run(number: int, opts: Options, found: Tools, layout: Layout) -> Result:
    busy = process.busy_machine()
    if busy > BUSY_CORES:
        print(f"WARNING: other processes use {busy:.2f} cores before run {number}: noisy timing")
    with servers.workspace("daarion-failover-", opts.keep, kept="  ") as space:
        stack = Stack(found, layout, space.path)
        try:
            summary = stack.start_all(opts.health)
            if number == 1:
                print(f"config check: {summary}")
            outcome = asyncio.run(scenario(stack, opts))
        finally:
            stack.close()
            left = stack.leftovers()
            print(f"\nRun {number}: processes left behind (pgrep): {left or 'none'}")
        result = evaluate(
            outcome, read_log(space.path / "gateway.log", outcome.events), opts.health
        )
        space.keep = space.keep or result.lost > 0
        print_result(number, result)
        return result


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["backend"]:
        host, port, name = sys.argv[2:5]
        serve_backend(host, int(port), name)
        return 0
    opts = parse_options(argv)
    process.stop_on_signals()
    found = ensure_tools(opts.python_backend)
    layout = process.choose_layout()
    layout.pin_harness()  # the observer: wrk's CPU
    describe(opts, layout, found)
    results = []
    try:
        for number in range(1, opts.runs + 1):
            results.append(one_run(number, opts, found, layout))
    except KeyboardInterrupt:
        print("\ninterrupted: every process was stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"\nfailover bench failed: {exc}", file=sys.stderr)
        return 1
    print_summary(results, opts)
    return 0 if all(r.lost == 0 and r.bound_held for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
