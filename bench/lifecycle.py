"""Restarts under load: `.venv/bin/python bench/lifecycle.py` (~1.5 min).

``wrk -t1 -c50 --latency`` runs through a proxy for ``--duration`` seconds (default 12); a
third of the way in, the proxy is restarted:

- ``gateway`` (``serve``, and ``serve --workers 2``): ``daarion-gateway restart`` (SIGUSR2:
  a new generation of workers on the same sockets, then the old one hands over);
- ``nginx``: ``nginx -s reload`` (SIGHUP to its master: new workers, the old ones finish),
  the same job done by the proxy the gateway is compared with.

Reported per proxy: requests, req/s, non-2xx answers and wrk's socket errors (connect, read,
write, timeout) over the whole run; the **longest gap in answers** (the longest time between
two consecutive answers the backend saw requests for, from its access log with millisecond
times: the time during which no request got through); the restart's own time (from the
signal to the outcome ``restart`` prints); p50/p99. Targets (the issue): 0 socket errors and 0
non-2xx across a restart. The backend (nginx) and the proxy share CPU 0, wrk runs on CPU 1
("pin", as in bench/run.py).
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from lib import load, process, report, servers, tools
from lib.process import LOOPBACK, Layout, Server
from lib.report import fmt
from lib.tools import GATEWAY, Tools

REQUEST_PATH: Final = "/api/bench/"
RESTART_TIMEOUT: Final = 60.0

# The backend logs each request with its time in milliseconds (msec), for the gap.
BACKEND: Final = """\
    log_format at '$msec';
    server {
        listen 127.0.0.1:%(port)d backlog=1024;
        access_log %(log)s at buffer=256k flush=100ms;
        default_type application/json;
        location / { return 200 '{"ok":true}'; }
    }"""

GATEWAY_CONFIG: Final = """\
lifecycle: {drain_delay: 2, shutdown_timeout: 10}
upstream_keepalive_timeout: 60
metrics_cache: 5
health: {enabled: false}
nodes:
  local: {host: 127.0.0.1}
services:
  bench: {port: %(backend)d, nodes: [local]}
"""


@dataclass(frozen=True)
class Options:
    duration: int
    conns: int
    log_level: str
    json_path: Path | None
    install: bool
    keep: bool


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="bench/lifecycle.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--duration", type=int, default=12, help="seconds of load per run (12)")
    parser.add_argument("--conns", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--log-level", default="INFO", help="the gateway's (INFO)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get nginx, wrk")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if args.duration < 6 or args.conns < 1:
        parser.error("--duration must be >= 6 and --conns >= 1")
    return Options(
        args.duration, args.conns, args.log_level.upper(), args.json, not args.no_install, args.keep
    )


@dataclass
class Run:
    proxy: str  # gateway, gateway --workers 2, nginx
    requests: int
    rps: float
    non2xx: int
    socket_errors: dict[str, int]
    longest_gap_ms: float
    typical_gap_ms: float  # the median gap between two answers, for scale
    restart_s: float  # from the signal to the restart's outcome
    restart_ok: bool
    p50_ms: float
    p99_ms: float


def gaps(log: Path, start: float, end: float) -> tuple[float, float]:
    """(longest, median) time in ms between consecutive requests the backend logged in
    [start, end] (wall clock)."""
    times = sorted(
        t for t in (float(line) for line in log.read_text().split() if line) if start <= t <= end
    )
    between = [b - a for a, b in itertools.pairwise(times)]
    if not between:
        return float("nan"), float("nan")
    between_sorted = sorted(between)
    return 1000 * between_sorted[-1], 1000 * between_sorted[len(between_sorted) // 2]


def restart_gateway(pid_file: Path) -> tuple[float, bool, str]:
    began = time.monotonic()
    out = subprocess.run(
        [GATEWAY, "restart", "--pid-file", str(pid_file), "--timeout", str(RESTART_TIMEOUT)],
        capture_output=True,
        text=True,
        check=False,
    )
    return time.monotonic() - began, out.returncode == 0, (out.stdout + out.stderr).strip()


def restart_nginx(nginx: str, home: Path) -> tuple[float, bool, str]:
    """``nginx -s reload`` (it signals the master and returns: the time is the signal's)."""
    began = time.monotonic()
    out = subprocess.run(
        [nginx, "-p", str(home), "-c", str(home / "nginx.conf"), "-s", "reload"],
        capture_output=True,
        text=True,
        check=False,
    )
    return time.monotonic() - began, out.returncode == 0, (out.stdout + out.stderr).strip()


class Stack(servers.Stack):
    backend: Server
    backend_log: Path

    def start_backend(self) -> None:
        self.backend_log = self.workdir / "backend-access.log"
        self.backend = self.nginx_server("backend", BACKEND, log=self.backend_log)
        self.ready(self.backend, lambda: servers.http_status(self.backend.port, "/") == 200)

    def gateway(self, name: str, workers: int, log_level: str) -> tuple[Server, Path]:
        config = self.workdir / f"{name}.yaml"
        config.write_text(GATEWAY_CONFIG % {"backend": self.backend.port})
        pid_file = self.workdir / f"{name}.pid"
        port = process.free_port()
        command = servers.gateway_command(config, port, log_level, workers=workers)
        server = self.start(name, [*command, "--pid-file", str(pid_file)], port)
        self.ready(server, lambda: servers.http_status(port, REQUEST_PATH) == 200)
        return server, pid_file

    def nginx(self) -> Server:
        body = servers.NGINX_PROXY.replace("%(backend)d", str(self.backend.port))
        server = self.nginx_server("nginx", body)
        self.ready(server, lambda: servers.http_status(server.port, REQUEST_PATH) == 200)
        return server


def measure(
    stack: Stack,
    name: str,
    port: int,
    restart: Callable[[], tuple[float, bool, str]],
    opts: Options,
) -> Run:
    """wrk against ``port``; ``restart()`` a third of the way in."""
    assert stack.tools.wrk is not None  # noqa: S101 - checked by nginx_and_wrk
    url = f"http://{LOOPBACK}:{port}{REQUEST_PATH}"
    command = load.wrk_command(
        stack.tools.wrk, url, opts.conns, opts.duration, pin=stack.prefix(stack.layout.load)
    )
    began = time.time()
    wrk = process.spawn(command, stdout=subprocess.PIPE)
    stack.adopt(wrk)
    time.sleep(opts.duration / 3)
    took, ok, said = restart()
    out, _ = wrk.communicate(timeout=opts.duration + 30)
    ended = time.time()
    done = load.parse_wrk(out.decode())
    time.sleep(0.3)  # the backend's log buffer flushes every 100 ms
    longest, typical = gaps(stack.backend_log, began + 1, ended - 1)
    print(f"  {name}: {done.requests} requests, restart {took:.2f} s ({said.splitlines()[-1]})")
    return Run(
        name,
        done.requests,
        done.rps,
        done.non2xx,
        done.socket_errors,
        longest,
        typical,
        took,
        ok,
        done.p50_ms,
        done.p99_ms,
    )


def table(runs: list[Run]) -> list[list[str]]:
    rows = [["proxy", "requests", "req/s", "non-2xx", "sock err", "longest gap ms",
             "median gap ms", "restart s", "p50 ms", "p99 ms"]]  # fmt: skip
    for r in runs:
        errors = sum(r.socket_errors.values())
        restart = fmt(r.restart_s, ".2f") + ("" if r.restart_ok else " FAILED")
        rows.append([
            r.proxy, str(r.requests), fmt(r.rps, ".0f"), str(r.non2xx),
            f"{errors} {r.socket_errors}" if errors else "0", fmt(r.longest_gap_ms),
            fmt(r.typical_gap_ms, ".2f"), restart, fmt(r.p50_ms, ".2f"), fmt(r.p99_ms, ".2f"),
        ])  # fmt: skip
    return rows


def run_all(stack: Stack, opts: Options) -> list[Run]:
    stack.start_backend()
    runs = []
    for workers in (1, 2):
        name = "gateway" if workers == 1 else f"gateway --workers {workers}"
        server, pid_file = stack.gateway(f"gateway-w{workers}", workers, opts.log_level)
        runs.append(measure(stack, name, server.port, lambda p=pid_file: restart_gateway(p), opts))
        process.stop(server.proc)
    assert stack.tools.nginx is not None  # noqa: S101
    nginx = stack.nginx()
    home = stack.workdir / "nginx"
    runs.append(
        measure(
            stack,
            "nginx (-s reload)",
            nginx.port,
            lambda: restart_nginx(stack.tools.nginx or "", home),
            opts,
        )
    )
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    opts = parse_options(argv)
    process.stop_on_signals()
    found: Tools = tools.nginx_and_wrk(
        opts.install, "bench/lifecycle.py needs nginx (backend, the compared proxy) and wrk"
    )
    layout: Layout = process.choose_layout()
    env = {
        "gateway_code": tools.gateway_code(),
        "nproc": tools.first_line(["nproc"]),
        "layout": layout.note,
        "nginx": tools.first_line([found.nginx or "nginx", "-v"]),
    }
    layout.pin_harness()
    with servers.workspace("daarion-lifecycle-", keep=opts.keep) as space:
        stack = Stack(found, layout, space.path)
        at = opts.duration / 3
        print(
            f"c{opts.conns}, {opts.duration} s per proxy, restarted at {at:.0f} s. {layout.note}."
        )
        runs = servers.run_stack(stack, space, lambda: run_all(stack, opts))
    if isinstance(runs, int):
        return runs
    print("\nResults (one run each; a gap: the longest time no request reached the backend):")
    report.print_table(table(runs))
    clean = [r for r in runs if r.proxy.startswith("gateway")]
    lines = [
        f"{r.proxy}: {r.non2xx} non-2xx, {sum(r.socket_errors.values())} socket errors, "
        f"longest gap {fmt(r.longest_gap_ms)} ms: "
        + report.verdict(r.non2xx == 0 and not any(r.socket_errors.values()) and r.restart_ok)
        for r in clean
    ]
    report.print_headline("target: 0 non-2xx and 0 socket errors across a restart", lines, env)
    return report.finish(started, opts, env, lines, runs=runs, discarded=[])


if __name__ == "__main__":
    sys.exit(main())
