"""The ``Gateway``: the long-lived things (client session, metrics, health, limiter, prober,
the current snapshot) and their lifecycle, reloads, and the server that feeds requests to
``pipeline.handle``.

Why aiohttp's low-level ``web.Server`` and not ``web.Application``: the gateway has exactly one
catch-all route, so the router and middleware chain would only add work on the hot path; and
owning the protocol class lets requests that the HTTP parser itself rejects get the same JSON
error body, request id and single log line as every other error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Coroutine
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from . import endpoints, logs, pipeline, wskeepalive, wssession
from .balancer import Balancer
from .config import Config, ConfigError, load_config
from .errors import GatewayError, error_response
from .health import HealthBook
from .logs import REQUEST_ID, new_request_id
from .metrics import GATEWAY, UNMATCHED, Metrics
from .probe import Prober
from .ratelimit import Limiter, LocalLimiter
from .redislimit import RedisLimiter
from .slots import Slots
from .snapshot import Route, Snapshot, compile_snapshot
from .workers import Worker

log = logging.getLogger("gateway")

# Client-side limits, in the spirit of nginx's defaults. The two size limits differ by design:
# aiohttp's LineTooLong carries only the limit it hit, which tells 414 from 431.
MAX_REQUEST_LINE: Final = 8190
MAX_HEADER_FIELD: Final = 8192
SERVER_LIMITS: Final[dict[str, Any]] = {
    "keepalive_timeout": 75.0,  # idle keep-alive connections are closed after this
    "max_line_size": MAX_REQUEST_LINE,  # beyond it: 414
    "max_field_size": MAX_HEADER_FIELD,  # one header name or value; beyond it: 431
    "max_headers": 100,
    "lingering_time": 2.0,  # how long an unread request body is drained after an early answer
}


class Gateway:
    def __init__(self, config: Config, *, config_path: str | None = None) -> None:
        self.snapshot: Snapshot = compile_snapshot(config)
        self.config_path = config_path
        self.metrics = Metrics()
        self.health = HealthBook(self.metrics)
        self.clock = time.monotonic
        self.started = self.clock()
        self.draining = False
        self.endpoints: dict[str, endpoints.Endpoint] = endpoints.table(self)
        self.balancer = Balancer()
        self.websockets: set[wssession.Session] = set()
        self._slots: dict[str, Slots] = {}
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.ServerRunner | None = None
        self._samples: web.ServerRunner | None = None  # a worker's own metrics, for the others
        self.worker: Worker | None = None  # serve --workers: which one this is
        self._background: set[asyncio.Task[None]] = set()
        self.limiter: Limiter = self._make_limiter(config)
        self.health.sync(self.snapshot.routes.values())

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the gateway is not started")
        return self._session

    async def start(
        self, host: str | None = None, port: int | None = None, worker: Worker | None = None
    ) -> list[Any]:
        """Open the upstream session and listen; return the bound addresses. A ``worker``
        shares the port with the others and serves its metrics to them."""
        listen = self.snapshot.config.listen
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,  # bounded per service by Slots instead
                limit_per_host=0,
                ttl_dns_cache=10,
                keepalive_timeout=15.0,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # bodies pass through byte for byte
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            trust_env=False,
            raise_for_status=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        # aiohttp resends an idempotent request once on its own when a connection drops,
        # to the same upstream; failover.py decides retries (how many, and where) instead.
        # This private switch is the one aiohttp's own test client uses.
        self._session._retry_connection = False
        await self.limiter.start()
        prober = Prober(lambda: self.snapshot, self._session, self.health, self.metrics)
        self._in_background(prober.run())
        self._in_background(wskeepalive.Keepalive(self).run())
        server = _Server(self, handler_cancellation=True, access_log=None, **SERVER_LIMITS)
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=10.0)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            host if host is not None else listen.host,
            port if port is not None else listen.port,
            backlog=1024,
            reuse_port=worker is not None,
        )
        await site.start()
        if worker is not None:
            self.worker = worker
            self._samples = web.ServerRunner(web.Server(self._own_samples), handle_signals=False)
            await self._samples.setup()
            await web.UnixSite(self._samples, worker.own_socket).start()
        return list(self._runner.addresses)

    async def _own_samples(self, request: web.BaseRequest) -> web.StreamResponse:
        endpoints.refresh_metrics(self)
        body = orjson.dumps(self.metrics.families())
        return web.Response(body=body, content_type="application/json")

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to 10 s), then close."""
        self.draining = True
        await wskeepalive.shut_down(self)  # 1001 to both legs of every session
        if self._runner is not None:
            await self._runner.cleanup()
        if self._samples is not None:
            await self._samples.cleanup()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
        await self.limiter.close()
        logs.flush()

    def _make_limiter(self, config: Config) -> Limiter:
        settings = config.redis
        if settings is None or settings.url.startswith("memory://"):
            return LocalLimiter()
        self.metrics.health.labels(GATEWAY, "redis").set(1)
        return RedisLimiter(settings, on_transition=self._redis_changed)

    def _redis_changed(self, connected: bool) -> None:
        self.metrics.rate_limit_degraded.set(0 if connected else 1)
        self.metrics.health.labels(GATEWAY, "redis").set(1 if connected else 0)

    def slots_for(self, route: Route) -> Slots:
        slots = self._slots.get(route.service)
        if slots is None:
            slots = self._slots[route.service] = Slots(route.max_connections)
        return slots

    # -- configuration -----------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the config file again; swap it in only if it is valid. Returns success."""
        if self.config_path is None:
            return False
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("failure").inc()
            self.metrics.config_ok.set(0)
            log.error(  # noqa: TRY400 - a bad file is not a bug: no traceback
                "config reload rejected; still serving the previous config",
                extra={
                    "fields": {"config": exc.source, "problems": [str(p) for p in exc.problems]}
                },
            )
            return False
        self.apply(config)
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_ok.set(1)
        log.info("config reloaded", extra={"fields": {"config": self.config_path}})
        return True

    def apply(self, config: Config) -> None:
        """Swap in a new config. Requests already running keep the snapshot they started with."""
        old = self.snapshot
        new = compile_snapshot(config)
        if config.listen != old.config.listen:
            log.warning("listen address changes take effect only after a restart")
        self.snapshot = new
        if config.redis != old.config.redis:
            previous, self.limiter = self.limiter, self._make_limiter(config)
            self._in_background(self._swap_limiter(previous))
        for name, route in new.routes.items():
            if name in self._slots:
                self._slots[name].resize(route.max_connections)
        for name in old.routes.keys() - new.routes.keys():
            self._slots.pop(name, None)
            self.metrics.forget_service(name)
        self.health.sync(new.routes.values())

    async def _swap_limiter(self, previous: Limiter) -> None:
        await previous.close()
        await self.limiter.start()

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _Server(web.Server):
    """Makes ``_Protocol`` connections that call the gateway."""

    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        # pipeline.handle bound with a C-level partial: no extra coroutine frame per request.
        super().__init__(functools.partial(pipeline.handle, gateway), **kwargs)
        self.gateway = gateway

    def __call__(self) -> web.RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class _Protocol(web.RequestHandler):
    """aiohttp's HTTP protocol, with the gateway's JSON answer for unparsable requests."""

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gateway = manager.gateway

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._gateway.metrics.client_connections.inc()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._gateway.metrics.client_connections.dec()

    def detach(self) -> tuple[asyncio.Transport, bytes] | None:
        """Let go of the connection for a WebSocket relay, which takes the transport and what
        the client sent after its handshake: aiohttp stops reading it, forgets it and never
        closes it. None when the client has gone already."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return None
        tail, self._message_tail = self._message_tail, b""
        self._force_close = True  # start() leaves its loop without closing the transport
        self.transport = None
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        if self._manager is not None:
            self._manager.connection_lost(self, None)  # not among the server's connections
        if self._buffer_paused:
            transport.resume_reading()
        return transport, tail

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; the connection is dropped")
        request_id = new_request_id()
        REQUEST_ID.set(request_id)
        err = _parse_error(status, exc)
        fields = {"status": err.status, "error": err.code, "client": request.remote}
        if err.status >= 500:
            log.error("unhandled error", exc_info=exc, extra={"fields": fields})
        else:
            # A client that cannot speak HTTP (or TLS sent to a plain port): one line, no
            # traceback, only the first line of aiohttp's description.
            fields["detail"] = (message or str(exc or "")).strip().partition("\n")[0][:200]
            logs.access("bad request", fields)
        self._gateway.metrics.observe_request(UNMATCHED, "OTHER", err.status, 0.0)
        response = error_response(err, request_id)
        response.force_close()
        return response


def _parse_error(status: int, exc: BaseException | None) -> GatewayError:
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (MAX_REQUEST_LINE,):
            return GatewayError(414, "uri_too_long", "the request line is too long")
        return GatewayError(431, "headers_too_large", "a request header is too long")
    if isinstance(exc, BadHttpMessage) or status == 400:
        return GatewayError(400, "bad_request", "the request is not valid HTTP/1.1")
    if status == 504:
        return GatewayError(504, "timeout", "the request took too long")
    return GatewayError(500, "internal_error", "the gateway failed to handle the request")
