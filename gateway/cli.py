"""The command line: ``daarion-gateway [serve|check|schema|healthcheck]``. Parse, set up
logging, run.

The gateway itself (aiohttp, prometheus-client, redis) is imported only by the commands that
need it: ``healthcheck`` runs every 30 s in the Docker image and ``check`` and ``schema`` in
editors and CI, so they start with the config types and the standard library alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson

from .commands import COMMANDS, serves
from .config import Config, ConfigError, config_json_schema, load_config, parse_config
from .config.types import Listen

if TYPE_CHECKING:
    from .routetable import Entry, RouteTable
    from .snapshot import Route

log = logging.getLogger("gateway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daarion-gateway", description="The public entry of a DAARION node."
    )
    # worker and preflight are the supervisor's, not for people: left out of the help.
    sub = parser.add_subparsers(
        dest="command", metavar="{serve,check,schema,healthcheck,restart,demo}"
    )
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        help="routes.yaml to use (default: $GATEWAY_CONFIG, else ./routes.yaml)",
    )
    serve = sub.add_parser("serve", parents=[config], help="run the gateway (the default)")
    serve.add_argument("--host", help="listen address (overrides listen.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    # Defaults from the environment are text, which argparse converts (and refuses with a
    # usage message) as it does a value given; an empty one (VAR= in an env file) is unset.
    serve.add_argument(
        "--workers",
        type=_positive,
        default=os.environ.get("GATEWAY_WORKERS") or "1",
        help="worker processes sharing the port (default: $GATEWAY_WORKERS, else 1)",
    )
    serve.add_argument(
        "--pid-file",
        help="where to write the pid, for restart (default: lifecycle.pid_file, else "
        "gateway-<port>.pid in the user's runtime directory)",
    )
    serve.add_argument(
        "--log-level",
        default=os.environ.get("GATEWAY_LOG_LEVEL") or "INFO",
        type=_level,
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default: $GATEWAY_LOG_LEVEL, else INFO)",
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
    again = sub.add_parser(
        "restart",
        parents=[config],
        help="start a new generation of the running gateway (newly installed code, the "
        "config file as it is now) on its sockets; the old one drains",
    )
    again.add_argument("--pid-file", help="the gateway's pid file (default: from the config)")
    again.add_argument("--port", type=int, help="its plain port (default: listen.port)")
    again.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    # What the supervisor runs (not for people): a worker, and a restart's check.
    worker = sub.add_parser("worker")
    worker.add_argument("--control", type=int, required=True)
    worker.add_argument("--log-level", default="INFO", type=str.upper)
    sub.add_parser("preflight", parents=[config])
    from . import demo  # noqa: PLC0415 - the demo's options (argparse only; the gateway loads later)

    demo.add_arguments(sub.add_parser("demo", help="the gateway in front of stand-in services"))
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _level(text: str) -> str:
    if text.upper() not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LEVELS)}")
    return text.upper()


def config_path(given: str | None) -> str:
    return given or os.environ.get("GATEWAY_CONFIG") or "routes.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if serves(args_list) and args_list[:1] != ["serve"]:
        args_list.insert(0, "serve")
    args = _parser().parse_args(args_list)
    if args.command == "schema":
        text = orjson.dumps(config_json_schema(), option=orjson.OPT_INDENT_2).decode()
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `schema | head`: the reader has gone; stop as cat would
            # Python would flush stdout again at exit and print a second error: point it at
            # /dev/null first. 141 is what a shell reports for a tool killed by SIGPIPE.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        return 0
    if args.command in ("serve", "worker"):
        from .logs import setup_logging  # noqa: PLC0415 - only these need the gateway loaded

        setup_logging(args.log_level)
        if args.command == "worker":
            return _worker(args)
        return _serve(config_path(args.config), args)
    if args.command == "demo":
        from .demo import run  # noqa: PLC0415 - the demo loads the whole gateway, for itself only

        return run(args)
    path = config_path(args.config)
    if args.command == "preflight":
        return _preflight(path)
    if args.command == "restart":
        return restart(path, args.pid_file, args.port, args.timeout)
    try:
        config = load_config(path)
    except ConfigError as exc:
        if args.command == "healthcheck":
            # The file may be mid-edit, or wrong and not reloaded: the gateway serves what it
            # loaded before. Its address is then $GATEWAY_HOST and --port or $GATEWAY_PORT
            # (the shipped routes.yaml's), or the defaults.
            given = os.environ.get("GATEWAY_PORT", "")
            port = args.port or (int(given) if given.isdigit() else Listen().port)
            host = os.environ.get("GATEWAY_HOST") or Listen().host
            sys.stderr.write(f"{path}: not valid now ({len(exc.problems)} problem(s)); "
                             f"probing {host}:{port} from the environment\n")  # fmt: skip
            return probe_listener(host, port, args.timeout)
        sys.stderr.write(f"{exc}\n")
        return 2
    if args.command == "check":
        sys.stdout.write(summary(path, config))
        return 0
    return healthcheck(config, args.port, args.timeout)


def summary(path: str, config: Config) -> str:
    """``check``'s report: the route table in match order, and routes that can never match."""
    from .logs import redacted  # noqa: PLC0415 - not needed by healthcheck/schema
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
    warnings = never_matched(config) + unguarded_methods(snapshot.table) + any_origin(config)
    lines += [f"warning: {warning}" for warning in warnings]
    if config.rate_limits:
        where = "in each process's memory"
        if config.redis is not None and not config.redis.url.startswith("memory://"):
            where = f"through {redacted(config.redis.url)} (on_error: {config.redis.on_error})"
        lines.append(f"rate limits {', '.join(config.rate_limits)} are kept {where}")
    if config.tracing is not None:
        t = config.tracing
        lines.append(
            f"tracing: spans to {redacted(t.otlp_endpoint)} as {t.service_name}, sample_ratio "
            f"{t.sample_ratio:g}, a parent's sampled flag followed from {t.sampled_from}"
        )
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


# Methods tried on a route's path to find where the ones it does not take go; ANY_OTHER
# stands for every method no route lists (a WebDAV PROPFIND, a made-up one).
_PROBED_METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
_ANY_OTHER: Final = "ANY-OTHER-METHOD"


def unguarded_methods(table: RouteTable[Route]) -> list[str]:
    """Routes with ``methods`` and a guard (required auth, a rate limit) whose path's other
    methods go to a route without that guard: ``methods`` routes, it does not refuse (nginx's
    ``limit_except ... deny`` does), so a POST of a GET-only admin path is the shorter
    route's. Every method the route does not take is tried, and every host it names."""
    from .routetable import Found  # noqa: PLC0415 - check only

    warnings = []
    for entry in table.entries:
        if entry.methods is None:
            continue
        leaks: dict[tuple[str, str], list[str]] = {}  # (other route, what is lost): methods
        others: dict[str, Entry[Route]] = {}
        for method in (*_PROBED_METHODS, _ANY_OTHER):
            if entry.allows(method):
                continue
            for host in sorted(entry.hosts or ("",)):
                found = table.match(entry.path, method, host)
                if not isinstance(found, Found) or found.entry is entry:
                    continue
                lost = _lost_guard(entry.policy, found.entry.policy)
                if lost:
                    others[found.entry.id] = found.entry
                    named = "any other method" if method == _ANY_OTHER else method
                    methods = leaks.setdefault((found.entry.id, lost), [])
                    if named not in methods:
                        methods.append(named)
        for (other_id, lost), methods in leaks.items():
            other = others[other_id]
            warnings.append(
                f"route {entry.id} ({_route_path(entry)}) takes only those methods: "
                f"{', '.join(methods)} of its path go to route {other_id} "
                f"({_route_path(other)}) without {lost}; leave methods off the guarded route"
            )
    return warnings


def _lost_guard(mine: Route, theirs: Route) -> str:
    """What of ``mine``'s guard a request loses on ``theirs``: "" when nothing."""
    lost = []
    if (
        mine.auth is not None
        and mine.auth.required
        and (  # (optional guards nothing)
            theirs.auth is None
            or not theirs.auth.required
            or (mine.auth.roles or frozenset()) - (theirs.auth.roles or frozenset())
        )
    ):
        lost.append("its auth")
    if mine.zone is not None and (theirs.zone is None or theirs.zone.name != mine.zone.name):
        lost.append(f"its rate limit ({mine.zone.name})")
    return " and ".join(lost)


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


def healthcheck(config: Config, port: int | None, timeout: float) -> int:
    """GET /health on this machine: 0 when it answers 200 (healthy or degraded), else 1."""
    return probe_listener(config.listen.host, port or config.listen.port, timeout)


def probe_listener(host: str, port: int, timeout: float) -> int:
    """``probe_health`` of the listener on ``host:port`` (a wildcard: on loopback)."""
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard listen is probed on loopback
        host = "127.0.0.1"
    authority = f"[{host}]" if ":" in host else host  # an IPv6 address, in brackets
    return probe_health(f"http://{authority}:{port}/health", timeout)


def probe_health(url: str, timeout: float) -> int:
    """0 when ``url`` answers 200, else 1 (what it said goes to stdout or stderr)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http:// built by the callers
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        sys.stderr.write(f"{url}: {exc}\n")
        return 1
    sys.stdout.write(f"{url}: {status}\n")
    return 0 if status == 200 else 1


def _serve(path: str, args: argparse.Namespace) -> int:
    """``serve``: the supervisor and its workers (``lifecycle/``)."""
    from .lifecycle import supervisor  # noqa: PLC0415 - only serve needs it

    state = supervisor.handed_over()
    if state is not None:  # after a restart's exec: the previous program's options
        options = supervisor.Options(**state["options"])
        path = options.path
    else:
        options = supervisor.Options(
            path, args.workers, args.host, args.port, args.log_level, args.pid_file
        )
    texts = [_read(path)] + ([state["text"]] if state is not None else [])
    problems: list[str] = []
    for text in texts:
        if text is None:
            continue
        try:
            config = parse_config(text, path)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        return supervisor.run(options, text, config, state)
    sys.stderr.write("\n".join(problems or [f"{path}: cannot read the file"]) + "\n")
    return 2


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _worker(args: argparse.Namespace) -> int:
    from .lifecycle import worker  # noqa: PLC0415 - the whole gateway, for a worker only

    return worker.main(args.control)


def _preflight(path: str) -> int:
    """What a restart runs before it replaces the supervisor's program: can the installed
    code be imported, and does it accept the config file?"""
    from .lifecycle import supervisor, worker  # noqa: F401, PLC0415 - importing is the check

    try:
        load_config(path)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    return 0


def restart(path: str, pid_file: str | None, port: int | None, timeout: float) -> int:
    """``restart``: SIGUSR2 to the running gateway, then wait for how the restart ended."""
    import time  # noqa: PLC0415 - restart only

    from .lifecycle.supervisor import pid_file_for  # noqa: PLC0415 - stdlib and config only

    if pid_file is None:
        try:
            pid_file = pid_file_for(load_config(path), port)
        except ConfigError as exc:
            sys.stderr.write(f"{exc}\n(give --pid-file, which needs no config)\n")
            return 2
        except OSError as exc:
            sys.stderr.write(f"no pid file: {exc}\n")
            return 1
    found = _supervisor(pid_file)
    if isinstance(found, str):
        sys.stderr.write(f"no running gateway: {found}\n")
        return 1
    before = _state(pid_file).get("restarts", 0)
    try:
        os.kill(found, signal.SIGUSR2)
    except OSError as exc:
        sys.stderr.write(f"cannot signal the gateway (pid {found}): {exc}\n")
        return 1
    sys.stdout.write(f"sent SIGUSR2 to the gateway (pid {found}); waiting for the new generation\n")
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        outcome = _state(pid_file).get("last_restart") or {}
        if outcome.get("n", 0) > before:
            if outcome.get("ok"):
                sys.stdout.write(f"restarted: generation {outcome['generation']} serves\n")
                return 0
            problems = "".join(f"\n  {p}" for p in outcome.get("problems", ()))
            sys.stderr.write(f"restart failed, the running generation serves on: "
                             f"{outcome.get('error')}{problems}\n")  # fmt: skip
            return 1
        time.sleep(0.1)
    sys.stderr.write(f"no outcome within {timeout:g} s: see the gateway's log\n")
    return 1


def _supervisor(pid_file: str) -> int | str:
    """The pid of the gateway supervisor ``pid_file`` names, or why there is none: the file
    must be this user's (or root's), its state file must name the same pid, and that process
    must be a ``gateway serve`` (a stale file's pid may belong to another program now)."""
    try:
        info = os.stat(pid_file)
        pid = int(Path(pid_file).read_text().split()[0])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return f"{pid_file} names no process"
    if info.st_uid not in (os.getuid(), 0):
        return f"{pid_file} belongs to another user"
    if _state(pid_file).get("pid") != pid:
        return f"{pid_file} and its state file disagree (a stale file?)"
    others = {c.encode() for c in COMMANDS if c != "serve"}  # serve is also the default
    if not any(b"gateway" in arg for arg in argv) or others & set(argv):
        return f"process {pid} in {pid_file} is not a gateway's supervisor"
    return pid


def _state(pid_file: str) -> dict[str, Any]:
    try:
        state: dict[str, Any] = orjson.loads(Path(pid_file + ".json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return state
