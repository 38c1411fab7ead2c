"""The ACME client against a real CA: Pebble (``tests/pebble.py``) validating http-01 through a
real aiohttp server that answers from the ``ChallengeStore``. Only time is faked: ``Clock``
moves the wall clock on, so a certificate can fall due without waiting a day.

Pebble issues certificates valid two days here, so ``renew_before_days`` (1 at least) is a
large part of their lifetime, and 30 is longer than all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import os
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from gateway.certs import Pair, read_pair
from gateway.config.types import Acme
from gateway.edge.acme import DAY, AcmeManager, ChallengeStore, renewal_delay
from gateway.logs import flush, setup_logging
from gateway.metrics import Metrics

from .pebble import Pebble, require

DOMAINS = ("gateway.test", "www.gateway.test")


class Clock:
    """The wall clock plus an offset the test moves on. ``sleep(s)`` (the manager's) ends once
    ``now()`` has gone ``s`` further: by real time passing, or at once when ``advance`` jumps
    past it. Every sleep asked for is kept in ``sleeps``."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.sleeps: list[float] = []
        self._moved = asyncio.Event()

    def now(self) -> float:
        return time.time() + self.offset

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        deadline = self.now() + seconds
        while (left := deadline - self.now()) > 0:
            moved = self._moved
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await moved.wait()

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        self._moved.set()
        self._moved = asyncio.Event()


@dataclass
class ChallengeServer:
    """The plain listener's stand-in: answers the CA from the store, and notes each answer.
    A test that clears ``release`` holds the answers (the CA's validation waits) until it is
    set again; ``asked`` notes each request as it comes."""

    port: int
    answered: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not so within {timeout} s")
        await asyncio.sleep(0.02)


def orders(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("gateway_acme_orders_total", {"result": result})
    return value or 0.0


def verify(pair: Pair, root: bytes) -> None:
    """The chain in ``pair.cert_path`` leads to ``root``, for every domain (raises if not)."""
    leaf, *intermediates = x509.load_pem_x509_certificates(Path(pair.cert_path).read_bytes())
    store = Store([x509.load_pem_x509_certificate(root)])
    for domain in DOMAINS:
        verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(domain))
        verifier.verify(leaf, intermediates)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def contents(path: str) -> bytes:
    return Path(path).read_bytes()


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "acme"


@pytest.fixture
async def challenge_server(storage: Path) -> AsyncIterator[ChallengeServer]:
    store = ChallengeStore(str(storage))
    holder: list[ChallengeServer] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        holder[0].asked.append(token)
        await holder[0].release.wait()
        body = store.get(token)
        if body is None:
            raise web.HTTPNotFound
        holder[0].answered.append(token)
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/.well-known/acme-challenge/{token}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    holder.append(ChallengeServer(runner.addresses[0][1]))
    holder[0].release.set()
    yield holder[0]
    holder[0].release.set()
    await runner.cleanup()


@pytest.fixture
def pebble(tmp_path: Path, challenge_server: ChallengeServer) -> Iterator[Pebble]:
    require()
    ca = Pebble(tmp_path / "pebble", challenge_server.port)
    yield ca
    ca.close()


@pytest.fixture
async def running() -> AsyncIterator[Callable[[AcmeManager], asyncio.Task[None]]]:
    """``running(manager)``: its ``run()`` as a task, cancelled at the end of the test."""
    tasks: list[asyncio.Task[None]] = []

    def start(manager: AcmeManager) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(manager.run()))
        return tasks[-1]

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def logs() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The gateway's JSON log lines so far, parsed."""
    stream = io.StringIO()
    setup_logging("INFO", stream)

    def lines() -> list[dict[str, Any]]:
        flush()
        logging.getLogger().handlers[0].flush()
        return [orjson.loads(line) for line in stream.getvalue().splitlines()]

    yield lines
    logging.getLogger().handlers.clear()


def settings(pebble: Pebble, storage: Path, renew_before_days: int = 30) -> Acme:
    return Acme(
        domains=DOMAINS,
        directory=pebble.directory,
        email="ops@gateway.test",
        storage=str(storage),
        ca_bundle=pebble.ca_file,
        renew_before_days=renew_before_days,
    )


def manager(
    pebble: Pebble, storage: Path, clock: Clock, *, renew_before_days: int = 30, **options: Any
) -> tuple[AcmeManager, Metrics]:
    metrics = Metrics()
    acme = AcmeManager(
        settings(pebble, storage, renew_before_days),
        metrics,
        ChallengeStore(str(storage)),
        now=clock.now,
        sleep=clock.sleep,
        **options,
    )
    return acme, metrics


def unreachable_ca(
    storage: Path, clock: Clock, **options: Any
) -> Callable[[], tuple[AcmeManager, Metrics]]:
    """A maker of processes (or workers) sharing ``storage`` and ``clock``, each ordering from
    a directory nothing listens on: every order fails."""
    from .helpers import free_port  # noqa: PLC0415

    settings = Acme(
        domains=DOMAINS, directory=f"https://127.0.0.1:{free_port()}/dir", storage=str(storage)
    )

    def process() -> tuple[AcmeManager, Metrics]:
        metrics = Metrics()
        acme = AcmeManager(
            settings, metrics, ChallengeStore(str(storage)), now=clock.now, sleep=clock.sleep,
            jitter=lambda: 0.5, **options,
        )  # fmt: skip
        return acme, metrics

    return process


def due(pair: Pair, clock: Clock, renew_before_days: int) -> float:
    """Seconds the clock must move on for ``pair`` to be due, and one more."""
    return renewal_delay(pair.not_before, pair.not_after, renew_before_days, clock.now()) + 1


async def test_a_missing_certificate_is_ordered_and_stored_privately(
    pebble, storage, challenge_server, running
):
    clock = Clock()
    acme, metrics = manager(pebble, storage, clock, retry_first=0.2, check_interval=7 * DAY)
    assert acme.state == "pending"
    running(acme)
    await until(lambda: acme.state == "valid")

    pair = read_pair(*acme.cert_paths)
    assert acme.certificate == pair
    assert sorted(pair.names) == sorted(DOMAINS)
    verify(pair, pebble.root())
    assert acme.cert_paths == (
        str(storage / "certificates/gateway.test/fullchain.pem"),
        str(storage / "certificates/gateway.test/privkey.pem"),
    )
    for path in (*acme.cert_paths, storage / "account.json"):
        assert mode(path) == 0o600, path
    for folder in (storage, storage / "certificates", storage / "certificates/gateway.test"):
        assert mode(folder) == 0o700, folder
    assert (orders(metrics, "success"), orders(metrics, "failure")) == (1, 0)
    assert acme.last_error is None
    assert pebble.issued() == 1
    # The CA's requests were answered from the store, and the answers are gone since.
    assert len(set(challenge_server.answered)) == len(DOMAINS)
    assert os.listdir(storage / "challenges") == []
    # renew_before_days (30) is longer than the certificate's two days: it is renewed at the
    # half of its lifetime, not ordered again and again.
    await until(lambda: clock.sleeps[-1] > 3600)
    midpoint = (pair.not_before + pair.not_after) / 2
    assert clock.sleeps[-1] == pytest.approx(midpoint - clock.now(), abs=5)
    assert pebble.issued() == 1


async def test_a_restart_reuses_the_stored_certificate_and_account(pebble, storage, running):
    first, _ = manager(pebble, storage, Clock())
    task = running(first)
    await until(lambda: first.state == "valid")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    account = (storage / "account.json").read_bytes()
    chain = os.stat(first.cert_paths[0])

    clock = Clock()
    second, metrics = manager(pebble, storage, clock, check_interval=7 * DAY)
    running(second)
    await until(lambda: len(clock.sleeps) > 0)  # it has looked, and decided to wait

    assert second.state == "valid"
    assert second.certificate is not None
    assert first.certificate is not None
    assert second.certificate.fingerprint == first.certificate.fingerprint
    assert clock.sleeps[0] > 3600  # until the renewal, not a poll of the CA
    assert (pebble.issued(), pebble.accounts()) == (1, 1)
    assert (orders(metrics, "success"), orders(metrics, "failure")) == (0, 0)
    assert (storage / "account.json").read_bytes() == account
    assert os.stat(first.cert_paths[0]).st_ino == chain.st_ino  # not even rewritten


async def test_a_due_certificate_is_renewed_and_replaced_atomically(pebble, storage, running):
    clock = Clock()
    acme, metrics = manager(pebble, storage, clock, renew_before_days=1, retry_first=0.2)
    running(acme)
    await until(lambda: acme.state == "valid")
    old = acme.certificate
    assert old is not None
    # Opened now, read after: a file replaced by a rename still reads whole through these.
    old_chain, old_key = os.open(old.cert_path, os.O_RDONLY), os.open(old.key_path, os.O_RDONLY)
    try:
        clock.advance(due(old, clock, 1))
        await until(lambda: acme.certificate is not None and acme.certificate != old)
        (storage / "old-chain.pem").write_bytes(os.read(old_chain, 1 << 20))
        (storage / "old-key.pem").write_bytes(os.read(old_key, 1 << 20))
    finally:
        os.close(old_chain)
        os.close(old_key)

    new = read_pair(*acme.cert_paths)
    assert new.fingerprint != old.fingerprint
    assert acme.certificate == new
    assert new.not_after > old.not_after
    verify(new, pebble.root())
    assert read_pair(str(storage / "old-chain.pem"), str(storage / "old-key.pem")).fingerprint == (
        old.fingerprint
    )
    assert sorted(os.listdir(os.path.dirname(new.cert_path))) == ["fullchain.pem", "privkey.pem"]
    assert (mode(new.cert_path), mode(new.key_path)) == (0o600, 0o600)
    assert (orders(metrics, "success"), orders(metrics, "failure")) == (2, 0)
    assert (pebble.issued(), pebble.accounts()) == (2, 1)  # the same account renews


async def test_a_failed_renewal_is_counted_logged_and_retried_with_backoff(
    pebble, storage, running, logs
):
    clock = Clock()
    acme, metrics = manager(
        pebble, storage, clock, renew_before_days=1,
        retry_first=0.1, retry_most=0.4, jitter=lambda: 0.5,
    )  # fmt: skip
    running(acme)
    await until(lambda: acme.state == "valid")
    old = acme.certificate
    assert old is not None

    pebble.stop()
    clock.advance(due(old, clock, 1))
    await asyncio.sleep(2.0)  # retries after 0.1, 0.2, 0.4, 0.4, ... seconds

    failures = orders(metrics, "failure")
    assert 4 <= failures <= 7  # at 0, 0.1, 0.3, 0.7, 1.1, 1.5, 1.9 s: never a tight loop
    failed = [line for line in logs() if line["message"] == "acme order failed"]
    assert len(failed) == failures
    assert {line["level"] for line in failed} == {"WARNING"}
    assert all("traceback" not in line for line in failed)
    assert all("ConnectionError" in line["error"] for line in failed)
    assert [line["retry_in"] for line in failed[:4]] == [0.1, 0.2, 0.4, 0.4]
    assert acme.state == "valid"  # the old certificate is still in place, and served
    assert acme.last_error is not None
    assert "ConnectionError" in acme.last_error
    assert read_pair(*acme.cert_paths).fingerprint == old.fingerprint

    await asyncio.to_thread(pebble.start)  # a new CA: it knows no account any more
    await until(lambda: acme.certificate != old)
    assert acme.last_error is None
    assert orders(metrics, "success") == 2
    assert not (storage / "backoff.json").exists()  # a success ends the stored backoff
    assert acme.certificate is not None
    verify(acme.certificate, pebble.root())
    assert pebble.accounts() == 2  # the manager registered again with the new CA


async def test_only_the_lock_holder_orders_and_another_takes_over(pebble, storage, running):
    """Two managers on one storage, as two workers of serve --workers would be, and first a
    third process that holds the lock."""
    storage.mkdir(mode=0o700)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n",
        str(storage / ".lock"),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    clock = Clock()
    managers = dict(
        manager(pebble, storage, clock, renew_before_days=1, check_interval=0.1) for _ in "ab"
    )
    try:
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"locked\n"
        tasks = {acme: running(acme) for acme in managers}
        await asyncio.sleep(0.5)  # another process holds the lock: neither orders
        assert [acme.state for acme in managers] == ["pending", "pending"]
        assert pebble.issued() == 0
    finally:
        holder.kill()  # the kernel drops a dead process's lock
        await holder.wait()

    await until(lambda: all(acme.state == "valid" for acme in managers))
    assert pebble.issued() == 1
    assert sorted(orders(metrics, "success") for metrics in managers.values()) == [0, 1]
    first, second = managers
    assert first.certificate == second.certificate  # the other one read it from the files

    # The one that ordered ends (its lock with it); the other takes over the next renewal.
    ordered = next(acme for acme, metrics in managers.items() if orders(metrics, "success"))
    other = second if ordered is first else first
    tasks[ordered].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await tasks[ordered]
    old = other.certificate
    assert old is not None
    clock.advance(due(old, clock, 1))
    await until(lambda: other.certificate != old)
    assert orders(managers[other], "success") == 1
    assert pebble.issued() == 2


async def test_cancelling_an_order_frees_the_lock_and_its_thread_gives_up(storage, running):
    """A CA that accepts connections and never answers: ``run`` ends at once when cancelled,
    and the order's thread, which cannot be cancelled, gives up within the network timeout."""
    connected = asyncio.Event()
    given_up = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await reader.read()  # until the client closes
        given_up.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = Acme(
        domains=DOMAINS, directory=f"https://127.0.0.1:{port}/dir", storage=str(storage)
    )
    metrics = Metrics()
    acme = AcmeManager(settings, metrics, ChallengeStore(str(storage)), network_timeout=1)
    task = running(acme)
    try:
        await until(connected.is_set, timeout=5)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=0.5)
        assert done == {task}
        assert task.cancelled()
        fd = os.open(storage / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: this would raise otherwise
        finally:
            os.close(fd)
        started = time.monotonic()
        await asyncio.wait_for(given_up.wait(), timeout=3)
        assert time.monotonic() - started < 1.5
        assert orders(metrics, "failure") == 0  # cancelled, not failed
    finally:
        server.close()
        await server.wait_closed()


async def test_the_backoff_outlives_a_restart(storage, running, logs):
    """A gateway restarted in a loop (a crash, a container's restart policy) must not order at
    every start: a failed order's backoff is stored, and a new process keeps to it (and goes
    on doubling it), then orders when it ends."""
    clock = Clock()
    process = unreachable_ca(storage, clock, retry_first=60)
    first, metrics = process()
    task = running(first)
    await until(lambda: orders(metrics, "failure") == 1)
    task.cancel()
    assert (storage / "backoff.json").stat().st_mode & 0o777 == 0o600
    second, metrics = process()  # the restart
    running(second)
    await asyncio.sleep(0.3)
    assert orders(metrics, "failure") == 0  # 60 s of backoff left: no order
    assert second.state == "failed"  # and it says why
    clock.advance(61)
    await until(lambda: orders(metrics, "failure") == 1)
    failed = [line for line in logs() if line["message"] == "acme order failed"]
    assert [line["retry_in"] for line in failed] == [60, 120]  # the second doubles


async def test_a_worker_that_takes_the_lock_over_keeps_to_the_stored_backoff(
    storage, running, logs
):
    """serve --workers: the worker that orders fails again and again, then dies; the one that
    takes its lock over (started before those failures) goes on with the stored backoff: no
    order at once, and the delay goes on doubling."""
    clock = Clock()
    worker = unreachable_ca(storage, clock, check_interval=0.1)

    def holders() -> int:
        return sum(line["message"] == "acme orders in this process" for line in logs())

    first, first_metrics = worker()
    first_task = running(first)
    await until(lambda: orders(first_metrics, "failure") == 1)
    second, metrics = worker()
    running(second)
    await asyncio.sleep(0.3)  # it has looked: the lock is taken
    clock.advance(61)
    await until(lambda: orders(first_metrics, "failure") == 2)
    clock.advance(121)
    await until(lambda: orders(first_metrics, "failure") == 3)
    stored = json.loads((storage / "backoff.json").read_bytes())
    assert stored["failures"] == 3
    assert stored["next_order"] - clock.now() == pytest.approx(240, abs=5)

    first_task.cancel()  # its lock with it
    with contextlib.suppress(asyncio.CancelledError):
        await first_task
    await until(lambda: holders() == 2)
    await asyncio.sleep(0.3)  # the clock stands still: 240 s of backoff left
    assert orders(metrics, "failure") == 0
    assert json.loads((storage / "backoff.json").read_bytes()) == stored
    assert second.state == "failed"
    clock.advance(241)
    await until(lambda: orders(metrics, "failure") == 1)
    failed = [line for line in logs() if line["message"] == "acme order failed"]
    assert [line["retry_in"] for line in failed] == [60, 120, 240, 480]  # the 4th in a row
    assert json.loads((storage / "backoff.json").read_bytes())["failures"] == 4


async def test_every_worker_reports_the_failure_of_the_one_that_orders(pebble, storage, running):
    """serve --workers: /health's ``acme`` part is the same whichever worker answers: the one
    that does not order says ``failed`` with the error the other stored, and ``valid``, with no
    error, once the other's next order succeeds."""
    pebble.stop()  # the orders fail: the CA does not answer
    clock = Clock()
    first, first_metrics = manager(pebble, storage, clock, check_interval=0.1, jitter=lambda: 0.5)
    second, second_metrics = manager(pebble, storage, clock, check_interval=0.1)
    running(first)  # takes the lock, and orders
    running(second)  # looks before the first order has failed
    await until(lambda: orders(first_metrics, "failure") == 1)
    assert first.state == "failed"
    await until(lambda: second.state == "failed")
    assert second.last_error == first.last_error
    assert second.last_error is not None
    assert "ConnectionError" in second.last_error
    assert orders(second_metrics, "failure") == 0  # it only reports the other's

    await asyncio.to_thread(pebble.start)
    clock.advance(61)  # the backoff is over: the first orders again
    await until(lambda: first.state == "valid")
    await until(lambda: second.state == "valid" and second.last_error is None)
    assert (orders(first_metrics, "success"), orders(second_metrics, "success")) == (1, 0)
    assert first.certificate == second.certificate


@pytest.mark.parametrize("changed", ["directory", "domains"])
async def test_a_backoff_stored_for_another_order_does_not_hold_back_a_fixed_config(
    pebble, storage, running, changed
):
    """The operator fixes what made the orders fail (a wrong directory URL, a misspelt
    domain) and restarts: the fixed config orders at once, not after the old one's backoff."""
    from .helpers import free_port  # noqa: PLC0415

    fixed = settings(pebble, storage)
    if changed == "directory":
        wrong = dataclasses.replace(fixed, directory=f"https://127.0.0.1:{free_port()}/dir")
    else:
        wrong = dataclasses.replace(fixed, domains=("typo.gateway.test",))
        pebble.stop()  # its orders fail: the CA does not answer
    clock = Clock()
    metrics = Metrics()
    first = AcmeManager(
        wrong, metrics, ChallengeStore(str(storage)), now=clock.now, sleep=clock.sleep,
        jitter=lambda: 0.5,
    )  # fmt: skip
    task = running(first)
    await until(lambda: orders(metrics, "failure") == 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    stored = json.loads((storage / "backoff.json").read_bytes())
    assert stored["next_order"] - clock.now() > 30  # about a minute to wait, for that config
    if changed == "domains":
        await asyncio.to_thread(pebble.start)

    second, metrics = manager(pebble, storage, clock)  # the clock stands still
    running(second)
    await until(lambda: second.state == "valid")
    assert (orders(metrics, "success"), orders(metrics, "failure")) == (1, 0)
    assert pebble.issued() == 1
    assert not (storage / "backoff.json").exists()


async def test_a_stop_while_the_ca_validates_ends_the_order_at_once(
    pebble, storage, challenge_server, running
):
    """SIGTERM while the CA validates (its request to the challenge is held here): the order's
    thread gives up within a second, so the process can exit (asyncio.run waits for it), and
    nothing has been issued."""
    challenge_server.release.clear()
    acme, metrics = manager(pebble, storage, Clock())
    task = running(acme)
    try:
        await until(lambda: len(challenge_server.asked) > 0)  # the CA is validating
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        started = time.monotonic()
        # What asyncio.run and uvloop.run do before the process exits.
        await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), 10)
        assert time.monotonic() - started < 2.5
    finally:
        challenge_server.release.set()
    assert os.listdir(storage / "challenges") == []
    assert pebble.issued() == 0
    assert not (storage / "certificates").exists()  # nothing to store
    assert orders(metrics, "failure") == 0  # stopped, not failed


async def test_a_stop_once_the_ca_issues_still_stores_the_certificate(pebble, storage, running):
    """SIGTERM after the order is finalized: the CA issues the certificate whatever happens, so
    it is stored (another order would count against the CA's duplicate-certificate limit), and
    the next start serves it and orders nothing."""
    acme, _ = manager(pebble, storage, Clock())
    task = running(acme)
    await until(lambda: pebble.issued() == 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), 30)
    pair = read_pair(*acme.cert_paths)
    verify(pair, pebble.root())

    clock = Clock()
    again, metrics = manager(pebble, storage, clock)
    running(again)
    await until(lambda: len(clock.sleeps) > 0)
    assert again.state == "valid"
    assert again.certificate == pair
    assert pebble.issued() == 1
    assert (orders(metrics, "success"), orders(metrics, "failure")) == (0, 0)


async def test_a_stop_keeps_the_lock_until_what_the_ca_issued_is_stored(
    pebble, storage, running, monkeypatch
):
    """The lock was released at once while the order thread went on storing: a process that
    took it over meanwhile tidied the storage under the store (its staged files) and ordered
    again. The stop now ends once the store did: here each rename takes 0.2 s longer."""
    renames: list[str] = []

    def slow_replace(source: str, target: str) -> None:
        time.sleep(0.2)
        replace(source, target)
        renames.append(os.path.basename(target))

    replace = os.replace
    monkeypatch.setattr(os, "replace", slow_replace)
    acme, _ = manager(pebble, storage, Clock())
    task = running(acme)
    await until(lambda: pebble.issued() == 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert renames[-1] == "fullchain.pem"  # the whole store, before the lock went
    verify(read_pair(*acme.cert_paths), pebble.root())
    fd = os.open(storage / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the stop returned
    finally:
        os.close(fd)


async def test_a_certificate_issued_but_not_stored_is_stored_by_the_next_attempt(
    pebble, storage, running
):
    """The storage fails after the CA issued the certificate (a disk almost full; here a file
    where the certificate's folder goes): the next attempt stores that certificate instead of
    ordering another one."""
    blocker = storage / "certificates" / DOMAINS[0]
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"not a folder")
    clock = Clock()
    acme, metrics = manager(pebble, storage, clock, jitter=lambda: 0.5)
    running(acme)
    await until(lambda: orders(metrics, "failure") == 1)
    assert acme.last_error is not None
    assert "NotADirectoryError" in acme.last_error
    assert pebble.issued() == 1

    blocker.unlink()  # the storage will do again
    clock.advance(61)
    await until(lambda: acme.state == "valid")
    pair = read_pair(*acme.cert_paths)
    verify(pair, pebble.root())
    assert acme.certificate == pair
    assert pebble.issued() == 1  # the one issued before
    assert (orders(metrics, "success"), orders(metrics, "failure")) == (1, 1)
    assert not (storage / "backoff.json").exists()


async def test_the_directory_is_trusted_through_the_systems_cas_without_ca_bundle(
    pebble, storage, running, monkeypatch
):
    """A private CA installed in the OS trust store (here: the file OpenSSL takes as the
    system's, which SSL_CERT_FILE names) is trusted without ``ca_bundle``, as are certifi's."""
    import certifi  # noqa: PLC0415

    monkeypatch.setenv("SSL_CERT_FILE", pebble.ca_file)
    metrics = Metrics()
    acme = AcmeManager(
        dataclasses.replace(settings(pebble, storage), ca_bundle=None),
        metrics, ChallengeStore(str(storage)), retry_first=0.2,
    )  # fmt: skip
    running(acme)
    await until(lambda: acme.state == "valid" or orders(metrics, "failure") > 0)
    assert (acme.state, acme.last_error) == ("valid", None)
    bundle = (storage / "ca-bundle.pem").read_bytes()
    assert contents(pebble.ca_file) in bundle
    assert contents(certifi.where()).strip() in bundle
    assert mode(storage / "ca-bundle.pem") == 0o600


@pytest.mark.parametrize("crash", ["after the key", "before the key"])
async def test_a_store_cut_short_by_a_crash_is_finished_at_the_next_start(
    pebble, storage, running, crash
):
    """A renewal's certificate and key are two files, never replaced at the same instant. A
    crash (SIGKILL, a power loss) in between leaves what a renewal writes before its first or
    second rename: the next start puts together a pair that loads, and orders nothing."""
    clock = Clock()
    acme, _ = manager(pebble, storage, clock, renew_before_days=1)
    task = running(acme)
    await until(lambda: acme.state == "valid")
    old = acme.certificate
    assert old is not None
    folder = Path(old.cert_path).parent
    old_files = {name: (folder / name).read_bytes() for name in ("fullchain.pem", "privkey.pem")}
    clock.advance(due(old, clock, 1))
    await until(lambda: acme.certificate not in (None, old))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    new = acme.certificate
    assert new is not None
    new_chain = (folder / "fullchain.pem").read_bytes()
    # What the renewal's _store leaves when it is killed: the old pair, its new chain beside
    # it (and a temporary file of an earlier write, killed earlier still) ...
    (folder / "fullchain.pem").write_bytes(old_files["fullchain.pem"])
    (folder / "fullchain.pem.new").write_bytes(new_chain)
    (folder / ".k2j4_x1.tmp").write_bytes(b"-----BEGIN PRIV")
    if crash == "after the key":  # ... and the new key in place of the old one
        expected = new
    else:
        (folder / "privkey.pem").write_bytes(old_files["privkey.pem"])
        expected = old

    clock = Clock()  # the next start, at the real time: neither certificate is due
    again, metrics = manager(pebble, storage, clock)
    running(again)
    await until(lambda: len(clock.sleeps) > 0)  # it has looked, and decided to wait
    pair = read_pair(*again.cert_paths)
    assert pair.fingerprint == expected.fingerprint
    assert again.state == "valid"
    assert again.certificate == pair
    assert sorted(os.listdir(folder)) == ["fullchain.pem", "privkey.pem"]
    assert (orders(metrics, "success"), orders(metrics, "failure")) == (0, 0)
    assert pebble.issued() == 2


def test_the_challenge_store_serves_only_tokens(storage):
    store = ChallengeStore(str(storage))
    token = "Zm9vYmFy_-0123456789abcdefghijklmnopqrstuvw"  # noqa: S105 - an ACME token, not a secret
    assert store.get(token) is None
    store.put(token, b"key-authorization")
    assert store.get(token) == b"key-authorization"
    assert mode(storage / "challenges" / token) == 0o600
    assert mode(storage / "challenges") == 0o700

    (storage / "secret").write_bytes(b"account key")
    (storage / "challenges" / ".hidden").write_bytes(b"not a token")
    for bad in ("../secret", "..", ".hidden", "a/b", "", f"{token}\n", "x" * 256, "tok%2e", "t.k"):
        assert store.get(bad) is None, bad
        with pytest.raises(ValueError, match="not an ACME token"):
            store.put(bad, b"x")

    store.remove(token)
    assert store.get(token) is None
    assert sorted(os.listdir(storage / "challenges")) == [".hidden"]
    store.remove(token)  # gone already: no error
    store.remove("../secret")  # not a token: nothing removed
    assert (storage / "secret").exists()
