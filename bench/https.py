"""HTTPS benchmark of the gateway against nginx: `.venv/bin/python bench/https.py` (~2 min).

Both proxies terminate TLS with the same certificate (an ephemeral ECDSA P-256 chain made with
trustme) in front of bench/run.py's backend, on 127.0.0.1, with run.py's "pin" layout (backend
and proxy on CPU 0, ``wrk -t1`` on CPU 1). Each proxy is one process serving plain HTTP and
HTTPS side by side (nginx: one worker, two server blocks; the gateway: ``listen`` and
``tls.listen``, ``redirect_http: false``). For each rep, each load shape ("mode") is run on
nginx and then on the gateway, ``wrk -t1 -c50 -d8s --latency``:

- ``http``: plain HTTP, keep-alive (run.py's c50 row, measured again in the same run);
- ``https``: HTTPS, keep-alive (50 handshakes at the start, then only records);
- ``http-close``: plain HTTP with ``Connection: close``: a new TCP connection per request, what
  a new connection costs without TLS;
- ``resumed``: HTTPS with ``Connection: close``: a new TCP connection and TLS handshake per
  request; wrk resumes the previous connection's session (it keeps its SSL object), so each is
  a TLS 1.3 resumption with a ticket (PSK + X25519);
- ``full``: the same against a second instance of each proxy started with an OpenSSL config
  that sends no tickets (``NumTickets = 0``): each handshake is a full one (X25519, an ECDSA
  P-256 signature, the certificate chain sent).

Reported: req/s, latency and CPU per request of each (proxy, mode); the plain ratio
(gateway/nginx req/s, http), the HTTPS ratio (https) and HTTPS ratio / plain ratio (target
>= 0.9; paired per rep), the handshake ratios (resumed, full) and CPU per handshake; what was
negotiated and whether wrk resumed (nginx logs each request's TLS in a check run); ``servers
idle %`` (CPU 0's idle time) says whether a row saturated the servers' core or wrk was the
limit. See
bench/README.md, "HTTPS".
"""

from __future__ import annotations

import argparse
import functools
import os
import ssl
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from lib import load, options, process, report, servers, tls, tools
from lib.process import LOOPBACK, Layout, Server
from lib.report import fmt, median, verdict
from lib.tools import Tools

from gateway.edge.tls import CIPHERS

REQUEST_PATH: Final = "/api/bench/"
WARMUP_SECONDS: Final = 1  # of each mode on each proxy: 2 to 5 s per proxy process
CHECK_SECONDS: Final = 1
RATIO_TARGET: Final = 0.9  # the issue: HTTPS ratio / plain ratio, gateway/nginx req/s
IDLE_WAIT: Final = 120.0  # --rerun-disturbed: longest wait for an idle machine
HANDSHAKES: Final = ("resumed", "full")  # the modes with a TLS handshake per request
UNSATURATED: Final = 10.0  # % idle of the servers' CPU above which the client was the limit
NGINX: Final = "nginx"
GATEWAY: Final = "gateway"
HSTS: Final = "max-age=31536000"  # the gateway's default header, sent by nginx too


@dataclass(frozen=True)
class Mode:
    name: str
    scheme: str
    close: bool  # Connection: close: a new connection (and handshake) per request
    tickets: bool  # False: on the instances that send no session tickets
    about: str


MODES: Final = (
    Mode("http", "http", close=False, tickets=True, about="plain HTTP, keep-alive"),
    Mode("https", "https", close=False, tickets=True, about="HTTPS, keep-alive"),
    Mode(
        "http-close",
        "http",
        close=True,
        tickets=True,
        about="plain HTTP, Connection: close: a new TCP connection per request",
    ),
    Mode(
        "resumed",
        "https",
        close=True,
        tickets=True,
        about="HTTPS, Connection: close: a handshake per request, resumed by ticket",
    ),
    Mode(
        "full",
        "https",
        close=True,
        tickets=False,
        about="HTTPS, Connection: close, no tickets: a full handshake per request",
    ),
)

# nginx as bench/run.py's proxy, plus the same location over TLS (the gateway's ciphers and
# its server preference, as Python's server contexts have it; nginx's defaults otherwise:
# ssl_session_cache none, ssl_session_tickets on with keys made at start-up, 5 min sessions)
# and a third server that logs each request's TLS (the check runs, never measured).
NGINX_BODY: Final = f"""\
{servers.NGINX_UPSTREAM}
    ssl_certificate %(cert)s;
    ssl_certificate_key %(key)s;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {CIPHERS};
    ssl_prefer_server_ciphers on;
    {tls.NGINX_TLS_LOG_FORMAT}
    server {{
        listen 127.0.0.1:%(port)d backlog=1024;
{servers.NGINX_PROXY_LOCATION}
    }}
    server {{
        listen 127.0.0.1:%(tls)d ssl backlog=1024;
        add_header Strict-Transport-Security "{HSTS}" always;
{servers.NGINX_PROXY_LOCATION}
    }}
    server {{
        listen 127.0.0.1:%(check)d ssl;
        access_log %(tls_log)s tls;
{servers.NGINX_PROXY_LOCATION}
    }}"""

GATEWAY_CONFIG: Final = """\
# Made by bench/https.py: bench/run.py's gateway with an HTTPS listener too.
listen: {host: 127.0.0.1, port: 8080}
tls:
  listen: {host: 127.0.0.1, port: %(tls)d}
  certificates: [{cert: "%(cert)s", key: "%(key)s"}]
  redirect_http: false
nodes:
  bench: {host: 127.0.0.1}
services:
  bench: {port: "${BENCH_BACKEND_PORT}", nodes: [bench], http_prefix: ""}
"""


# -- options -------------------------------------------------------------------------------


DEFAULTS: Final = options.Defaults(
    reps=1,
    reps_help="repetitions; medians are shown (1)",
    quick_duration=2,
    quick_reps=None,
    rerun_group="a (rep, mode) pair of runs",
    idle_wait=IDLE_WAIT,
)
Options = options.WrkOptions


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="bench/https.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    options.add_wrk_options(parser, DEFAULTS)
    return Options(**options.wrk_options(parser, parser.parse_args(argv), DEFAULTS))


# -- the stack -----------------------------------------------------------------------------


@dataclass
class Proxy:
    """One proxy process, serving plain HTTP on ``server.port`` and HTTPS on ``https_port``."""

    kind: str  # NGINX or GATEWAY
    tickets: bool  # False: started with tls.NO_TICKETS_CONF
    server: Server
    https_port: int
    check_port: int | None = None  # nginx: the server that logs each request's TLS
    tls_log: Path | None = None

    @property
    def name(self) -> str:
        return self.kind if self.tickets else f"{self.kind}-no-tickets"

    def url(self, mode: Mode) -> str:
        port = self.https_port if mode.scheme == "https" else self.server.port
        return f"{mode.scheme}://{LOOPBACK}:{port}{REQUEST_PATH}"


class Stack(servers.Stack):
    """The backend, and nginx and the gateway each with and without session tickets."""

    backend: Server

    def __init__(self, found: Tools, layout: Layout, workdir: Path) -> None:
        super().__init__(found, layout, workdir)
        self.certs = tls.make_certificates(workdir)
        self.no_tickets = {**os.environ, **tls.no_tickets_env(workdir)}
        self.proxies: list[Proxy] = []

    def start_all(self, log_level: str) -> None:
        self.backend = self.nginx_server("backend", servers.NGINX_BACKEND)
        self.ready(self.backend, lambda: servers.http_status(self.backend.port, "/") == 200)
        for tickets in (True, False):
            self._ready(self._nginx(tickets))
            self._ready(self._gateway(tickets, log_level))

    def proxy(self, kind: str, tickets: bool) -> Proxy:
        return next(p for p in self.proxies if (p.kind, p.tickets) == (kind, tickets))

    def _nginx(self, tickets: bool) -> Proxy:
        name = NGINX if tickets else f"{NGINX}-no-tickets"
        https, check = process.free_port(), process.free_port()
        tls_log = self.workdir / f"{name}-tls.log"
        server = self.nginx_server(
            name,
            NGINX_BODY,
            env=None if tickets else self.no_tickets,
            backend=self.backend.port,
            tls=https,
            check=check,
            tls_log=tls_log,
            cert=self.certs.fullchain,
            key=self.certs.key,
        )
        return self._add(Proxy(NGINX, tickets, server, https, check, tls_log))

    def _gateway(self, tickets: bool, log_level: str) -> Proxy:
        name = GATEWAY if tickets else f"{GATEWAY}-no-tickets"
        https = process.free_port()
        config = self.workdir / f"{name}.yaml"
        config.write_text(
            GATEWAY_CONFIG % {"tls": https, "cert": self.certs.fullchain, "key": self.certs.key}
        )
        env = {**(os.environ if tickets else self.no_tickets)}
        env["BENCH_BACKEND_PORT"] = str(self.backend.port)
        server = self.gateway_server(name, config, log_level, env=env)
        return self._add(Proxy(GATEWAY, tickets, server, https))

    def _add(self, proxy: Proxy) -> Proxy:
        self.proxies.append(proxy)
        return proxy

    def _ready(self, proxy: Proxy) -> None:
        port, ca = proxy.server.port, self.certs.ca
        self.ready(
            proxy.server,
            lambda: (
                servers.http_status(port, REQUEST_PATH) == 200
                and tls.https_status(proxy.https_port, REQUEST_PATH, ca) == 200
            ),
        )


def ensure_tools(opts: Options) -> Tools:
    return tools.nginx_and_wrk(
        opts.install, "bench/https.py needs nginx (backend, proxy) and wrk (the load)"
    )


# -- load ----------------------------------------------------------------------------------


def wrk(stack: Stack, url: str, close: bool, conns: int, seconds: int) -> load.Load:
    assert stack.tools.wrk is not None  # noqa: S101 - checked by ensure_tools
    command = load.wrk_command(
        stack.tools.wrk,
        url,
        conns,
        seconds,
        pin=stack.prefix(stack.layout.load),
        headers=["Connection: close"] if close else [],
    )
    return load.parse_wrk(process.output(command, seconds + 60))


def check_wrk(stack: Stack, conns: int) -> dict[str, Any]:
    """What wrk negotiates and whether it resumes: a short Connection: close run on each
    nginx's logging server, and a Python client's two connections to every proxy."""
    found: dict[str, Any] = {}
    for proxy in stack.proxies:
        seen: dict[str, Any] = {
            "probe": asdict(tls.probe(proxy.https_port, REQUEST_PATH, stack.certs.ca))
        }
        if proxy.check_port is not None and proxy.tls_log is not None:
            url = f"https://{LOOPBACK}:{proxy.check_port}{REQUEST_PATH}"
            done = wrk(stack, url, True, min(conns, 4), CHECK_SECONDS)
            logged = tls.parse_tls_log(proxy.tls_log.read_text())
            seen["wrk"] = {**asdict(logged), "wrk_requests": done.requests}
        found[proxy.name] = seen
    return found


# -- one measured run ----------------------------------------------------------------------


@dataclass
class Run(load.Figures):
    rep: int
    mode: str
    target: str  # NGINX or GATEWAY: what a run is paired by
    proxy: str  # the instance (with or without tickets)
    proxy_us: float  # CPU per request; with Connection: close, per connection and handshake
    backend_us: float
    load_cpu: float  # cores used by wrk
    other_cpu: float  # cores used by everything else on the machine
    steal_pct: float
    idle_pct: float  # of the servers' CPU: what the proxy had to spare (0: it was the limit)
    log_warnings: int = 0


def measure(stack: Stack, proxy: Proxy, mode: Mode, opts: Options, rep: int) -> Run:
    log = proxy.server.log if proxy.kind == GATEWAY else None
    offset = log.stat().st_size if log is not None else 0
    clock = functools.partial(
        process.CpuClock.read,
        {
            "proxy": lambda: process.cpu_seconds(proxy.server.proc.pid),
            "backend": lambda: process.cpu_seconds(stack.backend.proc.pid),
            "load": process.children_cpu,
        },
    )
    servers_cpus = stack.layout.servers
    before, idle, started = clock(), process.idle_cpu(servers_cpus), time.monotonic()
    done = wrk(stack, proxy.url(mode), mode.close, opts.conns, opts.duration)
    used = clock() - before
    idle = process.idle_cpu(servers_cpus) - idle
    cpus = len(servers_cpus) if servers_cpus is not None else os.cpu_count() or 1
    per = 1e6 / max(done.requests, 1)
    return Run(
        rep=rep,
        mode=mode.name,
        target=proxy.kind,
        proxy=proxy.name,
        **vars(load.figures(done)),
        proxy_us=used["proxy"] * per,
        backend_us=used["backend"] * per,
        load_cpu=used["load"] / done.seconds,
        other_cpu=used.other_cores(done.seconds),
        steal_pct=used.steal_pct,
        idle_pct=100 * idle / (cpus * (time.monotonic() - started)),
        log_warnings=servers.count_warnings(log, offset) if log is not None else 0,
    )


def progress_line(run: Run) -> str:
    return (
        f"  rep {run.rep} {run.mode:<10} {run.proxy:<19} {run.rps:8.0f} req/s  "
        f"p99 {run.p99_ms:7.2f} ms  proxy {run.proxy_us:6.1f} us/req  servers' CPU idle "
        f"{run.idle_pct:4.1f} %  load CPU {run.load_cpu:.2f}  errors "
        f"{run.non2xx}/{run.socket_errors}  other CPU {run.other_cpu:.2f}"
    )


def measure_pair(stack: Stack, opts: Options, rep: int, mode: Mode) -> list[Run]:
    """nginx, then the gateway, in one mode."""
    pair = []
    for kind in (NGINX, GATEWAY):
        run = measure(stack, stack.proxy(kind, mode.tickets), mode, opts, rep)
        pair.append(run)
        print(progress_line(run), flush=True)
    return pair


def run_all(stack: Stack, opts: Options, discarded: list[Run]) -> list[Run]:
    print(f"\nWarm-up: {WARMUP_SECONDS} s of each mode on each proxy", flush=True)
    for mode in MODES:
        for kind in (NGINX, GATEWAY):
            proxy = stack.proxy(kind, mode.tickets)
            wrk(stack, proxy.url(mode), mode.close, opts.conns, WARMUP_SECONDS)
    runs: list[Run] = []
    for rep in range(1, opts.reps + 1):
        for mode in MODES:
            pair = functools.partial(measure_pair, stack, opts, rep, mode)
            label = f"rep {rep} {mode.name}"
            runs += process.least_disturbed(pair, label, opts.rerun_disturbed, discarded, IDLE_WAIT)
    return runs


# -- report --------------------------------------------------------------------------------


def _ratio(run: Run, base: Run) -> float | None:
    return run.rps / base.rps if base.rps > 0 else None


def _same(run: Run) -> tuple[str, int]:
    return run.mode, run.rep


def ratios(runs: list[Run], mode: str) -> list[float]:
    """gateway/nginx req/s in ``mode``, one per rep (paired)."""
    mine = [r for r in runs if (r.mode, r.target) == (mode, GATEWAY)]
    return report.paired(mine, runs, NGINX, _same, _ratio)


def ratio_of_ratios(runs: list[Run]) -> list[float]:
    """(HTTPS ratio) / (plain ratio), one per rep: each rep's four keep-alive runs."""
    by = {(r.rep, r.mode, r.target): r.rps for r in runs}
    values = []
    for rep in sorted({r.rep for r in runs}):
        try:
            https = by[rep, "https", GATEWAY] / by[rep, "https", NGINX]
            plain = by[rep, "http", GATEWAY] / by[rep, "http", NGINX]
        except (KeyError, ZeroDivisionError):
            continue
        if plain > 0:
            values.append(https / plain)
    return values


@dataclass
class Row:
    mode: str
    proxy: str
    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    proxy_us: float
    backend_us: float
    idle_pct: float
    load_cpu: float
    other_cpu: float
    non2xx: int
    socket_errors: int
    log_warnings: int
    x_nginx: float | None


def summarize(runs: list[Run]) -> list[Row]:
    rows = []
    for mode in MODES:
        gateway_ratio = median(ratios(runs, mode.name))
        for kind in (NGINX, GATEWAY):
            mine = [r for r in runs if (r.mode, r.target) == (mode.name, kind)]
            if not mine:
                continue
            med = statistics.median
            rows.append(
                Row(
                    mode=mode.name,
                    proxy=mine[0].proxy,
                    target=kind,
                    rps=med(r.rps for r in mine),
                    p50_ms=med(r.p50_ms for r in mine),
                    p99_ms=med(r.p99_ms for r in mine),
                    proxy_us=med(r.proxy_us for r in mine),
                    backend_us=med(r.backend_us for r in mine),
                    idle_pct=med(r.idle_pct for r in mine),
                    load_cpu=med(r.load_cpu for r in mine),
                    other_cpu=med(r.other_cpu for r in mine),
                    non2xx=sum(r.non2xx for r in mine),
                    socket_errors=sum(r.socket_errors for r in mine),
                    log_warnings=sum(r.log_warnings for r in mine),
                    x_nginx=gateway_ratio if kind == GATEWAY else None,
                )
            )
    return rows


def table(rows: list[Row]) -> list[list[str]]:
    head = [
        "mode", "proxy", "req/s", "p50 ms", "p99 ms", "proxy us/req", "backend us/req",
        "servers idle %", "load CPU", "other CPU", "non-2xx/sock err", "log warns", "x nginx",
    ]  # fmt: skip
    return [head] + [
        [
            row.mode,
            row.proxy,
            f"{row.rps:.0f}",
            f"{row.p50_ms:.2f}",
            f"{row.p99_ms:.2f}",
            f"{row.proxy_us:.1f}",
            f"{row.backend_us:.1f}",
            f"{row.idle_pct:.1f}",
            f"{row.load_cpu:.2f}",
            f"{row.other_cpu:.2f}",
            f"{row.non2xx}/{row.socket_errors}",
            str(row.log_warnings) if row.target == GATEWAY else "-",
            fmt(row.x_nginx, ".2f"),
        ]
        for row in rows
    ]


def _row(rows: list[Row], mode: str, kind: str) -> Row | None:
    return next((r for r in rows if (r.mode, r.target) == (mode, kind)), None)


def _each(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def headline(runs: list[Run], rows: list[Row], env: dict[str, Any]) -> list[str]:
    lines = [f"certificate (both proxies, the same files): {env['certificate']}"]
    lines += negotiated_lines(env["checks"])
    plain, https = ratios(runs, "http"), ratios(runs, "https")
    both = ratio_of_ratios(runs)
    of = median(both)
    lines += [
        f"plain ratio gateway/nginx req/s (http keep-alive) = {fmt(median(plain), '.2f')}"
        f"   (per rep: {_each(plain)})",
        f"HTTPS ratio gateway/nginx req/s (https keep-alive) = {fmt(median(https), '.2f')}"
        f"   (per rep: {_each(https)})",
        f"HTTPS ratio / plain ratio = {fmt(of, '.2f')} "
        f"({verdict(None if of is None else of >= RATIO_TARGET)}: target >= {RATIO_TARGET}; "
        f"per rep: {_each(both)})",
    ]
    shakes = [
        f"{name} {fmt(median(ratios(runs, name)), '.2f')}{_limit(rows, name)}"
        for name in HANDSHAKES
    ]
    lines.append(
        "handshake ratio gateway/nginx req/s (https, Connection: close: a new connection and "
        f"handshake per request): {'; '.join(shakes)}; without TLS (http-close) "
        f"{fmt(median(ratios(runs, 'http-close')), '.2f')}{_limit(rows, 'http-close')}"
    )
    lines += cpu_lines(rows)
    errors = [r for r in rows if r.non2xx or r.socket_errors]
    lines.append(
        "errors (non-2xx/socket): "
        + (", ".join(f"{r.mode} {r.proxy} {r.non2xx}/{r.socket_errors}" for r in errors) or "none")
    )
    warnings = env.get("gateway_warnings", {})
    if any(warnings.values()):
        lines.append(f"WARNING: the gateways logged WARNING+ lines: {warnings}")
    if (warning := report.disturbance([r.other_cpu for r in runs])) is not None:
        lines.append(warning)
    return lines


def negotiated_lines(checks: dict[str, Any]) -> list[str]:
    lines = []
    for name, seen in checks.items():
        probe = seen["probe"]
        said = (
            f"{probe['version']} {probe['cipher']}, ALPN {probe['alpn']}, HSTS "
            f"{probe['hsts']!r}, a second connection resumed: {report.yes(probe['resumed'])}"
            if probe["error"] is None
            else f"failed: {probe['error']}"
        )
        line = f"{name}: Python client: {said}"
        if (logged := seen.get("wrk")) is not None:
            line += (
                f"; wrk Connection: close: {logged['resumed']} of {logged['requests']} "
                f"handshakes resumed, {logged['negotiated']}"
            )
        lines.append(line)
    return lines


def _limit(rows: list[Row], mode: str) -> str:
    """Which proxies did not saturate the servers' core in ``mode`` (wrk was the limit)."""
    short = [r for r in rows if r.mode == mode and r.idle_pct > UNSATURATED]
    if not short:
        return ""
    said = ", ".join(f"{r.target} {r.idle_pct:.0f} %" for r in short)
    return f" [the servers' CPU was idle {said}: wrk was the limit there]"


def _versus(rows: list[Row], mode: str, value: Callable[[Row], float], unit: str) -> str:
    """nginx's and the gateway's ``value`` in ``mode``, and gateway/nginx."""
    n, g = _row(rows, mode, NGINX), _row(rows, mode, GATEWAY)
    if n is None or g is None:
        return f"{mode} -"
    times = f" = {value(g) / value(n):.1f}x" if value(n) > 0 else ""
    return f"{mode} nginx {value(n):.0f} {unit}, gateway {value(g):.0f} {unit}{times}"


def cpu_lines(rows: list[Row]) -> list[str]:
    """What TLS adds to a keep-alive request, and CPU per new connection and per handshake."""
    added = []
    for kind in (NGINX, GATEWAY):
        http, https = _row(rows, "http", kind), _row(rows, "https", kind)
        if http and https:
            added.append(
                f"{kind} {https.proxy_us - http.proxy_us:+.1f} us "
                f"({http.proxy_us:.1f} -> {https.proxy_us:.1f})"
            )
    lines = [f"proxy CPU per keep-alive request, https - http: {'; '.join(added)}"]
    per = [_versus(rows, m, lambda r: r.proxy_us, "us") for m in ("http-close", *HANDSHAKES)]
    lines.append(f"proxy CPU per new connection (one request each): {'; '.join(per)}")
    plain = {r.target: r.proxy_us for r in rows if r.mode == "http-close"}
    if len(plain) == 2:
        tls_only = [
            _versus(rows, m, lambda r: r.proxy_us - plain[r.target], "us") for m in HANDSHAKES
        ]
        lines.append(
            "  of which the TLS handshake (the https row - the http-close row): "
            + "; ".join(tls_only)
        )
    return lines


# -- environment ---------------------------------------------------------------------------


def _nginx_openssl(nginx: str) -> str:
    out = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=False)
    return next((line for line in out.stderr.splitlines() if "OpenSSL" in line), "?")


def _libssl(program: str) -> str:
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=False)
    return next((line.split()[0] for line in out.stdout.splitlines() if "libssl" in line), "?")


def environment(found: Tools, layout: Layout) -> dict[str, Any]:
    assert found.nginx is not None  # noqa: S101 - checked by ensure_tools
    assert found.wrk is not None  # noqa: S101
    py = tools.gateway_python()
    gateway_ssl = subprocess.run(
        [tools.PYTHON, "-c", "import ssl; print(ssl.OPENSSL_VERSION)"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "gateway_code": tools.gateway_code(),
        "gateway_python": f"{py.get('real_path')} {str(py.get('version', '')).split()[:1]}",
        "gateway_loop": f"uvloop {py.get('uvloop')}" if py.get("uvloop") else "asyncio",
        "aiohttp": py.get("aiohttp"),
        "gateway_openssl": gateway_ssl,
        "nginx": tools.first_line([found.nginx, "-v"]),
        "nginx_openssl": _nginx_openssl(found.nginx),
        "wrk": tools.first_line([found.wrk, "-v"]),
        "wrk_libssl": _libssl(found.wrk),
        "harness_openssl": ssl.OPENSSL_VERSION,
        "nproc": tools.first_line(["nproc"]),
        "layout": layout.note,
    }


def print_report(
    runs: list[Run], discarded: list[Run], opts: Options, env: dict[str, Any]
) -> list[str]:
    rows = summarize(runs)
    reps = f"median of {opts.reps} reps" if opts.reps > 1 else "1 rep"
    print(f"\nResults ({reps}; c{opts.conns}; x nginx: gateway/nginx req/s, paired per rep):")
    report.print_table(table(rows))
    lines = headline(runs, rows, env)
    if discarded:
        pairs = len({(r.rep, r.mode) for r in discarded})
        lines.append(
            f"{pairs} disturbed (rep, mode) pairs were measured again (--rerun-disturbed): the "
            f"table keeps the least disturbed attempt of each ({len(discarded)} runs dropped)"
        )
    print("\nHeadline (target: HTTPS ratio / plain ratio >= 0.9):")
    for line in lines:
        print(f"  {line}")
    print("\nEnvironment:")
    for key, value in env.items():
        if key not in ("checks", "gateway_warnings"):
            print(f"  {key}: {value}")
    return lines


def start_and_run(
    stack: Stack, opts: Options, env: dict[str, Any], discarded: list[Run]
) -> list[Run]:
    stack.start_all(opts.log_level)
    per_rep = len(MODES) * 2 * (opts.duration + 0.5)
    warmup = len(MODES) * 2 * (WARMUP_SECONDS + 0.5)
    print(
        "Proxies on 127.0.0.1 (http/https): "
        + ", ".join(f"{p.name} :{p.server.port}/:{p.https_port}" for p in stack.proxies)
        + f", backend :{stack.backend.port}. {stack.layout.note}. About "
        f"{warmup + opts.reps * per_rep:.0f} s of load.",
        flush=True,
    )
    for mode in MODES:
        print(f"  mode {mode.name}: {mode.about}")
    env["checks"] = check_wrk(stack, opts.conns)
    runs = run_all(stack, opts, discarded)
    env["gateway_warnings"] = {
        p.name: servers.warning_messages(p.server.log) for p in stack.proxies if p.kind == GATEWAY
    }
    return runs


def prepare(opts: Options) -> tuple[Tools, Layout, dict[str, Any]]:
    """The programs, the CPU layout (this harness moved to the load's CPU) and what they are."""
    found = ensure_tools(opts)
    layout = process.choose_layout()
    env = environment(found, layout)  # before pinning: nproc counts the CPUs it may use
    layout.pin_harness()
    env["busy_cores_before"] = process.busy_machine()
    return found, layout, env


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    opts = parse_options(argv)
    process.stop_on_signals()
    found, layout, env = prepare(opts)
    discarded: list[Run] = []
    with servers.workspace("daarion-https-", keep=opts.keep) as space:
        stack = Stack(found, layout, space.path)
        env["certificate"] = stack.certs.about
        runs = servers.run_stack(
            stack, space, functools.partial(start_and_run, stack, opts, env, discarded)
        )
    if isinstance(runs, int):
        return runs
    lines = print_report(runs, discarded, opts, env)
    return report.finish(
        started,
        opts,
        env,
        lines,
        runs=runs,
        discarded=discarded,
        rows=[asdict(r) for r in summarize(runs)],
    )


if __name__ == "__main__":
    raise SystemExit(main())
