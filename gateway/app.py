"""``Gateway``: the lifecycle of one gateway process. It builds the ``Shared`` context the
request phases use, starts and stops the server and the background tasks (probes, WebSocket
keepalive, the limiter), and reloads the config (a new snapshot is one assignment; a bad
file changes nothing).

The request path itself starts in ``pipeline.handle``; nothing there imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Coroutine
from typing import Any

import orjson
from aiohttp import web

from . import endpoints, logs, pipeline
from .aiohttp_private import keep_raw_header_bytes
from .config import Config, ConfigError, load_config
from .context import Shared
from .edge.connections import ConnectionTable
from .metrics import GATEWAY, Metrics
from .ratelimit.local import LocalLimiter
from .ratelimit.shared import RedisLimiter
from .ratelimit.zones import Limiter
from .server import SERVER_LIMITS, Server
from .snapshot import compile_snapshot
from .upstream.balancer import Balancer
from .upstream.health import HealthBook
from .upstream.http import UpstreamClient
from .upstream.probe import Prober
from .upstream.slots import SlotTable
from .websocket.keepalive import Keepalive, shut_down
from .workers import Worker

log = logging.getLogger("gateway")

SHUTDOWN_TIMEOUT = 10.0  # seconds requests in flight get to finish at a stop


class Gateway:
    def __init__(self, config: Config, *, config_path: str | None = None) -> None:
        self.config_path = config_path
        metrics = Metrics()
        snapshot = compile_snapshot(config)
        self.shared = Shared(
            snapshot=snapshot,
            metrics=metrics,
            health=HealthBook(metrics),
            balancer=Balancer(),
            slots=SlotTable(),
            limiter=_make_limiter(config, metrics),
            upstream=UpstreamClient(),
            connections=ConnectionTable(metrics, lambda: self.shared.snapshot.edge),
        )
        self._runner: web.ServerRunner | None = None
        self._samples: web.ServerRunner | None = None  # a worker's own metrics, for the others
        self._background: set[asyncio.Task[None]] = set()
        self.shared.health.sync(snapshot.routes.values())

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(
        self, host: str | None = None, port: int | None = None, worker: Worker | None = None
    ) -> list[Any]:
        """Open the upstream client and listen; return the bound addresses. A ``worker``
        shares the port with the others and serves its metrics to them."""
        shared = self.shared
        listen = shared.snapshot.config.listen
        keep_raw_header_bytes()  # obs-text in a header reaches the upstream byte for byte
        shared.upstream.open(shared.snapshot.config.upstream_keepalive_timeout)
        await shared.limiter.start()
        prober = Prober(
            lambda: self.shared.snapshot, shared.upstream.session, shared.health, shared.metrics
        )
        self._in_background(prober.run())
        self._in_background(Keepalive(shared).run())
        self._in_background(shared.connections.run())
        # pipeline.handle bound with a C-level partial: no extra coroutine frame per request.
        handler = functools.partial(pipeline.handle, shared)
        # keepalive_timeout is aiohttp's, fixed per server: a reload cannot change it.
        limits = {**SERVER_LIMITS, "keepalive_timeout": shared.snapshot.edge.keepalive_timeout}
        server = Server(
            handler,
            shared.metrics,
            shared.connections,
            handler_cancellation=True,
            access_log=None,
            **limits,
        )
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
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
            shared.worker = worker
            self._samples = web.ServerRunner(web.Server(self._own_samples), handle_signals=False)
            await self._samples.setup()
            await web.UnixSite(self._samples, worker.own_socket).start()
        return list(self._runner.addresses)

    async def _own_samples(self, request: web.BaseRequest) -> web.StreamResponse:
        endpoints.refresh_metrics(self.shared)
        body = orjson.dumps(self.shared.metrics.families())
        return web.Response(body=body, content_type="application/json")

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to 10 s), then close."""
        shared = self.shared
        shared.draining = True
        await shut_down(shared.sessions)  # 1001 to both legs of every session
        if self._runner is not None:
            await self._runner.cleanup()
        if self._samples is not None:
            await self._samples.cleanup()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await shared.upstream.close()
        await shared.limiter.close()
        logs.flush()

    # -- configuration -----------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the config file again; swap it in only if it is valid. Returns success."""
        if self.config_path is None:
            return False
        metrics = self.shared.metrics
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            metrics.config_reloads.labels("failure").inc()
            metrics.config_ok.set(0)
            log.error(  # noqa: TRY400 - a bad file is not a bug: no traceback
                "config reload rejected; still serving the previous config",
                extra={
                    "fields": {"config": exc.source, "problems": [str(p) for p in exc.problems]}
                },
            )
            return False
        self.apply(config)
        metrics.config_reloads.labels("success").inc()
        metrics.config_ok.set(1)
        log.info("config reloaded", extra={"fields": {"config": self.config_path}})
        return True

    def apply(self, config: Config) -> None:
        """Swap in a new config. Requests already running keep the snapshot they started with."""
        shared = self.shared
        old = shared.snapshot
        new = compile_snapshot(config)
        for key in ("listen", "upstream_keepalive_timeout"):
            if getattr(config, key) != getattr(old.config, key):
                log.warning("a changed %s takes effect only after a restart", key)
        if new.edge.keepalive_timeout != old.edge.keepalive_timeout:
            log.warning("a changed limits.keepalive_timeout takes effect only after a restart")
        shared.snapshot = new
        if config.redis != old.config.redis:
            previous = shared.limiter
            shared.limiter = _make_limiter(config, shared.metrics)
            self._in_background(self._swap_limiter(previous))
        shared.slots.sync(new.routes)
        for name in old.routes.keys() - new.routes.keys():
            shared.metrics.forget_service(name)
        shared.health.sync(new.routes.values())

    async def _swap_limiter(self, previous: Limiter) -> None:
        await previous.close()
        await self.shared.limiter.start()

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _make_limiter(config: Config, metrics: Metrics) -> Limiter:
    """The shared limiter for a ``redis`` section (its state in ``service_health``), else the
    in-memory one."""
    settings = config.redis
    if settings is None or settings.url.startswith("memory://"):
        return LocalLimiter()
    metrics.health.labels(GATEWAY, "redis").set(1)

    def changed(connected: bool) -> None:
        metrics.rate_limit_degraded.set(0 if connected else 1)
        metrics.health.labels(GATEWAY, "redis").set(1 if connected else 0)

    return RedisLimiter(settings, on_transition=changed)
