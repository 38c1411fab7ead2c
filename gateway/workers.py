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
PEER_TIMEOUT: Final = 1.0  # for another worker's samples at a scrape


@dataclass(frozen=True, slots=True)
class Worker:
    """What a worker knows of the others."""

    index: int
    sockets: tuple[str, ...]  # every worker's metrics socket, by index

    @property
    def own_socket(self) -> str:
        return self.sockets[self.index]

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(s for i, s in enumerate(self.sockets) if i != self.index)


def supervise(count: int, host: str, port: int, run: Callable[[Worker, int], int]) -> int:
    """Run ``run(worker, port)`` in ``count`` forked processes until SIGTERM or SIGINT."""
    reserved = _reserve(host, port)
    port = reserved.getsockname()[1]
    run_dir = tempfile.mkdtemp(prefix="daarion-gateway-")
    sockets = tuple(os.path.join(run_dir, f"worker-{i}.sock") for i in range(count))
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
    supervisor = os.getpid()
    children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
    pending: dict[int, float] = {}  # index -> when to start it again
    stopping = False

    def spawn(index: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                reserved.close()
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
                _end_with_parent(supervisor)
                code = run(Worker(index, sockets), port)
            finally:
                sys.stdout.flush()
                os._exit(code)
        children[pid] = (index, time.monotonic())

    try:
        for index in range(count):
            spawn(index)
        log.info(
            "workers started",
            extra={"fields": {"workers": count, "port": port, "pids": sorted(children)}},
        )
        while children or (pending and not stopping):
            received = signal.sigtimedwait(_WAITED, 0.5)
            signum = received.si_signo if received is not None else None
            if signum in (signal.SIGTERM, signal.SIGINT):
                stopping = True
            if signum in _FORWARDED:
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            for index, started in _reap(children, stopping):
                pending[index] = started + RESPAWN_DELAY  # at once if it lived long enough
            for index, when in list(pending.items()):
                if stopping:
                    pending.clear()
                elif time.monotonic() >= when:
                    del pending[index]
                    spawn(index)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        reserved.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    log.info("workers stopped")
    return 0


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


async def peer_samples(paths: tuple[str, ...]) -> list[Families]:
    """The other workers' metric samples; a worker that does not answer in time (one being
    started again, say) is left out, and ``gateway_workers_reporting`` shows it."""
    answers = await asyncio.gather(*(_samples(path) for path in paths), return_exceptions=True)
    found: list[Families] = []
    for path, answer in zip(paths, answers, strict=True):
        if isinstance(answer, BaseException):
            log.warning(
                "a worker's metrics are missing from this scrape",
                extra={"fields": {"socket": path, "error": repr(answer)}},
            )
        else:
            found.append(answer)
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
