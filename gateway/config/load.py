"""``load_config()``: a ``Config`` from ``routes.yaml``, or ``ConfigError`` listing every problem
with its YAML path and line; never a half-valid config. Also the cross-reference checks that
the types cannot express, and the JSON Schema of the whole file."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..certs import CertError, check_ca, read_pair
from .schema_export import json_schema
from .types import (
    HMAC_ALGORITHMS,
    HMAC_KEY_BYTES,
    NONE,
    REDIS_SCHEMES,
    RESERVED_SERVICE_NAMES,
    Admin,
    Auth,
    Config,
    Cors,
    Listen,
    Node,
    ServiceAuth,
    Tls,
)
from .validate import Problem, validate
from .yamlsource import LineLoader, explain_yaml_error, load_yaml, substitute_env


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [Problem("", f"cannot read the file: {exc}")]) from None
    return parse_config(text, source, env)


def digest(text: str) -> str:
    """Which config a process serves: the first 12 hex digits of its text's SHA-256."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def parse_config(
    text: str, source: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    env = os.environ if env is None else env
    try:
        data, loader = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [Problem(*explain_yaml_error(text, exc))]) from None
    if data is None:
        raise ConfigError(source, [Problem("", "the file is empty")])
    config, conv = validate(Config, data, env, loader)
    # The cross-references on the text as served: ${VAR} substituted (a node, zone, path or
    # URL from the environment is checked as the one written out).
    problems = list(conv.problems) + [
        Problem(path, message, conv.path_lines.get(path))
        for path, message in _semantic(_substituted(data, env))
    ]
    # What needs the values themselves (after ${VAR}): files, ports. From the sections that
    # are valid when the whole is not, so that these are reported with the rest.
    sections = (
        (config.listen, config.tls, config.admin, config.nodes, config.auth)
        if config is not None
        else _sections(data, env, loader)
    )
    problems += [
        Problem(path, message, conv.path_lines.get(path)) for path, message in _usable(*sections)
    ]
    if config is not None:
        # The same cross-checks on the values after ${VAR} and their conversion: on the raw
        # text, `credentials: "${CORS_CREDENTIALS}"` or `algorithms: ["${JWT_ALG}"]` passed
        # unseen (and `origins: ["${ORIGIN}"]` with ORIGIN=* let any site read credentialed
        # answers).
        seen = {(p.path, p.message) for p in problems}
        plain = _plain(config)
        problems += [
            Problem(path, message, conv.path_lines.get(path))
            for path, message in [*_auth_problems(plain), *_cors_problems(plain)]
            if (path, message) not in seen
        ]
    if config is None or problems:
        problems.sort(key=lambda p: (p.line or 0, p.path))
        raise ConfigError(source, problems)
    return config


Sections = tuple[Listen | None, Tls | None, Admin | None, Mapping[str, Node] | None, Auth | None]


def _sections(data: Any, env: Mapping[str, str], loader: LineLoader) -> Sections:
    """The sections ``_usable`` reads, each converted on its own (None where invalid)."""
    given = data if isinstance(data, dict) else {}

    def section(hint: Any, key: str, default: Any) -> Any:
        return validate(hint, given[key], env, loader)[0] if key in given else default

    return (
        section(Listen, "listen", Listen()),
        section(Tls, "tls", None),
        section(Admin, "admin", Admin()),
        section(Mapping[str, Node], "nodes", None),
        section(Auth, "auth", None),
    )


def _usable(
    listen: Listen | None,
    tls: Tls | None,
    admin: Admin | None,
    nodes: Mapping[str, Node] | None,
    auth: Auth | None = None,
) -> list[tuple[str, str]]:
    """Problems that only a config's values show: the files it names (read and checked now,
    so that ``check`` and a reload refuse what the listener could not load), and listeners
    on one port. A section that is None (invalid) is left out."""
    problems: list[tuple[str, str]] = []
    listeners: list[tuple[str, Listen]] = [("listen", listen)] if listen is not None else []
    if tls is not None and tls.enabled:
        listeners.append(("tls.listen", tls.listen))
        acme = tls.acme if tls.acme is not None and tls.acme.enabled else None
        if not tls.certificates and acme is None:
            problems.append(("tls", "needs certificates, or acme (enabled), or both"))
        for i, files in enumerate(tls.certificates):
            problems += _file_problem(f"tls.certificates[{i}]", read_pair, files.cert, files.key)
        if acme is not None and acme.ca_bundle is not None:
            problems += _file_problem("tls.acme.ca_bundle", check_ca, acme.ca_bundle)
    if admin is not None and admin.listen is not None:
        listeners.append(("admin.listen", admin.listen))
    for i, (where, bound) in enumerate(listeners):
        for other, earlier in listeners[:i]:
            if bound.port == earlier.port and _same_address(bound.host, earlier.host):
                problems.append((f"{where}.port", f"{bound.port} is also {other}'s port"))
                break
    for name, provider in auth.providers.items() if auth is not None else ():
        try:
            trusted = provider.jwks_url is None or _trusted_transport(provider.jwks_url)
        except ValueError as exc:  # "http://[x/keys"
            problems.append((f"auth.providers.{name}.jwks_url", f"not a URL: {exc}"))
            trusted = True
        if not trusted:
            problems.append((
                f"auth.providers.{name}.jwks_url",
                "must be https:// (plain http only to loopback): whoever sits on the path "
                "could hand the gateway keys of their own",
            ))  # fmt: skip
        shortest = max((HMAC_KEY_BYTES.get(a, 0) for a in provider.algorithms), default=0)
        if provider.secret is not None and len(provider.secret.encode()) < shortest:
            problems.append((
                f"auth.providers.{name}.secret",
                f"shorter than {shortest} bytes, the least RFC 7518 allows for "
                f"{', '.join(a for a in provider.algorithms if a in HMAC_KEY_BYTES)}",
            ))  # fmt: skip
    for name, node in (nodes or {}).items():
        if node.tls is None:
            continue
        base = f"nodes.{name}.tls"
        if node.tls.ca is not None:
            problems += _file_problem(f"{base}.ca", check_ca, node.tls.ca)
        if (node.tls.cert is None) != (node.tls.key is None):
            problems.append((base, "cert and key go together (a client certificate needs both)"))
        elif node.tls.cert is not None and node.tls.key is not None:
            problems += _file_problem(f"{base}.cert", read_pair, node.tls.cert, node.tls.key)
    return problems


def _trusted_transport(url: str) -> bool:
    """An https:// URL, or an http:// one to this machine."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "https":
        return True
    host = parsed.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _file_problem(where: str, check: Any, *paths: str) -> list[tuple[str, str]]:
    try:
        check(*paths)
    except CertError as exc:
        return [(where, str(exc))]
    return []


_WILDCARDS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - names of the wildcard address


def _same_address(a: str, b: str) -> bool:
    """Whether two listen hosts would take the same port (a wildcard takes it everywhere)."""
    return a == b or a in _WILDCARDS or b in _WILDCARDS


def _substituted(data: Any, env: Mapping[str, str]) -> Any:
    """The raw data with ``${VAR}`` substituted in its strings (one naming a variable that is
    not set is left as written: the conversion reports it)."""
    if isinstance(data, str):
        if "${" not in data:
            return data
        text, missing = substitute_env(data, env)
        return data if missing else text
    if isinstance(data, dict):
        return {key: _substituted(value, env) for key, value in data.items()}
    if isinstance(data, list):
        return [_substituted(value, env) for value in data]
    return data


def _semantic(data: Any) -> list[tuple[str, str]]:
    """Cross-references the types cannot express, as (path, message) pairs.

    Works on the raw data, defensively, so that these problems are reported together with
    the type errors instead of only after those are fixed.
    """
    if not isinstance(data, dict):
        return []
    return [
        *_service_refs(data),
        *_route_problems(data),
        *_zone_problems(data.get("rate_limits")),
        *_redis_problems(data.get("redis")),
        *_auth_problems(data),
        *_cors_problems(data),
    ]


def _service_refs(data: dict[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    services = data.get("services")
    nodes = data.get("nodes")
    zones = data.get("rate_limits")
    known = _names(nodes)
    zone_names = _names(zones)
    default = data.get("default_rate_limit")
    if isinstance(default, str) and default != NONE and default not in zone_names:
        problems.append(("default_rate_limit", _unknown("rate limit", default, zone_names)))
    for name, service in services.items() if isinstance(services, dict) else ():
        base = f"services.{name}"
        if name in RESERVED_SERVICE_NAMES:
            problems.append((base, f"'{name}' is reserved for the gateway itself"))
        if not isinstance(service, dict):
            continue
        zone = service.get("rate_limit")
        if isinstance(zone, str) and zone != NONE and zone not in zone_names:
            problems.append((f"{base}.rate_limit", _unknown("rate limit", zone, zone_names)))
        seen: set[tuple[str, Any]] = set()
        for path, ref in _node_refs(f"{base}.nodes", service.get("nodes")):
            node = ref.get("node") if isinstance(ref, dict) else ref
            if not isinstance(node, str):
                continue
            if known and node not in known:
                problems.append((path, _unknown("node", node, known)))
            port = ref.get("port") if isinstance(ref, dict) else None
            target = (node, port or service.get("port"))
            if target in seen:
                problems.append((path, f"{node}:{target[1]} is listed twice"))
            seen.add(target)
    return problems


def _route_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Routes that disagree with each other: the same path (and exactness) for methods and
    hosts that overlap, whether the routes are written or a service's own two rules; a `to`
    whose trailing slash differs from its path's; unknown zones; a name used twice."""
    services = data.get("services")
    zones = data.get("rate_limits")
    zone_names = _names(zones)
    problems: list[tuple[str, str]] = []
    claims: dict[tuple[str, bool], list[tuple[str, Any, Any]]] = {}
    names: dict[str, str] = {}

    def claim(where: str, path: str, exact: bool, methods: Any, hosts: Any) -> None:
        for other, other_methods, other_hosts in claims.get((path, exact), ()):
            if _overlap(methods, other_methods) and _overlap(hosts, other_hosts):
                problems.append((where, f"the same path as {other} ({path}) for the same "
                                        "methods and hosts"))  # fmt: skip
                return
        claims.setdefault((path, exact), []).append((where, methods, hosts))

    for name, service in services.items() if isinstance(services, dict) else ():
        if not isinstance(service, dict):
            continue
        rules = service.get("routes")
        if rules is None:  # the service's own two rules
            claim(f"services.{name}", f"/api/{name}", False, None, None)
            if service.get("websocket") or service.get("ws_prefix") is not None:
                claim(f"services.{name} (its /ws/ rule)", f"/ws/{name}", False, None, None)
            continue
        for i, rule in enumerate(rules if isinstance(rules, list) else ()):
            where = f"services.{name}.routes[{i}]"
            if not isinstance(rule, dict):
                continue
            path, to = rule.get("path"), rule.get("to")
            if isinstance(path, str) and isinstance(to, str):
                if path.endswith("/") != to.endswith("/"):
                    problems.append((f"{where}.to", "must end with / exactly when path does"))
                claim(where, path, rule.get("exact") is True, _methods(rule), rule.get("hosts"))
            zone = rule.get("rate_limit")
            if isinstance(zone, str) and zone != NONE and zone not in zone_names:
                problems.append((f"{where}.rate_limit", _unknown("rate limit", zone, zone_names)))
            route_name = rule.get("name")
            if isinstance(route_name, str):
                if route_name in names:
                    problems.append((f"{where}.name", f"also the name of {names[route_name]}"))
                names.setdefault(route_name, where)
    return problems


def _methods(rule: dict[str, Any]) -> Any:
    """A rule's methods as matched: GET takes HEAD too."""
    methods = rule.get("methods")
    if not isinstance(methods, list):
        return methods
    return [*methods, "HEAD"] if "GET" in methods else methods


def _overlap(a: Any, b: Any) -> bool:
    """Whether two lists of methods or hosts (None: any) have something in common."""
    if not isinstance(a, list) or not isinstance(b, list):
        return True
    return bool({str(x).lower() for x in a} & {str(x).lower() for x in b})


def _node_refs(base: str, refs: Any) -> list[tuple[str, Any]]:
    """(path, entry) of every node entry, tiers (lists inside the list) flattened."""
    out: list[tuple[str, Any]] = []
    for i, ref in enumerate(refs if isinstance(refs, list) else ()):
        if isinstance(ref, list):
            out += [(f"{base}[{i}][{j}]", inner) for j, inner in enumerate(ref)]
        else:
            out.append((f"{base}[{i}]", ref))
    return out


def _names(section: Any) -> list[str]:
    """A mapping's names, in order (YAML may make a key a number, a boolean or a date: the
    types report it; here it is only a name, and never compared with a string's order)."""
    return sorted(map(str, section)) if isinstance(section, dict) else []


def _unknown(what: str, name: str, known: list[str]) -> str:
    return f"unknown {what} '{name}' (known: {', '.join(known) or 'none'})"


def _zone_problems(zones: Any) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for name, zone in zones.items() if isinstance(zones, dict) else ():
        if name == NONE:
            problems.append((f"rate_limits.{name}", "'none' means no limit; pick another name"))
        if not isinstance(zone, dict):
            continue
        delay, burst = zone.get("delay"), zone.get("burst", 0)
        if isinstance(delay, int) and isinstance(burst, int) and delay > burst:
            problems.append((f"rate_limits.{name}.delay", f"must not exceed burst ({burst})"))
    return problems


def _redis_problems(redis: Any) -> list[tuple[str, str]]:
    url = redis.get("url") if isinstance(redis, dict) else None
    if isinstance(url, str) and "${" not in url:
        problem = redis_url_problem(url)
        if problem is not None:
            return [("redis.url", problem)]
    return []


def redis_url_problem(url: str) -> str | None:
    """What keeps the limiter's clients from using ``url``, read as they read it (None:
    nothing): a scheme, ports, a database number, a master's name."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in REDIS_SCHEMES:
        known = ", ".join(f"{name}://" for name in REDIS_SCHEMES)
        return f"unknown scheme '{scheme if sep else url}' (use {known})"
    if scheme == "memory":
        return None
    try:
        parsed = urllib.parse.urlsplit(url)
        if scheme == "unix":
            if not parsed.path:
                return "a unix:// URL names the socket's path: unix:///run/redis.sock"
            db = (urllib.parse.parse_qs(parsed.query).get("db") or ["0"])[0]
        elif scheme in ("redis+sentinel", "redis+cluster"):
            redis_hosts(parsed.netloc)  # as the client reads them
            master, _, db = parsed.path.strip("/").partition("/")
            if scheme == "redis+sentinel" and not master:
                return "a redis+sentinel:// URL names the master: redis+sentinel://h:26379/mymaster"
            db = db or "0"
        else:
            parsed.port  # noqa: B018 - raises ValueError for a port that is not one
            db = parsed.path.strip("/") or "0"
    except ValueError as exc:
        return f"not a URL the client can use: {exc}"
    if not db.isdigit():
        return f"the database must be a number, not '{db}'"
    return None


def redis_hosts(netloc: str) -> list[tuple[str, int]]:
    """A Sentinel or Cluster URL's hosts, ``[user:pass@]host:port,host:port`` → [(host,
    port), ...] (Sentinel's port by default); ValueError for a port that is not one. The
    limiter's client reads them with this, and ``check`` with it too."""
    hosts = []
    for item in netloc.rpartition("@")[2].split(","):
        host, sep, port = item.rpartition(":")
        if not sep:
            hosts.append((item, 26379))
        elif port.isdigit() and 0 < int(port) < 65536:
            hosts.append((host.strip("[]"), int(port)))
        else:
            raise ValueError(f"'{item}' is not host[:port]")
    return hosts


def _auth_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Providers that cannot verify what they accept, and services naming what is not there."""
    problems: list[tuple[str, str]] = []
    auth = data.get("auth")
    providers = auth.get("providers") if isinstance(auth, dict) else None
    known = _names(providers)
    for name, provider in providers.items() if isinstance(providers, dict) else ():
        if not isinstance(provider, dict):
            continue
        base = f"auth.providers.{name}"
        algorithms = provider.get("algorithms")
        algorithms = set(algorithms) if isinstance(algorithms, list) else set()
        keyed = [k for k in ("jwks_url", "jwks_file") if provider.get(k) is not None]
        if algorithms & HMAC_ALGORITHMS and algorithms - HMAC_ALGORITHMS:
            problems.append((f"{base}.algorithms", "HS* and asymmetric algorithms never together "
                             "(one key could then verify the other's tokens)"))  # fmt: skip
        if algorithms & HMAC_ALGORITHMS and provider.get("secret") is None:
            problems.append((base, "HS* tokens need a secret"))
        if algorithms - HMAC_ALGORITHMS and not keyed:
            problems.append((base, "asymmetric tokens need jwks_url or jwks_file"))
        if len(keyed) > 1:
            problems.append((base, "jwks_url or jwks_file, not both"))
        if provider.get("secret") is not None and not algorithms & HMAC_ALGORITHMS:
            problems.append((f"{base}.secret", "only HS* algorithms use a secret"))
    for where, rule in _auth_rules(data):
        mode = (
            rule if isinstance(rule, str) else rule.get("mode") if isinstance(rule, dict) else None
        )
        if mode in ("required", "optional") and not known:
            problems.append((where, f"auth: {mode} needs providers under the top-level auth"))
        named = rule.get("providers") if isinstance(rule, dict) else None
        for i, provider in enumerate(named if isinstance(named, list) else ()):
            if isinstance(provider, str) and known and provider not in known:
                problems.append((f"{where}.providers[{i}]", _unknown("provider", provider, known)))
    return problems


def _plain(config: Config) -> dict[str, Any]:
    """What ``_auth_problems`` and ``_cors_problems`` read, from a converted config, in the
    shape of the raw data they read it from."""

    def cors(value: Cors | str | None) -> Any:
        if isinstance(value, Cors):
            return {"origins": list(value.origins), "credentials": value.credentials}
        return value

    def auth(value: ServiceAuth | None) -> Any:
        if value is None:
            return None
        named = None if value.providers is None else list(value.providers)
        return {"mode": value.mode, "providers": named}

    providers = config.auth.providers if config.auth is not None else {}
    return {
        "cors": cors(config.cors),
        "auth": {
            "providers": {
                name: {
                    "algorithms": list(p.algorithms),
                    "secret": p.secret,
                    "jwks_url": p.jwks_url,
                    "jwks_file": p.jwks_file,
                }
                for name, p in providers.items()
            }
        }
        if config.auth is not None
        else None,
        "services": {
            name: {
                "cors": cors(service.cors),
                "auth": auth(service.auth),
                "routes": [
                    {"cors": cors(rule.cors), "auth": auth(rule.auth)}
                    for rule in service.routes or ()
                ],
            }
            for name, service in config.services.items()
        },
    }


def _auth_rules(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """(path, auth) of every service and route that sets auth."""
    found: list[tuple[str, Any]] = []
    services = data.get("services")
    for name, service in services.items() if isinstance(services, dict) else ():
        if not isinstance(service, dict):
            continue
        if service.get("auth") is not None:
            found.append((f"services.{name}.auth", service["auth"]))
        rules = service.get("routes")
        for i, rule in enumerate(rules if isinstance(rules, list) else ()):
            if isinstance(rule, dict) and rule.get("auth") is not None:
                found.append((f"services.{name}.routes[{i}].auth", rule["auth"]))
    return found


def _cors_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """``*`` with credentials: browsers refuse it, and echoing any origin instead would let
    every site read a user's answers. ``null`` likewise: any site can send it (from a
    sandboxed iframe, a data: URL), so with credentials it reads a user's answers too."""
    sections = [("cors", data.get("cors"))]
    services = data.get("services")
    for name, service in services.items() if isinstance(services, dict) else ():
        if isinstance(service, dict):
            sections.append((f"services.{name}.cors", service.get("cors")))
            rules = service.get("routes")
            for i, rule in enumerate(rules if isinstance(rules, list) else ()):
                if isinstance(rule, dict):
                    sections.append((f"services.{name}.routes[{i}].cors", rule.get("cors")))
    return [
        (f"{where}.origins", f"'{origin}' cannot go with credentials: true ({why})")
        for where, cors in sections
        if isinstance(cors, dict)
        and cors.get("credentials") is True
        and isinstance(cors.get("origins"), list)
        for origin, why in (("*", "list the origins"), ("null", "any site can send it"))
        if origin in cors["origins"]
    ]


def config_json_schema() -> dict[str, Any]:
    schema = json_schema(Config)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://daarion.city/schemas/gateway-routes.json",
        "title": "DAARION gateway routes.yaml",
        **schema,
    }
