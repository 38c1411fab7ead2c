"""WebSocket relay benchmark of the gateway: `.venv/bin/python bench/ws.py` (~2.6 min).

Two parts, on 127.0.0.1 only, with bench/run.py's "pin" layout (servers on CPU 0; the client
and this harness on CPU 1), following the anchor measurements (bench/README.md, "Anchors"):

1. **Throughput.** A WebSocket echo backend (bench/wsbackend.py: aiohttp + uvloop, binary
   echo) is reached three ways: directly, through nginx (1 worker, ``proxy_http_version 1.1``,
   ``Upgrade $http_upgrade``, ``Connection "upgrade"``) and through the gateway
   (``daarion-gateway serve``, one ``websocket: true`` service, log level WARNING). A client
   process (bench/wsclient.py ``echo``: aiohttp + uvloop) keeps W messages of 1 KiB in flight
   on each of C sessions for D seconds and counts the echoes, in two shapes: 8 conns x 16 in
   flight, and 1 conn x 1 (ping-pong). Reported: echoed msgs/s, paired ratios to direct and to
   nginx (medians over reps), CPU microseconds per echo of the proxy and of the backend (from
   /proc, over exactly the client's measuring window), the client's CPU, and other CPU (work
   of other processes on the machine meanwhile: above 0.1 cores a run was disturbed).
2. **Capacity.** A fresh backend and gateway (``ws_ping_interval`` short, 5 s) and one client
   process (bench/wsclient.py ``hold``) that opens 10,000 idle sessions through the gateway,
   200 handshakes at a time. Reported: the gateway's VmRSS after a warm-up (200 sessions opened
   and closed) and with all sessions open, the RSS per session beyond that baseline; then, after
   holding them 3 ping intervals + 1 s: whether every session is still open (the gateway's
   ``gateway_websocket_sessions``, the backend's and the client's counts) and whether pings
   flowed on both legs of every session (the backend and the client count the gateway's pings
   per session and answer each with a pong by hand).

With ``--profile`` (or automatically when the gateway misses its throughput target and py-spy
is available), one more 8 x 16 gateway run is sampled with py-spy and summarized by function.

Every process is stopped at the end, also on errors and Ctrl-C; a pgrep check reports any
left. Helpers come from bench/lib (spawning, pinning, /proc CPU, ports, apt-get, teardown, the
client's output). See bench/ws.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from lib import load, process, report, servers, tools
from lib.load import WsClient
from lib.process import BUSY_CORES, LOOPBACK, Layout, Server
from lib.report import fmt
from lib.tools import BENCH_DIR, PYTHON, Tools

SERVICE: Final = "chat"
BACKEND_PATH: Final = "/ws/echo"  # what every path below reaches on the backend
PROXY_PATH: Final = f"/ws/{SERVICE}/echo"  # through nginx and the gateway
SHAPES: Final = ((8, 16), (1, 1))  # (sessions, messages in flight on each)
# The compressed runs: 1 KiB JSON-like text, permessage-deflate agreed on both legs.
DEFLATE: Final = (8, 16)
DEFLATE_NAME: Final = "8x16+deflate"
TARGET_RATIO: Final = 0.5  # the issue: gateway/nginx echoed msgs/s
ANCHORS: Final = {(8, 16): 0.51, (1, 1): 0.73}  # the anchors: aiohttp relay / nginx
RSS_TARGET_KIB: Final = 20.0  # the issue: gateway RSS per idle session
DIRECT: Final = "direct"
NGINX: Final = "nginx"
GATEWAY: Final = "gateway"
CLIENT_WARMUP: Final = 0.5  # seconds of load before the client's measuring window
WARMUP_SECONDS: Final = 1.5  # one unrecorded 8 x 16 run per target before the reps
WARM_SESSIONS: Final = 200  # capacity: opened and closed before the RSS baseline
SETTLE: Final = 1.0  # seconds between a change and reading RSS
LINE_TIMEOUT: Final = load.LINE_TIMEOUT

GATEWAY_CONFIG: Final = """\
# Made by bench/ws.py: one WebSocket service in front of the benchmark backend.
listen: {{host: 127.0.0.1, port: 8080}}
nodes:
  bench: {{host: 127.0.0.1}}
services:
  {service}:
    port: {port}
    nodes: [bench]
    websocket: true
    ws_prefix: /ws          # /ws/{service}/<channel> -> /ws/<channel> on the backend
    ws_ping_interval: {ping}
"""

NGINX_BODY: Final = """\
    server {
        listen 127.0.0.1:%(port)d backlog=1024;
        location /ws/chat/ {
            proxy_pass http://127.0.0.1:%(backend)d/ws/;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
        }
    }"""


# -- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    duration: float
    reps: int
    parts: tuple[str, ...]
    sessions: int
    concurrency: int
    sources: int
    ping_interval: float
    hold_intervals: int
    workers: int
    log_level: str
    profile: str
    profile_seconds: float
    install: bool
    keep: bool
    json_path: Path | None


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--duration", type=float, default=5.0, help="seconds per throughput run (5)")
    add("--reps", type=int, default=3, help="throughput repetitions (3)")
    add("--only", choices=("throughput", "capacity"), help="run one part only")
    add("--sessions", type=int, default=10_000, help="capacity: idle sessions (10000)")
    add("--concurrency", type=int, default=200, help="capacity: handshakes at a time (200)")
    add("--sources", type=int, default=1, help="capacity: client addresses 127.0.0.1..N (1)")
    add("--ping-interval", type=float, default=5.0, help="capacity: ws_ping_interval (5)")
    add("--hold-intervals", type=int, default=3, help="capacity: hold this many intervals (3)")
    add(
        "--workers",
        type=int,
        default=2,
        help="capacity: the gateway's --workers (2: one per core, and each worker has an "
        "open-files limit of its own; throughput runs use 1, like nginx's 1 worker)",
    )
    add("--log-level", default="WARNING", help="the gateway's --log-level (WARNING)")
    add(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="py-spy the gateway in one more 8x16 run: always, never, or (auto) when the "
        "gateway misses the throughput target and py-spy is found",
    )
    add("--profile-seconds", type=float, default=8.0)
    add("--no-install", action="store_true", help="do not apt-get install a missing nginx")
    add("--keep", action="store_true", help="keep the work directory (logs, configs, profile)")
    add("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.reps < 1 or args.hold_intervals < 1 or args.concurrency < 1:
        parser.error("--sessions, --reps, --hold-intervals and --concurrency must be >= 1")
    return Options(
        duration=args.duration,
        reps=args.reps,
        parts=(args.only,) if args.only else ("throughput", "capacity"),
        sessions=args.sessions,
        concurrency=args.concurrency,
        sources=args.sources,
        ping_interval=args.ping_interval,
        hold_intervals=args.hold_intervals,
        workers=args.workers,
        log_level=args.log_level,
        profile=args.profile,
        profile_seconds=args.profile_seconds,
        install=not args.no_install,
        keep=args.keep,
        json_path=args.json,
    )


# -- small system helpers ------------------------------------------------------------------


def session_room(root: int) -> int:
    """Sessions the gateway's open-files limits leave room for (2 fds each): per worker (the
    children of ``root``; ``root`` itself when it has none), what its limit leaves."""
    workers = process.process_tree(root)[1:] or [root]
    return sum((process.fd_limit(pid) - process.fd_count(pid)) // 2 for pid in workers)


def ensure_tools(opts: Options) -> Tools:
    found = Tools.found(wrk=False)
    if found.nginx is None and "throughput" in opts.parts:
        if opts.install and not tools.install_missing(["nginx"]):
            found.nginx = tools.find_program("nginx")
        if found.nginx is None:
            found.notes.append("nginx missing and not installed: no nginx rows, no x nginx")
    return found


# -- the servers ---------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    proxy: Server | None  # None: the backend itself


class Stack(servers.Stack):
    """Backend, nginx, gateway and clients; ``close()`` stops every process it started."""

    def __init__(self, found: Tools, layout: Layout, workdir: Path, name: str) -> None:
        super().__init__(found, layout, workdir / name)
        self.name = name
        self.workdir.mkdir()
        self.workdir.chmod(0o755)  # nginx workers run unprivileged when started by root
        self.clients: list[WsClient] = []
        self.backend: Server | None = None
        self.gateway: Server | None = None
        self.targets: list[Target] = []

    @property
    def backend_port(self) -> int:
        assert self.backend is not None  # noqa: S101 - started first
        return self.backend.port

    def start_backend(self) -> None:
        port = process.free_port()
        command = [PYTHON, str(BENCH_DIR / "wsbackend.py"), "--port", str(port)]
        self.backend = self.start("backend", [*command, "--tag", str(self.workdir)], port)
        self.ready(self.backend, lambda: servers.http_status(port, "/health") == 200)
        self.targets.append(Target(DIRECT, f"ws://{LOOPBACK}:{port}{BACKEND_PATH}", None))

    def start_nginx(self) -> None:
        if self.tools.nginx is None:
            return
        server = self.nginx_server(NGINX, NGINX_BODY, backend=self.backend_port)
        self.ready(server, lambda: process.port_open(server.port))
        self.targets.append(Target(NGINX, f"ws://{LOOPBACK}:{server.port}{PROXY_PATH}", server))

    def start_gateway(self, ping_interval: float, log_level: str, workers: int = 1) -> None:
        config = self.workdir / "routes.yaml"
        config.write_text(
            GATEWAY_CONFIG.format(service=SERVICE, port=self.backend_port, ping=ping_interval)
        )
        servers.check_config(config)
        gateway = self.gateway_server(GATEWAY, config, log_level, workers=workers)
        self.ready(gateway, lambda: servers.http_status(gateway.port, "/health") is not None)
        self.gateway = gateway
        self.targets.append(Target(GATEWAY, f"ws://{LOOPBACK}:{gateway.port}{PROXY_PATH}", gateway))

    def client(self, args: list[str], *, stdin: bool = False) -> WsClient:
        command = load.wsclient_command(self.workdir, args, self.prefix(self.layout.load))
        child = WsClient(command, self.workdir / f"client-{len(self.clients)}.err", stdin=stdin)
        self.clients.append(child)
        self.adopt(child.proc)
        return child

    def backend_stats(self) -> dict[str, Any]:
        stats = servers.http_json(self.backend_port, "/stats")
        return stats if isinstance(stats, dict) else {}

    def warnings(self) -> int:
        """WARNING and worse lines in the gateway's log (at WARNING, every line it wrote)."""
        return servers.count_warnings(self.gateway.log) if self.gateway is not None else 0


# -- throughput ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Clock:
    cpu: process.CpuClock  # of the proxy, the backend and this harness
    proxy_sys: float  # the proxy's system CPU seconds
    proxy_writes: int  # and its write(2) calls

    def __sub__(self, before: Clock) -> Clock:
        return Clock(
            self.cpu - before.cpu,
            self.proxy_sys - before.proxy_sys,
            self.proxy_writes - before.proxy_writes,
        )


def read_clock(stack: Stack, target: Target) -> Clock:
    assert stack.backend is not None  # noqa: S101 - started first
    backend, proxy = stack.backend.proc.pid, target.proxy.proc.pid if target.proxy else None
    proxy_sys, proxy_writes = process.kernel_side(proxy) if proxy else (0.0, 0)
    cpu = process.CpuClock.read(
        {
            "proxy": lambda: process.cpu_seconds(proxy) if proxy else 0.0,
            "backend": lambda: process.cpu_seconds(backend),
            "harness": time.process_time,
        }
    )
    return Clock(cpu, proxy_sys, proxy_writes)


@dataclass
class EchoRun:
    rep: int
    shape: str
    target: str
    msgs_per_s: float
    echoed: int
    seconds: float
    proxy_us: float | None
    proxy_sys_pct: float | None  # share of the proxy's CPU spent in the kernel
    # write(2) calls per echo, gateway only: /proc/PID/io counts write(2), not nginx's send(2)
    proxy_writes: float | None
    backend_us: float
    client_cpu: float
    rtt_us: float  # mean round trip: messages in flight / rate
    other_cpu: float
    steal_pct: float
    errors: int


def shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def echo_client(
    stack: Stack, target: Target, shape: tuple[int, int], seconds: float, *, compress: bool = False
) -> WsClient:
    conns, window = shape
    return stack.client(
        ["echo", target.url, "--conns", str(conns), "--window", str(window),
         "--duration", str(seconds), "--warmup", str(CLIENT_WARMUP),
         *(["--compress"] if compress else [])]
    )  # fmt: skip


def measure(
    stack: Stack,
    target: Target,
    shape: tuple[int, int],
    seconds: float,
    rep: int,
    *,
    compress: bool = False,
) -> EchoRun:
    child = echo_client(stack, target, shape, seconds, compress=compress)
    try:
        child.expect("start")
        before = read_clock(stack, target)
        stop = child.expect("stop", seconds + LINE_TIMEOUT)
        after = read_clock(stack, target)
        echo = load.parse_echo(stop, child.expect("closed"))
    finally:
        child.finish()
    used = after - before
    cpu, rate, echoed = used.cpu, echo.rate, max(echo.echoed, 1)
    return EchoRun(
        rep=rep,
        shape=DEFLATE_NAME if compress else shape_name(shape),
        target=target.name,
        msgs_per_s=rate,
        echoed=echo.echoed,
        seconds=echo.seconds,
        proxy_us=cpu["proxy"] / echoed * 1e6 if target.proxy else None,
        proxy_sys_pct=100 * used.proxy_sys / cpu["proxy"] if cpu["proxy"] else None,
        proxy_writes=used.proxy_writes / echoed if target.name == GATEWAY else None,
        backend_us=cpu["backend"] / echoed * 1e6,
        client_cpu=echo.cpu_seconds / echo.seconds,
        rtt_us=shape[0] * shape[1] / max(rate, 1e-9) * 1e6,
        other_cpu=cpu.other_cores(echo.seconds, also_ours=echo.cpu_seconds),
        steal_pct=cpu.steal_pct,
        errors=echo.errors,
    )


def progress(run_: EchoRun) -> str:
    proxy = "-" if run_.proxy_us is None else f"{run_.proxy_us:.1f}"
    return (
        f"  rep {run_.rep} {run_.shape:<5} {run_.target:<8} {run_.msgs_per_s:9.0f} msgs/s  "
        f"proxy {proxy:>6} us/echo  backend {run_.backend_us:5.1f} us/echo  "
        f"client CPU {run_.client_cpu:.2f}  other CPU {run_.other_cpu:.2f}"
        + (f"  errors {run_.errors}" if run_.errors else "")
    )


def throughput(stack: Stack, opts: Options) -> list[EchoRun]:
    stack.start_backend()
    stack.start_nginx()
    stack.start_gateway(20.0, opts.log_level)
    names = ", ".join(t.name for t in stack.targets)
    print(f"\nThroughput: warm-up {WARMUP_SECONDS} s of 8x16 per target ({names})", flush=True)
    for target in stack.targets:
        measure(stack, target, SHAPES[0], WARMUP_SECONDS, 0)
    runs = []
    for rep in range(1, opts.reps + 1):
        for shape in SHAPES:
            for target in stack.targets:
                runs.append(measure(stack, target, shape, opts.duration, rep))
                print(progress(runs[-1]), flush=True)
        for target in stack.targets:
            runs.append(measure(stack, target, DEFLATE, opts.duration, rep, compress=True))
            print(progress(runs[-1]), flush=True)
    return runs


@dataclass
class Row:
    shape: str
    target: str
    msgs_per_s: float
    x_direct: float | None
    x_nginx: float | None
    x_nginx_low: float | None  # the lowest and highest per-rep ratio
    x_nginx_high: float | None
    proxy_us: float | None
    proxy_sys_pct: float | None
    proxy_writes: float | None
    backend_us: float
    client_cpu: float
    rtt_us: float
    other_cpu: float  # the worst run's
    steal_pct: float
    errors: int


def _ratio(run_: EchoRun, base: EchoRun) -> float | None:
    return run_.msgs_per_s / base.msgs_per_s if base.msgs_per_s else None


def _ratios(runs: list[EchoRun], mine: list[EchoRun], other: str) -> list[float]:
    """Per rep: msgs/s over ``other``'s msgs/s at the same shape and rep."""
    return report.paired(mine, runs, other, lambda r: (r.shape, r.rep), _ratio)


def summarize(runs: list[EchoRun]) -> list[Row]:
    rows = []
    median = report.median
    for shape, target in dict.fromkeys((r.shape, r.target) for r in runs):
        mine = [r for r in runs if (r.shape, r.target) == (shape, target)]
        vs_nginx = _ratios(runs, mine, NGINX) if target != DIRECT else []
        rows.append(
            Row(
                shape=shape,
                target=target,
                msgs_per_s=statistics.median(r.msgs_per_s for r in mine),
                x_direct=median(_ratios(runs, mine, DIRECT)),
                x_nginx=median(vs_nginx),
                x_nginx_low=min(vs_nginx, default=None),
                x_nginx_high=max(vs_nginx, default=None),
                proxy_us=median(r.proxy_us for r in mine),
                proxy_sys_pct=median(r.proxy_sys_pct for r in mine),
                proxy_writes=median(r.proxy_writes for r in mine),
                backend_us=statistics.median(r.backend_us for r in mine),
                client_cpu=statistics.median(r.client_cpu for r in mine),
                rtt_us=statistics.median(r.rtt_us for r in mine),
                other_cpu=max(r.other_cpu for r in mine),
                steal_pct=statistics.median(r.steal_pct for r in mine),
                errors=sum(r.errors for r in mine),
            )
        )
    return rows


def print_rows(rows: list[Row], reps: int) -> None:
    head = ["conns x in flight", "path", "echoed msgs/s", "x direct", "x nginx",
            "proxy us/echo", "proxy sys %", "gw write()s/echo", "backend us/echo",
            "client CPU", "mean RTT us", "other CPU (max)", "steal %", "errors"]  # fmt: skip
    table = [head]
    for r in rows:
        table.append(
            [r.shape.replace("x", " x "), r.target, f"{r.msgs_per_s:.0f}", fmt(r.x_direct, ".2f"),
             fmt(r.x_nginx, ".2f"), fmt(r.proxy_us), fmt(r.proxy_sys_pct, ".0f"),
             fmt(r.proxy_writes, ".2f"), f"{r.backend_us:.1f}", f"{r.client_cpu:.2f}",
             f"{r.rtt_us:.0f}", f"{r.other_cpu:.2f}", f"{r.steal_pct:.1f}", str(r.errors)]
        )  # fmt: skip
    print(
        f"\nThroughput (1 KiB binary echo; {DEFLATE_NAME}: 1 KiB JSON-like text, "
        f"permessage-deflate on both legs; median of {reps} reps; ratios paired per rep):"
    )
    report.print_table(table, left=2)


def _row(rows: list[Row], shape: tuple[int, int] | str, target: str) -> Row | None:
    name = shape if isinstance(shape, str) else shape_name(shape)
    return next((r for r in rows if (r.shape, r.target) == (name, target)), None)


def throughput_headline(rows: list[Row], runs: list[EchoRun]) -> list[str]:
    lines = []
    for shape in (*SHAPES, DEFLATE_NAME):
        gw, ng = _row(rows, shape, GATEWAY), _row(rows, shape, NGINX)
        if gw is None:
            continue
        ratio = gw.x_nginx
        verdict = report.verdict(None if ratio is None else ratio >= TARGET_RATIO)
        cpu = ""
        if ng is not None and gw.proxy_us and ng.proxy_us:
            cpu = (
                f"; proxy CPU per echo {gw.proxy_us:.1f} vs nginx {ng.proxy_us:.1f} us "
                f"= {gw.proxy_us / ng.proxy_us:.1f}x"
            )
        spread = f" (reps {fmt(gw.x_nginx_low, '.2f')}-{fmt(gw.x_nginx_high, '.2f')})"
        anchor = f"; anchor: aiohttp relay {ANCHORS[shape]}" if shape in ANCHORS else ""
        name = shape if isinstance(shape, str) else shape_name(shape)
        lines.append(
            f"gateway/nginx msgs/s at {name} = {fmt(ratio, '.2f')}{spread} "
            f"({verdict}: target >= {TARGET_RATIO}{anchor}){cpu}"
        )
    disturbed = report.disturbance(
        [r.other_cpu for r in runs], "throughput runs", "noisy; rerun when idle"
    )
    return lines + ([disturbed] if disturbed else [])


def gateway_ratio(rows: list[Row]) -> float | None:
    row = _row(rows, SHAPES[0], GATEWAY)
    return row.x_nginx if row else None


# -- profile -------------------------------------------------------------------------------


def profile(stack: Stack, pyspy: str, seconds: float) -> list[str]:
    """One more 8 x 16 gateway run, sampled by py-spy; a summary by function."""
    target = next(t for t in stack.targets if t.name == GATEWAY)
    assert target.proxy is not None  # noqa: S101 - the gateway is a proxy
    out = stack.workdir / "gateway.pyspy.txt"
    child = echo_client(stack, target, SHAPES[0], seconds)
    try:
        child.expect("start")
        spy = subprocess.run(
            [*stack.prefix(stack.layout.load), pyspy, "record",
             "-p", str(target.proxy.proc.pid), "-d", str(max(1, int(seconds) - 1)), "-r", "200",
             "-f", "raw", "--nonblocking", "-o", str(out)],
            capture_output=True, text=True, check=False, timeout=seconds + 30,
        )  # fmt: skip
        stop = child.expect("stop", seconds + LINE_TIMEOUT)
    finally:
        child.finish()
    if spy.returncode != 0 or not out.exists():
        return [f"py-spy failed ({spy.returncode}): {spy.stderr.strip()[-300:]}"]
    rate = float(stop["echoed"]) / float(stop["seconds"])
    return [f"{rate:.0f} msgs/s while sampled; raw profile {out}", *summarize_profile(out)]


def summarize_profile(path: Path, top: int = 14) -> list[str]:
    """Leaf (self) shares by function and by module, inclusive shares of gateway/aiohttp code."""
    leaf: Counter[str] = Counter()
    module: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count, frames = int(count_text), [_frame(f) for f in stack.split(";")]
        total += count
        leaf[frames[-1][0]] += count
        module[_module(frames)] += count
        for name in {f[0] for f in frames if "gateway/" in f[1] or "aiohttp/" in f[1]}:
            inclusive[name] += count
    if not total:
        return ["py-spy recorded no samples"]

    def share(counter: Counter[str], n: int) -> list[str]:
        return [f"    {100 * c / total:5.1f} %  {name}" for name, c in counter.most_common(n)]

    return [
        f"{total} samples (wall-clock, while the gateway was not idle in epoll: with the "
        "backend on its CPU this includes time it was preempted, mostly inside the write that "
        "wakes the backend, so the upstream send_frame is overstated; /proc CPU is exact). "
        "Self time by module:",
        *share(module, 10),
        "  Self time by function (leaf frames):",
        *share(leaf, top),
        "  Inclusive (the function or anything it called), gateway and aiohttp code:",
        *share(inclusive, top),
    ]


def _frame(text: str) -> tuple[str, str]:
    """``func (file.py:12)`` -> (``func (file.py)``, ``file.py``)."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", text)
    if match is None:
        return text, ""
    return f"{match.group(1)} ({match.group(2)})", match.group(2)


LOOP_FRAMES: Final = ("asyncio/runners.py", "uvloop/__init__.py", "gateway/cli.py")


def _module(frames: list[tuple[str, str]]) -> str:
    """The file of the leaf frame; a stack that ends in the loop runner is time in C."""
    file = frames[-1][1]
    if file.endswith(LOOP_FRAMES) or file.endswith("daarion-gateway"):
        return "C code under the event loop (uvloop: epoll, recv, callbacks; Cython parsers)"
    return file or "?"


# -- capacity ------------------------------------------------------------------------------


@dataclass
class Memory:
    """VmRSS (KiB) of one process at the capacity test's moments."""

    base: int = 0  # after the warm-up, before the sessions
    open: int = 0  # with every session open
    held: int = 0  # after the hold
    closed: int = 0  # after closing every session

    def per_session(self, sessions: int) -> float:
        return (self.open - self.base) / max(sessions, 1)


@dataclass
class Capacity:
    sessions: int  # asked for
    opened: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # the client's handshake errors
    open_seconds: float = 0.0
    open_cpu_us: float = 0.0  # gateway CPU per session opened (pings meanwhile included)
    rss_start_kib: int = 0
    gateway: Memory = field(default_factory=Memory)
    backend: Memory = field(default_factory=Memory)
    client: Memory = field(default_factory=Memory)
    workers: int = 1  # the gateway's worker processes
    fd_limit: int = 0  # the gateway's soft RLIMIT_NOFILE (each worker's)
    room: int = 0  # sessions that limit leaves room for, in all workers (2 fds each)
    fds_base: int = 0  # its open fds after the warm-up (every process)
    fds_open: int = 0  # ... with every session open
    upstream_errors: dict[str, float] = field(default_factory=dict)  # /metrics, by kind
    health_fails: float = 0.0  # failed active health checks (e.g. no fd left for the probe)
    metric_open: float | None = None  # gateway_websocket_sessions once all are open
    metric_held: float | None = None  # ... after the hold
    closed_during_hold: float | None = None
    hold_seconds: float = 0.0
    gateway_cpu_held: float = 0.0  # cores, while holding (pings)
    other_cpu: float = 0.0
    backend_stats: dict[str, Any] = field(default_factory=dict)  # its /stats after the hold
    backend_pings_in_hold: int = 0
    client_stats: dict[str, Any] = field(default_factory=dict)  # its stats after the hold
    client_pings_in_hold: int = 0
    closed: dict[str, Any] = field(default_factory=dict)
    pings_flowing: bool = False
    gateway_warnings: int = 0


@dataclass
class Hold:
    """The capacity test's processes."""

    stack: Stack
    client: WsClient
    gateway: int  # pids
    backend: int

    def rss(self) -> tuple[int, int, int]:
        rss = process.rss_kib
        return rss(self.gateway), rss(self.backend), rss(self.client.proc.pid)

    def metrics(self) -> list[servers.Sample]:
        assert self.stack.gateway is not None  # noqa: S101 - started
        return servers.parse_metrics(servers.http_text(self.stack.gateway.port, "/metrics"))


def note_rss(hold: Hold, result: Capacity, moment: str) -> None:
    for memory, value in zip(
        (result.gateway, result.backend, result.client), hold.rss(), strict=True
    ):
        setattr(memory, moment, value)


def sessions_metric(samples: list[servers.Sample]) -> tuple[float | None, float | None]:
    """(open sessions, sessions closed so far) of the service, from /metrics."""
    return (
        servers.total(samples, "gateway_websocket_sessions", service=SERVICE),
        servers.total(samples, "gateway_websocket_sessions_closed_total", service=SERVICE),
    )


def capacity(stack: Stack, opts: Options) -> Capacity:
    stack.start_backend()
    stack.start_gateway(opts.ping_interval, opts.log_level, opts.workers)
    assert stack.gateway is not None  # noqa: S101 - just started
    assert stack.backend is not None  # noqa: S101 - just started
    url = next(t.url for t in stack.targets if t.name == GATEWAY)
    client = stack.client(
        ["hold", url, "--concurrency", str(opts.concurrency), "--sources", str(opts.sources)],
        stdin=True,
    )
    hold = Hold(stack, client, stack.gateway.proc.pid, stack.backend.proc.pid)
    result = Capacity(opts.sessions)
    client.expect("ready")
    result.rss_start_kib = process.rss_kib(hold.gateway)
    print(f"\nCapacity: warm-up ({WARM_SESSIONS} sessions opened and closed)", flush=True)
    _warm_up(hold)
    note_rss(hold, result, "base")
    result.fds_base, result.fd_limit = (
        process.fd_count(hold.gateway),
        process.fd_limit(hold.gateway),
    )
    result.room, result.workers = session_room(hold.gateway), opts.workers
    _open_all(hold, opts, result)
    _hold(hold, opts, result)
    print("  closing every session", flush=True)
    client.send("close")
    result.closed = client.expect("closed", 120)
    time.sleep(SETTLE)
    note_rss(hold, result, "closed")
    client.send("quit")
    client.finish()
    result.gateway_warnings = stack.warnings()
    return result


def _warm_up(hold: Hold) -> None:
    hold.client.send(f"open {WARM_SESSIONS}")
    warm = load.parse_opened(hold.client.expect("open", 60))
    if warm.failed:
        raise RuntimeError(f"warm-up handshakes failed: {warm.failures}")
    hold.client.send("close")
    hold.client.expect("closed", 60)
    hold.metrics()
    time.sleep(SETTLE)


def _open_all(hold: Hold, opts: Options, result: Capacity) -> None:
    if result.room < opts.sessions:
        print(
            f"  NOTE: each of the gateway's {result.workers} workers may open {result.fd_limit} "
            f"files; {result.fds_base} are open: room for {result.room} sessions (2 fds each), "
            f"not {opts.sessions}",
            flush=True,
        )
    print(
        f"  opening {opts.sessions} sessions, {opts.concurrency} handshakes at a time", flush=True
    )
    cpu0 = process.cpu_seconds(hold.gateway)
    hold.client.send(f"open {opts.sessions}")
    opened = load.parse_opened(hold.client.expect("open", max(180.0, opts.sessions / 20)))
    result.opened, result.failed = opened.opened, opened.failed
    result.open_cpu_us = (process.cpu_seconds(hold.gateway) - cpu0) / max(result.opened, 1) * 1e6
    result.failures, result.open_seconds = opened.failures, opened.seconds
    result.fds_open = process.fd_count(hold.gateway)
    time.sleep(SETTLE)
    note_rss(hold, result, "open")
    samples = hold.metrics()
    result.metric_open, _ = sessions_metric(samples)
    result.upstream_errors = servers.total_by(samples, "gateway_upstream_errors_total", "kind")
    print(
        f"  {result.opened} open ({result.failed} failed) in {result.open_seconds:.1f} s; "
        f"gateway RSS {result.gateway.base / 1024:.1f} -> {result.gateway.open / 1024:.1f} MiB "
        f"= {result.gateway.per_session(result.opened):.1f} KiB per session",
        flush=True,
    )


def _cpu(hold: Hold) -> process.CpuClock:
    """CPU seconds so far of the gateway, the backend, the client and this harness."""
    cpu = process.cpu_seconds
    return process.CpuClock.read(
        {
            "gateway": lambda: cpu(hold.gateway),
            "backend": lambda: cpu(hold.backend),
            "client": lambda: cpu(hold.client.proc.pid),
            "harness": time.process_time,
        }
    )


def _hold(hold: Hold, opts: Options, result: Capacity) -> None:
    seconds = opts.hold_intervals * opts.ping_interval + 1.0
    print(
        f"  holding them {seconds:.0f} s ({opts.hold_intervals} ping intervals + 1 s)", flush=True
    )
    _, closed0 = sessions_metric(hold.metrics())
    hold.client.send("stats")
    client0, backend0 = hold.client.expect("stats"), hold.stack.backend_stats()
    before, started = _cpu(hold), time.monotonic()
    time.sleep(seconds)
    used, result.hold_seconds = _cpu(hold) - before, time.monotonic() - started
    result.gateway_cpu_held = used["gateway"] / result.hold_seconds
    result.other_cpu = used.other_cores(result.hold_seconds)
    hold.client.send("stats")
    result.client_stats, result.backend_stats = (
        hold.client.expect("stats"),
        hold.stack.backend_stats(),
    )
    result.client_pings_in_hold = result.client_stats["pings"] - client0["pings"]
    result.backend_pings_in_hold = result.backend_stats.get("pings", 0) - backend0.get("pings", 0)
    samples = hold.metrics()
    result.metric_held, closed1 = sessions_metric(samples)
    result.closed_during_hold = None if closed0 is None or closed1 is None else closed1 - closed0
    fails = servers.total(samples, "gateway_health_checks_total", result="fail")
    result.health_fails = fails or 0.0
    note_rss(hold, result, "held")
    result.pings_flowing = pings_flowing(result, opts)


def pings_flowing(result: Capacity, opts: Options) -> bool:
    """Every session that opened is still open everywhere, and each of its legs was pinged at
    least ``hold_intervals - 1`` times (a leg is pinged after an interval of silence)."""
    least = max(1, opts.hold_intervals - 1)
    n = result.opened
    return (
        n > 0
        and result.metric_held == n
        and not result.closed_during_hold
        and result.backend_stats.get("open") == n
        and result.client_stats.get("open") == n
        and not result.client_stats.get("ended_unasked")
        and result.backend_stats.get("min_pings_per_open", 0) >= least
        and result.client_stats.get("min_pings_per_open", 0) >= least
    )


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def capacity_lines(c: Capacity, opts: Options) -> list[str]:
    back, cli, gw = c.backend_stats, c.client_stats, c.gateway
    return [
        f"sessions: {c.opened} of {c.sessions} opened through the gateway in "
        f"{c.open_seconds:.1f} s ({c.opened / max(c.open_seconds, 1e-9):.0f}/s; gateway CPU "
        f"{c.open_cpu_us:.0f} us per session opened, pings meanwhile included); {c.failed} "
        f"handshakes failed: {c.failures or 'none'}",
        f"gateway files: {c.fds_base} open after the warm-up, {c.fds_open} with the sessions "
        f"open, limit {c.fd_limit} per worker x {c.workers} (room for {c.room} sessions at 2 fds "
        f"each); upstream errors "
        f"in /metrics {c.upstream_errors or 'none'}; failed health checks {c.health_fails:.0f}",
        f"gateway RSS: {_mib(c.rss_start_kib)} at start, {_mib(gw.base)} after the warm-up, "
        f"{_mib(gw.open)} with {c.opened} open, {_mib(gw.held)} after the hold, "
        f"{_mib(gw.closed)} after closing all",
        f"RSS per session beyond the baseline: gateway {gw.per_session(c.opened):.1f} KiB "
        f"({report.verdict(gw.per_session(c.opened) <= RSS_TARGET_KIB)}: target <= "
        f"{RSS_TARGET_KIB:.0f}); for scale, one aiohttp leg: backend (server side) "
        f"{c.backend.per_session(c.opened):.1f} KiB, client (client side) "
        f"{c.client.per_session(c.opened):.1f} KiB",
        f"after holding {c.hold_seconds:.1f} s (ws_ping_interval {opts.ping_interval:g} s): "
        f"gateway_websocket_sessions = {fmt(c.metric_held, '.0f')}, closed meanwhile "
        f"{fmt(c.closed_during_hold, '.0f')}; backend open {back.get('open')}, client open "
        f"{cli.get('open')}, client sessions ended unasked: {cli.get('ended_unasked') or 'none'}",
        f"pings at the backend (gateway -> service legs): {c.backend_pings_in_hold} during the "
        f"hold, {back.get('pings')} in all, per open session min {back.get('min_pings_per_open')}"
        f" / median {back.get('median_pings_per_open')}; pongs it got (the clients' answers, "
        f"relayed by the gateway) {back.get('pongs')}",
        f"pings at the clients (gateway -> client legs, each answered with a pong): "
        f"{c.client_pings_in_hold} during the hold, {cli.get('pings')} in all, per open session "
        f"min {cli.get('min_pings_per_open')} / median {cli.get('median_pings_per_open')}; "
        f"pongs they got (the backend's answers, relayed) {cli.get('pongs')}",
        f"gateway CPU while holding: {c.gateway_cpu_held:.2f} cores; other CPU "
        f"{c.other_cpu:.2f} cores; closing: {c.closed.get('codes')} in "
        f"{c.closed.get('seconds', 0):.1f} s; gateway WARNING+ log lines {c.gateway_warnings}",
    ]


def capacity_headline(c: Capacity, opts: Options) -> list[str]:
    least = max(1, opts.hold_intervals - 1)
    lines = [
        f"sessions open through the gateway ({c.workers} workers): {c.opened}/{c.sessions} "
        f"({report.verdict(c.opened >= c.sessions)})"
        + (
            f"; {c.workers} x the open-files limit {c.fd_limit} leave room for {c.room}"
            if c.room < c.sessions
            else ""
        ),
        f"RSS per idle session (every gateway process) = "
        f"{c.gateway.per_session(c.opened):.1f} KiB "
        f"({report.verdict(c.gateway.per_session(c.opened) <= RSS_TARGET_KIB)}: target <= "
        f"{RSS_TARGET_KIB:.0f}); {_mib(c.gateway.base)} -> {_mib(c.gateway.open)}",
        f"pings flowing: {'yes' if c.pings_flowing else 'NO'} (all {c.opened} open sessions "
        f"still open after {opts.hold_intervals} intervals: {fmt(c.metric_held, '.0f')} in "
        f"/metrics; each leg pinged >= {least} times: backend min "
        f"{c.backend_stats.get('min_pings_per_open')}, client min "
        f"{c.client_stats.get('min_pings_per_open')}; {c.backend_pings_in_hold} + "
        f"{c.client_pings_in_hold} pings during the hold)",
    ]
    if c.other_cpu > BUSY_CORES:
        lines.append(f"WARNING: other work used {c.other_cpu:.2f} cores during the hold")
    return lines


# -- main ----------------------------------------------------------------------------------


@dataclass
class Results:
    runs: list[EchoRun] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)
    capacity: Capacity | None = None
    leftovers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def want_profile(opts: Options, rows: list[Row], notes: list[str]) -> str | None:
    """The py-spy to profile with, if this run should profile."""
    if opts.profile == "never":
        return None
    ratio = gateway_ratio(rows)
    if opts.profile == "auto" and (ratio is None or ratio >= TARGET_RATIO):
        return None
    pyspy = tools.find_pyspy()
    if pyspy is None:
        notes.append(
            "py-spy not found: no profile (pip install --target /tmp/pyspy py-spy, or put "
            "py-spy on PATH)"
        )
    return pyspy


def run_throughput(stack: Stack, opts: Options, results: Results) -> None:
    results.runs = throughput(stack, opts)
    results.rows = summarize(results.runs)
    if (pyspy := want_profile(opts, results.rows, results.notes)) is not None:
        print(f"\nProfiling the gateway with py-spy during one more 8x16 run ({pyspy})", flush=True)
        results.profile = profile(stack, pyspy, opts.profile_seconds)


def run_parts(opts: Options, found: Tools, layout: Layout, workdir: Path, results: Results) -> None:
    """Each part on its own stack; every process is stopped, also when a part fails."""
    stacks: list[Stack] = []
    try:
        for part in opts.parts:
            stack = Stack(found, layout, workdir, part)
            stacks.append(stack)
            if part == "throughput":
                run_throughput(stack, opts, results)
            else:
                results.capacity = capacity(stack, opts)
            stack.close()
    finally:
        for stack in stacks:
            stack.close()
        results.leftovers = sorted({line for s in stacks for line in s.leftovers()})


def environment(found: Tools, layout: Layout, opts: Options) -> list[str]:
    py = tools.gateway_python()
    nginx = tools.first_line([found.nginx, "-v"]) if found.nginx else "-"
    return [
        f"gateway code: {tools.gateway_code()}; log level {opts.log_level}; health checks on "
        "(the backend answers GET /health); no rate limit",
        f"interpreter: {py.get('real_path')} {py.get('version', '').split()[0]}; aiohttp "
        f"{py.get('aiohttp')} (C parser: {py.get('aiohttp_c_parser')}), uvloop {py.get('uvloop')}",
        f"nginx: {nginx}; nproc {os.cpu_count()}; kernel {os.uname().release}",
        f"CPU layout: {layout.note} (the client and this harness on the load CPU)",
    ]


def print_report(results: Results, opts: Options, env: list[str], started: float) -> list[str]:
    lines: list[str] = []
    if results.rows:
        print_rows(results.rows, opts.reps)
        lines += throughput_headline(results.rows, results.runs)
    if results.profile:
        print("\nWhere the gateway spends its time (py-spy, 8x16):")
        for line in results.profile:
            print(f"  {line}")
    if results.capacity is not None:
        print(f"\nCapacity ({opts.sessions} idle sessions through the gateway):")
        for line in capacity_lines(results.capacity, opts):
            print(f"  {line}")
        lines += capacity_headline(results.capacity, opts)
    lines.append(f"processes left behind (pgrep): {results.leftovers or 'none'}")
    lines.append(f"elapsed {time.monotonic() - started:.0f} s")
    print("\nHeadline:")
    for line in lines:
        print(f"  {line}")
    print("\nEnvironment:")
    for line in env + [f"NOTE: {n}" for n in results.notes]:
        print(f"  {line}")
    return lines


def write_json(path: Path, results: Results, headline: list[str], env: list[str]) -> None:
    data = {
        "runs": [asdict(r) for r in results.runs],
        "rows": [asdict(r) for r in results.rows],
        "capacity": asdict(results.capacity) if results.capacity else None,
        "profile": results.profile,
        "headline": headline,
        "environment": env,
    }
    report.write_json(path, data)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    opts = parse_options(argv)
    process.stop_on_signals()
    found = ensure_tools(opts)
    layout = process.choose_layout()
    layout.pin_harness()  # the client's CPU
    found.notes.append(process.raise_nofile(max(65536, 3 * opts.sessions + 1024)))
    env = environment(found, layout, opts)
    if (busy := process.busy_machine()) > BUSY_CORES:
        print(f"WARNING: the machine is busy before the start ({busy:.2f} cores)", flush=True)
    results = Results(notes=list(found.notes))
    with servers.workspace("daarion-ws-bench-", keep=opts.keep) as space:
        try:
            run_parts(opts, found, layout, space.path, results)
        except KeyboardInterrupt:
            print(
                f"\ninterrupted; processes left behind: {results.leftovers or 'none'}",
                file=sys.stderr,
            )
            return 130
        except RuntimeError as exc:
            print(f"\nbench failed: {exc}", file=sys.stderr)
            print(f"processes left behind: {results.leftovers or 'none'}", file=sys.stderr)
            return 1
    headline = print_report(results, opts, env, started)
    if opts.json_path is not None:
        write_json(opts.json_path, results, headline, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
