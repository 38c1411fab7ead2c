"""What a worker knows of the others (``serve --workers N``: N gateway processes on the
supervisor's sockets, see ``lifecycle/``), and the kernel's help in ending with the
supervisor.

A worker also listens on a Unix socket in the supervisor's private directory, where it
answers with its own metric samples: the worker that gets a ``/metrics`` scrape adds up the
others' of its generation (``metrics.merge``), so a scrape sees the whole gateway whichever
worker answers it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import orjson

if TYPE_CHECKING:
    from .metrics import Families

log = logging.getLogger("gateway")

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
    def peers(self) -> dict[int, str]:
        return {i: s for i, s in enumerate(self.sockets) if i != self.index}


def end_with_parent(parent: int) -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies (even by SIGKILL),
    so that no worker is left serving on its own (Linux's PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:  # pragma: no cover - Linux has it
        log.warning("PR_SET_PDEATHSIG failed: workers may outlive a killed supervisor")
    if os.getppid() != parent:  # it died before the call took effect
        os.kill(os.getpid(), signal.SIGTERM)


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
