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
import os
import socket
import ssl
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from . import endpoints, logs, pipeline
from .aiohttp_private import HeldSite, keep_raw_header_bytes, site_server
from .auth import Authenticator
from .config import Config, ConfigError, digest, parse_config
from .config.types import Acme, Tls
from .context import ADMIN, HTTP, HTTPS, Listener, Shared
from .edge.accept import Acceptor, handshakes_done
from .edge.acme import AcmeManager, ChallengeStore
from .edge.connections import ConnectionTable
from .edge.tls import Certificates, Source, acme_source
from .lifecycle.listeners import bind
from .metrics import GATEWAY, Metrics
from .ratelimit.local import LocalLimiter
from .ratelimit.shared import RedisLimiter
from .ratelimit.zones import Limiter
from .server import Server
from .snapshot import Snapshot, compile_snapshot
from .upstream.balancer import Balancer
from .upstream.health import HealthBook
from .upstream.http import UpstreamClient
from .upstream.probe import Prober
from .upstream.slots import SlotTable
from .websocket.keepalive import Keepalive, shut_down
from .workers import Worker

log = logging.getLogger("gateway")

ACCEPTED_GRACE = 0.25  # seconds a connection accepted as the listeners close gets for a request


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        config_text: str | None = None,
        generation: int = 1,
    ) -> None:
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
        # Which config this process serves: the hash of its text (of its repr when the
        # config was not read from a text, as in tests that build one).
        self.shared.generation = generation
        self.shared.config_hash = digest(config_text if config_text is not None else repr(config))
        # A reload's config, its hash and its snapshot, from prepare() until commit().
        self._prepared: tuple[Config, str, Snapshot] | None = None
        metrics.serving_config(self.shared.config_hash)
        metrics.generation.set(generation)
        self._runners: list[web.ServerRunner] = []  # one per listener
        self._waiting: list[web.BaseSite] = []  # sites set up, not yet accepting
        self.bound: dict[str, Any] = {}  # each listener's address, by its name
        self._samples: web.ServerRunner | None = None  # a worker's own metrics, for the others
        self._background: set[asyncio.Task[None]] = set()
        self._auth_swap = asyncio.Lock()
        _configure_metrics(metrics, snapshot)
        self.shared.health.sync(snapshot.routes.values())

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(
        self,
        host: str | None = None,
        port: int | None = None,
        worker: Worker | None = None,
        *,
        ports: Mapping[str, int] | None = None,
        sockets: Mapping[str, Sequence[socket.socket]] | None = None,
        accept: bool = True,
    ) -> list[Any]:
        """Open the upstream client, the limiter and the probes, and listen: the plain
        listener (on ``host`` and ``port`` when given), the HTTPS one and the admin one when
        configured (on ``ports[name]`` when given: 0 takes a free port). ``sockets``: the
        listening sockets by listener name, made by the supervisor (a listener missing there
        is bound here). ``accept=False``: everything but accepting, which ``accept()`` then
        starts (a new generation accepts only once all of it has started). Returns the plain
        listener's addresses; ``bound`` has every listener's. A ``worker`` serves its metrics
        to the other workers."""
        shared = self.shared
        config = shared.snapshot.config
        ports = ports or {}
        held = sockets or {}
        reuse = worker is not None and len(worker.sockets) > 1
        supervised = worker is not None

        def sockets_of(listener: Listener, where: str, at: int) -> Sequence[socket.socket] | None:
            found = held.get(listener.name)
            return self._sockets(found, listener, where, at, reuse=reuse, supervised=supervised)

        keep_raw_header_bytes()  # obs-text in an upstream's header reaches the client as it came
        shared.upstream.open(config.upstream_keepalive_timeout)
        await shared.limiter.start()
        if config.auth is not None:
            shared.authenticator = Authenticator(config.auth)
            await shared.authenticator.start()
        if config.tracing is not None:
            from .tracing.export import Tracer  # noqa: PLC0415 - the SDK only when tracing is on

            shared.tracer = Tracer(config.tracing, shared.metrics)
        prober = self.prober = Prober(
            lambda: self.shared.snapshot, shared.upstream.session, shared.health, shared.metrics
        )
        self._in_background(prober.run())
        self._in_background(Keepalive(shared).run())
        self._in_background(shared.connections.run())
        listen = config.listen
        where = host if host is not None else listen.host
        at = port if port is not None else listen.port
        plain = await self._listen(HTTP, sockets_of(HTTP, where, at) or bind(where, at))
        tls = config.tls
        if tls is not None and tls.enabled:
            certificates = self._certificates(config, tls)
            https_sockets = sockets_of(
                HTTPS, tls.listen.host, ports.get(HTTPS.name, tls.listen.port)
            )
            if https_sockets is not None:
                https = await self._listen(
                    HTTPS, https_sockets, tls=(certificates.context, tls.handshake_timeout)
                )
                shared.https_port = https[0][1]
        admin = config.admin.listen
        if admin is not None:
            admin_sockets = sockets_of(ADMIN, admin.host, ports.get(ADMIN.name, admin.port))
            if admin_sockets is not None:
                await self._listen(ADMIN, admin_sockets)
                shared.admin_listening = True
        if worker is not None:
            shared.worker = worker
            self._samples = web.ServerRunner(web.Server(self._own_samples), handle_signals=False)
            await self._samples.setup()
            await web.UnixSite(self._samples, worker.own_socket).start()
        if accept:
            await self.accept()
        return plain

    def _certificates(self, config: Config, tls: Tls) -> Certificates:
        """The HTTPS listener's certificates, kept up to date, and ACME when it is on."""
        shared = self.shared
        certificates = shared.certificates = Certificates(shared.metrics, tls.min_version)
        acme = tls.acme if tls.acme is not None and tls.acme.enabled else None
        certificates.configure(tls_sources(config, acme), tls.min_version)
        self._in_background(certificates.watch())
        if acme is not None:
            # In every worker: the one holding the storage's lock orders, the others answer
            # challenges from the same files and load what it stores.
            challenges = ChallengeStore(acme.storage)
            shared.challenge = challenges.get
            shared.acme = AcmeManager(acme, shared.metrics, challenges)
            self._in_background(shared.acme.run())
        return certificates

    def _sockets(
        self, held: Sequence[socket.socket] | None, listener: Listener, where: str, at: int,
        *, reuse: bool, supervised: bool,
    ) -> Sequence[socket.socket] | None:  # fmt: skip
        """A listener's sockets: those the supervisor made (``held``), else bound here; under
        a supervisor, None: it binds every listener, at a start or a restart, and one that
        a reload added waits for that (a worker started again since used to bind it itself:
        on a taken port it failed and was retried forever, else it alone served it)."""
        if held:
            return held
        if supervised:
            log.warning(
                "%s is not served until the next restart: the supervisor binds it then",
                listener.name, extra={"fields": self.who()},
            )  # fmt: skip
            return None
        return bind(where, at, reuse_port=reuse)

    async def accept(self) -> None:
        """Start accepting on every listener."""
        waiting, self._waiting = self._waiting, []
        for site in waiting:
            await site.start()

    async def _listen(
        self,
        listener: Listener,
        sockets: Sequence[socket.socket],
        tls: tuple[ssl.SSLContext, float] | None = None,
    ) -> list[Any]:
        """Serve ``listener`` on ``sockets`` (``tls``: its context and handshake timeout),
        from ``accept()`` on."""
        shared = self.shared
        # pipeline.handle bound with a C-level partial: no extra coroutine frame per request.
        handler = functools.partial(pipeline.handle, shared, listener)
        server = Server(
            handler,
            shared.metrics,
            shared.connections,
            hsts=(lambda: self.shared.snapshot.exposure.hsts) if listener.tls else None,
            keepalive_timeout=lambda: self.shared.snapshot.edge.keepalive_timeout,
        )
        runner = web.ServerRunner(
            server,
            handle_signals=False,
            shutdown_timeout=shared.snapshot.config.lifecycle.shutdown_timeout,
        )
        await runner.setup()
        self._runners.append(runner)
        for sock in sockets:
            self._waiting.append(
                HeldSite(
                    runner,
                    sock,
                    ssl_context=tls[0] if tls is not None else None,
                    handshake_timeout=tls[1] if tls is not None else 0,
                    serve=Acceptor,
                )
            )
        addresses = [sock.getsockname() for sock in sockets]
        self.bound[listener.name] = addresses[0]
        return addresses

    async def _own_samples(self, request: web.BaseRequest) -> web.StreamResponse:
        endpoints.refresh_metrics(self.shared)
        body = orjson.dumps(self.shared.metrics.families())
        return web.Response(body=body, content_type="application/json")

    async def stop(self, *, handover: bool = False, accepted: bool = True) -> None:
        """Drain, then close. Phase 1 (``lifecycle.drain_delay``): keep accepting and serving,
        /health answering 503 and every answer saying ``Connection: close`` (a keep-alive
        connection ends right after an answer, never under a request a client may be
        writing). Then WebSocket sessions get ``ws_drain`` seconds to end, and 1001; phase 2:
        the listeners close, idle connections are closed, requests in flight get
        ``shutdown_timeout`` to finish.

        ``handover``: a newer generation accepts on the same sockets already. This one stops
        accepting at once, and phase 1 ends as soon as its last connection has closed (each
        after an answer); /health keeps its status, with ``draining``. ``accepted=False``: it
        never accepted (a new generation that did not start), so nothing is drained."""
        shared = self.shared
        lifecycle = shared.snapshot.config.lifecycle
        shared.draining = True
        shared.handover = handover
        shared.drain_ends = shared.clock() + lifecycle.drain_delay
        if handover:
            log.info(
                "handing over: a newer generation accepts; this one closes each connection "
                "after its next answer",
                extra={"fields": {"seconds": lifecycle.drain_delay, **self.who()}},
            )
            await self.stop_accepting()
            ends = time.monotonic() + lifecycle.drain_delay
            while len(shared.connections) and time.monotonic() < ends:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        elif lifecycle.drain_delay > 0 and accepted:
            log.info(
                "draining: still serving, every answer closes its connection",
                extra={"fields": {"seconds": lifecycle.drain_delay, **self.who()}},
            )
            await asyncio.sleep(lifecycle.drain_delay)
        ends = time.monotonic() + lifecycle.ws_drain
        while shared.sessions and time.monotonic() < ends:  # noqa: ASYNC110 - once, at a stop
            await asyncio.sleep(0.05)
        await shut_down(shared.sessions)  # 1001 to both legs of every session
        if not handover:
            # Every listener stops accepting at once: first no new handshake starts on any,
            # and those under way complete and are accepted (their clients count themselves
            # connected). A connection accepted just before may not have sent its request
            # yet: such connections get up to ACCEPTED_GRACE for it to arrive (and be
            # answered, with Connection: close) before idle connections are closed; requests
            # in flight on any listener then get the same shutdown_timeout.
            acceptors = [
                server
                for runner in self._runners
                for site in runner.sites
                if isinstance(server := site_server(site), Acceptor)
            ]
            for acceptor in acceptors:
                acceptor.refuse_new()
            await handshakes_done({a.port for a in acceptors if a.port is not None})
            for runner in self._runners:
                for site in list(runner.sites):
                    await _stop_site(site)
            grace_ends = time.monotonic() + ACCEPTED_GRACE
            while shared.connections.fresh and time.monotonic() < grace_ends:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await asyncio.gather(*(runner.cleanup() for runner in self._runners))
        if self._samples is not None:
            await self._samples.cleanup()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await shared.upstream.close()
        await shared.limiter.close()
        if shared.authenticator is not None:
            await shared.authenticator.close()
        if shared.tracer is not None:
            # Exports what is queued (each export bounded by tracing.export_timeout, the
            # whole within about twice that), in a thread: the loop goes on meanwhile.
            await asyncio.to_thread(shared.tracer.shutdown)
        logs.flush()

    async def stop_accepting(self) -> None:
        """Close this process's listening sockets, which another process holds too (the
        supervisor's, a newer generation's): their queues stay, and are served there."""
        self._waiting = []  # never started: their sockets close with the process
        for runner in self._runners:
            for site in list(runner.sites):
                server = site_server(site)
                await site.stop()
                if server is not None:  # what it took already is this process's to serve
                    await server.wait_closed()

    # -- configuration -----------------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP without a supervisor: load the config file again and swap it in only if it
        is valid (returns whether it was); read the certificate files again either way."""
        if self.config_path is None:
            self.reload_certificates()
            return False
        try:
            with open(self.config_path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            problems = [f"cannot read the file: {exc}"]
        else:
            problems = self.prepare(text)
        if problems:
            self.abort()
            log.error(
                "config reload rejected; still serving the previous config",
                extra={"fields": {"config": self.config_path, "problems": problems, **self.who()}},
            )
            return False
        self.commit()
        return True

    def prepare(self, text: str) -> list[str]:
        """A reload's first step: parse and compile ``text``; the problems, none when it can
        be served (``commit`` then swaps it in, ``abort`` drops it)."""
        try:
            config = parse_config(text, self.config_path or "<config>")
            snapshot = compile_snapshot(config)
        except ConfigError as exc:
            return [str(p) for p in exc.problems]
        except (ssl.SSLError, OSError) as exc:
            # A node's TLS file changed between the check and the compile.
            return [f"a TLS file changed while the config was loaded: {exc}"]
        self._prepared = (config, digest(text), snapshot)
        return []

    def commit(self) -> None:
        """Serve the prepared config."""
        if self._prepared is None:
            raise RuntimeError("nothing prepared")
        (config, self.shared.config_hash, snapshot), self._prepared = self._prepared, None
        self.reload_certificates()
        metrics = self.shared.metrics
        self.apply(config, snapshot)
        metrics.config_reloads.labels("success").inc()
        metrics.config_ok.set(1)
        metrics.serving_config(self.shared.config_hash)
        log.info(
            "config reloaded",
            extra={
                "fields": {
                    "config": self.config_path,
                    "hash": self.shared.config_hash,
                    **self.who(),
                }
            },
        )

    def abort(self) -> None:
        """A reload that is not served (this process's or another worker's config is
        invalid): say so in the metrics; read the certificate files again anyway."""
        self._prepared = None
        self.reload_certificates()
        self.shared.metrics.config_reloads.labels("failure").inc()
        self.shared.metrics.config_ok.set(0)

    def who(self) -> dict[str, object]:
        """Which process a lifecycle line is about (with --workers, several write one)."""
        worker = self.shared.worker
        return {
            "pid": os.getpid(),
            "worker": worker.index if worker is not None else None,
            "generation": self.shared.generation,
        }

    def reload_certificates(self) -> None:
        """Serve the certificate files as they are now (those that changed and load)."""
        if self.shared.certificates is not None:
            self.shared.certificates.refresh()

    def apply(self, config: Config, compiled: Snapshot | None = None) -> None:
        """Swap in a new config (``compiled``: its snapshot, when made already). Requests
        already running keep the snapshot they started with."""
        shared = self.shared
        old = shared.snapshot
        new = compiled if compiled is not None else compile_snapshot(config)
        restart = (
            "listen",
            "upstream_keepalive_timeout",
            "admin.listen",
            "tls.listen",
            "tls.acme",
            "tls.handshake_timeout",
            "lifecycle.shutdown_timeout",
            "lifecycle.pid_file",
            "tracing",
        )
        for key in restart:
            if _setting(config, key) != _setting(old.config, key):
                log.warning("a changed %s takes effect only after a restart", key)
        tls = config.tls if config.tls is not None and config.tls.enabled else None
        if (tls is None) != (shared.certificates is None):
            log.warning("turning TLS on or off takes effect only after a restart")
        elif tls is not None and shared.certificates is not None:
            # ACME's certificate stays the one the running AcmeManager keeps (a changed
            # tls.acme needs a restart, as warned above).
            running = shared.acme.settings if shared.acme is not None else None
            # Files swapped for ACME (which starts at the restart): the files until then.
            sources = tls_sources(config, running) or tls_sources(old.config, running)
            shared.certificates.configure(sources, tls.min_version)
        shared.snapshot = new
        if _verifying(config) != _verifying(old.config):
            # Other providers: the new authenticator fetches its keys before it takes over
            # (the old one verifies meanwhile); identity headers, WebSocket token places and
            # the realm are read from the snapshot, and need no new one.
            self._in_background(self._swap_authenticator(config))
        if config.redis != old.config.redis:
            previous = shared.limiter
            shared.limiter = _make_limiter(config, shared.metrics)
            self._in_background(self._swap_limiter(previous, shared.limiter))
        shared.slots.sync(new.routes)
        _configure_metrics(shared.metrics, new)
        shared.health.sync(new.routes.values())

    async def _swap_authenticator(self, config: Config) -> None:
        async with self._auth_swap:  # one at a time: the last config wins
            if _verifying(config) != _verifying(self.shared.snapshot.config):
                return  # a later reload changed it again; its own swap follows
            previous = self.shared.authenticator
            new = Authenticator(config.auth, previous=previous) if config.auth is not None else None
            if new is not None:
                await new.start()  # keys first (a failure is logged; refreshes go on)
            self.shared.authenticator = new
            if previous is not None:
                await previous.close()

    async def _swap_limiter(self, previous: Limiter, new: Limiter) -> None:
        await previous.close()
        await new.start()  # this one (a later reload may have made another already)

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _stop_site(site: web.BaseSite) -> None:
    """Stop a site's listener without resetting what its accept queue holds: connections the
    kernel completed before the close (their clients may have written a request already)
    are taken and served, not reset (``Acceptor.close(take_queue=True)``, which first has the
    kernel start no new handshake on it: ``accept.refuse_new``), and each is the
    server's before this returns, so that the shutdown that follows sees it."""
    server = site_server(site)
    if isinstance(server, Acceptor):
        server.close(take_queue=True)
        await server.wait_closed()
    await site.stop()


def _configure_metrics(metrics: Metrics, snapshot: Snapshot) -> None:
    """Tell the metrics what ``snapshot`` names: the series of anything else go."""
    metrics.configure(
        services=snapshot.routes.keys(),
        # An unnamed route is <service>#<index> (a name has no "#"): it is its path and what
        # it matches, which a reload may give to another index.
        routes={
            (entry.policy.service, entry.id): (
                (entry.path, entry.exact, entry.methods, entry.hosts, entry.websocket)
                if "#" in entry.id
                else None
            )
            for entry in snapshot.table.entries
        },
        targets={(t.service, t.node) for route in snapshot.routes.values() for t in route.targets},
        zones=snapshot.config.rate_limits.keys(),
    )


def _verifying(config: Config) -> object:
    """What an ``Authenticator`` is built from: the providers and the cache's size."""
    auth = config.auth
    return None if auth is None else (auth.providers, auth.cache_size)


def _setting(config: Config, key: str) -> object:
    """A setting by its dotted name (None where a section is absent)."""
    value: object = config
    for part in key.split("."):
        value = getattr(value, part, None)
    return value


def tls_sources(config: Config, acme: Acme | None) -> tuple[Source, ...]:
    """The certificates the HTTPS listener serves, in order: the files, then, with ``acme``
    (the running ACME client's settings: a changed ``tls.acme`` waits for a restart),
    ACME's."""
    tls = config.tls
    if tls is None:
        return ()
    sources = [Source(files.cert, files.key) for files in tls.certificates]
    if acme is not None:
        sources.append(acme_source(acme))
    return tuple(sources)


def _make_limiter(config: Config, metrics: Metrics) -> Limiter:
    """The shared limiter for a ``redis`` section (its state in ``service_health``), else the
    in-memory one."""
    settings = config.redis
    metrics.rate_limit_degraded.set(0)  # a new limiter: what the last one said is over
    if settings is None or settings.url.startswith("memory://"):
        metrics.remove_series(metrics.health, lambda labels: labels == (GATEWAY, "redis"))
        return LocalLimiter()
    metrics.health.labels(GATEWAY, "redis").set(1)

    def changed(connected: bool) -> None:
        metrics.rate_limit_degraded.set(0 if connected else 1)
        metrics.health.labels(GATEWAY, "redis").set(1 if connected else 0)

    return RedisLimiter(settings, on_transition=changed)
