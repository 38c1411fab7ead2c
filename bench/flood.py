"""Flood benchmark of the gateway (issue 10): `.venv/bin/python bench/flood.py` (~2 min).

Does the gateway keep serving well-behaved clients while others hold connections open? On
127.0.0.1 with bench/run.py's "pin" layout (backend nginx and the gateway on CPU 0; wrk, the
attackers and this harness on CPU 1), for each of ``--reps`` (default 3), in this order:

1. **quiet**: ``wrk -t1 -c50 -d8s --latency`` on the gateway, nothing else connected;
2. **flood**: bench/flooder.py (its own process) opens 5,000 idle connections (half send
   nothing, half a partial request head) and 500 slow-body ones (a POST head with
   ``Content-Length: 1000000``, then one byte every 3 s), all from 127.0.0.10 onwards, 250 at
   most per address (below the gateway's per-address cap, 256); once they are open (and the
   gateway's ``gateway_client_connections`` shows them), the same wrk run. Halfway through it,
   the gateway's RSS, open files and connections and the backend's open files are read. Then
   the attackers close everything (reporting how many connections the gateway closed on them:
   each was reopened) and the harness waits for the gateway to count them gone.

Reported: req/s, p50/p99, errors and CPU per request of both modes (medians over reps), the
req/s ratio flood/quiet (median of the per-rep ratios), and the verdicts against the issue's
targets: ratio >= 0.8 and flood p99 < 50 ms. The gateway runs the harness's own config
(bench/run.py's GATEWAY_CONFIG) with ``limits.client_body_timeout: 60`` and the service's
``max_connections: 1024`` (bench/README.md, "Flood", says why). See bench/README.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from lib import load, options, process, report, servers, tools
from lib.load import WsClient
from lib.process import LOOPBACK, Layout, Server
from lib.report import fmt, median, verdict
from lib.tools import Tools

REQUEST_PATH: Final = "/api/bench/"
WARMUP_SECONDS: Final = 2
RATIO_TARGET: Final = 0.8  # the issue: flood req/s / quiet req/s
P99_TARGET_MS: Final = 50.0  # the issue: p99 during the flood
IDLE_WAIT: Final = 120.0  # --rerun-disturbed: longest wait for an idle machine
OPEN_TIMEOUT: Final = 120.0  # for the attackers to open everything
SETTLE_TIMEOUT: Final = 30.0  # for the gateway to count the attackers' connections (gone)
QUIET: Final = "quiet"
FLOOD: Final = "flood"

# The backend: bench/run.py's (``return 200`` for any path, which never reads a body), plus
# /upload/, which reads the whole body before answering (nginx buffers it, then proxies the
# request to its own ``return 200``), as an upload endpoint does: the slow bodies go there, so
# the backend does not answer them early and each holds its upstream connection for the run.
BACKEND_BODY: Final = """\
    server {
        listen 127.0.0.1:%(port)d backlog=1024;
        default_type application/json;
        client_max_body_size 2m;
        client_body_timeout 120s;
        location / { return 200 '{"ok":true}'; }
        location /upload/ { proxy_pass http://127.0.0.1:%(port)d/; }
    }"""
SLOW_PATH: Final = "/api/bench/upload/"  # -> /upload/ on the backend

# bench/run.py's GATEWAY_CONFIG, plus what lets the run measure holding the slow bodies: a
# body timeout longer than the run (so they stay open) and upstream slots for 500 slow bodies
# (each holds one while its body trickles in) besides wrk's 50.
GATEWAY_CONFIG: Final = """\
# Made by bench/flood.py: one service in front of the benchmark backend.
listen: {host: 127.0.0.1, port: 8080}
limits: {client_body_timeout: 60}
nodes:
  bench: {host: 127.0.0.1}
services:
  bench: {port: "${BENCH_BACKEND_PORT}", nodes: [bench], http_prefix: "", max_connections: 1024}
"""


# -- options -------------------------------------------------------------------------------


DEFAULTS: Final = options.Defaults(
    reps=3,
    reps_help="quiet/flood pairs (3)",
    quick_duration=3,
    quick_reps=1,
    rerun_group="a quiet/flood pair",
    idle_wait=IDLE_WAIT,
)


@dataclass(frozen=True)
class Options(options.WrkOptions):
    idle: int
    slow: int
    interval: float


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="bench/flood.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    options.add_wrk_options(parser, DEFAULTS)
    parser.add_argument("--idle", type=int, default=5000, help="idle attacker connections")
    parser.add_argument("--slow", type=int, default=500, help="slow-body attacker connections")
    parser.add_argument(
        "--interval", type=float, default=3.0, help="seconds between slow-body bytes (3)"
    )
    args = parser.parse_args(argv)
    if min(args.idle, args.slow) < 0:
        parser.error("--idle, --slow must be >= 0")
    return Options(
        **options.wrk_options(parser, args, DEFAULTS),
        idle=args.idle,
        slow=args.slow,
        interval=args.interval,
    )


# -- the stack -----------------------------------------------------------------------------


class Stack(servers.Stack):
    """nginx as the backend and the gateway in front of it, pinned to the servers' CPU."""

    backend: Server
    gateway: Server

    def start_all(self, log_level: str) -> None:
        assert self.tools.nginx is not None  # noqa: S101 - checked by ensure_tools
        self.backend = self.nginx_server("backend", BACKEND_BODY)
        self.ready(self.backend, lambda: servers.http_status(self.backend.port, "/") == 200)
        config = self.workdir / "gateway-routes.yaml"
        config.write_text(GATEWAY_CONFIG)
        env = {**os.environ, "BENCH_BACKEND_PORT": str(self.backend.port)}
        self.gateway = self.gateway_server("gateway", config, log_level, env=env)
        self.ready(
            self.gateway, lambda: servers.http_status(self.gateway.port, REQUEST_PATH) == 200
        )

    def client_connections(self) -> float | None:
        """The gateway's ``gateway_client_connections`` (this request's own included)."""
        samples = servers.parse_metrics(servers.http_text(self.gateway.port, "/metrics"))
        return servers.total(samples, "gateway_client_connections")

    def flooder(self, opts: Options) -> WsClient:
        command = load.flooder_command(
            self.gateway.port,
            opts.idle,
            opts.slow,
            opts.interval,
            slow_path=SLOW_PATH,
            pin=self.prefix(self.layout.load),
        )
        client = WsClient(command, self.workdir / "flooder.err", stdin=True)
        self.adopt(client.proc)
        return client


def ensure_tools(opts: Options) -> Tools:
    return tools.nginx_and_wrk(
        opts.install, "bench/flood.py needs nginx (the backend) and wrk (the measured load)"
    )


# -- one measured run ----------------------------------------------------------------------


@dataclass
class Run:
    rep: int
    mode: str  # quiet or flood
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    proxy_us: float
    backend_us: float
    load_cpu: float  # cores used by wrk
    attackers_cpu: float  # cores used by the flooder
    other_cpu: float  # cores used by everything else (other users' work)
    steal_pct: float
    # halfway through the run:
    gateway_connections: float | None  # its /metrics gateway_client_connections
    gateway_rss_kib: int
    gateway_fds: int
    backend_fds: int  # its upstream connections from the gateway, plus its own files
    attackers_open: dict[str, int] = field(default_factory=dict)
    log_warnings: int = 0
    attack: dict[str, Any] = field(default_factory=dict)  # flood: the flooder's counts

    @property
    def target(self) -> str:  # for report.paired
        return self.mode


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _clock(stack: Stack, attackers: int | None) -> process.CpuClock:
    return process.CpuClock.read(
        {
            "proxy": lambda: process.cpu_seconds(stack.gateway.proc.pid),
            "backend": lambda: process.cpu_seconds(stack.backend.proc.pid),
            "load": process.children_cpu,
            "attackers": lambda: process.cpu_seconds(attackers) if attackers else 0.0,
            "harness": _self_cpu,
        }
    )


def wrk(
    stack: Stack, conns: int, seconds: int, halfway: Callable[[], None] | None = None
) -> load.Load:
    """One wrk run on the gateway; ``halfway()`` is called in the middle of it."""
    assert stack.tools.wrk is not None  # noqa: S101 - checked by ensure_tools
    url = f"http://{LOOPBACK}:{stack.gateway.port}{REQUEST_PATH}"
    command = load.wrk_command(
        stack.tools.wrk, url, conns, seconds, pin=stack.prefix(stack.layout.load)
    )
    proc = process.spawn(command, stdout=subprocess.PIPE)
    try:
        if halfway is not None:
            time.sleep(seconds / 2)
            halfway()
        out, _ = proc.communicate(timeout=seconds + 60)
    finally:
        process.stop(proc)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    return load.parse_wrk(text)


def measure(
    stack: Stack, opts: Options, rep: int, mode: str, flooder: WsClient | None = None
) -> Run:
    seen: dict[str, Any] = {}

    def halfway() -> None:
        seen["connections"] = stack.client_connections()
        seen["rss"] = process.rss_kib(stack.gateway.proc.pid)
        seen["fds"] = process.fd_count(stack.gateway.proc.pid)
        seen["backend_fds"] = process.fd_count(stack.backend.proc.pid)
        if flooder is not None:
            flooder.send("stats")
            seen["attackers"] = load.parse_flooder(flooder.expect("stats")).open

    log_offset = stack.gateway.log.stat().st_size
    before = _clock(stack, flooder.proc.pid if flooder else None)
    done = wrk(stack, opts.conns, opts.duration, halfway)
    used = _clock(stack, flooder.proc.pid if flooder else None) - before
    per = 1e6 / max(done.requests, 1)
    return Run(
        rep=rep,
        mode=mode,
        **vars(load.figures(done)),
        proxy_us=used["proxy"] * per,
        backend_us=used["backend"] * per,
        load_cpu=used["load"] / done.seconds,
        attackers_cpu=used["attackers"] / done.seconds,
        other_cpu=used.other_cores(done.seconds),
        steal_pct=used.steal_pct,
        gateway_connections=seen.get("connections"),
        gateway_rss_kib=seen.get("rss", 0),
        gateway_fds=seen.get("fds", 0),
        backend_fds=seen.get("backend_fds", 0),
        attackers_open=seen.get("attackers", {}),
        log_warnings=servers.count_warnings(stack.gateway.log, log_offset),
    )


def wait_connections(stack: Stack, done: Callable[[float], bool]) -> tuple[float | None, float]:
    """Poll /metrics until ``done(gateway_client_connections)``; (last value, seconds)."""
    started = time.monotonic()
    value = stack.client_connections()
    while (value is None or not done(value)) and time.monotonic() - started < SETTLE_TIMEOUT:
        time.sleep(0.25)
        value = stack.client_connections()
    return value, time.monotonic() - started


def flood_run(stack: Stack, opts: Options, rep: int) -> Run:
    """Open the attackers' connections, measure the wrk run while they are held, close them."""
    flooder = stack.flooder(opts)
    try:
        opened = load.parse_flooder(flooder.expect("opened", OPEN_TIMEOUT))
        held, settle = wait_connections(stack, lambda n: n >= 0.98 * opened.open_total)
        run = measure(stack, opts, rep, FLOOD, flooder)
        flooder.send("stop")
        closed = load.parse_flooder(flooder.expect("closed", 60))
    finally:
        flooder.finish()
    gone, drain = wait_connections(stack, lambda n: n <= 1)
    run.attack = {
        "opened_at_start": opened.open,
        "open_seconds": opened.seconds,
        "gateway_connections_before_wrk": held,
        "settle_seconds": round(settle, 2),
        "open_at_stop": closed.open,
        "connects": closed.opened,
        "connect_failed": closed.connect_failed,
        "closed_by_server": closed.closed_by_server,
        "answered": closed.answered,
        "body_bytes": closed.body_bytes,
        "sources": list(closed.sources),
        "flooder_cpu_seconds": closed.cpu_seconds,
        "gateway_connections_after": gone,
        "drain_seconds": round(drain, 2),
    }
    return run


def progress_line(run: Run) -> str:
    line = (
        f"  rep {run.rep} {run.mode:<5} {run.rps:8.0f} req/s  p50 {run.p50_ms:6.2f} ms  "
        f"p99 {run.p99_ms:7.2f} ms  proxy {run.proxy_us:5.0f} us/req  "
        f"errors {run.non2xx}/{run.socket_errors}  gw conns {fmt(run.gateway_connections, '.0f')}"
        f"  RSS {run.gateway_rss_kib / 1024:.0f} MiB  other CPU {run.other_cpu:.2f}"
    )
    if run.attack:
        a = run.attack
        line += (
            f"\n      attackers: opened {sum(a['opened_at_start'].values())} in "
            f"{a['open_seconds']:.1f} s, open at stop {sum(a['open_at_stop'].values())}, "
            f"closed by the gateway {sum(a['closed_by_server'].values())} "
            f"{a['closed_by_server']}, answers {a['answered'] or 'none'}, "
            f"drained in {a['drain_seconds']:.1f} s"
        )
    return line


def measure_pair(stack: Stack, opts: Options, rep: int) -> list[Run]:
    """A quiet run and, right after it, a flood run."""
    pair = []
    for mode in (QUIET, FLOOD):
        run = measure(stack, opts, rep, QUIET) if mode == QUIET else flood_run(stack, opts, rep)
        pair.append(run)
        print(progress_line(run), flush=True)
    return pair


def run_all(stack: Stack, opts: Options, discarded: list[Run], env: dict[str, Any]) -> list[Run]:
    print(f"\nWarm-up: {WARMUP_SECONDS} s of wrk c{opts.conns}", flush=True)
    wrk(stack, opts.conns, WARMUP_SECONDS)
    # the baseline of RSS per held connection: after the first flood the gateway keeps most of
    # the memory it took (freed objects stay in the allocator's arenas), so the quiet runs of
    # later reps show the flood's peak, not the gateway before it
    env["gateway_rss_before_flood_kib"] = process.rss_kib(stack.gateway.proc.pid)
    runs: list[Run] = []
    for rep in range(1, opts.reps + 1):
        pair = functools.partial(measure_pair, stack, opts, rep)
        runs += process.least_disturbed(
            pair, f"rep {rep}", opts.rerun_disturbed, discarded, IDLE_WAIT
        )
    return runs


# -- report --------------------------------------------------------------------------------


def _ratio(run: Run, base: Run) -> float | None:
    return run.rps / base.rps if base.rps > 0 else None


def flood_ratio(runs: list[Run]) -> float | None:
    """flood req/s / quiet req/s: the median of the per-rep ratios."""
    floods = [r for r in runs if r.mode == FLOOD]
    return median(report.paired(floods, runs, QUIET, lambda r: r.rep, _ratio))


def rows(runs: list[Run]) -> list[list[str]]:
    head = [
        "mode", "req/s", "p50 ms", "p99 ms", "proxy us/req", "backend us/req",
        "non-2xx/sock err", "gw conns", "gw RSS MiB", "gw fds", "backend fds",
        "attackers open", "attackers CPU", "load CPU", "other CPU", "log warns",
    ]  # fmt: skip
    table = [head]
    for mode in (QUIET, FLOOD):
        mine = [r for r in runs if r.mode == mode]
        if not mine:
            continue
        med = statistics.median
        table.append(
            [
                mode,
                f"{med(r.rps for r in mine):.0f}",
                f"{med(r.p50_ms for r in mine):.2f}",
                f"{med(r.p99_ms for r in mine):.2f}",
                f"{med(r.proxy_us for r in mine):.0f}",
                f"{med(r.backend_us for r in mine):.0f}",
                f"{sum(r.non2xx for r in mine)}/{sum(r.socket_errors for r in mine)}",
                fmt(median(r.gateway_connections for r in mine), ".0f"),
                f"{med(r.gateway_rss_kib for r in mine) / 1024:.0f}",
                f"{med(r.gateway_fds for r in mine):.0f}",
                f"{med(r.backend_fds for r in mine):.0f}",
                f"{med(sum(r.attackers_open.values()) for r in mine):.0f}",
                f"{med(r.attackers_cpu for r in mine):.2f}",
                f"{med(r.load_cpu for r in mine):.2f}",
                f"{med(r.other_cpu for r in mine):.2f}",
                str(sum(r.log_warnings for r in mine)),
            ]
        )
    return table


def headline(
    runs: list[Run], opts: Options, warnings: dict[str, int], rss_before_kib: int
) -> list[str]:
    quiet = [r for r in runs if r.mode == QUIET]
    flood = [r for r in runs if r.mode == FLOOD]
    ratio = flood_ratio(runs)
    p99 = statistics.median(r.p99_ms for r in flood)
    q99 = statistics.median(r.p99_ms for r in quiet)
    held = opts.idle + opts.slow
    lines = [
        f"flood/quiet req/s = {fmt(ratio, '.2f')} "
        f"({verdict(None if ratio is None else ratio >= RATIO_TARGET)}: target >= "
        f"{RATIO_TARGET}; median of {len(flood)} paired reps: "
        + ", ".join(f"{f.rps / q.rps:.2f}" for q, f in zip(quiet, flood, strict=True) if q.rps)
        + ")",
        f"flood p99 = {p99:.1f} ms ({verdict(p99 < P99_TARGET_MS)}: target < "
        f"{P99_TARGET_MS:.0f} ms); p50 {statistics.median(r.p50_ms for r in flood):.2f} ms; "
        f"quiet p99 {q99:.1f} ms, p50 {statistics.median(r.p50_ms for r in quiet):.2f} ms",
        f"wrk errors: quiet non-2xx {sum(r.non2xx for r in quiet)}, socket "
        f"{sum(r.socket_errors for r in quiet)}; flood non-2xx {sum(r.non2xx for r in flood)}, "
        f"socket {sum(r.socket_errors for r in flood)}",
    ]
    conns = median(r.gateway_connections for r in flood)
    rss_f = statistics.median(r.gateway_rss_kib for r in flood)
    lines.append(
        f"gateway during the flood: {fmt(conns, '.0f')} client connections (/metrics; attackers "
        f"{held} + wrk {opts.conns} + 1), RSS {rss_f / 1024:.0f} MiB (before the first flood "
        f"{rss_before_kib / 1024:.0f} MiB: {(rss_f - rss_before_kib) / max(held, 1):.1f} KiB "
        "per held connection), "
        f"{statistics.median(r.gateway_fds for r in flood):.0f} open files; backend "
        f"{statistics.median(r.backend_fds for r in flood):.0f} open files (quiet "
        f"{statistics.median(r.backend_fds for r in quiet):.0f}: the slow bodies' upstream "
        "connections)"
    )
    closed: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for r in flood:
        closed.update(r.attack.get("closed_by_server", {}))
        answered.update(r.attack.get("answered", {}))
        failed.update(r.attack.get("connect_failed", {}))
    opened = [sum(r.attack.get("opened_at_start", {}).values()) for r in flood]
    lines.append(
        f"attackers: {min(opened, default=0)} of {held} open at the start of each flood "
        f"(min over reps); the gateway closed {sum(closed.values())} of theirs "
        f"({dict(closed) or 'none'}; each reopened), answered {dict(answered) or 'none'}, "
        f"connects failed {dict(failed) or 'none'}; attackers' CPU "
        f"{statistics.median(r.attackers_cpu for r in flood):.2f} cores (on the load CPU)"
    )
    if warnings:
        lines.append(f"gateway WARNING+ log lines over the whole bench: {warnings}")
    if (warning := report.disturbance([r.other_cpu for r in runs])) is not None:
        lines.append(warning)
    return lines


def environment(found: Tools, layout: Layout, notes: list[str]) -> dict[str, Any]:
    py = tools.gateway_python()
    return {
        "gateway_code": tools.gateway_code(),
        "gateway_python": f"{py.get('real_path')} {str(py.get('version', '')).split()[0:1]}",
        "nginx": tools.first_line([found.nginx, "-v"]) if found.nginx else None,
        "wrk": tools.first_line([found.wrk, "-v"]) if found.wrk else None,
        "nproc": tools.first_line(["nproc"]),
        "layout": layout.note + "; attackers (bench/flooder.py) and this harness with the load",
        "notes": notes,
    }


def start_and_run(
    stack: Stack, opts: Options, env: dict[str, Any], discarded: list[Run]
) -> tuple[list[Run], dict[str, int]]:
    """The runs, and the gateway's WARNING+ log messages over the whole bench."""
    stack.start_all(opts.log_level)
    env["gateway_open_files_limit"] = process.fd_limit(stack.gateway.proc.pid)
    per_pair = 2 * opts.duration + 10
    print(
        f"Gateway on {LOOPBACK}:{stack.gateway.port} (open-files limit "
        f"{env['gateway_open_files_limit']}), backend :{stack.backend.port}. "
        f"{stack.layout.note}. {opts.reps} quiet/flood pairs, about "
        f"{opts.reps * per_pair + WARMUP_SECONDS:.0f} s.",
        flush=True,
    )
    runs = run_all(stack, opts, discarded, env)
    return runs, servers.warning_messages(stack.gateway.log)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    opts = parse_options(argv)
    process.stop_on_signals()
    found = ensure_tools(opts)
    layout = process.choose_layout()
    notes = [process.raise_nofile(opts.idle + opts.slow + 1024)]
    env = environment(found, layout, notes)
    layout.pin_harness()
    env["busy_cores_before"] = process.busy_machine()
    discarded: list[Run] = []
    with servers.workspace("daarion-flood-", keep=opts.keep) as space:
        stack = Stack(found, layout, space.path)
        done = servers.run_stack(
            stack, space, functools.partial(start_and_run, stack, opts, env, discarded)
        )
    if isinstance(done, int):
        return done
    runs, warnings = done
    print(f"\nResults (median of {opts.reps} reps; halfway figures for gw/backend/attackers):")
    report.print_table(rows(runs))
    lines = headline(runs, opts, warnings, env["gateway_rss_before_flood_kib"])
    if discarded:
        lines.append(
            f"{len(discarded) // 2} disturbed pairs were measured again (--rerun-disturbed): "
            "the table keeps the least disturbed attempt of each"
        )
    report.print_headline("issue 10: flood/quiet >= 0.8, flood p99 < 50 ms", lines, env)
    return report.finish(started, opts, env, lines, runs=runs, discarded=discarded)


if __name__ == "__main__":
    raise SystemExit(main())
