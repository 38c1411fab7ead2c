"""What a request's phases may use: ``Shared`` (the long-lived things of one gateway process)
and ``Exchange`` (one request).

A phase takes these two and nothing else: not the application (``app.Gateway``), which owns
the lifecycle and builds ``Shared`` once. This module imports no phase; its imports are the
types of the things it holds, and none of those modules imports it, so the phases can depend
on it without any import cycle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .metrics import UNMATCHED
from .tracing.context import UNTRACED, Trace

if TYPE_CHECKING:
    from .auth import Authenticator
    from .edge.acme import AcmeManager
    from .edge.connections import ConnectionTable
    from .edge.cors import Added
    from .edge.tls import Certificates
    from .metrics import Metrics
    from .ratelimit.zones import Limiter
    from .request import Request
    from .snapshot import Snapshot, Target
    from .tracing.export import Tracer
    from .upstream.balancer import Balancer
    from .upstream.health import HealthBook
    from .upstream.http import UpstreamClient
    from .upstream.slots import SlotTable
    from .websocket.session import Session
    from .workers import Worker


@dataclass(frozen=True, slots=True)
class Listener:
    """Which of the gateway's listeners a request came in on."""

    name: str  # in log lines and Gateway.bound
    tls: bool


HTTP = Listener("http", tls=False)  # the plain listener (listen)
HTTPS = Listener("https", tls=True)  # tls.listen
ADMIN = Listener("admin", tls=False)  # admin.listen: the operator's endpoints only


@dataclass(slots=True, eq=False)
class Shared:
    """The things every request of this process shares. ``snapshot`` is the current config
    (a reload assigns a new one; a request reads it once, into its ``Exchange``); ``limiter``
    is replaced when the ``redis`` settings change; ``draining`` is set when the gateway
    begins to stop. Everything else lives as long as the process."""

    snapshot: Snapshot
    metrics: Metrics
    health: HealthBook
    balancer: Balancer
    slots: SlotTable
    limiter: Limiter
    upstream: UpstreamClient
    connections: ConnectionTable  # the client connections: caps, idle ones, unfinished heads
    sessions: set[Session] = field(default_factory=set)  # open WebSocket sessions
    clock: Callable[[], float] = time.monotonic
    started: float = field(default_factory=time.monotonic)
    draining: bool = False  # stopping: every answer closes its connection
    handover: bool = False  # ... because a newer generation serves (/health stays as it is)
    generation: int = 1  # the gateway's: 1 at a start, one more at each restart (SIGUSR2)
    config_hash: str = ""  # which config this process serves (config.digest of its text)
    drain_ends: float = 0.0  # while draining: when the listeners close (clock())
    worker: Worker | None = None  # serve --workers: which worker this process is
    certificates: Certificates | None = None  # what the HTTPS listener serves
    # ACME's http-01 answers: the key authorization for a token, None for an unknown one.
    challenge: Callable[[str], bytes | None] | None = None
    https_port: int | None = None  # the HTTPS listener's port, for redirects
    # Whether this process runs an admin listener (https_port: an HTTPS one). A reload that
    # adds one takes effect at a restart: until then the plain listener neither redirects to
    # a missing HTTPS listener nor hides the admin endpoints behind a missing admin one.
    admin_listening: bool = False
    acme: AcmeManager | None = None  # orders and renews tls.acme's certificate
    authenticator: Authenticator | None = None  # verifies tokens (config.auth)
    tracer: Tracer | None = None  # records and exports sampled requests' spans (config.tracing)


@dataclass(slots=True)
class Exchange:
    """What is known about one request so far; read by the final log line and metrics."""

    request: Request
    listener: Listener
    snapshot: Snapshot  # read once: a reload never changes a request half way through
    request_id: str
    started: float
    client: str  # the client address (the peer, or what trusted proxies report)
    proto: str  # http or https, as the client used it
    service: str = UNMATCHED
    route: str = UNMATCHED  # the route's name (a service's own rules: the service's)
    peer_trusted: bool = False  # the peer is one of trusted_proxies
    user: str | None = None  # the verified token's subject
    identity_headers: tuple[tuple[str, str], ...] = ()  # set upstream from the token
    token_subprotocol: str | None = None  # bearer.<token>: left out of the upstream's offer
    target: Target | None = None  # the upstream target tried last
    status: int = 0
    error: str | None = None
    rate_limit: str | None = None  # "delayed" or "dry_run" when the limiter had a say
    log_fields: dict[str, object] = field(default_factory=dict)  # more for the log line
    session: Session | None = None  # a WebSocket session, which logs at its end
    # What the answer gets besides its own headers (edge/cors.py), once routed; before (and
    # then None), the snapshot's Exposure.added.
    added: Added | None = None
    # The request's W3C trace (tracing/context.py); pipeline.handle sets it before any phase.
    trace: Trace = UNTRACED
