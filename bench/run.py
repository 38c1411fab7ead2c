"""Benchmark the DAARION gateway against nginx on loopback: `.venv/bin/python bench/run.py`.

What it measures: requests per second, latency (p50, p99) and CPU time per request of the
gateway as a reverse proxy in front of a trivial backend, next to nginx doing the same job,
following the anchor measurements (bench/README.md, "Anchors"; the "pin" layout):

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
import functools
import os
import re
import secrets
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from lib import load, process, report, servers, tools
from lib import profile as profiler
from lib.process import BUSY_CORES, LOOPBACK, Layout, Server
from lib.report import fmt, median
from lib.tools import BENCH_DIR, Tools

REQUEST_PATH: Final = "/api/bench/"
BACKEND_ANSWER: Final = b'{"ok":true}'  # what the backend answers on each of its paths
WARMUP_SECONDS: Final = 2
ANCHOR_RATIO: Final = 0.15  # the anchors: aiohttp 1 proc / nginx 1 worker, pin, c50, c200
P99_TARGET_MS: Final = 1000.0
IDLE_WAIT: Final = 120.0  # --rerun-disturbed: longest wait for the machine to be idle again
DIRECT: Final = "direct"
NGINX: Final = "nginx-proxy"
REDIS_HELPER: Final = 'redis-server --port {port} --bind 127.0.0.1 --save "" --appendonly no'
# The tracing suite's collector stand-in (bench/otlpsink.py), run by this interpreter.
COLLECTOR_HELPER: Final = (
    f"{sys.executable} {Path(__file__).parent / 'otlpsink.py'} --port {{port}}"
)
ISSUER: Final = "daarion-auth"  # bench/variants/auth.yaml's provider, as routes.yaml's
ORIGIN: Final = "https://app.daarion.space"  # in bench/variants/auth.yaml's cors.origins
CHECK_HEADER: Final = "X-Bench-Check"  # the backend logs the bodies of requests that have it
FAIR_P99_OVER_P50: Final = 10.0  # --suite lean's fairness: p99 <= 10 x p50 ...
FAIR_MAX_MS: Final = 1000.0  # ... and no request over 1 s (nor any wrk timeout)


# -- request shapes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What every request of a run is: method, path on the backend, body, answer's framing."""

    name: str
    path: str  # the backend's path; the proxies get REQUEST_PATH + path
    about: str
    script: str | None = None  # a wrk Lua script under bench/wrk/ (the method and body)
    body: int = 0  # bytes of request body the script sends (a POST)
    chunked: bool = False  # the backend answers with Transfer-Encoding: chunked

    def url_path(self, direct: bool) -> str:
        """The path to ask a target for: the backend's own when ``direct``."""
        return ("/" if direct else REQUEST_PATH) + self.path


SHAPES: Final = {
    shape.name: shape
    for shape in (
        Shape("get", "", "GET, an 11-byte answer with its Content-Length"),
        Shape(
            "post16k",
            "upload",
            "POST with a 16 KiB body (buffered by the gateway: <= REPLAY_LIMIT), the backend "
            "reads it whole, then answers the 11 bytes",
            script="post-16k.lua",
            body=16 * 1024,
        ),
        Shape(
            "post1m",
            "upload",
            "POST with a 1 MiB body (streamed by the gateway: > REPLAY_LIMIT), the backend "
            "reads it whole, then answers the 11 bytes",
            script="post-1m.lua",
            body=1024 * 1024,
        ),
        Shape(
            "chunked",
            "chunked",
            "GET, the same 11 bytes answered with Transfer-Encoding: chunked",
            chunked=True,
        ),
    )
}


# -- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    config: Path | None  # None: the harness's own routes.yaml
    log_level: str
    program: str | None = None  # another build's daarion-gateway (--code); None: this one


@dataclass(frozen=True)
class Helper:
    name: str
    command: str  # may contain {port}


@dataclass(frozen=True)
class Criteria:
    """What a suite's second variant may cost against its first (an issue's acceptance bar)."""

    min_ratio: float  # req/s of the variant / req/s of the base, paired
    max_added_p99_ms: float | None = None  # p99 of the variant - p99 of the base, paired


@dataclass(frozen=True)
class Suite:
    """A named comparison: ``--suite NAME`` instead of ``--variant``/``--helper`` options."""

    about: str
    variants: tuple[tuple[str, str], ...]  # (name, file under bench/); the first is the base
    helpers: tuple[tuple[str, str], ...]
    log_levels: str  # unless --log-levels is given
    criteria: Criteria | None = None
    # Every request (to every target, so the bytes are the same) carries a bearer token the
    # harness mints at start (HS256, its secret in BENCH_JWT_SECRET) and this Origin; before
    # loading, the second variant must take the token (200) and refuse a bad one (401).
    bearer_origin: str | None = None
    shapes: tuple[str, ...] = ("get",)  # unless --shapes is given
    nginx_target: float | None = None  # each gateway's req/s / nginx's at every GET conns
    fairness: bool = False  # p99/p50 and the longest request at the last conns, with a verdict


SUITES: Final = {
    "limiter": Suite(
        about="the shared rate limiter's cost: a zone that never refuses, kept in a Redis "
        "the harness starts pinned with the proxy, against the same gateway without it",
        variants=(("plain", "variants/plain.yaml"), ("limiter", "variants/limiter.yaml")),
        helpers=(("redis", REDIS_HELPER),),
        log_levels="INFO",
        criteria=Criteria(min_ratio=0.85, max_added_p99_ms=2.0),
    ),
    "auth": Suite(
        about="what a protected API costs: auth: required with a cached HS256 token "
        "(identity headers upstream) and CORS on, against the same gateway without them, "
        "with the same Authorization and Origin headers sent to both",
        variants=(("plain", "variants/plain.yaml"), ("auth", "variants/auth.yaml")),
        helpers=(),
        log_levels="INFO",
        criteria=Criteria(min_ratio=0.9),
        bearer_origin=ORIGIN,
    ),
    "tracing": Suite(
        about="what tracing costs: spans for 1 request in 100 (sample_ratio 0.01) exported "
        "over OTLP/HTTP to a collector stand-in the harness starts pinned with the proxy, "
        "against the same gateway with tracing off (add --code base=PROGRAM, a build without "
        "tracing, for what tracing off costs)",
        variants=(("plain", "variants/plain.yaml"), ("tracing", "variants/tracing.yaml")),
        helpers=(("collector", COLLECTOR_HELPER),),
        log_levels="INFO",
        criteria=Criteria(min_ratio=0.95),
    ),
    "lean": Suite(
        about="issue 17's measurement: the gateway with every feature on (the shared rate "
        "limiter through a Redis the harness starts pinned with the proxy, metrics, INFO "
        "logs) against nginx, for small GETs, POSTs of 16 KiB and 1 MiB, and a chunked "
        "answer, with the fairness of each at the highest --conns (--code NAME=PROGRAM "
        "builds get the same config)",
        variants=(("gateway", "variants/limiter.yaml"),),
        helpers=(("redis", REDIS_HELPER),),
        log_levels="INFO",
        shapes=("get", "post16k", "post1m", "chunked"),
        nginx_target=0.33,
        fairness=True,
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
    shapes: tuple[str, ...] = ("get",)
    shape_conns: tuple[int, ...] = (50,)  # for the shapes other than get
    profile: bool = False
    profile_only: bool = False
    profile_seconds: int = 10
    keep: bool = False

    def conns_of(self, shape: str) -> tuple[int, ...]:
        return self.conns if shape == "get" else self.shape_conns


def _name_value(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not value:
        raise argparse.ArgumentTypeError(f"{what} must look like NAME=VALUE, got {text!r}")
    return name, value


def _variant_arg(text: str) -> tuple[str, str]:
    return _name_value(text, "--variant")


def _code_arg(text: str) -> tuple[str, str]:
    return _name_value(text, "--code")


def _helper_arg(text: str) -> tuple[str, str]:
    return _name_value(text, "--helper")


def _shapes_arg(text: str) -> tuple[str, ...]:
    shapes = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in shapes if name not in SHAPES]
    if not shapes or unknown or len(set(shapes)) != len(shapes):
        raise argparse.ArgumentTypeError(
            f"--shapes takes distinct names of {', '.join(SHAPES)}: {text!r}"
        )
    return shapes


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
        "--code",
        type=_code_arg,
        action="append",
        default=[],
        metavar="NAME=PROGRAM",
        help="another build of the gateway measured in the same run, after this one's "
        "variants: the path of its daarion-gateway (e.g. an older checkout's "
        ".venv/bin/daarion-gateway), run with the harness's own routes.yaml; repeatable",
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
        "--shapes",
        type=_shapes_arg,
        help="the requests to load each target with, in turn: "
        + "; ".join(f"{s.name}: {s.about}" for s in SHAPES.values())
        + " (default: get, or the suite's)",
    )
    parser.add_argument(
        "--shape-conns",
        type=_conns_arg,
        help="connection counts for the shapes other than get (default: the first of --conns)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the runs, load each gateway once more (get, the first --conns) while "
        "py-spy samples it: a summary of where its time goes, by package and function",
    )
    parser.add_argument(
        "--profile-only",
        action="store_true",
        help="the checks, the warm-up and --profile, no measured runs",
    )
    parser.add_argument(
        "--profile-seconds", type=int, default=10, help="length of a profiled run (default 10)"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory (configs, logs, py-spy's raw samples)",
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
        parser.error("--suite brings its own variants and helpers: no --variant, --helper")
    log_levels = args.log_levels or (suite.log_levels if suite else "INFO,WARNING")
    levels = [level.strip().upper() for level in log_levels.split(",") if level.strip()]
    if not levels:
        parser.error("--log-levels needs at least one level")
    pairs = suite.variants if suite else args.variant
    helpers = suite.helpers if suite else args.helper
    configs: list[tuple[str, Path | None]] = [
        (name, (BENCH_DIR / path if suite else Path(path)).resolve()) for name, path in pairs
    ] or [("gateway", None)]
    # Another build runs with the suite's base config (for every suite but lean the same as
    # the harness's own routes.yaml), so that it does the same work as the variant it is
    # compared with; without a suite, with the harness's own.
    code_config = configs[0][1] if suite else None
    variants = tuple(
        Variant(name if i == 0 else f"{name}@{level}", config, level, program)
        for name, config, program in [
            *((name, config, None) for name, config in configs),
            *((name, code_config, program) for name, program in args.code),
        ]
        for i, level in enumerate(levels)
    )
    names = [v.name for v in variants]
    if len(set(names)) != len(names) or {DIRECT, NGINX} & set(names):
        parser.error(f"variant names must be unique and not {DIRECT} or {NGINX}")
    for _, config in configs:
        if config is not None and not config.is_file():
            parser.error(f"no such variant file: {config}")
    for _, program in args.code:
        if not os.access(program, os.X_OK):
            parser.error(f"--code: not an executable: {program}")
    shapes = args.shapes or (suite.shapes if suite else ("get",))
    if args.profile_seconds < 1:
        parser.error("--profile-seconds must be at least 1")
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
        shapes=shapes,
        shape_conns=args.shape_conns or args.conns[:1],
        profile=args.profile or args.profile_only,
        profile_only=args.profile_only,
        profile_seconds=args.profile_seconds,
        keep=args.keep,
    )


# -- tools ---------------------------------------------------------------------------------


def ensure_tools(opts: Options) -> Tools:
    if opts.python_tools:
        found = Tools.found(nginx=False, wrk=False)
        found.notes.append("--python-tools: Python load generator and backend, no nginx rows")
        return found
    if opts.install and (missing := tools.install_missing(["nginx", "wrk"])):
        print(f"could not install {', '.join(missing)} (need root and apt-get)", flush=True)
    found = Tools.found()
    if found.nginx is None:
        found.notes.append(
            "nginx missing: the backend is bench/pyloadgen.py's Python server and the "
            "nginx proxy rows are skipped"
        )
    if found.wrk is None:
        found.notes.append(
            "wrk missing: load comes from bench/pyloadgen.py (slower than wrk, so the direct "
            "row shows the load generator's ceiling)"
        )
    return found


# -- configs -------------------------------------------------------------------------------

# The backend: the other benches' (``return 200 '{"ok":true}'`` for any path), plus a path for
# each shape that needs more:
# - ``/upload`` reads the whole request body (in memory) before it answers, as an application
#   does: ``mirror_request_body`` makes nginx read it before the content phase (a ``return``
#   would answer first and discard the body after). The answer comes from the static file
#   ``ok.json`` (nginx answers a POST on a static file with 405, turned into a 200 with the
#   same 11 bytes). Requests carrying X-Bench-Check are logged with their body's length:
#   the check before loading (what reached the backend through each proxy).
# - ``/chunked`` answers ``ok.json`` through SSI, which drops the Content-Length: nginx sends
#   it chunked (one chunk and the last).
BACKEND_BODY: Final = """\
    log_format bench_check '$http_x_bench_check $request_method $request_uri $status '
                           '$content_length $http_transfer_encoding $request_length';
    server {
        listen 127.0.0.1:%(port)d backlog=1024;
        default_type application/json;
        client_max_body_size 0;
        location / { return 200 '{"ok":true}'; }
        location = /upload {
            root %(files)s;
            try_files /ok.json =404;
            client_body_buffer_size 2m;
            mirror /_read_body;
            mirror_request_body on;
            error_page 405 =200 @read;
        }
        location = /_read_body { internal; return 204; }
        location @read {
            access_log %(files)s/checked.log bench_check if=$http_x_bench_check;
            return 200 '{"ok":true}';
        }
        location = /chunked {
            root %(files)s;
            try_files /ok.json =404;
            ssi on;
            ssi_types *;
        }
    }"""
PROXY_BODY: Final = servers.NGINX_PROXY

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

    @property
    def gateway_log(self) -> Path | None:
        return self.proxy.log if self.kind == "gateway" and self.proxy is not None else None


class Stack(servers.Stack):
    """The servers under test: the backend, the nginx proxy, helpers and gateway variants."""

    def __init__(self, found: Tools, layout: Layout, workdir: Path) -> None:
        super().__init__(found, layout, workdir)
        self.backend: Server | None = None
        self.helpers: list[Server] = []
        self.targets: list[Target] = []
        self.headers: tuple[str, ...] = ()  # sent with every request (wrk's -H), ready checks too

    @property
    def _bport(self) -> int:
        return self.backend.port if self.backend is not None else 0

    @property
    def backend_files(self) -> Path:
        """The backend's static file and its log of checked bodies."""
        return self.workdir / "backend-files"

    def start_backend(self) -> None:
        if self.tools.nginx is not None:
            self.backend_files.mkdir(mode=0o755)
            (self.backend_files / "ok.json").write_bytes(BACKEND_ANSWER)
            self.backend = self.nginx_server("backend", BACKEND_BODY, files=self.backend_files)
        else:
            port = process.free_port()
            self.backend = self.start("backend", load.pyloadgen_backend(port), port)
        self._ready(self.backend)
        self.targets.append(Target(DIRECT, self.backend.port, None, "direct"))

    def start_nginx_proxy(self) -> None:
        if self.tools.nginx is None:
            return
        proxy = self.nginx_server("nginx-proxy", PROXY_BODY, backend=self._bport)
        self._ready(proxy)
        self.targets.append(Target(NGINX, proxy.port, proxy, "nginx"))

    def start_helper(self, helper: Helper) -> dict[str, str]:
        port = process.free_port()
        command = shlex.split(helper.command.replace("{port}", str(port)))
        server = self.start(f"helper-{helper.name}", command, port)
        self.ready(server, lambda: process.port_open(port))
        self.helpers.append(server)
        return {f"BENCH_{re.sub(r'[^A-Z0-9]', '_', helper.name.upper())}_PORT": str(port)}

    def start_gateway(self, variant: Variant, env: dict[str, str]) -> None:
        config = variant.config
        if config is None:
            config = self.workdir / "gateway-routes.yaml"
            config.write_text(GATEWAY_CONFIG)
        gateway_env = {**os.environ, **env, "BENCH_BACKEND_PORT": str(self._bport)}
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", variant.name)
        server = self.gateway_server(
            name, config, variant.log_level, env=gateway_env, program=variant.program
        )
        self._ready(server)
        self.targets.append(Target(variant.name, server.port, server, "gateway"))

    def _ready(self, server: Server) -> None:
        self.ready(
            server, lambda: servers.http_status(server.port, REQUEST_PATH, self.headers) == 200
        )

    def gateway_log_lines(self) -> dict[str, int]:
        """Lines each gateway wrote to its log file: one per request at INFO."""
        counts = {}
        for target in self.targets:
            if (log := target.gateway_log) is not None:
                with log.open("rb") as lines:
                    counts[target.name] = sum(1 for _ in lines)
        return counts

    def gateway_warnings(self) -> dict[str, dict[str, int]]:
        """Per gateway, its WARNING and worse log messages and how often each came."""
        return {
            target.name: servers.warning_messages(log)
            for target in self.targets
            if (log := target.gateway_log) is not None
        }

    def gateway_dependencies(self) -> dict[str, Any]:
        """Each gateway's /health ``dependencies`` now (e.g. whether Redis is connected)."""
        answers = {}
        for target in self.targets:
            if target.kind == "gateway":
                body = servers.http_json(target.port, "/health")
                answers[target.name] = body.get("dependencies") if isinstance(body, dict) else None
        return answers

    def gateway_trace_spans(self) -> dict[str, dict[str, float]]:
        """Each gateway's /metrics spans so far: exported, and dropped by reason."""
        found = {}
        for target in self.targets:
            if target.kind == "gateway":
                samples = servers.parse_metrics(servers.http_text(target.port, "/metrics"))
                spans = servers.total_by(samples, "gateway_trace_spans_dropped_total", "reason")
                exported = servers.total_by(samples, "gateway_trace_spans_exported_total", "x")
                found[target.name] = {"exported": exported.get("", 0.0), **spans}
        return found

    def gateway_counts(self) -> dict[str, dict[str, Any]]:
        """Each gateway's /metrics so far: requests answered, rate-limit decisions by result,
        whether the limiter is degraded (Redis failing: the fallback decides)."""
        found = {}
        for target in self.targets:
            if target.kind == "gateway":
                samples = servers.parse_metrics(servers.http_text(target.port, "/metrics"))
                found[target.name] = {
                    "requests": servers.total(samples, "http_requests_total") or 0.0,
                    "decisions": servers.total_by(
                        samples, "gateway_rate_limit_decisions_total", "result"
                    ),
                    "degraded": servers.total(samples, "gateway_rate_limit_degraded"),
                }
        return found

    def gateway_auth_results(self) -> dict[str, dict[str, float]]:
        """Each gateway's /metrics token checks so far, by result (ok, invalid_token, ...)."""
        return {
            target.name: servers.total_by(
                servers.parse_metrics(servers.http_text(target.port, "/metrics")),
                "gateway_auth_total",
                "result",
            )
            for target in self.targets
            if target.kind == "gateway"
        }


# -- the auth suite's token and its check before loading -----------------------------------


def mint_token(secret: str, now: float) -> str:
    """An HS256 access token as auth-service signs them, valid for an hour."""
    claims = {
        "sub": "bench-user",
        "iss": ISSUER,
        "type": "access",
        "roles": ["user"],
        "iat": int(now),
        "exp": int(now) + 3600,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def check_auth(stack: Stack, suite: Suite, token: str) -> list[str]:
    """Before loading: every target answers the suite's request (token and Origin) with the
    backend's 200; the checked variant (the suite's second) with the CORS header, and a bad
    or missing token with 401, so the runs measure the accepted path. What was found, or
    RuntimeError."""
    origin = suite.bearer_origin
    checked = suite.variants[1][0]
    direct = next(t.port for t in stack.targets if t.kind == "direct")
    backend = servers.http_get(direct, REQUEST_PATH)[1]
    seen = []
    for target in stack.targets:
        status, head, body = servers.http_answer(target.port, REQUEST_PATH, stack.headers)
        allowed = servers.header_values(head, "Access-Control-Allow-Origin")
        if status != 200 or body != backend:
            raise RuntimeError(
                f"{target.name} answered the token with {status} {body[:200]!r}, not the "
                f"backend's 200 {backend!r}"
            )
        if target.name == checked and allowed != [origin]:
            raise RuntimeError(
                f"{target.name}: Access-Control-Allow-Origin {allowed} for Origin {origin}"
            )
        seen.append(f"{target.name} 200 (Access-Control-Allow-Origin: {allowed or 'none'})")
    port = next(t.port for t in stack.targets if t.name == checked)
    bad = [f"Authorization: Bearer {token[:-4]}AAAA", f"Origin: {origin}"]
    for what, headers in (("a bad signature", bad), ("no token", [f"Origin: {origin}"])):
        status, head, _ = servers.http_answer(port, REQUEST_PATH, headers)
        if status != 401:
            raise RuntimeError(f"{checked} answered {what} with {status}, not 401")
        allowed = servers.header_values(head, "Access-Control-Allow-Origin")
        seen.append(f"{checked} {what}: 401 (Access-Control-Allow-Origin: {allowed or 'none'})")
    return seen


# -- every shape's check before loading ----------------------------------------------------


def check_shapes(stack: Stack, shapes: Sequence[Shape]) -> list[str]:
    """Before loading: every target answers each shape's request (with wrk's headers) with a
    200 and the backend's body, the backend answers ``chunked`` chunked, and a POST's body
    reaches the backend whole through every target (the backend's log of checked requests).
    What was found, or RuntimeError."""
    seen = []
    for shape in shapes:
        log = stack.backend_files / "checked.log"
        offset = log.stat().st_size if log.exists() else 0
        answers = []
        for target in stack.targets:
            direct = target.kind == "direct"
            body = b"x" * shape.body if shape.body else None
            status, head, got = servers.http_answer(
                target.port,
                shape.url_path(direct),
                [*stack.headers, f"{CHECK_HEADER}: {target.name}"],
                timeout=10.0,
                method="GET" if body is None else "POST",
                body=body,
            )
            framing = [v.lower() for v in servers.header_values(head, "Transfer-Encoding")]
            chunked = framing == ["chunked"]
            whole = servers.dechunk(got) if chunked else got
            if status != 200 or whole != BACKEND_ANSWER:
                raise RuntimeError(
                    f"{shape.name}: {target.name} answered {status} {got[:200]!r}, not 200 "
                    f"{BACKEND_ANSWER!r}"
                )
            if direct and shape.chunked != chunked:
                raise RuntimeError(
                    f"{shape.name}: the backend answered with Transfer-Encoding {framing}"
                )
            answers.append(f"{target.name} {'chunked' if chunked else 'Content-Length'}")
        seen.append(f"{shape.name}: 200 and the backend's body from {', '.join(answers)}")
        if shape.body:
            seen.append(f"{shape.name}: " + check_bodies(stack, shape, log, offset))
    return seen


def check_bodies(stack: Stack, shape: Shape, log: Path, offset: int) -> str:
    """What the backend logged of the checked POSTs after ``offset``: each target's body
    reached it whole (RuntimeError if not)."""
    deadline = time.monotonic() + 3.0
    while True:  # nginx logs a request after answering it: wait a little for the last line
        with contextlib.suppress(OSError), log.open("rb") as lines:
            lines.seek(offset)
            found = {
                fields[0]: fields[1:]
                for line in lines.read().decode(errors="replace").splitlines()
                if len(fields := line.split()) == 7
            }
        if all(t.name in found for t in stack.targets) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    seen = []
    for target in stack.targets:
        method, uri, status, length, framing, request_length = found.get(target.name, ["?"] * 6)
        whole = (
            length == str(shape.body)
            if framing == "-"
            else framing == "chunked" and int(request_length) > shape.body
        )
        if (method, uri, status) != ("POST", f"/{shape.path}", "200") or not whole:
            raise RuntimeError(
                f"{shape.name}: the backend logged {method} {uri} {status} Content-Length "
                f"{length} Transfer-Encoding {framing} ({request_length} bytes) for "
                f"{target.name}'s {shape.body}-byte body"
            )
        sent = f"Content-Length {length}" if framing == "-" else f"chunked, {request_length} B"
        seen.append(f"{target.name} ({sent})")
    return f"the backend read every body whole, sent by {', '.join(seen)}"


# -- load ----------------------------------------------------------------------------------


def run_load(
    found: Tools,
    layout: Layout,
    port: int,
    conns: int,
    seconds: int,
    *,
    headers: Sequence[str] = (),
    shape: Shape = SHAPES["get"],
    direct: bool = False,
) -> load.Load:
    """One load run of ``seconds`` on 127.0.0.1:``port``: wrk (sending ``headers``, with the
    shape's script), or pyloadgen without it (GETs with no headers: a suite with headers or
    another shape needs wrk). A ``direct`` target (the backend) gets the shape's own path."""
    pin = process.pin_prefix(found.taskset, layout.load)
    path = shape.url_path(direct)
    if found.wrk is not None:
        url = f"http://{LOOPBACK}:{port}{path}"
        script = BENCH_DIR / "wrk" / shape.script if shape.script else None
        command = load.wrk_command(
            found.wrk, url, conns, seconds, pin=pin, headers=headers, script=script
        )
        return load.parse_wrk(process.output(command, seconds + 60))
    command = [*pin, *load.pyloadgen_command(port, path, conns, seconds)]
    return load.parse_pyloadgen(process.output(command, seconds + 60))


# -- one measured run ----------------------------------------------------------------------


@dataclass
class Run:
    rep: int
    conns: int
    target: str
    kind: str
    shape: str
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
    max_ms: float | None = None  # the longest request wrk timed (None: pyloadgen)
    timeouts: int = 0  # requests wrk gave up on (its 2 s timeout): none of them is in max_ms

    @property
    def tail_ratio(self) -> float | None:
        """p99 / p50 of the run."""
        return self.p99_ms / self.p50_ms if self.p50_ms > 0 else None


def _clock(stack: Stack, target: Target) -> process.CpuClock:
    """CPU seconds so far of the proxy, the backend, the helpers and the load generators that
    have finished (reaped children), and of the machine."""
    assert stack.backend is not None  # noqa: S101 - started first
    backend, proxy = stack.backend.proc.pid, target.proxy.proc.pid if target.proxy else None
    return process.CpuClock.read(
        {
            "proxy": lambda: process.cpu_seconds(proxy) if proxy is not None else 0.0,
            "backend": lambda: process.cpu_seconds(backend),
            "helpers": lambda: sum(process.cpu_seconds(h.proc.pid) for h in stack.helpers),
            "load": process.children_cpu,
        }
    )


def _us_per_request(seconds: float, requests: int) -> float:
    return seconds / max(requests, 1) * 1e6


def _log_size(target: Target) -> int:
    if (log := target.gateway_log) is None:
        return 0
    with contextlib.suppress(OSError):
        return log.stat().st_size
    return 0


def measure(
    stack: Stack, target: Target, conns: int, seconds: int, rep: int, *, shape: Shape
) -> Run:
    log_offset = _log_size(target)
    before = _clock(stack, target)
    done = run_load(
        stack.tools,
        stack.layout,
        target.port,
        conns,
        seconds,
        headers=stack.headers,
        shape=shape,
        direct=target.kind == "direct",
    )
    used = _clock(stack, target) - before
    log = target.gateway_log
    return Run(
        rep=rep,
        conns=conns,
        target=target.name,
        kind=target.kind,
        shape=shape.name,
        **vars(load.figures(done)),
        socket_error_kinds=done.socket_errors,
        proxy_us=_us_per_request(used["proxy"], done.requests) if target.proxy else None,
        backend_us=_us_per_request(used["backend"], done.requests),
        helper_us=_us_per_request(used["helpers"], done.requests) if stack.helpers else None,
        load_cpu=used["load"] / done.seconds,
        other_cpu=used.other_cores(done.seconds),
        steal_pct=used.steal_pct,
        log_warnings=servers.count_warnings(log, log_offset) if log is not None else 0,
        max_ms=done.latency_ms.max if done.latency_ms is not None else None,
        timeouts=done.socket_errors.get("timeout", 0),
    )


# -- summary -------------------------------------------------------------------------------


@dataclass
class Row:
    """One (shape, target, conns): medians over reps, errors summed, ratios as medians of
    pairs (with their range over reps)."""

    target: str
    kind: str
    shape: str
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
    x_nginx_range: tuple[float, float] | None = None  # the per-rep ratios' lowest and highest
    proxy_us_range: tuple[float, float] | None = None
    tail_ratio: float | None = None  # p99 / p50: median over reps
    tail_ratio_worst: float | None = None  # ... and the highest of a rep
    max_ms: float | None = None  # the longest request of any rep (wrk)
    timeouts: int = 0  # requests wrk gave up on, all reps


def _ratio(run: Run, base: Run) -> float | None:
    return run.rps / base.rps if base.rps > 0 else None


def _p99_difference(run: Run, base: Run) -> float:
    return run.p99_ms - base.p99_ms


def _cpu_difference(run: Run, base: Run) -> float | None:
    if run.proxy_us is None or base.proxy_us is None:
        return None
    return run.proxy_us - base.proxy_us


def _same_load(run: Run) -> tuple[str, int, int]:
    return run.shape, run.conns, run.rep


def _per_rep(
    runs: list[Run],
    mine: list[Run],
    other: str | None,
    compare: Callable[[Run, Run], float | None] = _ratio,
) -> list[float]:
    """``compare(run, base)`` for each rep, base being ``other``'s run at the same shape,
    connection count and rep (by default the req/s ratio)."""
    if other is None:
        return []
    return report.paired(mine, runs, other, _same_load, compare)


def _span(values: Iterable[float | None]) -> tuple[float, float] | None:
    present = [v for v in values if v is not None]
    return (min(present), max(present)) if present else None


def summarize(runs: list[Run], first_gateway: str | None) -> list[Row]:
    rows = []
    keys = dict.fromkeys((r.shape, r.conns, r.target) for r in runs)  # keeps the run order
    shapes = list(dict.fromkeys(r.shape for r in runs))
    for shape, conns, target in sorted(keys, key=lambda k: (shapes.index(k[0]), k[1])):
        mine = [r for r in runs if (r.shape, r.conns, r.target) == (shape, conns, target)]
        kind = mine[0].kind
        vs_first = kind == "gateway" and first_gateway not in (None, target)
        x_nginx = _per_rep(runs, mine, NGINX) if kind == "gateway" else []
        first = first_gateway if vs_first else None
        tails = [r.tail_ratio for r in mine]
        rows.append(
            Row(
                target=target,
                kind=kind,
                shape=shape,
                conns=conns,
                rps=statistics.median(r.rps for r in mine),
                p50_ms=statistics.median(r.p50_ms for r in mine),
                p99_ms=statistics.median(r.p99_ms for r in mine),
                proxy_us=median(r.proxy_us for r in mine),
                backend_us=statistics.median(r.backend_us for r in mine),
                helper_us=median(r.helper_us for r in mine),
                load_cpu=statistics.median(r.load_cpu for r in mine),
                other_cpu=statistics.median(r.other_cpu for r in mine),
                steal_pct=statistics.median(r.steal_pct for r in mine),
                non2xx=sum(r.non2xx for r in mine),
                socket_errors=sum(r.socket_errors for r in mine),
                log_warnings=sum(r.log_warnings for r in mine),
                x_nginx=median(x_nginx),
                x_direct=median(_per_rep(runs, mine, DIRECT)) if kind != "direct" else None,
                x_first=median(_per_rep(runs, mine, first)),
                p99_vs_first_ms=median(_per_rep(runs, mine, first, _p99_difference)),
                proxy_us_vs_first=median(_per_rep(runs, mine, first, _cpu_difference)),
                x_nginx_range=_span(x_nginx),
                proxy_us_range=_span(r.proxy_us for r in mine),
                tail_ratio=median(tails),
                tail_ratio_worst=max((t for t in tails if t is not None), default=None),
                max_ms=max((r.max_ms for r in mine if r.max_ms is not None), default=None),
                timeouts=sum(r.timeouts for r in mine),
            )
        )
    return rows


def print_rows(rows: list[Row], reps: int, with_helpers: bool) -> None:
    shapes = len({row.shape for row in rows}) > 1
    head = ["shape"] if shapes else []
    head += ["target", "conns", "req/s", "p50 ms", "p99 ms", "max ms"]
    head += ["proxy us/req", "backend us/req"]
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
        cells = [row.shape] if shapes else []
        cells += [
            row.target,
            str(row.conns),
            f"{row.rps:.0f}",
            f"{row.p50_ms:.2f}",
            f"{row.p99_ms:.2f}",
            fmt(row.max_ms, ".0f"),
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
    print(
        f"\nResults ({'median of ' + str(reps) + ' reps' if reps > 1 else '1 rep'}; ratios are "
        "paired req/s at the same shape and conns; max ms: the longest request of any rep):"
    )
    report.print_table(table)


# -- headline ------------------------------------------------------------------------------


def _row(rows: list[Row], target: str, conns: int, shape: str = "get") -> Row | None:
    return next((r for r in rows if (r.target, r.conns, r.shape) == (target, conns, shape)), None)


def headline(rows: list[Row], opts: Options, env: dict[str, Any] | None = None) -> list[str]:
    gateway = opts.variants[0].name
    conns = opts.conns
    lines = []
    ratios = [(c, r.x_nginx) for c in conns if (r := _row(rows, gateway, c)) is not None]
    if any(x is not None for _, x in ratios):
        lines.append(
            f"{gateway}/nginx "
            + ", ".join(f"c{c} = {fmt(x, '.2f')}" for c, x in ratios)
            + f"   (anchor: {ANCHOR_RATIO:.2f}; target >= {ANCHOR_RATIO:.2f})"
        )
    cpu = []
    for c in conns:
        g, n = _row(rows, gateway, c), _row(rows, NGINX, c)
        if g and n and g.proxy_us and n.proxy_us:
            cpu.append(
                f"c{c} {g.proxy_us:.0f}/{n.proxy_us:.0f} us = {g.proxy_us / n.proxy_us:.1f}x"
            )
    if cpu:
        lines.append(f"{gateway} CPU/req vs nginx CPU/req: {'; '.join(cpu)}   (anchor: 8.9x, 8.5x)")
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
    if suite is not None and suite.nginx_target is not None:
        lines += nginx_verdict(rows, opts, suite.nginx_target)
    if suite is not None and suite.fairness:
        lines += fairness(rows, opts)
    if suite is not None and suite.helpers and suite.criteria is None:
        lines += features_in_use(rows, opts, env or {})
    return lines


def _range(span: tuple[float, float] | None, spec: str = ".2f") -> str:
    return "" if span is None else f" ({format(span[0], spec)}-{format(span[1], spec)})"


def nginx_verdict(rows: list[Row], opts: Options, target: float) -> list[str]:
    """Each gateway's req/s against nginx's, paired, for every shape and conns (the target
    applies to get), and their CPU per request."""
    lines = [
        f"suite {opts.suite}: gateway/nginx req/s, median of the per-rep ratios (their range); "
        f"target >= {target:.2f} for get at every conns:"
    ]
    for variant in opts.variants:
        for shape in opts.shapes:
            mine = [r for c in opts.conns_of(shape) if (r := _row(rows, variant.name, c, shape))]
            if not mine:
                continue
            figures = ", ".join(
                f"c{r.conns} = {fmt(r.x_nginx, '.2f')}{_range(r.x_nginx_range)}"
                + (
                    f" {report.verdict(None if r.x_nginx is None else r.x_nginx >= target)}"
                    if shape == "get"
                    else ""
                )
                for r in mine
            )
            cpu = ", ".join(
                f"c{r.conns} {fmt(r.proxy_us, '.0f')}/{fmt(n.proxy_us, '.0f')} us"
                + (f" = {r.proxy_us / n.proxy_us:.1f}x" if r.proxy_us and n.proxy_us else "")
                for r in mine
                if (n := _row(rows, NGINX, r.conns, shape)) is not None
            )
            lines.append(f"  {variant.name} {shape}: {figures}; CPU/req vs nginx's: {cpu}")
    return lines


def fairness(rows: list[Row], opts: Options) -> list[str]:
    """At each shape's highest conns, for nginx and each gateway: p50, p99, p99/p50 and the
    longest request, with the verdict p99 <= 10 x p50 and nothing over 1 s (in every rep)."""
    lines = [
        f"suite {opts.suite}: fairness under saturation, each shape at its highest conns "
        f"(ok: p99 <= {FAIR_P99_OVER_P50:g} x p50 in every rep, no request over "
        f"{FAIR_MAX_MS / 1000:g} s and no wrk timeout, in any rep):"
    ]
    names = [NGINX, *(v.name for v in opts.variants)]
    for shape in opts.shapes:
        conns = max(opts.conns_of(shape))
        for name in names:
            if (r := _row(rows, name, conns, shape)) is None:
                continue
            ok = (
                r.tail_ratio_worst is not None
                and r.tail_ratio_worst <= FAIR_P99_OVER_P50
                and r.max_ms is not None
                and r.max_ms <= FAIR_MAX_MS
                and r.timeouts == 0
            )
            lines.append(
                f"  {shape} c{conns} {name}: p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, "
                f"p99/p50 {fmt(r.tail_ratio, '.1f')} (worst rep {fmt(r.tail_ratio_worst, '.1f')})"
                f", max {fmt(r.max_ms, '.0f')} ms, wrk timeouts {r.timeouts}: "
                + ("ok" if ok else "MISS")
            )
    return lines


def features_in_use(rows: list[Row], opts: Options, env: dict[str, Any]) -> list[str]:
    """That each gateway ran with its features doing their work: what its /metrics counted
    over the whole bench, the helpers' CPU per request, /health, WARNING lines."""
    lines = []
    measured = env.get("measured_requests", {})
    for variant in opts.variants:
        name = variant.name
        counts = env.get("gateway_counts", {}).get(name, {})
        decisions = ", ".join(
            f"{result} {n:.0f}" for result, n in sorted(counts.get("decisions", {}).items())
        )
        lines.append(
            f"suite {opts.suite}: {name}'s /metrics over the whole bench: requests "
            f"{counts.get('requests', 0):.0f} (its kept runs had {measured.get(name, 0)}), "
            f"rate-limit decisions: {decisions or 'none'}, degraded "
            f"{counts.get('degraded', '?')}; /health dependencies "
            f"{env.get('gateway_dependencies', {}).get(name)}; WARNING+ log lines: "
            f"{env.get('gateway_warnings', {}).get(name) or 'none'}"
        )
        if env.get("gateway_warnings", {}).get(name) or counts.get("degraded"):
            lines.append(
                f"WARNING: {name} fell back or warned during the bench: part of its runs may "
                "not have measured what the suite intends"
            )
        helper = ", ".join(
            f"{r.shape} c{r.conns} {fmt(r.helper_us)} us"
            for r in rows
            if r.target == name and r.helper_us is not None
        )
        if helper:
            helpers = ", ".join(h.name for h in opts.helpers)
            lines.append(f"  helpers' ({helpers}) CPU per request of {name}: {helper}")
    return lines


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
        f"({report.verdict(None if v.x_first is None else v.x_first >= criteria.min_ratio)})"
        for c, _, v in pairs
    )
    most = criteria.max_added_p99_ms
    added = ", ".join(
        f"c{c} {fmt(v.p99_vs_first_ms, '+.2f')} ms ({b.p99_ms:.2f} -> {v.p99_ms:.2f}"
        + (
            ""
            if most is None
            else "; "
            + report.verdict(None if v.p99_vs_first_ms is None else v.p99_vs_first_ms <= most)
        )
        + ")"
        for c, b, v in pairs
    )
    lines = [
        f"suite {opts.suite}: {name}/{base} req/s {ratios}   (target >= {criteria.min_ratio:.2f})",
        f"suite {opts.suite}: p99 {name} - {base} (paired): {added}   "
        + ("(no target)" if most is None else f"(target <= {most:g} ms)"),
    ]
    if any(c > 1 for c, _, _ in pairs):
        lines.append(
            "  (at c50/c200 the proxy's core is saturated, so p99 there grows with 1/req/s; "
            "--conns 1 measures what one decision adds to an unloaded request)"
        )
    cpu = ", ".join(
        f"c{c} {fmt(v.proxy_us_vs_first, '+.0f')} us ({fmt(b.proxy_us, '.0f')} -> "
        f"{fmt(v.proxy_us, '.0f')}"
        + (f", x{v.proxy_us / b.proxy_us:.2f}" if v.proxy_us and b.proxy_us else "")
        + ")"
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
    if (checks := env.get("gateway_auth_results", {}).get(name)) is not None:
        counted = ", ".join(f"{result} {n:.0f}" for result, n in sorted(checks.items()))
        loaded = env.get("gateway_auth_measured_requests", {}).get(name)
        lines.append(
            f"suite {opts.suite}: {name}'s token checks over the whole bench (/metrics "
            f"gateway_auth by result): {counted or 'none'}; its kept runs had {loaded} "
            "requests (warm-up, checks and dropped reruns add to the counts)"
        )
    if (spans := env.get("gateway_trace_spans", {}).get(name)) is not None:
        counted = ", ".join(f"{kind} {n:.0f}" for kind, n in sorted(spans.items()))
        lines.append(
            f"suite {opts.suite}: {name}'s spans over the whole bench (/metrics "
            f"gateway_trace_spans_*): {counted}"
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


# -- profile -------------------------------------------------------------------------------


def profile_all(stack: Stack, opts: Options, pyspy: str) -> dict[str, list[str]]:
    """Each gateway loaded twice more (get, the first --conns, --profile-seconds each): alone,
    then while py-spy samples it from the load's CPU: the summary of each (lib/profile.py),
    with what the sampling cost it."""
    shape = SHAPES["get" if "get" in opts.shapes else opts.shapes[0]]
    conns = opts.conns_of(shape.name)[0]
    found = {}
    for target in stack.targets:
        if target.kind != "gateway" or target.proxy is None:
            continue
        pid = target.proxy.proc.pid
        kernel, preempted = process.kernel_side(pid), process.preemptions(pid)
        alone = measure(stack, target, conns, opts.profile_seconds, 0, shape=shape)
        kernel_after, preempted_after = process.kernel_side(pid), process.preemptions(pid)
        system, writes = kernel_after[0] - kernel[0], kernel_after[1] - kernel[1]
        out = stack.workdir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', target.name)}.pyspy.txt"
        command = profiler.record_command(pyspy, pid, out)
        spy = process.spawn([*stack.prefix(stack.layout.load), *command], stdout=subprocess.PIPE)
        stack.adopt(spy)
        time.sleep(0.5)  # py-spy attaches
        run = measure(stack, target, conns, opts.profile_seconds, 0, shape=shape)
        status = profiler.finish(spy)
        said = spy.stdout.read().decode(errors="replace") if spy.stdout else ""
        if not out.exists():
            found[target.name] = [f"py-spy failed ({status}): {said.strip()[-400:]}"]
            continue
        summary = profiler.summarize(profiler.parse_raw(out.read_text()), run.proxy_us)
        found[target.name] = [
            f"{shape.name} c{conns}, {opts.profile_seconds} s: {run.rps:.0f} req/s and "
            f"{fmt(run.proxy_us, '.0f')} us of CPU per request while sampled (/proc; steal "
            f"{run.steal_pct:.0f} %), against {alone.rps:.0f} req/s and "
            f"{fmt(alone.proxy_us, '.0f')} us just before, alone (steal {alone.steal_pct:.0f} "
            f"%); errors {run.non2xx}/{run.socket_errors}; raw samples {out}",
            # (Threads that end during the run take their counts along: at least 0.)
            _kernel_line(alone, system, writes, max(preempted_after - preempted, 0)),
            *summary,
        ]
        print(f"  profiled {target.name}: {run.rps:.0f} req/s", flush=True)
    return found


def _kernel_line(alone: Run, system: float, writes: int, preempted: int) -> str:
    """What /proc says of the run alone: the kernel's part of the CPU, write()s and
    involuntary context switches per request, and how to read the writes' share with them."""
    requests = max(alone.requests, 1)
    line = (
        f"alone, from /proc: system (kernel) CPU {fmt(_us_per_request(system, requests), '.0f')} "
        f"of the {fmt(alone.proxy_us, '.0f')} us per request; per request "
        f"{writes / requests:.2f} write()s and {preempted / requests:.2f} involuntary "
        "context switches"
    )
    if preempted >= requests / 10:  # (the pin layout puts the backend on the gateway's CPU)
        line += (
            ": the gateway often waits for its CPU after a write (the backend it woke runs "
            "on it); py-spy counts such waits in the frame that wrote (in the sampled run "
            "likewise), so the share of socket writes below is an upper bound"
        )
    return line


def print_profiles(profiles: dict[str, list[str]]) -> None:
    for name, lines in profiles.items():
        print(f"\nWhere {name}'s time goes (py-spy; shares of samples, lib/profile.py):")
        for line in lines:
            print(f"  {line}")


# -- environment report --------------------------------------------------------------------


def environment(found: Tools, layout: Layout) -> dict[str, Any]:
    return {
        "gateway_code": tools.gateway_code(),
        "gateway_python": tools.gateway_python(),
        "nginx": tools.first_line([found.nginx, "-v"]) if found.nginx else None,
        "wrk": tools.first_line([found.wrk, "-v"]) if found.wrk else None,
        "nproc": tools.first_line(["nproc"]),
        "cpu_count": os.cpu_count(),
        "kernel": os.uname().release,
        "layout": layout.note,
        "notes": found.notes,
    }


def print_environment(env: dict[str, Any]) -> None:
    py = env["gateway_python"]
    yes = report.yes
    print("\nEnvironment:")
    print(f"  gateway code: {env['gateway_code']}")
    print(f"  gateway interpreter: {tools.PYTHON} -> {py.get('real_path')}")
    print(f"    {py.get('version', py.get('error'))}")
    built = (
        f"--enable-optimizations: {yes(py.get('enable_optimizations'))}, "
        f"--with-lto: {yes(py.get('with_lto'))}"
    )
    if "debian_package" in py:
        built += (
            f"; from Debian package {py['debian_package']} (Debian builds it with PGO+LTO "
            "in its packaging, which CONFIG_ARGS does not show)"
        )
    print(f"    configure flags (sysconfig CONFIG_ARGS): {built}")
    c_parser = yes(py.get("aiohttp_c_parser"))
    print(f"    aiohttp {py.get('aiohttp')} (C parser: {c_parser}), uvloop {py.get('uvloop')}")
    print(f"  nginx: {env['nginx'] or 'not installed'}")
    print(f"  wrk: {env['wrk'] or 'not installed (Python load generator)'}")
    print(f"  nproc: {env['nproc']}; kernel {env['kernel']}")
    print(f"  CPU layout: {env['layout']}")
    for name, lines in env.get("gateway_log_lines", {}).items():
        print(f"  {name} wrote {lines} log lines to its file (stdout) during the whole bench")
    for note in env["notes"]:
        print(f"  NOTE: {note}")


# -- main ----------------------------------------------------------------------------------


def plan_seconds(opts: Options, targets: int, gateways: int) -> float:
    groups = 0 if opts.profile_only else sum(len(opts.conns_of(s)) for s in opts.shapes)
    profiled = gateways * 2 * (opts.profile_seconds + 1) if opts.profile else 0
    return targets * (WARMUP_SECONDS + 0.5 + groups * opts.reps * (opts.duration + 0.5)) + profiled


def start_stack(stack: Stack, opts: Options) -> list[str]:
    """Every server, ready; what the suite's check before loading found (if it has one)."""
    suite = SUITES[opts.suite] if opts.suite else None
    env: dict[str, str] = {}
    token = None
    if suite is not None and suite.bearer_origin is not None:
        if stack.tools.wrk is None:
            raise RuntimeError(f"--suite {opts.suite} needs wrk (pyloadgen sends no headers)")
        env["BENCH_JWT_SECRET"] = secret = secrets.token_urlsafe(32)
        token = mint_token(secret, time.time())
        stack.headers = (f"Authorization: Bearer {token}", f"Origin: {suite.bearer_origin}")
    if opts.shapes != ("get",) and (stack.tools.wrk is None or stack.tools.nginx is None):
        raise RuntimeError("--shapes other than get need wrk and nginx (the backend's paths)")
    stack.start_backend()
    stack.start_nginx_proxy()
    for helper in opts.helpers:
        env.update(stack.start_helper(helper))
    for variant in opts.variants:
        stack.start_gateway(variant, env)
    checked = check_auth(stack, suite, token) if suite is not None and token is not None else []
    if stack.tools.nginx is not None and stack.tools.wrk is not None:
        checked += check_shapes(stack, [SHAPES[name] for name in opts.shapes])
    return checked


def measure_group(stack: Stack, opts: Options, rep: int, shape: Shape, conns: int) -> list[Run]:
    """Every target in turn at one rep, shape and connection count."""
    group = []
    for target in stack.targets:
        run = measure(stack, target, conns, opts.duration, rep, shape=shape)
        group.append(run)
        print(progress_line(run), flush=True)
    return group


def run_all(stack: Stack, opts: Options, discarded: list[Run]) -> list[Run]:
    """Every measured run; with --rerun-disturbed, the attempts not kept go to ``discarded``."""
    targets = stack.targets
    print(
        f"\nWarm-up: {WARMUP_SECONDS} s per target ({', '.join(t.name for t in targets)})",
        flush=True,
    )
    for target in targets:
        run_load(
            stack.tools,
            stack.layout,
            target.port,
            opts.conns[0],
            WARMUP_SECONDS,
            headers=stack.headers,
        )
    runs: list[Run] = []
    if opts.profile_only:
        return runs
    for rep in range(1, opts.reps + 1):
        for shape in (SHAPES[name] for name in opts.shapes):
            for conns in opts.conns_of(shape.name):
                group = functools.partial(measure_group, stack, opts, rep, shape, conns)
                label = f"rep {rep} {shape.name} c{conns}"
                runs += process.least_disturbed(
                    group, label, opts.rerun_disturbed, discarded, IDLE_WAIT
                )
    return runs


def progress_line(run: Run) -> str:
    return (
        f"  rep {run.rep} {run.shape:<8} c{run.conns:<4} {run.target:<20} {run.rps:9.0f} req/s  "
        f"p99 {run.p99_ms:8.2f} ms  proxy {fmt(run.proxy_us):>6} us/req  "
        f"errors {run.non2xx}/{run.socket_errors}  other CPU {run.other_cpu:.2f}"
        + (f"  log warnings {run.log_warnings}" if run.log_warnings else "")
    )


def print_report(runs: list[Run], opts: Options, env: dict[str, Any], started: float) -> None:
    gateways = [v.name for v in opts.variants]
    rows = summarize(runs, gateways[0])
    lines: list[str] = []
    if runs:
        print_rows(rows, opts.reps, bool(opts.helpers))
        print("\nHeadline (gateway = first variant, logging every request at INFO to a file):")
        lines = headline(rows, opts, env)
        warning = report.disturbance([r.other_cpu for r in runs])
        if warning is not None:
            lines.append(warning)
    if discarded := env.get("discarded_runs"):
        groups = len({(r["rep"], r["shape"], r["conns"]) for r in discarded})
        lines.append(
            f"{groups} disturbed rep/shape/conns groups were measured again "
            "(--rerun-disturbed): the table keeps the least disturbed attempt of each "
            f"({len(discarded)} runs dropped)"
        )
    for line in lines:
        print(f"  {line}")
    print_profiles(env.get("profiles", {}))
    print_environment(env)
    elapsed = time.monotonic() - started
    if opts.json_path is not None:
        data = {
            "options": {**asdict(opts), "json_path": str(opts.json_path)},
            "environment": env,
            "runs": [asdict(r) for r in runs],
            "rows": [asdict(r) for r in rows],
            "headline": lines,
            "elapsed_seconds": elapsed,
        }
        report.write_json(opts.json_path, data)
    print(f"\nElapsed: {elapsed:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    opts = parse_options(argv)
    pyspy = tools.find_pyspy() if opts.profile else None
    if opts.profile and pyspy is None:
        print(
            "--profile needs py-spy: .venv/bin/python -m pip install py-spy (into the venv "
            "only, not the lock), or put it on PATH",
            file=sys.stderr,
        )
        return 2
    process.stop_on_signals()
    found = ensure_tools(opts)
    layout = process.choose_layout()
    env = environment(found, layout)
    env["busy_cores_before"] = busy = process.busy_machine()
    if busy > BUSY_CORES:
        print(
            f"WARNING: the machine is busy before the start ({busy:.2f} cores used by other "
            "processes): results will be noisy",
            flush=True,
        )
    with servers.workspace("daarion-bench-", opts.keep) as space:
        stack = Stack(found, layout, space.path)
        try:
            checked = start_stack(stack, opts)
            print(
                f"Targets on {LOOPBACK}: " + ", ".join(f"{t.name}:{t.port}" for t in stack.targets)
            )
            print(
                f"Layout: {layout.note}. About "
                f"{plan_seconds(opts, len(stack.targets), len(opts.variants)):.0f} s of load."
            )
            if opts.suite:
                print(f"Suite {opts.suite}: {SUITES[opts.suite].about}")
            if checked:
                print("Checked before loading, with wrk's headers:")
                for line in checked:
                    print(f"  {line}")
                env["checked_before_loading"] = checked
            for note in found.notes:
                print(f"NOTE: {note}")
            discarded: list[Run] = []
            runs = run_all(stack, opts, discarded)
            if pyspy is not None:
                print(f"\nProfiling each gateway with {pyspy}", flush=True)
                env["profiles"] = profile_all(stack, opts, pyspy)
            env["discarded_runs"] = [asdict(r) for r in discarded]
            env["gateway_counts"] = stack.gateway_counts()
            env["measured_requests"] = {
                t.name: sum(r.requests for r in runs if r.target == t.name) for t in stack.targets
            }
            env["gateway_dependencies"] = stack.gateway_dependencies()
            env["gateway_log_lines"] = stack.gateway_log_lines()
            env["gateway_warnings"] = stack.gateway_warnings()
            if opts.suite == "tracing":
                env["gateway_trace_spans"] = stack.gateway_trace_spans()
            if stack.headers:
                env["gateway_auth_results"] = stack.gateway_auth_results()
                env["gateway_auth_measured_requests"] = {
                    t.name: sum(r.requests for r in runs if r.target == t.name)
                    for t in stack.targets
                }
        except KeyboardInterrupt:
            print("\ninterrupted: stopping every server", file=sys.stderr)
            return 130
        except RuntimeError as exc:
            print(f"\nbench failed: {exc}", file=sys.stderr)
            return 1
        finally:
            stack.close()
    print_report(runs, opts, env, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
