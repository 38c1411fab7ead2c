"""Benchmark the DAARION gateway against nginx on loopback: `.venv/bin/python bench/run.py`.

What it measures: requests per second, latency (p50, p99) and CPU time per request of the
gateway as a reverse proxy in front of a trivial backend, next to nginx doing the same job,
following /work/shared/bench/anchors.md ("pin" layout):

- backend: nginx, 1 worker, ``return 200 '{"ok":true}'`` for any path;
- targets: the backend directly; nginx as a reverse proxy (1 worker, upstream keepalive 256,
  HTTP/1.1 upstream, ``Connection ""``, X-Forwarded-For); each gateway variant (a routes.yaml
  whose service ``bench`` points at the backend), run as ``daarion-gateway serve``;
- every server process and thread is pinned to one CPU, the load generator (``wrk -t1``) to
  another, so a figure is "what one core does for proxy + backend";
- for each connection count, each target is loaded in turn (interleaved, so drift hits all
  alike) after a 2 s warm-up of every target, with ``wrk -t1 -cN -dD --latency``;
- CPU time (utime + stime of every process of a server, from /proc) is read before and after
  each run, giving CPU microseconds per request, which is much steadier than req/s on a noisy
  VM; ratios are paired (same rep and connection count) and, with ``--reps``, the median of
  the per-rep ratios is reported.

The gateway logs one JSON line per request at INFO, its default: the headline rows run it
that way with stdout going to a file, so the logging cost is included; ``@WARNING`` rows show
the same variant with request logging off.

Everything listens on 127.0.0.1 only and is torn down at the end, also on Ctrl-C or errors.
When nginx or wrk are missing and cannot be installed, Python stand-ins from
``bench/pyloadgen.py`` are used and the nginx proxy row is skipped; the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO: Final = BENCH_DIR.parent
VENV_BIN: Final = REPO / ".venv" / "bin"
LOOPBACK: Final = "127.0.0.1"
REQUEST_PATH: Final = "/api/bench/"
TICKS_PER_SECOND: Final = os.sysconf("SC_CLK_TCK")
WARMUP_SECONDS: Final = 2
READY_TIMEOUT: Final = 15.0
STOP_TIMEOUT: Final = 5.0
ANCHOR_RATIO: Final = 0.15  # anchors.md: aiohttp 1 proc / nginx 1 worker, pin, c50 and c200
P99_TARGET_MS: Final = 1000.0
BUSY_CORES: Final = 0.1  # other work on the machine above this disturbs a run
IDLE_WAIT: Final = 120.0  # --rerun-disturbed: longest wait for the machine to be idle again
DIRECT: Final = "direct"
NGINX: Final = "nginx-proxy"
REDIS_HELPER: Final = 'redis-server --port {port} --bind 127.0.0.1 --save "" --appendonly no'


# -- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    config: Path | None  # None: the harness's own routes.yaml
    log_level: str


@dataclass(frozen=True)
class Helper:
    name: str
    command: str  # may contain {port}


@dataclass(frozen=True)
class Criteria:
    """What a suite's second variant may cost against its first (an issue's acceptance bar)."""

    min_ratio: float  # req/s of the variant / req/s of the base, paired
    max_added_p99_ms: float  # p99 of the variant - p99 of the base, paired


@dataclass(frozen=True)
class Suite:
    """A named comparison: ``--suite NAME`` instead of ``--variant``/``--helper`` options."""

    about: str
    variants: tuple[tuple[str, str], ...]  # (name, file under bench/); the first is the base
    helpers: tuple[tuple[str, str], ...]
    log_levels: str  # unless --log-levels is given
    criteria: Criteria | None = None


SUITES: Final = {
    "limiter": Suite(
        about="the shared rate limiter's cost: a zone that never refuses, kept in a Redis "
        "the harness starts pinned with the proxy, against the same gateway without it",
        variants=(("plain", "variants/plain.yaml"), ("limiter", "variants/limiter.yaml")),
        helpers=(("redis", REDIS_HELPER),),
        log_levels="INFO",
        criteria=Criteria(min_ratio=0.85, max_added_p99_ms=2.0),
    ),
}


@dataclass(frozen=True)
class Options:
    duration: int
    conns: tuple[int, ...]
    reps: int
    json_path: Path | None
    variants: tuple[Variant, ...]
    helpers: tuple[Helper, ...]
    python_tools: bool
    install: bool
    suite: str | None = None
    rerun_disturbed: int = 0


def _name_value(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not value:
        raise argparse.ArgumentTypeError(f"{what} must look like NAME=VALUE, got {text!r}")
    return name, value


def _variant_arg(text: str) -> tuple[str, str]:
    return _name_value(text, "--variant")


def _helper_arg(text: str) -> tuple[str, str]:
    return _name_value(text, "--helper")


def _conns_arg(text: str) -> tuple[int, ...]:
    try:
        conns = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--conns takes numbers like 50,200: {text!r}") from None
    if not conns or min(conns) < 1:
        raise argparse.ArgumentTypeError("--conns takes positive numbers")
    return conns


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--duration", type=int, default=8, help="seconds per run (default 8)")
    parser.add_argument("--conns", type=_conns_arg, default=(50, 200), help="default 50,200")
    parser.add_argument("--reps", type=int, default=1, help="repetitions; medians are shown")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--quick", action="store_true", help="2 s runs: a smoke test")
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        help="a named comparison with its variants and helpers: "
        + "; ".join(f"{name}: {suite.about}" for name, suite in SUITES.items()),
    )
    parser.add_argument(
        "--variant",
        type=_variant_arg,
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a gateway variant: a routes.yaml with service 'bench' at port "
        "${BENCH_BACKEND_PORT}; repeatable (default: one 'gateway' made by the harness)",
    )
    parser.add_argument(
        "--log-levels",
        help="gateway --log-level for each variant; the first one is the headline "
        "(default INFO,WARNING: INFO logs every request, as in production; a --suite "
        "runs INFO only)",
    )
    parser.add_argument(
        "--helper",
        type=_helper_arg,
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="a server the variants need (e.g. redis), started pinned with the proxy; "
        "{port} in COMMAND becomes a free port, also given to the gateway as "
        "BENCH_<NAME>_PORT; its CPU per request is reported",
    )
    parser.add_argument(
        "--python-tools",
        action="store_true",
        help="use the Python load generator and backend even if wrk and nginx exist",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="do not apt-get install nginx and wrk"
    )
    parser.add_argument(
        "--rerun-disturbed",
        type=int,
        default=0,
        metavar="N",
        help="measure a (rep, conns) group of targets again, up to N times, when other work "
        f"on the machine used more than {BUSY_CORES} cores during one of its runs; waits up "
        f"to {IDLE_WAIT:.0f} s for the machine to be idle first, keeps the least disturbed "
        "attempt (default 0)",
    )
    return parser


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.reps < 1 or args.duration < 1:
        parser.error("--reps and --duration must be at least 1")
    if args.rerun_disturbed < 0:
        parser.error("--rerun-disturbed must be 0 or more")
    suite = SUITES[args.suite] if args.suite else None
    if suite is not None and (args.variant or args.helper):
        parser.error("--suite brings its own variants and helpers: no --variant or --helper")
    log_levels = args.log_levels or (suite.log_levels if suite else "INFO,WARNING")
    levels = [level.strip().upper() for level in log_levels.split(",") if level.strip()]
    if not levels:
        parser.error("--log-levels needs at least one level")
    pairs = suite.variants if suite else args.variant
    helpers = suite.helpers if suite else args.helper
    configs: list[tuple[str, Path | None]] = [
        (name, (BENCH_DIR / path if suite else Path(path)).resolve()) for name, path in pairs
    ] or [("gateway", None)]
    variants = tuple(
        Variant(name if i == 0 else f"{name}@{level}", config, level)
        for name, config in configs
        for i, level in enumerate(levels)
    )
    names = [v.name for v in variants]
    if len(set(names)) != len(names) or {DIRECT, NGINX} & set(names):
        parser.error(f"variant names must be unique and not {DIRECT} or {NGINX}")
    for _, config in configs:
        if config is not None and not config.is_file():
            parser.error(f"no such variant file: {config}")
    return Options(
        duration=2 if args.quick else args.duration,
        conns=args.conns,
        reps=args.reps,
        json_path=args.json,
        variants=variants,
        helpers=tuple(Helper(name, command) for name, command in helpers),
        python_tools=args.python_tools,
        install=not args.no_install,
        suite=args.suite,
        rerun_disturbed=args.rerun_disturbed,
    )


# -- tools ---------------------------------------------------------------------------------


@dataclass
class Tools:
    nginx: str | None
    wrk: str | None
    taskset: str | None
    notes: list[str] = field(default_factory=list)


def find_program(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/local/sbin") if (p := Path(d, name)).is_file()),
        None,
    )


@contextlib.contextmanager
def _services_not_started() -> Iterator[None]:
    """Keep Debian's package scripts from starting a system nginx on port 80 while installing."""
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def apt_install(packages: list[str]) -> bool:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    print(f"installing {' '.join(packages)} with apt-get ...", flush=True)
    with _services_not_started():
        for step in ([], [["apt-get", "update", "-q"]]):  # retry once with fresh lists
            for command in step:
                subprocess.run(command, env=env, capture_output=True, check=False)
            if subprocess.run(install, env=env, capture_output=True, check=False).returncode == 0:
                return True
    return False


def ensure_tools(opts: Options) -> Tools:
    if opts.python_tools:
        tools = Tools(None, None, find_program("taskset"))
        tools.notes.append("--python-tools: Python load generator and backend, no nginx rows")
        return tools
    missing = [name for name in ("nginx", "wrk") if find_program(name) is None]
    if missing and opts.install and not apt_install(missing):
        print(f"could not install {', '.join(missing)} (need root and apt-get)", flush=True)
    tools = Tools(find_program("nginx"), find_program("wrk"), find_program("taskset"))
    if tools.nginx is None:
        tools.notes.append(
            "nginx missing: the backend is bench/pyloadgen.py's Python server and the "
            "nginx proxy rows are skipped"
        )
    if tools.wrk is None:
        tools.notes.append(
            "wrk missing: load comes from bench/pyloadgen.py (slower than wrk, so the direct "
            "row shows the load generator's ceiling)"
        )
    return tools


# -- CPUs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    servers: frozenset[int] | None  # None: unpinned
    load: frozenset[int] | None
    note: str


def choose_layout() -> Layout:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Layout(None, None, f"only {len(cpus)} CPU: unpinned (servers and load share it)")
    servers, load = frozenset({cpus[0]}), frozenset({cpus[1]})
    return Layout(
        servers,
        load,
        f"pin: servers (backend, proxy, helpers) on CPU {cpus[0]}, load generator on CPU {cpus[1]}",
    )


def pin_prefix(tools: Tools, cpus: frozenset[int] | None) -> list[str]:
    if cpus is None or tools.taskset is None:
        return []
    return [tools.taskset, "-c", ",".join(map(str, sorted(cpus)))]


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (nginx's workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def pin_tree(root: int, cpus: frozenset[int] | None) -> None:
    """Pin every thread of every process under ``root`` (taskset covers only what it starts)."""
    if cpus is None:
        return
    for pid in process_tree(root):
        with contextlib.suppress(FileNotFoundError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                    os.sched_setaffinity(int(task.name), cpus)


def cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and its descendants (a process's stat covers all threads)."""
    ticks = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / TICKS_PER_SECOND


def machine_cpu() -> tuple[float, float, float]:
    """Seconds of (busy, stolen, all) CPU time of the whole machine, from /proc/stat."""
    with Path("/proc/stat").open() as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = map(
            int, stat.readline().split()[1:9]
        )
    busy = user + nice + system  # processes; irq/softirq time is charged to none of them
    total = busy + irq + softirq + idle + iowait + steal
    return busy / TICKS_PER_SECOND, steal / TICKS_PER_SECOND, total / TICKS_PER_SECOND


# -- processes -----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the harness dies, so nothing outlives a kill -9."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(
    command: list[str], *, env: dict[str, str] | None = None, stdout: TextIO | int | None = None
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group (Ctrl-C reaches only the harness)."""
    return subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded harness
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (nginx workers)


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_config(path: Path) -> str:
    """``daarion-gateway check`` of a config the harness wrote: its summary, or RuntimeError."""
    command = [str(VENV_BIN / "daarion-gateway"), "check", "--config", str(path)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"config rejected:\n{out.stdout}{out.stderr}")
    return out.stdout.strip()


def http_status(port: int, path: str) -> int | None:
    request = f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection((LOOPBACK, port), timeout=2) as sock:
            sock.sendall(request.encode())
            head = sock.recv(64)
    except OSError:
        return None
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return int(match.group(1)) if match else None


def http_json(port: int, path: str) -> Any:
    """The JSON body of ``GET path`` (None if there is no answer or it is not JSON)."""
    request = f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nConnection: close\r\n\r\n"
    chunks = []
    try:
        with socket.create_connection((LOOPBACK, port), timeout=2) as sock:
            sock.sendall(request.encode())
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None
    _, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    try:
        return json.loads(body)
    except ValueError:
        return None


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
        return True
    return False


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def wait_ready(server: Server, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}"
            )
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready in {READY_TIMEOUT:.0f} s:\n{server.log_tail()}")


# -- configs -------------------------------------------------------------------------------

NGINX_MAIN: Final = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{body}
}}
"""

BACKEND_BODY: Final = """\
    server {
        listen 127.0.0.1:%(port)d backlog=1024;
        default_type application/json;
        location / { return 200 '{"ok":true}'; }
    }"""

PROXY_BODY: Final = """\
    upstream backend {
        server 127.0.0.1:%(backend)d;
        keepalive 256;
    }
    server {
        listen 127.0.0.1:%(port)d backlog=1024;
        location /api/bench/ {
            proxy_pass http://backend/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }
    }"""

GATEWAY_CONFIG: Final = """\
# Made by bench/run.py: one service in front of the benchmark backend.
listen: {host: 127.0.0.1, port: 8080}
nodes:
  bench: {host: 127.0.0.1}
services:
  bench: {port: "${BENCH_BACKEND_PORT}", nodes: [bench], http_prefix: ""}
"""


# -- the stack under test ------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    proxy: Server | None  # None: the backend itself
    kind: str  # "direct", "nginx" or "gateway"


class Stack:
    """The servers under test; ``close()`` stops every process it started."""

    def __init__(self, tools: Tools, layout: Layout, workdir: Path) -> None:
        self.tools = tools
        self.layout = layout
        self.workdir = workdir
        self.servers: list[Server] = []
        self.backend: Server | None = None
        self.helpers: list[Server] = []
        self.targets: list[Target] = []

    def _start(
        self, name: str, command: list[str], env: dict[str, str] | None, port: int
    ) -> Server:
        log = self.workdir / f"{name}.log"
        with log.open("w") as out:
            proc = spawn(
                [*pin_prefix(self.tools, self.layout.servers), *command], env=env, stdout=out
            )
        server = Server(name, proc, port, log)
        self.servers.append(server)
        return server

    def _nginx(self, name: str, body: str) -> Server:
        assert self.tools.nginx is not None  # noqa: S101 - only called when nginx exists
        port = free_port()
        nginx_dir = self.workdir / name
        nginx_dir.mkdir()
        conf = nginx_dir / "nginx.conf"
        text = NGINX_MAIN.format(dir=nginx_dir, body=body % {"port": port, "backend": self._bport})
        conf.write_text(text)
        command = [
            self.tools.nginx,
            "-p",
            str(nginx_dir),
            "-c",
            str(conf),
            "-e",
            str(nginx_dir / "error.log"),
        ]
        return self._start(name, command, None, port)

    @property
    def _bport(self) -> int:
        return self.backend.port if self.backend is not None else 0

    def start_backend(self) -> None:
        if self.tools.nginx is not None:
            self.backend = self._nginx("backend", BACKEND_BODY)
        else:
            port = free_port()
            command = [
                sys.executable,
                str(BENCH_DIR / "pyloadgen.py"),
                "backend",
                "--port",
                str(port),
            ]
            self.backend = self._start("backend", command, None, port)
        self._ready(self.backend, REQUEST_PATH)
        self.targets.append(Target(DIRECT, self.backend.port, None, "direct"))

    def start_nginx_proxy(self) -> None:
        if self.tools.nginx is None:
            return
        proxy = self._nginx("nginx-proxy", PROXY_BODY)
        self._ready(proxy, REQUEST_PATH)
        self.targets.append(Target(NGINX, proxy.port, proxy, "nginx"))

    def start_helper(self, helper: Helper) -> dict[str, str]:
        port = free_port()
        command = shlex.split(helper.command.replace("{port}", str(port)))
        server = self._start(f"helper-{helper.name}", command, None, port)
        wait_ready(server, lambda: port_open(port))
        pin_tree(server.proc.pid, self.layout.servers)
        self.helpers.append(server)
        return {f"BENCH_{re.sub(r'[^A-Z0-9]', '_', helper.name.upper())}_PORT": str(port)}

    def start_gateway(self, variant: Variant, env: dict[str, str]) -> None:
        config = variant.config
        if config is None:
            config = self.workdir / "gateway-routes.yaml"
            config.write_text(GATEWAY_CONFIG)
        port = free_port()
        command = [
            str(VENV_BIN / "daarion-gateway"),
            "serve",
            "--config",
            str(config),
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--log-level",
            variant.log_level,
        ]
        gateway_env = {**os.environ, **env, "BENCH_BACKEND_PORT": str(self._bport)}
        server = self._start(_file_name(variant.name), command, gateway_env, port)
        self._ready(server, REQUEST_PATH)
        self.targets.append(Target(variant.name, port, server, "gateway"))

    def _ready(self, server: Server, path: str) -> None:
        wait_ready(server, lambda: http_status(server.port, path) == 200)
        pin_tree(server.proc.pid, self.layout.servers)

    def gateway_log_lines(self) -> dict[str, int]:
        """Lines each gateway wrote to its log file: one per request at INFO."""
        counts = {}
        for target in self.targets:
            if target.kind == "gateway" and target.proxy is not None:
                with target.proxy.log.open("rb") as log:
                    counts[target.name] = sum(1 for _ in log)
        return counts

    def gateway_warnings(self) -> dict[str, dict[str, int]]:
        """Per gateway, its WARNING and worse log messages and how often each came: e.g.
        ``redis unavailable: rate limits fall back`` means a variant measured its fallback."""
        found: dict[str, dict[str, int]] = {}
        for target in self.targets:
            if target.kind != "gateway" or target.proxy is None:
                continue
            counts: dict[str, int] = {}
            with target.proxy.log.open("rb") as log:
                for line in log:
                    if b'"level":"INFO"' in line or b'"level":"DEBUG"' in line:
                        continue  # the request lines: skip them without parsing
                    with contextlib.suppress(ValueError, AttributeError):
                        record = json.loads(line)
                        message = f"{record['level']}: {record['message']}"
                        counts[message] = counts.get(message, 0) + 1
            found[target.name] = counts
        return found

    def gateway_dependencies(self) -> dict[str, Any]:
        """Each gateway's /health ``dependencies`` now (e.g. whether Redis is connected)."""
        answers = {}
        for target in self.targets:
            if target.kind == "gateway":
                body = http_json(target.port, "/health")
                answers[target.name] = body.get("dependencies") if isinstance(body, dict) else None
        return answers

    def close(self) -> None:
        for server in reversed(self.servers):
            stop(server.proc)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# -- load ----------------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: dict[str, int]


_UNIT_MS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk(output: str) -> Load:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output without /{pattern}/:\n{output}")
        return match

    done = find(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Load(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1000,
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_ms(find(r"^\s+50%\s+(\S+)").group(1)),
        p99_ms=_ms(find(r"^\s+99%\s+(\S+)").group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=dict(
            zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True)
        )
        if errors
        else {"connect": 0, "read": 0, "write": 0, "timeout": 0},
    )


def parse_pyloadgen(output: str) -> Load:
    data = json.loads(output.strip().splitlines()[-1])
    return Load(
        requests=data["requests"],
        seconds=data["seconds"],
        rps=data["rps"],
        p50_ms=data["p50_ms"],
        p99_ms=data["p99_ms"],
        non2xx=data["non2xx"],
        socket_errors=data["errors"],
    )


def load_command(tools: Tools, layout: Layout, port: int, conns: int, seconds: int) -> list[str]:
    pin = pin_prefix(tools, layout.load)
    if tools.wrk is not None:
        url = f"http://{LOOPBACK}:{port}{REQUEST_PATH}"
        return [*pin, tools.wrk, "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", url]
    return [
        *pin,
        sys.executable,
        str(BENCH_DIR / "pyloadgen.py"),
        "load",
        "--port",
        str(port),
        "--path",
        REQUEST_PATH,
        "--conns",
        str(conns),
        "--duration",
        str(seconds),
    ]


def run_load(tools: Tools, layout: Layout, port: int, conns: int, seconds: int) -> Load:
    command = load_command(tools, layout, port, conns, seconds)
    proc = spawn(command, stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=seconds + 60)
    finally:
        stop(proc)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(
            f"load generator failed ({proc.returncode}): {shlex.join(command)}\n{text}"
        )
    return parse_wrk(text) if tools.wrk is not None else parse_pyloadgen(text)


# -- one measured run ----------------------------------------------------------------------


@dataclass
class Run:
    rep: int
    conns: int
    target: str
    kind: str
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    socket_error_kinds: dict[str, int]
    proxy_us: float | None
    backend_us: float
    helper_us: float | None
    load_cpu: float  # cores used by the load generator
    other_cpu: float  # cores used by everything else on the machine (other users' work)
    steal_pct: float
    log_warnings: int = 0  # WARNING+ lines the target gateway logged during the run


@dataclass(frozen=True)
class CpuClock:
    """CPU seconds used so far by each party of a run, and by the machine."""

    proxy: float
    backend: float
    helpers: float
    load: float  # reaped children: the load generators that have finished
    busy: float
    steal: float
    total: float


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _clock(stack: Stack, target: Target) -> CpuClock:
    assert stack.backend is not None  # noqa: S101 - started first
    busy, steal, total = machine_cpu()
    return CpuClock(
        proxy=cpu_seconds(target.proxy.proc.pid) if target.proxy is not None else 0.0,
        backend=cpu_seconds(stack.backend.proc.pid),
        helpers=sum(cpu_seconds(h.proc.pid) for h in stack.helpers),
        load=_children_cpu(),
        busy=busy,
        steal=steal,
        total=total,
    )


def _us_per_request(seconds: float, requests: int) -> float:
    return seconds / max(requests, 1) * 1e6


def _log_size(target: Target) -> int:
    if target.kind != "gateway" or target.proxy is None:
        return 0
    with contextlib.suppress(OSError):
        return target.proxy.log.stat().st_size
    return 0


def _warnings_since(target: Target, offset: int) -> int:
    """WARNING and worse lines the gateway wrote to its log after ``offset`` bytes."""
    if target.kind != "gateway" or target.proxy is None:
        return 0
    with contextlib.suppress(OSError), target.proxy.log.open("rb") as log:
        log.seek(offset)
        text = log.read()
        return sum(text.count(f'"level":"{level}"'.encode()) for level in _WARNING_LEVELS)
    return 0


_WARNING_LEVELS: Final = ("WARNING", "ERROR", "CRITICAL")


def measure(stack: Stack, target: Target, conns: int, seconds: int, rep: int) -> Run:
    log_offset = _log_size(target)
    before = _clock(stack, target)
    load = run_load(stack.tools, stack.layout, target.port, conns, seconds)
    after = _clock(stack, target)
    used = {name: getattr(after, name) - getattr(before, name) for name in vars(after)}
    ours = used["proxy"] + used["backend"] + used["helpers"] + used["load"]
    return Run(
        rep=rep,
        conns=conns,
        target=target.name,
        kind=target.kind,
        rps=load.rps,
        requests=load.requests,
        p50_ms=load.p50_ms,
        p99_ms=load.p99_ms,
        non2xx=load.non2xx,
        socket_errors=sum(load.socket_errors.values()),
        socket_error_kinds=load.socket_errors,
        proxy_us=_us_per_request(used["proxy"], load.requests) if target.proxy else None,
        backend_us=_us_per_request(used["backend"], load.requests),
        helper_us=_us_per_request(used["helpers"], load.requests) if stack.helpers else None,
        load_cpu=used["load"] / load.seconds,
        other_cpu=max(0.0, used["busy"] - ours) / load.seconds,
        steal_pct=100.0 * used["steal"] / max(used["total"], 1e-9),
        log_warnings=_warnings_since(target, log_offset),
    )


# -- summary -------------------------------------------------------------------------------


@dataclass
class Row:
    """One (target, conns): medians over reps, errors summed, ratios as medians of pairs."""

    target: str
    kind: str
    conns: int
    rps: float
    p50_ms: float
    p99_ms: float
    proxy_us: float | None
    backend_us: float
    helper_us: float | None
    load_cpu: float
    other_cpu: float
    steal_pct: float
    non2xx: int
    socket_errors: int
    log_warnings: int
    x_nginx: float | None
    x_direct: float | None
    x_first: float | None  # vs the first gateway variant
    p99_vs_first_ms: float | None  # p99 minus the first gateway's, paired
    proxy_us_vs_first: float | None  # proxy CPU per request minus the first gateway's, paired


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _paired(
    runs: list[Run],
    mine: list[Run],
    other: str | None,
    compare: Callable[[Run, Run], float | None] = lambda run, base: (
        run.rps / base.rps if base.rps > 0 else None
    ),
) -> float | None:
    """Median over reps of ``compare(run, base)``, base being ``other``'s run at the same
    connection count and rep (by default the req/s ratio)."""
    values = []
    for run in mine:
        base = next(
            (r for r in runs if (r.target, r.conns, r.rep) == (other, run.conns, run.rep)), None
        )
        if base is not None:
            values.append(compare(run, base))
    return median(values)


def _p99_difference(run: Run, base: Run) -> float:
    return run.p99_ms - base.p99_ms


def _cpu_difference(run: Run, base: Run) -> float | None:
    if run.proxy_us is None or base.proxy_us is None:
        return None
    return run.proxy_us - base.proxy_us


def summarize(runs: list[Run], first_gateway: str | None) -> list[Row]:
    rows = []
    keys = dict.fromkeys((r.conns, r.target) for r in runs)  # keeps the run order
    for conns, target in sorted(keys, key=lambda k: k[0]):
        mine = [r for r in runs if (r.conns, r.target) == (conns, target)]
        kind = mine[0].kind
        vs_first = kind == "gateway" and first_gateway not in (None, target)
        rows.append(
            Row(
                target=target,
                kind=kind,
                conns=conns,
                rps=statistics.median(r.rps for r in mine),
                p50_ms=statistics.median(r.p50_ms for r in mine),
                p99_ms=statistics.median(r.p99_ms for r in mine),
                proxy_us=median([r.proxy_us for r in mine]),
                backend_us=statistics.median(r.backend_us for r in mine),
                helper_us=median([r.helper_us for r in mine]),
                load_cpu=statistics.median(r.load_cpu for r in mine),
                other_cpu=statistics.median(r.other_cpu for r in mine),
                steal_pct=statistics.median(r.steal_pct for r in mine),
                non2xx=sum(r.non2xx for r in mine),
                socket_errors=sum(r.socket_errors for r in mine),
                log_warnings=sum(r.log_warnings for r in mine),
                x_nginx=_paired(runs, mine, NGINX) if kind == "gateway" else None,
                x_direct=_paired(runs, mine, DIRECT) if kind != "direct" else None,
                x_first=_paired(runs, mine, first_gateway) if vs_first else None,
                p99_vs_first_ms=_paired(runs, mine, first_gateway, _p99_difference)
                if vs_first
                else None,
                proxy_us_vs_first=_paired(runs, mine, first_gateway, _cpu_difference)
                if vs_first
                else None,
            )
        )
    return rows


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row], reps: int, with_helpers: bool) -> None:
    head = ["target", "conns", "req/s", "p50 ms", "p99 ms", "proxy us/req", "backend us/req"]
    head += ["helper us/req"] if with_helpers else []
    head += [
        "load CPU",
        "other CPU",
        "steal %",
        "non-2xx/sock err",
        "log warns",
        "x nginx",
        "x direct",
        "x first gw",
    ]
    table = [head]
    for row in rows:
        cells = [
            row.target,
            str(row.conns),
            f"{row.rps:.0f}",
            f"{row.p50_ms:.2f}",
            f"{row.p99_ms:.2f}",
            fmt(row.proxy_us),
            fmt(row.backend_us),
        ]
        cells += [fmt(row.helper_us)] if with_helpers else []
        cells += [
            f"{row.load_cpu:.2f}",
            f"{row.other_cpu:.2f}",
            f"{row.steal_pct:.1f}",
            f"{row.non2xx}/{row.socket_errors}",
            str(row.log_warnings) if row.kind == "gateway" else "-",
            fmt(row.x_nginx, ".2f"),
            fmt(row.x_direct, ".2f"),
            fmt(row.x_first, ".2f"),
        ]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print(
        f"\nResults ({'median of ' + str(reps) + ' reps' if reps > 1 else '1 rep'}; ratios are "
        "paired req/s at the same conns):"
    )
    for i, cells in enumerate(table):
        print(
            "  "
            + "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _row(rows: list[Row], target: str, conns: int) -> Row | None:
    return next((r for r in rows if (r.target, r.conns) == (target, conns)), None)


def busy_machine() -> float:
    """Cores used by other processes over one second (the harness has started nothing yet)."""
    busy0, _, _ = machine_cpu()
    time.sleep(1.0)
    busy1, _, _ = machine_cpu()
    return busy1 - busy0


def disturbance(runs: list[Run]) -> str | None:
    disturbed = [r for r in runs if r.other_cpu > BUSY_CORES]
    if not disturbed:
        return None
    worst = max(r.other_cpu for r in disturbed)
    return (
        f"WARNING: {len(disturbed)} of {len(runs)} runs shared the machine with other work "
        f"(other CPU up to {worst:.2f} cores): their figures are noisy; rerun when it is idle"
    )


def headline(rows: list[Row], opts: Options, env: dict[str, Any] | None = None) -> list[str]:
    gateway = opts.variants[0].name
    conns = opts.conns
    lines = []
    ratios = [(c, r.x_nginx) for c in conns if (r := _row(rows, gateway, c)) is not None]
    if any(x is not None for _, x in ratios):
        lines.append(
            f"{gateway}/nginx "
            + ", ".join(f"c{c} = {fmt(x, '.2f')}" for c, x in ratios)
            + f"   (anchors.md: {ANCHOR_RATIO:.2f}; target >= {ANCHOR_RATIO:.2f})"
        )
    cpu = []
    for c in conns:
        g, n = _row(rows, gateway, c), _row(rows, NGINX, c)
        if g and n and g.proxy_us and n.proxy_us:
            cpu.append(
                f"c{c} {g.proxy_us:.0f}/{n.proxy_us:.0f} us = {g.proxy_us / n.proxy_us:.1f}x"
            )
    if cpu:
        lines.append(
            f"{gateway} CPU/req vs nginx CPU/req: {'; '.join(cpu)}   (anchors.md: 8.9x, 8.5x)"
        )
    for c in conns:
        if (g := _row(rows, gateway, c)) is not None:
            verdict = "ok" if g.p99_ms < P99_TARGET_MS else "OVER"
            lines.append(
                f"{gateway} c{c}: p99 {g.p99_ms:.1f} ms ({verdict}: target < "
                f"{P99_TARGET_MS:.0f} ms), non-2xx {g.non2xx}, socket errors {g.socket_errors}"
            )
    for variant in opts.variants[1:]:
        mine = [r for c in conns if (r := _row(rows, variant.name, c)) is not None]
        lines.append(
            f"{variant.name} / {gateway}: req/s "
            + ", ".join(f"c{r.conns} = {fmt(r.x_first, '.2f')}" for r in mine)
            + "; p99 "
            + ", ".join(f"c{r.conns} {fmt(r.p99_vs_first_ms, '+.2f')} ms" for r in mine)
            + "; proxy CPU/req "
            + ", ".join(f"c{r.conns} {fmt(r.proxy_us_vs_first, '+.0f')} us" for r in mine)
        )
    suite = SUITES[opts.suite] if opts.suite else None
    if suite is not None and suite.criteria is not None:
        lines += suite_verdict(rows, opts, suite, suite.criteria, env or {})
    return lines


def verdict(ok: bool | None) -> str:
    return "?" if ok is None else "ok" if ok else "MISS"


def suite_verdict(
    rows: list[Row], opts: Options, suite: Suite, criteria: Criteria, env: dict[str, Any]
) -> list[str]:
    """The suite's acceptance figures: its second variant against its first (the base)."""
    base, name = suite.variants[0][0], suite.variants[1][0]
    pairs = [
        (c, b, v)
        for c in opts.conns
        if (b := _row(rows, base, c)) is not None and (v := _row(rows, name, c)) is not None
    ]
    ratios = ", ".join(
        f"c{c} = {fmt(v.x_first, '.2f')} "
        f"({verdict(None if v.x_first is None else v.x_first >= criteria.min_ratio)})"
        for c, _, v in pairs
    )
    added = ", ".join(
        f"c{c} {fmt(v.p99_vs_first_ms, '+.2f')} ms ({b.p99_ms:.2f} -> {v.p99_ms:.2f}; "
        + verdict(
            None if v.p99_vs_first_ms is None else v.p99_vs_first_ms <= criteria.max_added_p99_ms
        )
        + ")"
        for c, b, v in pairs
    )
    lines = [
        f"suite {opts.suite}: {name}/{base} req/s {ratios}   (target >= {criteria.min_ratio:.2f})",
        f"suite {opts.suite}: p99 {name} - {base} (paired): {added}   "
        f"(target <= {criteria.max_added_p99_ms:g} ms)",
    ]
    if any(c > 1 for c, _, _ in pairs):
        lines.append(
            "  (at c50/c200 the proxy's core is saturated, so p99 there grows with 1/req/s; "
            "--conns 1 measures what one decision adds to an unloaded request)"
        )
    cpu = ", ".join(
        f"c{c} {fmt(v.proxy_us_vs_first, '+.0f')} us ({fmt(b.proxy_us, '.0f')} -> "
        f"{fmt(v.proxy_us, '.0f')})"
        for c, b, v in pairs
    )
    lines.append(f"suite {opts.suite}: proxy CPU/req {name} - {base}: {cpu}")
    for helper in opts.helpers:
        per = ", ".join(f"c{c} {fmt(v.helper_us)} us" for c, _, v in pairs)
        idle = ", ".join(f"c{c} {fmt(b.helper_us)} us" for c, b, _ in pairs)
        lines.append(
            f"suite {opts.suite}: {helper.name} CPU per request of {name}: {per}   "
            f"(idle {helper.name} during {base} runs: {idle})"
        )
    refused = sum(v.non2xx for _, _, v in pairs)
    if refused:
        lines.append(f"WARNING: {name} answered {refused} non-2xx (refusals?) in its runs")
    dependencies = env.get("gateway_dependencies", {}).get(name)
    warnings = env.get("gateway_warnings", {}).get(name)
    lines.append(
        f"suite {opts.suite}: {name} /health dependencies after the runs: {dependencies}; "
        f"its WARNING+ log lines: {warnings or 'none'}"
    )
    if warnings:
        lines.append(
            f"WARNING: {name} logged warnings during the bench (e.g. a Redis fallback): "
            "part of its runs may not have measured what the suite intends"
        )
    return lines


# -- environment report --------------------------------------------------------------------

_PYTHON_INFO: Final = """
import json, os, sys, sysconfig
info = {"version": sys.version, "executable": sys.executable,
        "real_path": os.path.realpath(sys.executable)}
args = sysconfig.get_config_var("CONFIG_ARGS") or ""
info["enable_optimizations"] = "--enable-optimizations" in args
info["with_lto"] = "--with-lto" in args
try:
    import aiohttp, aiohttp.http_parser as hp
    info["aiohttp"] = aiohttp.__version__
    info["aiohttp_c_parser"] = hp.HttpRequestParser.__module__ == "aiohttp._http_parser"
except ImportError:
    pass
try:
    import uvloop
    info["uvloop"] = uvloop.__version__
except ImportError:
    pass
print(json.dumps(info))
"""


def gateway_python() -> dict[str, Any]:
    python = VENV_BIN / "python"
    out = subprocess.run(
        [str(python), "-c", _PYTHON_INFO], capture_output=True, text=True, check=False
    )
    info: dict[str, Any] = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr}
    if "real_path" in info and shutil.which("dpkg"):
        owner = subprocess.run(
            ["dpkg", "-S", info["real_path"]], capture_output=True, text=True, check=False
        )
        if owner.returncode == 0:
            info["debian_package"] = owner.stdout.split(":")[0]
    return info


def _first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def gateway_code() -> str:
    """The commit the gateway's code is at, and whether gateway/ has uncommitted changes."""
    git = ["git", "-C", str(REPO)]
    head = _first_line([*git, "rev-parse", "--short", "HEAD"])
    changed = subprocess.run(
        [*git, "status", "--porcelain", "--", "gateway"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    return f"{head} + uncommitted changes in {len(changed)} gateway/ files" if changed else head


def environment(tools: Tools, layout: Layout) -> dict[str, Any]:
    return {
        "gateway_code": gateway_code(),
        "gateway_python": gateway_python(),
        "nginx": _first_line([tools.nginx, "-v"]) if tools.nginx else None,
        "wrk": _first_line([tools.wrk, "-v"]) if tools.wrk else None,
        "nproc": _first_line(["nproc"]),
        "cpu_count": os.cpu_count(),
        "kernel": os.uname().release,
        "layout": layout.note,
        "notes": tools.notes,
    }


def print_environment(env: dict[str, Any]) -> None:
    py = env["gateway_python"]
    print("\nEnvironment:")
    print(f"  gateway code: {env['gateway_code']}")
    print(f"  gateway interpreter: {VENV_BIN / 'python'} -> {py.get('real_path')}")
    print(f"    {py.get('version', py.get('error'))}")
    built = (
        f"--enable-optimizations: {_yes(py.get('enable_optimizations'))}, "
        f"--with-lto: {_yes(py.get('with_lto'))}"
    )
    if "debian_package" in py:
        built += (
            f"; from Debian package {py['debian_package']} (Debian builds it with PGO+LTO "
            "in its packaging, which CONFIG_ARGS does not show)"
        )
    print(f"    configure flags (sysconfig CONFIG_ARGS): {built}")
    c_parser = _yes(py.get("aiohttp_c_parser"))
    print(f"    aiohttp {py.get('aiohttp')} (C parser: {c_parser}), uvloop {py.get('uvloop')}")
    print(f"  nginx: {env['nginx'] or 'not installed'}")
    print(f"  wrk: {env['wrk'] or 'not installed (Python load generator)'}")
    print(f"  nproc: {env['nproc']}; kernel {env['kernel']}")
    print(f"  CPU layout: {env['layout']}")
    for name, lines in env.get("gateway_log_lines", {}).items():
        print(f"  {name} wrote {lines} log lines to its file (stdout) during the whole bench")
    for note in env["notes"]:
        print(f"  NOTE: {note}")


def _yes(value: object) -> str:
    return "yes" if value is True else "no" if value is False else "?"


# -- main ----------------------------------------------------------------------------------


def raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """Ctrl-C, SIGTERM and SIGHUP stop a bench the same way: every process it started is
    stopped on the way out (KeyboardInterrupt), even if it was started ignoring SIGINT."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupt)


def plan_seconds(opts: Options, targets: int) -> float:
    return targets * (WARMUP_SECONDS + 0.5 + len(opts.conns) * opts.reps * (opts.duration + 0.5))


def start_stack(stack: Stack, opts: Options) -> None:
    stack.start_backend()
    stack.start_nginx_proxy()
    env: dict[str, str] = {}
    for helper in opts.helpers:
        env.update(stack.start_helper(helper))
    for variant in opts.variants:
        stack.start_gateway(variant, env)


def wait_idle(limit: float) -> float:
    """Wait until other work uses at most BUSY_CORES (over 1 s), ``limit`` seconds at most;
    returns the cores still in use."""
    deadline = time.monotonic() + limit
    while (busy := busy_machine()) > BUSY_CORES and time.monotonic() < deadline:
        pass
    return busy


def _worst(group: list[Run]) -> float:
    return max(r.other_cpu for r in group)


def run_all(stack: Stack, opts: Options, discarded: list[Run]) -> list[Run]:
    """Every measured run; with --rerun-disturbed, the attempts not kept go to ``discarded``."""
    targets = stack.targets
    print(
        f"\nWarm-up: {WARMUP_SECONDS} s per target ({', '.join(t.name for t in targets)})",
        flush=True,
    )
    for target in targets:
        run_load(stack.tools, stack.layout, target.port, opts.conns[0], WARMUP_SECONDS)
    runs = []
    for rep in range(1, opts.reps + 1):
        for conns in opts.conns:
            best: list[Run] = []
            for attempt in range(opts.rerun_disturbed + 1):
                if attempt:
                    print(
                        f"  rep {rep} c{conns} was disturbed (other CPU {_worst(best):.2f} "
                        f"cores): waiting for an idle machine, then attempt {attempt + 1}",
                        flush=True,
                    )
                    wait_idle(IDLE_WAIT)
                group = []
                for target in targets:
                    run = measure(stack, target, conns, opts.duration, rep)
                    group.append(run)
                    print(progress_line(run), flush=True)
                if not best or _worst(group) < _worst(best):
                    best, group = group, best
                discarded.extend(group)
                if _worst(best) <= BUSY_CORES:
                    break
            runs.extend(best)
    return runs


def progress_line(run: Run) -> str:
    return (
        f"  rep {run.rep} c{run.conns:<4} {run.target:<24} {run.rps:9.0f} req/s  "
        f"p99 {run.p99_ms:8.2f} ms  proxy {fmt(run.proxy_us):>6} us/req  "
        f"errors {run.non2xx}/{run.socket_errors}  other CPU {run.other_cpu:.2f}"
        + (f"  log warnings {run.log_warnings}" if run.log_warnings else "")
    )


def report(runs: list[Run], opts: Options, env: dict[str, Any], started: float) -> None:
    gateways = [v.name for v in opts.variants]
    rows = summarize(runs, gateways[0])
    print_table(rows, opts.reps, bool(opts.helpers))
    print("\nHeadline (gateway = first variant, logging every request at INFO to a file):")
    lines = headline(rows, opts, env)
    warning = disturbance(runs)
    if warning is not None:
        lines.append(warning)
    if discarded := env.get("discarded_runs"):
        groups = len({(r["rep"], r["conns"]) for r in discarded})
        lines.append(
            f"{groups} disturbed rep/conns groups were measured again (--rerun-disturbed): "
            f"the table keeps the least disturbed attempt of each ({len(discarded)} runs dropped)"
        )
    for line in lines:
        print(f"  {line}")
    print_environment(env)
    elapsed = time.monotonic() - started
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "options": {**asdict(opts), "json_path": str(opts.json_path)},
            "environment": env,
            "runs": [asdict(r) for r in runs],
            "rows": [asdict(r) for r in rows],
            "headline": lines,
            "elapsed_seconds": elapsed,
        }
        opts.json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"\nJSON written to {opts.json_path}")
    print(f"\nElapsed: {elapsed:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    opts = parse_options(argv)
    stop_on_signals()
    tools = ensure_tools(opts)
    layout = choose_layout()
    env = environment(tools, layout)
    env["busy_cores_before"] = busy = busy_machine()
    if busy > BUSY_CORES:
        print(
            f"WARNING: the machine is busy before the start ({busy:.2f} cores used by other "
            "processes): results will be noisy",
            flush=True,
        )
    workdir = Path(tempfile.mkdtemp(prefix="daarion-bench-"))
    workdir.chmod(0o755)  # nginx workers run as an unprivileged user when started by root
    stack = Stack(tools, layout, workdir)
    try:
        start_stack(stack, opts)
        print(f"Targets on {LOOPBACK}: " + ", ".join(f"{t.name}:{t.port}" for t in stack.targets))
        print(
            f"Layout: {layout.note}. About {plan_seconds(opts, len(stack.targets)):.0f} s of load."
        )
        if opts.suite:
            print(f"Suite {opts.suite}: {SUITES[opts.suite].about}")
        for note in tools.notes:
            print(f"NOTE: {note}")
        discarded: list[Run] = []
        runs = run_all(stack, opts, discarded)
        env["discarded_runs"] = [asdict(r) for r in discarded]
        env["gateway_dependencies"] = stack.gateway_dependencies()
        env["gateway_log_lines"] = stack.gateway_log_lines()
        env["gateway_warnings"] = stack.gateway_warnings()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every server", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    report(runs, opts, env, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
