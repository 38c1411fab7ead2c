"""``serve --workers N``: N gateway processes on one port, and the supervisor that runs them.

One process is one core and one open-files limit; N workers use N cores, and hold N times the
WebSocket sessions a process's limit allows (two sockets each). Each worker binds the port
with ``SO_REUSEPORT``, so the kernel spreads new connections over them by address hash. The
supervisor keeps a bound, never listening socket on the port (it resolves ``--port 0`` and
keeps the port while workers come and go), forwards SIGTERM, SIGINT and SIGHUP to every worker,
and starts a new worker when one dies unasked (after a second, if it died within a second).

A worker also listens on a Unix socket in a private directory, where it answers with its own
metric samples: the worker that gets a ``/metrics`` scrape adds up the others' (``merge``),
so a scrape sees the whole gateway whichever worker answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import orjson

if TYPE_CHECKING:
    from .metrics import Families

log = logging.getLogger("gateway")

_FORWARDED: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_WAITED: Final = {*_FORWARDED, signal.SIGCHLD}
RESPAWN_DELAY: Final = 1.0  # after a worker that lived less than this
_PR_SET_PDEATHSIG: Final = 1
PEER_TIMEOUT: Final = 1.0
# A worker's stop takes lifecycle.drain_delay (5 s) + ws_drain (0) + 5 s of WebSocket close
# handshakes + shutdown_timeout (10 s) with the defaults: SIGKILL after half as much again.
STOP_GRACE: Final = 30.0  # for another worker's samples at a scrape


@dataclass(frozen=True, slots=True)
class Worker:
    """What a worker knows of the others."""

    index: int
    sockets: tuple[str, ...]  # every worker's metrics socket, by index

    @property
    def own_socket(self) -> str:
        return self.sockets[self.index]

    @property
    def peers(self) -> dict[int, str]:
        return {i: s for i, s in enumerate(self.sockets) if i != self.index}


def supervise(count: int, host: str, port: int, run: Callable[[Worker, int], int]) -> int:
    """Run ``run(worker, port)`` in ``count`` forked processes until SIGTERM or SIGINT."""
    reserved = _reserve(host, port)
    run_dir = tempfile.mkdtemp(prefix="daarion-gateway-")
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
    try:
        sockets = tuple(os.path.join(run_dir, f"worker-{i}.sock") for i in range(count))
        _Supervisor(reserved, sockets, previous, run).run()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        reserved.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    log.info("workers stopped")
    return 0


class _Supervisor:
    def __init__(
        self,
        reserved: socket.socket,
        sockets: tuple[str, ...],
        mask: set[int | signal.Signals],
        run: Callable[[Worker, int], int],
    ) -> None:
        self.reserved = reserved
        self.port: int = reserved.getsockname()[1]
        self.sockets = sockets
        self.mask = mask  # the signal mask the workers get back
        self.work = run
        self.pid = os.getpid()
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
        self.pending: dict[int, float] = {}  # index -> when to start it again
        self.stopping = 0.0  # when SIGTERM or SIGINT came

    def run(self) -> None:
        for index in range(len(self.sockets)):
            self.spawn(index)
        log.info(
            "workers started",
            extra={
                "fields": {
                    "workers": len(self.sockets),
                    "port": self.port,
                    "pids": sorted(self.children),
                }
            },
        )
        while self.children or (self.pending and not self.stopping):
            received = signal.sigtimedwait(_WAITED, 0.5)
            self.handle(received.si_signo if received is not None else None)
            for index, started in _reap(self.children, bool(self.stopping)):
                self.pending[index] = started + RESPAWN_DELAY  # at once if it lived long
            now = time.monotonic()
            for index, when in list(self.pending.items()):
                if self.stopping:
                    self.pending.clear()
                elif now >= when:
                    del self.pending[index]
                    self.spawn(index)

    def handle(self, signum: int | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
            self.stopping = time.monotonic()
        if self.stopping and time.monotonic() - self.stopping > STOP_GRACE:
            _kill_all(self.children)
        if signum in _FORWARDED:
            forwarded = signal.SIGTERM if signum == signal.SIGINT else signum
            for pid in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, forwarded)

    def spawn(self, index: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                self.reserved.close()
                # Ignored until the worker's loop handles it: a reload signal sent while the
                # worker starts must not kill it (SIGHUP's default action).
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
                _end_with_parent(self.pid)
                code = self.work(Worker(index, self.sockets), self.port)
            except Exception:
                log.exception("worker failed", extra={"fields": {"worker": index}})
            finally:
                sys.stdout.flush()
                os._exit(code)
        self.children[pid] = (index, time.monotonic())


def _reap(children: dict[int, tuple[int, float]], stopping: bool) -> list[tuple[int, float]]:
    """Collect the workers that have exited; return (index, started) of those to start again."""
    again = []
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        index, started = children.pop(pid)
        if stopping:
            continue
        lived = time.monotonic() - started
        log.error(
            "worker exited; starting another",
            extra={"fields": {"worker": index, "pid": pid, "status": status, "lived_s": lived}},
        )
        again.append((index, started))
    return again


def _kill_all(children: dict[int, tuple[int, float]]) -> None:
    for pid, (index, _) in children.items():
        log.error("worker still running after the grace period; killing it",
                  extra={"fields": {"worker": index, "pid": pid}})  # fmt: skip
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _end_with_parent(parent: int) -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies (even by SIGKILL),
    so that no worker is left serving on its own (Linux's PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:  # pragma: no cover - Linux has it
        log.warning("PR_SET_PDEATHSIG failed: workers may outlive a killed supervisor")
    if os.getppid() != parent:  # it died before the call took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _reserve(host: str, port: int) -> socket.socket:
    """A socket bound to the port with ``SO_REUSEPORT`` that never listens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserved.bind((host, port))
    except OSError:
        reserved.close()
        raise
    return reserved


async def peer_samples(peers: dict[int, str]) -> dict[int, Families]:
    """The other workers' metric samples by worker index; a worker that does not answer in
    time (one being started again, say) is left out, and ``gateway_workers_reporting`` shows
    it."""
    indexes = list(peers)
    answers = await asyncio.gather(*(_samples(peers[i]) for i in indexes), return_exceptions=True)
    found: dict[int, Families] = {}
    for index, answer in zip(indexes, answers, strict=True):
        if isinstance(answer, BaseException):
            log.warning(
                "a worker's metrics are missing from this scrape",
                extra={"fields": {"worker": index, "error": repr(answer)}},
            )
        else:
            found[index] = answer
    return found


async def _samples(path: str) -> Families:
    async with asyncio.timeout(PEER_TIMEOUT):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(b"GET / HTTP/1.0\r\nHost: worker\r\n\r\n")
            answer = await reader.read()
        finally:
            writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 ") and not head.startswith(b"HTTP/1.0 200 "):
        raise ConnectionError(head[:40])
    families: Families = orjson.loads(body)
    return families
