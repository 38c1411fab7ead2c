"""The types of ``routes.yaml``: frozen dataclasses that *are* the schema.

Validation (``validate.py``) and the JSON Schema export (``schema_export.py``) both read these
hints, defaults and ``doc`` texts, so there is no second description of the format to drift
apart. A layered setting (timeouts, health, ejection, retries: a service's own, else the top
level's, else the built-in one) is ``None`` when unset; its built-in default is written once,
as the field's ``fallback``, and the ``DEFAULT_*`` objects below are made from those.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, ClassVar, Final, Literal, TypeVar

from .validate import Check, MinItems, Pattern, Range, doc

NAME_RE = r"[a-z0-9][a-z0-9_-]{0,62}"
Name = Annotated[str, Pattern(NAME_RE, "a name (lowercase letters, digits, '-', '_')")]
Port = Annotated[int, Range(min=1, max=65535)]
Seconds = Annotated[float, Range(gt=0, max=86400)]
# Close codes for "the upstream went away": 1011 first (every client knows it; 1014 is not in
# RFC 6455's own list, and some clients fail the connection on it).
UpstreamGoneCode = Literal[1011, 1014, 1001, 1012, 1013]
Host = Annotated[
    str,
    Pattern(
        r"[A-Za-z0-9._-]+|\[?[0-9A-Fa-f:.]+\]?",
        "a host name or IP address (no scheme, port or path)",
    ),
]
# A path prefix: empty, or segments of unreserved/sub-delim characters, never "." or "..".
PREFIX_RE = r"(/(?!\.\.?(?:/|$))[A-Za-z0-9._~!$&'()*+,;=:@-]+)*"
Prefix = Annotated[str, Pattern(PREFIX_RE, "a path prefix like /search, or empty")]

# Names the gateway uses for itself in metric labels and logs.
RESERVED_SERVICE_NAMES = frozenset({"gateway", "unmatched"})
NONE = "none"  # rate_limit: none / default_rate_limit: none
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster", "memory")
Rate = Annotated[str, Pattern(r"[1-9][0-9]{0,8}r/[sm]", "a rate like 10r/s or 30r/m")]
KeyPart = Annotated[
    str,
    Pattern(
        r"client_ip|service|user|header:[A-Za-z0-9!#$%&'*+.^_`|~-]+",
        "client_ip, service, user or header:<Name>",
    ),
]
Origin = Annotated[
    str,
    Pattern(
        r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|null", "an origin like https://app.daarion.city"
    ),
]


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


Cidr = Annotated[
    str,
    Pattern(r"[0-9A-Fa-f:.]+(/[0-9]{1,3})?", "an address or CIDR like 10.0.0.0/8"),
    Check(_is_network, "an address or CIDR like 10.0.0.0/8"),
]


@dataclass(frozen=True)
class Listen:
    """Where the gateway accepts client connections."""

    host: str = doc("Address to listen on.", "0.0.0.0")  # noqa: S104 - a gateway listens publicly
    port: Port = doc("TCP port to listen on.", 8080)


HostName = Annotated[
    str,
    Pattern(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?", "a lowercase host name like app.daarion.space"),
]
FilePath = Annotated[str, Pattern(r"[^\x00]+", "a file path")]
# What a header's value may hold (RFC 9110 5.5, visible ASCII and spaces): a line break or
# another control character would make every answer that carries it fail to be written.
HeaderValue = Annotated[
    str, Pattern(r"[!-~]([\t !-~]*[!-~])?", "a header value (visible ASCII, inner spaces)")
]


@dataclass(frozen=True)
class NodeTls:
    """HTTPS (and WSS) to every service of a node, and to its health probes."""

    ca: FilePath | None = doc(
        "PEM file of the CA(s) the node's certificate must chain to (default: the system store).",
        None,
    )
    server_name: HostName | None = doc(
        "The name the node's certificate must carry, and the SNI sent (default: the node's host).",
        None,
    )
    cert: FilePath | None = doc(
        "PEM file of a client certificate to present (mutual TLS between nodes); needs key.",
        None,
    )
    key: FilePath | None = doc("PEM file of that client certificate's private key.", None)
    insecure_skip_verify: bool = doc(
        "Accept any certificate from the node (a warning is logged at every start): for a "
        "lab, never for production.",
        False,
    )


@dataclass(frozen=True)
class Node:
    """A machine where services run."""

    host: Host = doc("Host name or IP address of the node.")
    tls: NodeTls | None = doc(
        "Reach the node over HTTPS and WSS, its certificate verified; absent: plain HTTP.", None
    )


@dataclass(frozen=True)
class NodeRef:
    """One place a service runs: a node, optionally on a port other than the service's."""

    __shorthand__: ClassVar[str] = "node"
    node: Name = doc("Name of a node under `nodes`.")
    port: Port | None = doc("Port on that node; defaults to the service's port.", None)


@dataclass(frozen=True)
class Timeouts:
    """Upstream timeouts in seconds. Unset keys fall back to the top-level `timeouts`, then to
    the built-in defaults."""

    connect: Seconds | None = doc(
        "Time to get a connection to the upstream, including waiting for a free slot under "
        "`max_connections`.",
        None,
        fallback=0.5,
    )
    response: Seconds | None = doc(
        "Time to wait for the upstream's response headers after the request is sent, and the "
        "longest pause allowed while reading its body.",
        None,
        fallback=30.0,
    )


@dataclass(frozen=True)
class HealthCheck:
    """Active health checks of each target. Unset keys fall back to the top-level `health`,
    then to the built-in defaults."""

    path: (
        Annotated[str, Pattern(r"/[A-Za-z0-9._~!$&'()*+,;=:@/?%-]*", "a path like /health")] | None
    ) = doc("Path probed on each target (some services use /healthz).", None, fallback="/health")
    interval: Seconds | None = doc("Seconds between probes of a target.", None, fallback=5.0)
    unhealthy_interval: Seconds | None = doc(
        "Seconds between probes while no target of the service is usable (Envoy's "
        "unhealthy_interval): a service that returns is served again within about this "
        "times rise.",
        None,
        fallback=1.0,
    )
    timeout: Seconds | None = doc("Seconds a probe may take.", None, fallback=1.0)
    rise: Annotated[int, Range(min=1, max=100)] | None = doc(
        "Consecutive passes that bring a target back.", None, fallback=2
    )
    fall: Annotated[int, Range(min=1, max=100)] | None = doc(
        "Consecutive failures, of probes or of real traffic, that take a target out.",
        None,
        fallback=3,
    )
    enabled: bool | None = doc("Probe at all.", None, fallback=True)


@dataclass(frozen=True)
class Ejection:
    """How long real-traffic failures take a target out: ``base`` seconds the first time, a
    ``base`` more each time it repeats, at most ``max``."""

    base: Seconds | None = doc("Seconds out after the first ejection.", None, fallback=5.0)
    max: Seconds | None = doc("Longest ejection in seconds.", None, fallback=60.0)


DEFAULT_RETRIES: Final = 1
Retries = Annotated[int, Range(min=0, max=5)]


@dataclass(frozen=True)
class RateLimit:
    """A limit_req zone: nginx's leaky bucket, shared by every gateway through Redis."""

    rate: Rate = doc("Sustained rate: Nr/s or Nr/m.")
    burst: Annotated[int, Range(min=0, max=1_000_000)] = doc(
        "Requests allowed above the rate at once (nginx burst=).", 0
    )
    key: Annotated[tuple[KeyPart, ...], MinItems(1)] = doc(
        "What identifies a bucket: client_ip, service, user, header:<Name>. A zone without "
        "'service' is one bucket across every service that uses it.",
        ("client_ip",),
    )
    delay: Annotated[int, Range(min=0, max=1_000_000)] | None = doc(
        "Requests of the burst served at once; later ones are delayed to the rate, not "
        "refused (nginx delay=). Default: the whole burst (nodelay).",
        None,
    )
    dry_run: bool = doc("Count and log what would be refused, refuse nothing.", False)
    status: Annotated[int, Range(min=400, max=599)] = doc(
        "Status of a refusal (429; nginx answers 503).", 429
    )
    headers: bool = doc("Send RateLimit headers on allowed responses too.", True)


@dataclass(frozen=True)
class RedisSettings:
    """Where rate-limit state is shared. Without this section limits are per process."""

    url: str = doc(
        "redis://, rediss://, unix://, redis+sentinel://host:port[,host:port]/<master>[/db], "
        "redis+cluster://host:port[,host:port], or memory:// for per-process limits.",
        "redis://127.0.0.1:6379/0",
    )
    timeout: Seconds = doc(
        "Longest wait for any Redis call (an answer already waiting unread in the socket "
        "then gets up to 30 ms more to be read: a late event loop, not a slow Redis).",
        0.05,
    )
    on_error: Literal["local", "allow", "deny"] = doc(
        "While Redis fails: enforce the same limits per process (local), let everything "
        "through (allow) or refuse everything limited (deny).",
        "local",
    )
    prefix: str = doc("Prefix of the gateway's keys in Redis.", "daarion:rl:")


Size = (
    Annotated[int, Range(min=0, max=2**53)]
    | Annotated[str, Pattern(r"[0-9]{1,15}[kKmMgG]?", "a size like 100m, 32k or 1048576")]
)


@dataclass(frozen=True)
class RequestLimits:
    """Limits on one request, per service (key by key over the top-level `limits`)."""

    client_max_body_size: Size | None = doc(
        "Largest request body (nginx's client_max_body_size): a bigger Content-Length gets 413 "
        "before anything is forwarded; 0: no limit.",
        None,
        fallback="100m",
    )
    client_body_timeout: Seconds | None = doc(
        "Seconds allowed between two reads of a request body (nginx's client_body_timeout); "
        "longer gets 408.",
        None,
        fallback=60.0,
    )
    underscores_in_headers: bool | None = doc(
        "Forward request headers whose names hold '_' (nginx's underscores_in_headers); they "
        "are dropped otherwise, against X_Forwarded_For-style spoofing.",
        None,
        fallback=False,
    )


@dataclass(frozen=True)
class Limits(RequestLimits):
    """What one client may hold: request limits (defaults for every service) and connection
    limits (the whole gateway: top level only)."""

    client_header_timeout: Seconds | None = doc(
        "Seconds for a whole request head; longer gets 408 and the connection is closed.",
        None,
        fallback=60.0,
    )
    client_header_buffer: Size | None = doc(
        "Largest request head, request line and headers together (nginx's "
        "large_client_header_buffers 4 8k); bigger gets 431.",
        None,
        fallback="32k",
    )
    keepalive_timeout: Seconds | None = doc(
        "Seconds an idle keep-alive client connection is kept open (a reload applies from each "
        "connection's next answer on).",
        None,
        fallback=75.0,
    )
    send_timeout: Seconds | None = doc(
        "Seconds a client may take none of its answer while the gateway has more for it "
        "(nginx's send_timeout); longer and the connection is closed (0: no limit).",
        None,
        fallback=60.0,
    )
    max_connections_per_client: Annotated[int, Range(min=1, max=1_000_000)] | None = doc(
        "Open connections per client address (nginx's limit_conn); more are closed at once.",
        None,
        fallback=256,
    )
    max_client_connections: Annotated[int, Range(min=1, max=10_000_000)] | None = doc(
        "Open client connections in all, per process (keep it below the open-files limit): at "
        "the limit the longest-idle keep-alive connections are closed first, then new ones "
        "refused.",
        None,
        fallback=16384,
    )


# A public path, or what it maps to upstream: "/", or segments (never "." or ".."), with or
# without a trailing "/".
# No ";": a path parameter in a route could not be told from one a request adds (routing.py).
ROUTE_PATH_RE = r"/|(/(?!\.\.?(?:/|$))[A-Za-z0-9._~!$&'()*+,=:@-]+)+/?"
RoutePath = Annotated[str, Pattern(ROUTE_PATH_RE, "a path like /api/city/ or /ws/events")]
Method = Annotated[str, Pattern(r"[A-Z][A-Z-]{0,19}", "an HTTP method like GET")]


HeaderName = Annotated[
    str, Pattern(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}", "a header name like X-User-Id")
]
Algorithm = Literal[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
]  # fmt: skip
# The HS* algorithms and the least secret each takes: its hash's size (RFC 7518 3.2).
HMAC_KEY_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}
HMAC_ALGORITHMS: Final = frozenset(HMAC_KEY_BYTES)


@dataclass(frozen=True)
class AuthProvider:
    """Who issues the tokens a service accepts, and how they are checked (RFC 8725)."""

    algorithms: Annotated[tuple[Algorithm, ...], MinItems(1)] = doc(
        "The only algorithms accepted (the token's alg just picks among them); HS* and the "
        "asymmetric ones never together."
    )
    secret: str | None = doc("The shared secret of HS* tokens (from the environment).", None)
    jwks_url: Annotated[str, Pattern(r"https?://\S+", "an http(s):// URL")] | None = doc(
        "Where the public keys of asymmetric tokens are (a JWKS), fetched and cached.", None
    )
    jwks_file: FilePath | None = doc("A JWKS file instead of jwks_url.", None)
    issuer: str | None = doc("The iss a token must carry (checked when set).", None)
    audience: str | None = doc("The aud a token must carry (checked when set).", None)
    claims: Mapping[
        Annotated[str, Pattern(r"[A-Za-z_][A-Za-z0-9_]{0,63}", "a claim name")], str
    ] = doc(
        "Claims that must have these values (DAARION: type: access, so that a refresh "
        "token never passes).",
        factory=lambda: MappingProxyType({}),
    )
    leeway: Annotated[float, Range(min=0, max=300)] = doc(
        "Seconds of clock skew allowed for exp, nbf and iat.", 30.0
    )
    jwks_refresh: Seconds = doc("Seconds between background refreshes of jwks_url.", 300.0)
    jwks_timeout: Seconds = doc("Seconds a JWKS fetch may take.", 5.0)


@dataclass(frozen=True)
class Auth:
    """JWT authentication at the edge: the token checked once, the services given the
    identity."""

    providers: Annotated[Mapping[Name, AuthProvider], MinItems(1)] = doc("Token issuers by name.")
    identity_headers: Mapping[
        Annotated[str, Pattern(r"[A-Za-z_][A-Za-z0-9_]{0,63}", "a claim name")], HeaderName
    ] = doc(
        "Request headers set from the verified token's claims (lists joined by commas); "
        "removed from every incoming request, whatever its spelling.",
        factory=lambda: MappingProxyType(
            {"sub": "X-User-Id", "roles": "X-User-Roles", "email": "X-User-Email"}
        ),
    )
    websocket_token: tuple[
        Annotated[
            str, Pattern(r"query:[A-Za-z0-9_.-]{1,64}|subprotocol", "query:<name> or subprotocol")
        ],
        ...,
    ] = doc(
        "Where a WebSocket handshake may carry its token besides Authorization (browsers "
        "cannot set headers): query:<name> (removed from the query sent upstream) and "
        "subprotocol (bearer.<token>, removed from the offer sent upstream).",
        ("query:access_token", "subprotocol"),
    )
    realm: Annotated[str, Pattern(r"[A-Za-z0-9._ -]{1,64}", "a short name")] = doc(
        "The realm of WWW-Authenticate in 401 and 403 answers (RFC 6750).", "daarion"
    )
    cache_size: Annotated[int, Range(min=0, max=1_000_000)] = doc(
        "Verified tokens remembered until they expire (0: none), so that a repeated token "
        "costs one signature check.",
        10_000,
    )


@dataclass(frozen=True)
class ServiceAuth:
    """Whether a service (or route) needs a token."""

    __shorthand__: ClassVar[str] = "mode"
    mode: Literal["required", "optional", "none"] = doc(
        "required: no valid token gets 401; optional: no token passes anonymously, an invalid "
        "one gets 401; none: no check."
    )
    providers: Annotated[tuple[Name, ...], MinItems(1)] | None = doc(
        "Providers whose tokens are accepted (default: every one).", None
    )
    roles: Annotated[tuple[str, ...], MinItems(1)] | None = doc(
        "Any of these roles (the token's roles claim) is needed, else 403.", None
    )


def _is_cors_origin(text: str) -> bool:
    """Labels that are host name labels, a port that is a port (beyond the pattern)."""
    if text in ("null", "*"):
        return True
    host, _, port = text.partition("://")[2].removeprefix("*.").partition(":")
    labels = host.split(".")
    return all(x and x[0] != "-" and x[-1] != "-" for x in labels) and (
        not port or 0 < int(port) < 65536
    )


CORS_ORIGIN_HINT: Final = "an origin like https://app.daarion.city or https://*.daarion.city"
CorsOrigin = Annotated[
    str,
    Pattern(r"https?://(\*\.)?[A-Za-z0-9.-]+(:[0-9]{1,5})?|null|\*", CORS_ORIGIN_HINT),
    Check(_is_cors_origin, CORS_ORIGIN_HINT),
]


@dataclass(frozen=True)
class Cors:
    """CORS owned by the gateway (aiohttp-cors's semantics): preflights answered at the edge,
    one consistent set of headers on every answer."""

    origins: Annotated[tuple[CorsOrigin, ...], MinItems(1)] = doc(
        "Allowed origins: exact (scheme, host, port), https://*.domain (subdomains, on a dot "
        "boundary), null (only when listed), or * (any; not with credentials)."
    )
    credentials: bool = doc("Allow credentials (cookies, Authorization).", False)
    methods: Annotated[tuple[Method, ...], MinItems(1)] = doc(
        "Methods a preflight allows.", ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    )
    headers: tuple[HeaderName, ...] = doc(
        "Request headers a preflight allows.", ("Authorization", "Content-Type", "X-Request-ID")
    )
    expose: tuple[HeaderName, ...] = doc(
        "Response headers scripts may read.",
        ("X-Request-ID", "RateLimit", "RateLimit-Policy", "Retry-After"),
    )
    max_age: Annotated[int, Range(min=0, max=86400)] = doc(
        "Seconds a browser may cache a preflight.", 600
    )


@dataclass(frozen=True)
class SecurityHeaders:
    """Headers added to answers that do not already carry them; null leaves one out."""

    content_type_options: HeaderValue | None = doc("X-Content-Type-Options.", "nosniff")
    frame_options: HeaderValue | None = doc("X-Frame-Options.", "DENY")
    referrer_policy: HeaderValue | None = doc("Referrer-Policy.", "no-referrer")


@dataclass(frozen=True)
class RouteRule:
    """A public path a service serves, and the upstream path it maps to. The longest matching
    path wins, across every service."""

    path: RoutePath = doc(
        "The public path: a prefix that matches on a segment boundary (/public/ matches "
        "/public/x, not /publicity), or the whole path with exact."
    )
    to: RoutePath = doc(
        "What replaces the matched path upstream, byte for byte; ends with / exactly when "
        "path does."
    )
    exact: bool = doc("Match the whole path only.", False)
    methods: Annotated[tuple[Method, ...], MinItems(1)] | None = doc(
        "Only these methods (default: any); a path that matches with another method gets 405.",
        None,
    )
    hosts: Annotated[tuple[HostName, ...], MinItems(1)] | None = doc(
        "Only requests for these host names (the Host header without its port; default: any).",
        None,
    )
    name: Name | None = doc(
        "The route's name in metrics and log lines (default: <service>#<index>).", None
    )
    websocket: bool = doc("WebSocket handshakes only (else plain HTTP only).", False)
    rate_limit: Name | None = doc(
        "A zone under rate_limits, or none, instead of the service's.", None
    )
    timeouts: Timeouts = doc("Timeouts over the service's, key by key.", Timeouts())
    retries: Retries | None = doc("Retries instead of the service's.", None)
    limits: RequestLimits = doc("Request limits over the service's, key by key.", RequestLimits())
    ws_origins: tuple[Origin, ...] | Literal["any"] | None = doc(
        "ws_origins instead of the service's.", None
    )
    auth: ServiceAuth | None = doc("auth instead of the service's.", None)
    cors: Cors | Literal["none"] | None = doc("cors instead of the service's.", None)
    ws_max_message: Annotated[int, Range(min=1, max=64 * 1024 * 1024)] | None = doc(
        "ws_max_message instead of the service's.", None
    )
    ws_ping_interval: Seconds | None = doc("ws_ping_interval instead of the service's.", None)
    ws_idle_timeout: Seconds | None = doc("ws_idle_timeout instead of the service's.", None)
    ws_extensions: bool | None = doc("ws_extensions instead of the service's.", None)
    ws_upstream_gone_code: UpstreamGoneCode | None = doc(
        "ws_upstream_gone_code instead of the service's.", None
    )
    cookie_path: bool = doc(
        "Rewrite Set-Cookie Path= from the upstream path (to) to the public one (path).", False
    )


@dataclass(frozen=True)
class Service:
    """A service reachable as /api/<name>/... (and /ws/<name>/...)."""

    port: Port = doc("The service's port on its nodes.")
    nodes: Annotated[
        tuple[NodeRef | Annotated[tuple[NodeRef, ...], MinItems(1)], ...], MinItems(1)
    ] = doc(
        "Nodes the service runs on, in order of preference; a list inside the list is a "
        "tier of nodes that share the load round-robin."
    )
    http_prefix: Prefix | None = doc(
        "Path prefix on the upstream that replaces /api/<name>; default /<name>; "
        "empty strips the whole /api/<name>.",
        None,
    )
    timeouts: Timeouts = doc("Upstream timeouts for this service.", Timeouts())
    max_connections: Annotated[int, Range(min=1, max=100_000)] = doc(
        "Most requests in flight to this service at once (per gateway process); "
        "others wait up to the connect timeout, then get 503.",
        256,
    )
    rate_limit: Name | None = doc(
        "A zone under rate_limits, or none; default: default_rate_limit.", None
    )
    websocket: bool = doc(
        "Accept WebSocket sessions on /ws/<name>/... (a ws_prefix implies it).", False
    )
    ws_prefix: Prefix | None = doc(
        "Path prefix on the upstream that replaces /ws/<name>; default /ws/<name>.", None
    )
    ws_origins: tuple[Origin, ...] | Literal["any"] | None = doc(
        "Origins allowed to open WebSocket sessions (e.g. https://app.daarion.city); default: "
        "no Origin (not a browser), the same origin as the request's Host, or one cors allows; "
        "any: every origin.",
        None,
    )
    auth: ServiceAuth | None = doc(
        "Whether requests need a token: required, optional or none (the default), or "
        "{mode, providers, roles}.",
        None,
    )
    cors: Cors | Literal["none"] | None = doc(
        "CORS for this service instead of the top level's; none: the gateway adds none and "
        "passes the upstream's through.",
        None,
    )
    ws_max_message: Annotated[int, Range(min=1, max=64 * 1024 * 1024)] = doc(
        "Largest WebSocket message in bytes; a bigger one closes the session with 1009.",
        1024 * 1024,
    )
    ws_ping_interval: Seconds = doc(
        "Seconds of silence after which the gateway pings each leg of a session; a peer that "
        "does not answer within half of it is taken as dead.",
        20.0,
    )
    ws_idle_timeout: Seconds | None = doc(
        "Close sessions without any message for this many seconds (default: never).", None
    )
    ws_extensions: bool = doc(
        "Pass the client's WebSocket extension offer (permessage-deflate) to the upstream and "
        "the one it accepts back; frames stay compressed through the gateway, so "
        "ws_max_message counts compressed bytes. false: offer none (uncompressed sessions).",
        True,
    )
    ws_upstream_gone_code: UpstreamGoneCode = doc(
        "Close code the client gets when the upstream's connection ends without a close "
        "frame: 1011 (understood by every client), or 1014 (bad gateway; RFC 6455's first "
        "list lacks it), 1001, 1012 or 1013.",
        1011,
    )
    health: HealthCheck = doc("Active health checks for this service.", HealthCheck())
    retries: Retries | None = doc(
        "Extra attempts on another target when that is safe.", None, fallback=DEFAULT_RETRIES
    )
    ejection: Ejection = doc("Passive ejection of failing targets.", Ejection())
    limits: RequestLimits = doc("Request limits for this service.", RequestLimits())
    routes: tuple[RouteRule, ...] | None = doc(
        "The service's public paths. Without it: /api/<name>/ (to http_prefix) and, for a "
        "WebSocket service, /ws/<name>/ (to ws_prefix).",
        None,
    )


@dataclass(frozen=True)
class CertificateFiles:
    """A certificate served on the TLS listener, for the names it carries."""

    cert: FilePath = doc("PEM file: the certificate, then its chain (certbot's fullchain.pem).")
    key: FilePath = doc("PEM file: its private key (certbot's privkey.pem).")


# A domain an ACME CA can issue for over http-01: a host name with a dot, no wildcard.
AcmeDomain = Annotated[
    str,
    Pattern(
        r"(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]{0,61}"
        r"[a-z0-9])?",
        "a lowercase domain like gateway.daarion.city",
    ),
]


@dataclass(frozen=True)
class Acme:
    """Certificates ordered and renewed automatically from an ACME CA (RFC 8555, http-01)."""

    domains: Annotated[tuple[AcmeDomain, ...], MinItems(1)] = doc(
        "Names the certificate is for (one certificate for all of them); each must reach "
        "this gateway's plain listener on port 80."
    )
    directory: Annotated[str, Pattern(r"https://\S+", "an https:// URL")] = doc(
        "The CA's directory URL.", "https://acme-v02.api.letsencrypt.org/directory"
    )
    email: Annotated[str, Pattern(r"[^@\s]+@[^@\s]+", "an email address")] | None = doc(
        "Contact for the CA's expiry notices.", None
    )
    storage: FilePath = doc(
        "Directory for the account key and certificates (mode 0600), reused on restart.",
        "/var/lib/daarion-gateway/acme",
    )
    ca_bundle: FilePath | None = doc(
        "Extra CA (PEM) trusted for the directory's HTTPS (a test CA such as Pebble's).", None
    )
    renew_before_days: Annotated[int, Range(min=1, max=365)] = doc(
        "Renew this many days before the certificate expires.", 30
    )
    enabled: bool = doc("Order certificates at all (lets the environment turn ACME off).", True)


@dataclass(frozen=True)
class Hsts:
    """Strict-Transport-Security on HTTPS answers (RFC 6797)."""

    max_age: Annotated[int, Range(min=0, max=2**31 - 1)] = doc(
        "Seconds browsers keep to HTTPS (0 tells them to forget).", 31536000
    )
    include_subdomains: bool = doc("For every subdomain too.", False)
    preload: bool = doc("Ask to be preloaded into browsers (needs a year and subdomains).", False)


@dataclass(frozen=True)
class Tls:
    """The HTTPS listener: TLS 1.2+ with certificates from files, from ACME, or both."""

    listen: Listen = doc("Where HTTPS is served.", Listen(port=443))
    certificates: tuple[CertificateFiles, ...] = doc(
        "Certificate files; the one whose names match the client's SNI is served (exact or "
        "*. wildcard), else the first.",
        (),
    )
    acme: Acme | None = doc("Automatic certificates.", None)
    min_version: Literal["1.2", "1.3"] = doc("Oldest TLS version accepted.", "1.2")
    hsts: Hsts | None = doc("HSTS on HTTPS answers; null: none.", Hsts())
    redirect_http: bool = doc(
        "The plain listener answers 308 to https:// (but ACME challenges and the gateway's "
        "own endpoints).",
        True,
    )
    public_port: Port | None = doc(
        "The HTTPS port clients reach, in redirects (behind a port mapping; default: the port "
        "the listener is bound to).",
        None,
    )
    handshake_timeout: Seconds = doc(
        "Seconds a client gets to finish its TLS handshake before it is closed.", 10.0
    )
    enabled: bool = doc("Serve HTTPS at all (lets the environment turn TLS on).", True)


@dataclass(frozen=True)
class Lifecycle:
    """How the gateway stops (SIGTERM, docker stop: drain first, then close) and restarts
    (SIGUSR2, daarion-gateway restart: a new generation on the same sockets)."""

    drain_delay: Annotated[float, Range(min=0, max=300)] = doc(
        "Seconds the gateway keeps accepting and serving after SIGTERM, /health answering 503 "
        "and every answer saying Connection: close, so that load balancers and clients move "
        "away before the listeners close.",
        5.0,
    )
    shutdown_timeout: Annotated[float, Range(min=0, max=600)] = doc(
        "Seconds requests in flight then get to finish (needs a restart).", 10.0
    )
    ws_drain: Annotated[float, Range(min=0, max=3600)] = doc(
        "Seconds WebSocket sessions get to end on their own before they are closed with "
        "1001 (0: at once, when the listeners close).",
        0.0,
    )
    pid_file: FilePath | None = doc(
        "Where serve writes its pid (and, beside it as .json, its generation and how the "
        "last restart ended), which daarion-gateway restart reads; default: "
        "gateway-<port>.pid in $XDG_RUNTIME_DIR, else in a private daarion-gateway-<uid> "
        "directory in the temporary directory.",
        None,
    )


@dataclass(frozen=True)
class Tracing:
    """Distributed tracing: one OpenTelemetry span per sampled request, exported over OTLP/HTTP
    (protobuf) to a collector (Jaeger, Tempo, the OpenTelemetry Collector). Without this
    section the gateway still passes W3C Trace Context on (traceparent, tracestate) and logs
    each request's trace_id, but records nothing. Changes need a restart."""

    otlp_endpoint: Annotated[str, Pattern(r"https?://\S+", "an http(s):// URL")] = doc(
        "The collector's OTLP/HTTP traces URL, path included, e.g. http://tempo:4318/v1/traces."
    )
    sample_ratio: Annotated[float, Range(min=0, max=1)] = doc(
        "Share of requests traced when no trusted parent decides (0 to 1).", 0.01
    )
    sampled_from: Literal["trusted_proxies", "anyone"] = doc(
        "Whose sampled flag in an incoming traceparent is followed: trusted_proxies' only "
        "(a client's trace id is continued, but sample_ratio decides, so a client cannot "
        "make every request traced), or anyone's.",
        "trusted_proxies",
    )
    service_name: Annotated[str, Pattern(r"\S{1,128}", "a name without spaces")] = doc(
        "The service.name the spans carry.", "daarion-gateway"
    )
    queue_size: Annotated[int, Range(min=1, max=1_000_000)] = doc(
        "Spans held for export at most; more are dropped and counted "
        "(gateway_trace_spans_dropped_total), never waited for.",
        2048,
    )
    export_timeout: Annotated[float, Range(gt=0, max=60)] = doc(
        "Seconds one export to the collector may take, retries included; its spans are "
        "dropped and counted after that.",
        5.0,
    )


LOOPBACK: Final = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class Admin:
    """The operator's endpoints: /metrics and /gateway/* (/health is on every listener)."""

    listen: Listen | None = doc(
        "A listener of their own: they are served there and on no public one.", None
    )
    allow: tuple[Cidr, ...] = doc(
        "Client addresses (CIDRs) that may reach them; others get 404. The client address is "
        "the one the rate limiter uses (the peer, or what trusted proxies report).",
        LOOPBACK,
    )


@dataclass(frozen=True)
class Config:
    """The DAARION gateway's routing table (routes.yaml)."""

    nodes: Mapping[Name, Node] = doc("Machines where services run, by name.")
    services: Mapping[Name, Service] = doc("Services by name: /api/<name>/... routes to them.")
    listen: Listen = doc("Where the gateway listens (plain HTTP).", Listen())
    tls: Tls | None = doc("HTTPS: TLS termination, certificates, redirect, HSTS.", None)
    admin: Admin = doc("Who reaches /metrics and /gateway/*, and where.", Admin())
    lifecycle: Lifecycle = doc("How the gateway drains and stops.", Lifecycle())
    timeouts: Timeouts = doc("Default upstream timeouts for every service.", Timeouts())
    redis: RedisSettings | None = doc(
        "Shared rate-limit state; absent: limits are per process.", None
    )
    rate_limits: Mapping[Name, RateLimit] = doc(
        "Rate-limit zones by name.", factory=lambda: MappingProxyType({})
    )
    default_rate_limit: Name | None = doc(
        "The zone for services that name none (none: no limit).", None
    )
    trusted_proxies: tuple[Cidr, ...] = doc(
        "Peers whose X-Forwarded-For is believed (CIDRs); empty: the peer is the client.", ()
    )
    health: HealthCheck = doc("Default health checks for every service.", HealthCheck())
    retries: Retries | None = doc(
        "Default retries for every service.", None, fallback=DEFAULT_RETRIES
    )
    ejection: Ejection = doc("Default passive ejection for every service.", Ejection())
    limits: Limits = doc(
        "Client limits; the request limits are every service's defaults.", Limits()
    )
    upstream_keepalive_timeout: Seconds = doc(
        "Seconds an idle pooled upstream connection is kept; below the 5 s after which common "
        "backends (uvicorn, hypercorn) close theirs (needs a restart).",
        4.0,
    )
    auth: Auth | None = doc("JWT providers and identity headers (services opt in).", None)
    cors: Cors | None = doc("CORS for every service (a service's cors overrides).", None)
    security_headers: SecurityHeaders | None = doc(
        "Security headers added to every answer that has none of its own.", None
    )
    metrics_cache: Annotated[float, Range(min=0, max=60)] = doc(
        "Seconds a /metrics scrape is answered with the text rendered for the previous one; "
        "0: render every scrape.",
        1.0,
    )
    tracing: Tracing | None = doc(
        "OpenTelemetry spans exported over OTLP/HTTP; absent: trace context is passed on, "
        "nothing is recorded.",
        None,
    )


L = TypeVar("L", Timeouts, HealthCheck, Ejection, RequestLimits, Limits)


def defaults(cls: type[L]) -> L:
    """The built-in defaults of a layered settings type: every field's ``fallback``."""
    return cls(**{f.name: f.metadata["fallback"] for f in dataclasses.fields(cls)})


DEFAULT_TIMEOUTS: Final = defaults(Timeouts)
DEFAULT_HEALTH: Final = defaults(HealthCheck)
DEFAULT_EJECTION: Final = defaults(Ejection)
DEFAULT_LIMITS: Final = defaults(Limits)


def layered(*layers: L) -> L:
    """Field by field, the first value that is set: a service's own, then the top level's,
    then the defaults (which set every field)."""
    values = {
        f.name: next((v for layer in layers if (v := getattr(layer, f.name)) is not None), None)
        for f in dataclasses.fields(layers[0])
    }
    return dataclasses.replace(layers[0], **values)


SIZE_UNITS: Final = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def size(value: int | str) -> int:
    """Bytes of a ``Size`` (``32k`` is 32768, as in nginx)."""
    if isinstance(value, int):
        return value
    unit = value[-1].lower() if value[-1].isalpha() else ""
    return int(value.removesuffix(value[-1]) if unit else value) * SIZE_UNITS[unit]


def service_limits(config: Config, service: Service) -> RequestLimits:
    """A service's request limits, every field set: its own, the top level's, the defaults."""
    return layered(service.limits, config.limits, DEFAULT_LIMITS)


def connection_limits(config: Config) -> Limits:
    """The top-level limits, every field set."""
    return layered(config.limits, DEFAULT_LIMITS)


def service_settings(
    config: Config, service: Service
) -> tuple[Timeouts, HealthCheck, Ejection, int]:
    """A service's timeouts, health checks, ejection and retries, every field set."""
    retries = service.retries if service.retries is not None else config.retries
    return (
        layered(service.timeouts, config.timeouts, DEFAULT_TIMEOUTS),
        layered(service.health, config.health, DEFAULT_HEALTH),
        layered(service.ejection, config.ejection, DEFAULT_EJECTION),
        DEFAULT_RETRIES if retries is None else retries,
    )
