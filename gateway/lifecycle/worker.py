"""A worker: one gateway process under the supervisor (``daarion-gateway worker``, which the
supervisor runs; not a command for people). It gets its config text and its listening
sockets from the supervisor, starts everything, says ``ready``, and accepts only when told
to ``serve``: so a new generation takes connections only once all of it has started. Then it
does what the supervisor says (reloads in two steps, a handover), and stops on SIGTERM or
SIGINT, or when the supervisor is gone."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
from typing import Any, Final

from ..app import Gateway
from ..config import ConfigError, parse_config
from ..workers import Worker, end_with_parent
from .channel import Channel, Closed

log = logging.getLogger("gateway")
NOTHING: Final = object()  # no reload's config prepared

# The cyclic garbage collector's thresholds while serving (Python's are 700, 10, 10). Every
# collection of the oldest generation walks every object of every open connection: with
# 5,500 held connections that is a pause of about 80 ms, often enough with the defaults to
# put p99 at 100 ms, and the young collections cost ~12 % of the CPU per request. Collecting
# the young generation every 50,000 allocations instead of 700 lets most per-request objects
# die by reference counting first, so fewer reach the old generation and it is collected
# about once every 100 middle collections (bench/flood.py: p99 13 ms instead of 91 ms under
# 5,500 held connections, 147 instead of 167 us of CPU per request, the same memory).
GC_THRESHOLDS: Final = (50_000, 20, 100)
PROBES_WAIT: Final = 10.0  # seconds a start waits for its first health probes at most


def main(control: int) -> int:
    """Run a worker whose end of the channel is the inherited descriptor ``control``."""
    try:
        import uvloop  # noqa: PLC0415 - optional: absent on platforms without it
    except ImportError:  # pragma: no cover - uvloop is installed wherever it builds
        runner = asyncio.run
    else:
        runner = uvloop.run
    return runner(_work(socket.socket(fileno=control)))


async def _work(control: socket.socket) -> int:
    channel = await Channel.over(control)
    try:
        setup = await channel.receive()
    except Closed:
        return 1
    index, generation = setup["index"], setup["generation"]
    end_with_parent(setup["supervisor"])
    try:
        config = parse_config(setup["text"], setup["path"])
    except ConfigError as exc:  # the supervisor checked it: a newer version may not agree
        await _failed(channel, "config invalid", [str(p) for p in exc.problems])
        return 2
    _, open_files = raise_open_files_limit()
    gc.set_threshold(*GC_THRESHOLDS)
    gateway = Gateway(
        config, config_path=setup["path"], config_text=setup["text"], generation=generation
    )
    gateway.shared.metrics.config_ok.set(1 if setup["reload_ok"] else 0)
    worker = Worker(index, tuple(setup["peers"]))
    sockets = {
        name: [socket.socket(fileno=fd) for fd in fds] for name, fds in setup["listeners"].items()
    }
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _not_here, setup["supervisor"])
    try:
        addresses = await gateway.start(worker=worker, sockets=sockets, accept=False)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PROBES_WAIT):
                await gateway.prober.first_round()
    except Exception as exc:
        log.exception("worker could not start", extra={"fields": gateway.who()})
        await _failed(channel, f"{type(exc).__name__}: {exc}", [])
        return 1
    handover = False
    serving: list[bool] = []  # one entry once it accepts
    try:
        await channel.send("ready")
        orders = asyncio.ensure_future(_orders(channel, gateway, addresses, open_files, serving))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait((orders, stopped), return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if orders.done():
            handover = orders.result()
        else:
            orders.cancel()
    except Closed:
        pass
    finally:
        log.info("gateway stopping: draining requests in flight", extra={"fields": gateway.who()})
        with contextlib.suppress(asyncio.CancelledError):
            await gateway.stop(handover=handover, accepted=bool(serving))
        log.info("gateway stopped", extra={"fields": gateway.who()})
        channel.close()
    return 0


async def _orders(
    channel: Channel, gateway: Gateway, addresses: list[Any], open_files: int, serving: list[bool]
) -> bool:
    """Do what the supervisor says until a handover (True) or its end (False)."""
    # The reload whose config is prepared: its seq (None from a supervisor of code before
    # numbers, as after an upgrade that has not restarted it yet), or NOTHING.
    prepared: object = NOTHING
    while True:
        try:
            message = await channel.receive()
        except Closed:
            return False  # the supervisor is gone: stop (its death signal says so too)
        op = message["op"]
        if op == "serve":
            await gateway.accept()
            serving.append(True)
            gc.freeze()  # what start-up made lives as long as the process: no collection scans it
            _started(gateway, addresses, open_files)
            await channel.send("serving")
        elif op == "prepare":
            problems = gateway.prepare(message["text"])
            prepared = NOTHING if problems else message.get("seq")
            await channel.send(
                "prepared", seq=message.get("seq"), ok=not problems, problems=problems
            )
        elif op == "commit":
            if prepared is NOTHING or message.get("seq") != prepared:
                # Never a crash over it: the config served stays, and the supervisor's
                # next reload says so (never expected: it commits what every worker
                # answered it had prepared).
                log.error(
                    "a reload's commit for a config this worker has not prepared: ignored",
                    extra={"fields": {**gateway.who(), "seq": message.get("seq")}},
                )
                gateway.abort()
            else:
                try:
                    gateway.commit()
                except Exception:  # a file it needs changed since the prepare
                    log.exception(
                        "the prepared config could not be applied; the previous one serves",
                        extra={"fields": gateway.who()},
                    )
            prepared = NOTHING
        elif op == "abort":
            prepared = NOTHING
            gateway.abort()
        elif op == "handover":
            return True


def _started(gateway: Gateway, addresses: list[Any], open_files: int) -> None:
    log.info(
        "gateway started",
        extra={
            "fields": {
                **gateway.who(),
                "listen": [f"{a[0]}:{a[1]}" for a in addresses],
                "listeners": {name: f"{a[0]}:{a[1]}" for name, a in gateway.bound.items()},
                "config": gateway.config_path,
                "hash": gateway.shared.config_hash,
                "services": len(gateway.shared.snapshot.routes),
                "open_files_limit": open_files,
            }
        },
    )


async def _failed(channel: Channel, error: str, problems: list[str]) -> None:
    with contextlib.suppress(Closed):
        await channel.send("failed", error=error, problems=problems)
    channel.close()


def _not_here(supervisor: int) -> None:
    log.warning(
        "SIGHUP to a worker does nothing: send it to the supervisor, which reloads every "
        "worker or none",
        extra={"fields": {"pid": os.getpid(), "supervisor": supervisor}},
    )


def raise_open_files_limit() -> tuple[int, int]:
    """Lift the soft limit on open files to the hard one (each WebSocket session holds two
    sockets, each HTTP request in flight up to two). Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return soft, wanted
    return soft, soft
