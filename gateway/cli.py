"""The command line: ``daarion-gateway [serve|check|schema|healthcheck]``. Parse, set up
logging, run.

The gateway itself (aiohttp, prometheus-client, redis) is imported only by the commands that
need it: ``healthcheck`` runs every 30 s in the Docker image and ``check`` and ``schema`` in
editors and CI, so they start with the config types and the standard library alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import resource
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson

from .config import Config, ConfigError, config_json_schema, load_config

if TYPE_CHECKING:
    from .app import Gateway
    from .routetable import Entry
    from .snapshot import Route
    from .workers import Worker

log = logging.getLogger("gateway")

COMMANDS = ("serve", "check", "schema", "healthcheck", "demo")
# The cyclic garbage collector's thresholds while serving (Python's are 700, 10, 10). Every
# collection of the oldest generation walks every object of every open connection: with
# 5,500 held connections that is a pause of about 80 ms, often enough with the defaults to
# put p99 at 100 ms, and the young collections cost ~12 % of the CPU per request. Collecting
# the young generation every 50,000 allocations instead of 700 lets most per-request objects
# die by reference counting first, so fewer reach the old generation and it is collected
# about once every 100 middle collections (bench/flood.py: p99 13 ms instead of 91 ms under
# 5,500 held connections, 147 instead of 167 us of CPU per request, the same memory).
GC_THRESHOLDS = (50_000, 20, 100)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daarion-gateway", description="The public entry of a DAARION node."
    )
    sub = parser.add_subparsers(dest="command")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        help="routes.yaml to use (default: $GATEWAY_CONFIG, else ./routes.yaml)",
    )
    serve = sub.add_parser("serve", parents=[config], help="run the gateway (the default)")
    serve.add_argument("--host", help="listen address (overrides listen.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    serve.add_argument(
        "--workers",
        type=_positive,
        default=_positive(os.environ.get("GATEWAY_WORKERS", "1")),
        help="worker processes sharing the port (default: $GATEWAY_WORKERS, else 1)",
    )
    serve.add_argument(
        "--log-level",
        default=os.environ.get("GATEWAY_LOG_LEVEL", "INFO"),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    )
    sub.add_parser("check", parents=[config], help="validate the config and summarise it")
    sub.add_parser("schema", help="print the JSON Schema of routes.yaml")
    probe = sub.add_parser(
        "healthcheck",
        parents=[config],
        help="exit 0 if the local gateway's /health answers 200 (for Docker's HEALTHCHECK)",
    )
    probe.add_argument("--port", type=int, help="port to probe (default: listen.port)")
    probe.add_argument("--timeout", type=float, default=5.0)
    from . import demo  # noqa: PLC0415 - the demo's options (argparse only; the gateway loads later)

    demo.add_arguments(sub.add_parser("demo", help="the gateway in front of stand-in services"))
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def config_path(given: str | None) -> str:
    return given or os.environ.get("GATEWAY_CONFIG") or "routes.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help"):
        args_list.insert(0, "serve")
    args = _parser().parse_args(args_list)
    if args.command == "schema":
        sys.stdout.write(orjson.dumps(config_json_schema(), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
        return 0
    if args.command == "demo":
        from .demo import run  # noqa: PLC0415 - the demo loads the whole gateway, for itself only

        return run(args)
    path = config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    if args.command == "check":
        sys.stdout.write(summary(path, config))
        return 0
    if args.command == "healthcheck":
        return healthcheck(config, args.port, args.timeout)
    from .logs import setup_logging  # noqa: PLC0415 - only serve needs the gateway loaded

    setup_logging(args.log_level)
    return _serve(config, path, args.host, args.port, args.workers)


def summary(path: str, config: Config) -> str:
    """``check``'s report: the route table in match order, and routes that can never match."""
    from .snapshot import compile_snapshot  # noqa: PLC0415 - not needed by healthcheck/schema

    snapshot = compile_snapshot(config)
    entries = snapshot.table.entries
    width = max((len(_route_path(e)) for e in entries), default=0)
    lines = [
        f"{path}: OK, {len(snapshot.routes)} services on {len(config.nodes)} nodes, "
        f"listening on {config.listen.host}:{config.listen.port}",
    ]
    for entry in entries:
        route = entry.policy
        urls = ", ".join(
            # http(s)://host:port, or ws(s):// for a WebSocket route
            f"{'ws' + t.origin[4:] if entry.websocket else t.origin}{entry.to} ({t.node})"
            for t in route.targets
        )
        notes = _route_notes(entry, snapshot.routes[route.service])
        lines.append(f"  {_route_path(entry):<{width}} -> {urls}{notes}")
    lines += _entry_lines(config)
    lines += [f"warning: {warning}" for warning in never_matched(config) + any_origin(config)]
    if config.rate_limits:
        where = "in each process's memory"
        if config.redis is not None and not config.redis.url.startswith("memory://"):
            where = f"through {_redact(config.redis.url)} (on_error: {config.redis.on_error})"
        lines.append(f"rate limits {', '.join(config.rate_limits)} are kept {where}")
    return "\n".join(lines) + "\n"


def _entry_lines(config: Config) -> list[str]:
    """``check``'s lines on HTTPS (each certificate's names and end) and the admin surface."""
    import time  # noqa: PLC0415 - check only

    from .certs import read_pair  # noqa: PLC0415 - check only

    lines = []
    tls = config.tls
    if tls is not None and tls.enabled:
        lines.append(
            f"https on {tls.listen.host}:{tls.listen.port} (TLS {tls.min_version}+"
            + (", plain HTTP redirected to it" if tls.redirect_http else "")
            + (", HSTS" if tls.hsts is not None else "")
            + ")"
        )
        for files in tls.certificates:
            pair = read_pair(files.cert, files.key)  # load_config has read it already
            ends = time.strftime("%Y-%m-%d", time.gmtime(pair.not_after))
            lines.append(f"  certificate {files.cert}: {', '.join(pair.names)}, until {ends}")
        if tls.acme is not None and tls.acme.enabled:
            acme = tls.acme
            lines.append(
                f"  ACME: {', '.join(acme.domains)} from {acme.directory}, kept in {acme.storage}"
            )
    admin = config.admin
    where = f" on {admin.listen.host}:{admin.listen.port} only" if admin.listen else ""
    lines.append(f"/metrics and /gateway/* answer {', '.join(admin.allow)}{where}")
    for name, node in config.nodes.items():
        if node.tls is not None:
            trust = (
                "ANY certificate"
                if node.tls.insecure_skip_verify
                else (node.tls.ca or "the system's CAs")
            )
            mutual = ", with a client certificate" if node.tls.cert else ""
            lines.append(f"node {name}: HTTPS, verified against {trust}{mutual}")
    return lines


def _route_path(entry: Entry[Route]) -> str:
    """A route's match: its path, and what else it needs."""
    text = entry.path + (" (exact)" if entry.exact else "")
    if entry.methods is not None:
        text += " " + ",".join(sorted(entry.methods))
    if entry.hosts is not None:
        text += " @" + ",".join(sorted(entry.hosts))
    return text


def _route_notes(entry: Entry[Route], service: Route) -> str:
    """The route's kind, zone and the policies it sets over its service's."""
    route = entry.policy
    notes = []
    if entry.id != route.service:  # a written route: its name, and its service if not in it
        named = entry.id.startswith(f"{route.service}#")
        notes.append(f"route {entry.id}" + ("" if named else f" of {route.service}"))
    if entry.websocket:
        notes.append("websocket")
    if route.zone is not None:
        notes.append(f"limit: {route.zone.name}")
    if route.auth is not None:
        roles = f" ({', '.join(sorted(route.auth.roles))})" if route.auth.roles else ""
        notes.append(f"auth: {'required' if route.auth.required else 'optional'}{roles}")
    for key in ("connect_timeout", "response_timeout", "retries", "body", "cookie_path"):
        if getattr(route, key) != getattr(service, key):
            notes.append(f"{key}: {_shown(getattr(route, key))}")
    return "".join(f"  [{note}]" for note in notes)


def _shown(value: object) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in dataclasses.asdict(value).items())  # fmt: skip
    return f"{value:g}" if isinstance(value, float) else str(value)


def never_matched(config: Config) -> list[str]:
    """Routes that can never match: every path they match is the gateway's own (an exact
    /health, say, or anything under /gateway/; a prefix /health still matches /health/x)."""
    from .endpoints import OWN_PREFIX, own  # noqa: PLC0415 - not needed by healthcheck/schema

    warnings = []
    for name, service in config.services.items():
        for i, rule in enumerate(service.routes or ()):
            taken = rule.path.startswith(OWN_PREFIX) or (rule.exact and own(rule.path) is not None)
            if taken:
                warnings.append(
                    f"services.{name}.routes[{i}] ({rule.path}) can never match: "
                    "/health, /metrics and /gateway/ are the gateway's own"
                )
    return warnings


def any_origin(config: Config) -> list[str]:
    """Where ``ws_origins: any`` lets every web page open sessions with its visitors'
    cookies (the default accepts no Origin, the same origin, or one cors allows)."""
    found = []
    for name, service in config.services.items():
        places = [(f"services.{name}", service.ws_origins)]
        places += [(f"services.{name}.routes[{i}]", r.ws_origins) for i, r in
                   enumerate(service.routes or ())]  # fmt: skip
        found += [
            f"{where}: ws_origins: any accepts WebSocket sessions from every origin (any web "
            "page, with its visitors' cookies); list the origins, or leave it out for the "
            "same origin and cors's"
            for where, origins in places
            if origins == "any"
        ]
    return found


def _redact(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}"


def healthcheck(config: Config, port: int | None, timeout: float) -> int:
    """GET /health on this machine: 0 when it answers 200 (healthy or degraded), else 1."""
    host = config.listen.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard listen is probed on loopback
        host = "127.0.0.1"
    url = f"http://{host}:{port or config.listen.port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        sys.stderr.write(f"{url}: {exc}\n")
        return 1
    sys.stdout.write(f"{url}: {status}\n")
    return 0 if status == 200 else 1


def _serve(config: Config, path: str, host: str | None, port: int | None, workers: int) -> int:
    if workers == 1:
        return _serve_one(config, path, host, port, None)
    from .workers import supervise  # noqa: PLC0415 - only serve --workers needs it

    raise_open_files_limit()  # for the workers, which inherit it
    try:
        return supervise(
            workers,
            host if host is not None else config.listen.host,
            port if port is not None else config.listen.port,
            lambda worker, bound: _serve_one(_current(path, config), path, host, bound, worker),
        )
    except OSError as exc:
        log.critical("cannot listen", extra={"fields": {"error": str(exc)}})
        return 1


def _current(path: str, started_with: Config) -> Config:
    """The config file as it is now, for a worker started again after the others may have
    reloaded it; the supervisor's (the first) when the file has become invalid since."""
    try:
        return load_config(path)
    except ConfigError as exc:
        log.error(  # noqa: TRY400 - a bad file is not a crash: its problems, no traceback
            "config invalid; this worker serves the config the gateway started with",
            extra={"fields": {"problems": str(exc).splitlines()}},
        )
        return started_with


def _serve_one(
    config: Config, path: str, host: str | None, port: int | None, worker: Worker | None
) -> int:
    from .app import Gateway  # noqa: PLC0415 - the whole gateway, for serve only

    try:
        import uvloop  # noqa: PLC0415 - optional: absent on platforms without it
    except ImportError:  # pragma: no cover - uvloop is installed wherever it builds
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(_run(Gateway(config, config_path=path), host, port, worker))
    except OSError as exc:
        log.critical("cannot listen", extra={"fields": {"error": str(exc)}})
        return 1
    return 0


def raise_open_files_limit() -> tuple[int, int]:
    """Lift the soft limit on open files to the hard one (each WebSocket session holds two
    sockets, each HTTP request in flight up to two). Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return soft, wanted
    return soft, soft


async def _run(gateway: Gateway, host: str | None, port: int | None, worker: Worker | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload)
    _, open_files = raise_open_files_limit()
    gc.set_threshold(*GC_THRESHOLDS)
    addresses = await gateway.start(host, port, worker)
    gc.freeze()  # what start-up made lives as long as the process: no collection need scan it
    log.info(
        "gateway started",
        extra={
            "fields": {
                "pid": os.getpid(),
                "worker": worker.index if worker is not None else None,
                "listen": [f"{a[0]}:{a[1]}" for a in addresses],
                "listeners": {name: f"{a[0]}:{a[1]}" for name, a in gateway.bound.items()},
                "config": gateway.config_path,
                "services": len(gateway.shared.snapshot.routes),
                "open_files_limit": open_files,
            }
        },
    )
    try:
        await stop.wait()
    finally:
        log.info("gateway stopping: draining requests in flight")
        with contextlib.suppress(asyncio.CancelledError):
            await gateway.stop()
        log.info("gateway stopped")
