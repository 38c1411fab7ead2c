"""The gateway's ACME client (RFC 8555, http-01): orders one certificate for ``tls.acme``'s
domains, stores it where the TLS listener reads it, and renews it before it expires.

``AcmeManager.run`` is one loop: look at what is stored, order when the certificate is missing
or due (only the process that holds ``<storage>/.lock``; with ``serve --workers`` the others
only look), then wait. ``ChallengeStore`` holds the http-01 answers as files, so that any
worker can answer the CA; the plain listener answers ``/.well-known/acme-challenge/<token>``
from ``ChallengeStore.get``.

The storage directory (0700; every file 0600, each written whole and renamed into place, so a
reader never sees part of one)::

    account.json                              the account key and URL, for one directory URL
    certificates/<first domain>/privkey.pem   the certificate's key, replaced first
    certificates/<first domain>/fullchain.pem the certificate and its chain, replaced last
                                              (written beside it first, as fullchain.pem.new)
    challenges/<token>                        key authorizations while an order is open
    backoff.json                              after a failed order: when the next may start
                                              (and for which directory and domains)
    ca-bundle.pem                             the system's CAs, certifi's, and ca_bundle
    .lock                                     flock'd by the process that orders

The acme library (certbot's) speaks the protocol. It is synchronous (requests): an order runs
in a thread, and every network call in it is bounded by a timeout, so a cancelled ``run``
never leaves a thread waiting forever (while the CA validates, it gives up within a second;
once the order is finalized, it stores the certificate first). It is imported when the first
order starts, so a gateway whose certificate is stored and valid does not load it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import random
import re
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from .. import __version__
from ..certs import CertError, Pair, matches, read_pair

if TYPE_CHECKING:
    from acme import client, messages
    from josepy.jwk import JWK

    from ..config.types import Acme
    from ..metrics import Metrics

log = logging.getLogger("gateway.acme")

State = Literal["pending", "valid", "failed"]
DAY: Final = 86400.0
# How long a stop waits for an order thread to end (it stops at its next step, within about
# a second; or stores what the CA issued) before releasing the lock all the same.
STOP_WAIT: Final = 5.0
# An ACME token is base64url (RFC 8555 8.3); nothing else may name a file in challenges/.
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{1,255}")
# Beside fullchain.pem while a new chain is put in place (see AcmeManager._store).
_STAGED: Final = ".new"


def renewal_delay(not_before: float, not_after: float, renew_before_days: int, now: float) -> float:
    """Seconds from ``now`` until a certificate valid from ``not_before`` to ``not_after``
    (seconds since the epoch) is due for renewal; 0 when it is due. Due ``renew_before_days``
    before it expires, but never before half its lifetime: a CA's short-lived certificate
    (shorter than the window) is renewed at its midpoint, not again at once."""
    due = max(not_after - renew_before_days * DAY, (not_before + not_after) / 2)
    return max(0.0, due - now)


def retry_delay(failures: int, first: float, most: float, jitter: float) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1, 2, ...): ``first``,
    doubling each time, at most ``most``; ``jitter`` (0 to 1) spreads it over 75% to 125% of
    that, so that many gateways do not retry against a CA at the same moments."""
    nominal = min(most, first * 2.0 ** min(failures - 1, 64))
    return nominal * (0.75 + 0.5 * jitter)


def covers(pair: Pair, domains: tuple[str, ...]) -> bool:
    """Whether the certificate is valid for every one of ``domains``."""
    return all(any(matches(name, domain) for name in pair.names) for domain in domains)


class ChallengeStore:
    """http-01 key authorizations as files in ``<storage>/challenges/<token>``, visible to every
    process on the machine: with ``serve --workers`` the CA's request may reach any worker."""

    def __init__(self, storage: str) -> None:
        self.directory = os.path.join(storage, "challenges")

    def get(self, token: str) -> bytes | None:
        """The body for ``GET /.well-known/acme-challenge/<token>``: the key authorization, or
        None when no such challenge is open. Anything but a base64url token is None at once
        (it never names a path outside the directory)."""
        if not _TOKEN.fullmatch(token):
            return None
        try:
            return Path(self.directory, token).read_bytes()
        except OSError:
            return None

    def put(self, token: str, key_authorization: bytes) -> None:
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"not an ACME token: {token!r}")
        _make_directory(self.directory)
        write_atomically(os.path.join(self.directory, token), key_authorization)

    def remove(self, token: str) -> None:
        if _TOKEN.fullmatch(token):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, token))


@dataclasses.dataclass(frozen=True, slots=True)
class _Backoff:
    """What ``backoff.json`` says about this manager's order."""

    failures: int  # failed orders in a row
    next_order: float  # not before this (the wall clock)
    error: str | None  # the last one's


class _Stopped(Exception):
    """``run`` was cancelled: the order in its thread ends at the next step (before it is
    finalized: nothing has been issued)."""


def certificate_paths(settings: Acme) -> tuple[str, str]:
    """Where the certificate for ``settings.domains`` is stored: (fullchain.pem, privkey.pem)."""
    folder = os.path.join(settings.storage, "certificates", settings.domains[0])
    return os.path.join(folder, "fullchain.pem"), os.path.join(folder, "privkey.pem")


class AcmeManager:
    """Keeps a certificate for ``settings.domains`` in ``cert_paths``: ``await run()`` until
    cancelled. ``state`` says whether a real certificate is in place (serve
    ``certs.placeholder`` from memory until it is; never write it to ``cert_paths``)."""

    def __init__(
        self,
        settings: Acme,
        metrics: Metrics,
        challenges: ChallengeStore,
        *,
        now: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        retry_first: float = 60.0,
        retry_most: float = 6 * 3600.0,
        check_interval: float = 60.0,
        network_timeout: int = 30,
        order_timeout: float = 120.0,
    ) -> None:
        """``now`` and ``sleep`` are the wall clock and the wait (a test moves time on);
        failures are retried after ``retry_first`` seconds, doubling up to ``retry_most``, and
        two orders are never closer than ``retry_first``; the storage is looked at again at
        least every ``check_interval`` (a worker without the lock, to take over when its
        holder died); each network call gets ``network_timeout`` seconds, an order's polling
        ``order_timeout`` in all."""
        self._settings = settings
        self._metrics = metrics
        self._challenges = challenges
        self._now = now
        self._sleep = sleep
        self._jitter = jitter
        self._retry_first = retry_first
        self._retry_most = retry_most
        self._check_interval = check_interval
        self._network_timeout = network_timeout
        self._order_timeout = order_timeout
        self._storage = settings.storage
        self.cert_paths: Final = certificate_paths(settings)
        self._lock: int | None = None  # the fd of storage/.lock while this process holds it
        self._stopping = threading.Event()  # set when run() ends: its order thread stops
        self._ordering: asyncio.Future[Pair] | None = None  # the order thread's, while it runs
        # Set by the order thread (under _phase, with its last look at _stopping) once the CA
        # will issue: from then on a stop waits for the store before releasing the lock.
        self._storing = False
        self._phase = threading.Lock()
        self._certificate: Pair | None = None
        self._last_error: str | None = None  # this process's last order's (or storage's)
        self._stored_error: str | None = None  # without the lock: the last order's, as stored
        self._failures = 0
        self._next_order = 0.0  # not before this (now's clock): the backoff
        self._issued: tuple[bytes, bytes] | None = None  # (chain, key) issued, not yet stored

    @property
    def settings(self) -> Acme:
        """What this manager orders for (a reload does not change it: a restart does)."""
        return self._settings

    @property
    def state(self) -> State:
        """valid: a certificate for every domain, not expired, is in ``cert_paths``; failed:
        none is, and the last order failed (``last_error``); pending: none is yet (being
        ordered, or waiting for the process that orders)."""
        certificate = self._certificate
        if certificate is not None and certificate.not_after > self._now():
            return "valid"
        return "pending" if self.last_error is None else "failed"

    @property
    def last_error(self) -> str | None:
        """Why the last order failed (also while an older certificate is still served); None
        after a success. In a process that does not order, the error its orderer stored in
        ``backoff.json`` (read at every look, so at most ``check_interval`` old)."""
        return self._last_error if self._last_error is not None else self._stored_error

    @property
    def certificate(self) -> Pair | None:
        """The stored certificate as last read, if it is for every domain."""
        return self._certificate

    async def run(self) -> None:
        """Order when the certificate is missing or due, wait, repeat; until cancelled, when
        the lock is released at once and an order in flight stops at its next step; but once
        the order is finalized, the stop waits for its certificate to be stored (up to
        ``STOP_WAIT``) before releasing the lock: a process that took it over sooner would
        tidy the storage under the store and order again."""
        self._stopping = stopping = threading.Event()
        try:
            while True:
                await self._sleep(await self._step())
        finally:
            with self._phase:
                stopping.set()
                storing = self._storing
            ordering = self._ordering
            if storing and ordering is not None and not ordering.done():
                await asyncio.wait([ordering], timeout=STOP_WAIT)
                if not ordering.done():
                    log.warning("acme order still running at the stop; the lock is released")
            if ordering is not None and ordering.done() and not ordering.cancelled():
                ordering.exception()  # (its failure was the stop's: retrieved, not reported)
            self._unlock()

    async def _step(self) -> float:
        """One look at the storage (and an order, if this process orders and the certificate
        is missing or due); returns the seconds to wait before the next look."""
        now = self._now()
        self._certificate = certificate = self._stored()
        if self._lock is None:  # what the process that orders says of its last order
            stored = self._read_backoff()
            self._stored_error = None if stored is None else stored.error
        wait = self._next_order - now
        if wait > 0:
            return min(wait, self._check_interval)  # backing off (or just ordered)
        try:
            taken = self._lock is None
            if not self._holds_lock():
                self._last_error = None  # the storage does (again): another process orders
                self._failures = 0
                return self._check_interval
        except OSError as exc:  # the storage will not do: no order can be placed
            self._failed(exc)
            return self._next_order - now
        if taken:  # this process orders from now on: the backoff its last holder stored holds
            self._stored_error = None
            self._resume_backoff()
            try:
                self._finish_store()
            except OSError as exc:  # the order (or the next look) meets it too
                log.warning("acme storage not tidied", extra={"fields": {"reason": str(exc)}})
            self._certificate = certificate = self._stored()
            wait = self._next_order - now
            if wait > 0:
                return min(wait, self._check_interval)
        if certificate is not None:
            days = self._settings.renew_before_days
            wait = renewal_delay(certificate.not_before, certificate.not_after, days, now)
            if wait > 0:
                return min(wait, self._check_interval)
        await self._attempt()
        return 0.0

    async def _attempt(self) -> None:
        try:
            # Shielded: a stop does not forget the thread, which run() waits for.
            self._ordering = asyncio.get_running_loop().run_in_executor(
                None, self._order, self._stopping
            )
            pair = await asyncio.shield(self._ordering)
        except Exception as exc:  # noqa: BLE001 - the loop outlives any failure of an order
            self._failed(exc)
        else:
            self._certificate = pair
            self._last_error = None
            self._failures = 0
            self._next_order = self._now() + self._retry_first
            self._metrics.acme_orders.labels("success").inc()

    @property
    def _backoff_path(self) -> str:
        return os.path.join(self._storage, "backoff.json")

    def _keep_backoff(self) -> None:
        """The backoff outlives this process: a gateway restarted in a loop (a crash, a
        container's restart policy) must not order at every start, into the CA's limits on
        failed validations (Let's Encrypt: 5 per hour per name). It names the order it is
        for, so that a changed config is not held back by the old one's failures."""
        state = {**self._order_settings(), "failures": self._failures,
                 "next_order": self._next_order, "error": self._last_error}  # fmt: skip
        try:
            _make_directory(self._storage)
            write_atomically(self._backoff_path, json.dumps(state).encode())
        except OSError as exc:  # the backoff still holds in this process
            log.warning("acme backoff not stored", extra={"fields": {"reason": str(exc)}})

    def _order_settings(self) -> dict[str, object]:
        """What a stored backoff is for: an order from this directory, for these domains (in
        any order), with this contact and CA file; one that says otherwise is not kept to."""
        settings = self._settings
        return {"directory": settings.directory, "domains": sorted(settings.domains),
                "email": settings.email, "ca_bundle": settings.ca_bundle}  # fmt: skip

    def _read_backoff(self) -> _Backoff | None:
        """The stored backoff, if there is one for this order (running or over)."""
        try:
            state = json.loads(Path(self._backoff_path).read_bytes())
            failures, next_order = int(state["failures"]), float(state["next_order"])
            error = state.get("error")
            order = {name: state.get(name) for name in self._order_settings()}
        except (OSError, ValueError, KeyError, TypeError):
            return None  # none, or not ours to read
        if order != self._order_settings() or failures < 1:
            return None  # another directory or other domains (a config since fixed)
        return _Backoff(failures, next_order, error if isinstance(error, str) else None)

    def _resume_backoff(self) -> None:
        """Once this process holds the lock, the backoff stored by its previous holder (this
        process before a restart, or another worker that died) goes on: its failures in a row
        (when more than this process's own) and the wait still running (within this process's
        own bound: a clock moved back does not stop orders for long)."""
        stored = self._read_backoff()
        if stored is None or stored.failures < self._failures:
            return  # orders go by this process's own backoff
        self._failures = stored.failures
        self._last_error = stored.error
        now = self._now()
        if now < stored.next_order <= now + self._retry_most * 1.25:
            self._next_order = max(self._next_order, stored.next_order)

    def _failed(self, exc: Exception) -> None:
        """Count and log a failed order, and back off."""
        self._failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        delay = retry_delay(self._failures, self._retry_first, self._retry_most, self._jitter())
        self._next_order = self._now() + delay
        self._keep_backoff()
        self._metrics.acme_orders.labels("failure").inc()
        fields = {**self._fields(), "error": self._last_error, "failures": self._failures,
                  "retry_in": round(delay, 1)}  # fmt: skip
        if _expected(exc):
            log.warning("acme order failed", extra={"fields": fields})
        else:
            log.exception("acme order failed (a bug)", extra={"fields": fields})

    def _fields(self) -> dict[str, object]:
        return {"domains": list(self._settings.domains), "directory": self._settings.directory}

    def _stored(self) -> Pair | None:
        """The stored certificate, if it reads back and is for every domain."""
        try:
            pair = read_pair(*self.cert_paths)
        except CertError:
            return None
        return pair if covers(pair, self._settings.domains) else None

    # -- the lock: one process orders ---------------------------------------------------------

    def _holds_lock(self) -> bool:
        """Whether this process orders: it holds ``storage/.lock`` (a non-blocking attempt
        when it does not yet; the kernel drops the lock when its holder dies)."""
        if self._lock is not None:
            return True
        _make_directory(self._storage)
        fd = os.open(os.path.join(self._storage, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock = fd
        log.info("acme orders in this process", extra={"fields": {"storage": self._storage}})
        return True

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the only descriptor releases the flock
            self._lock = None

    # -- in a thread: the protocol ------------------------------------------------------------

    def _order(self, stopping: threading.Event) -> Pair:
        """Order, answer the http-01 challenges, finalize, store: the whole order, blocking
        (in a thread). Once ``stopping`` is set it is given up at its next step (within a
        second while the CA validates) until it is finalized; from then on the CA issues the
        certificate, and it is stored all the same (one more order would count against the
        CA's limit on duplicate certificates). A certificate issued but not stored (a full
        disk) is stored by the next attempt instead of ordering again."""
        from acme import challenges, crypto_util, messages  # noqa: PLC0415 - when ordering

        issued, self._issued = self._issued, None
        with self._phase:
            self._storing = issued is not None
        if issued is not None and _not_after(issued[0]) > self._now():
            return self._store_issued(*issued)
        acme, account_key = self._client()
        try:
            key = _new_key()
            order = acme.new_order(crypto_util.make_csr(key, list(self._settings.domains)))
            tokens: list[str] = []
            try:
                for authorization in order.authorizations:
                    if authorization.body.status == messages.STATUS_VALID:
                        continue  # the CA reused an authorization it had
                    challenge = next(
                        (c for c in authorization.body.challenges
                         if isinstance(c.chall, challenges.HTTP01)),
                        None,
                    )  # fmt: skip
                    if challenge is None:
                        name = authorization.body.identifier.value
                        raise CertError(f"the CA offers no http-01 challenge for {name}")
                    chall = challenge.chall
                    token = chall.encode("token")
                    self._challenges.put(token, chall.validation(account_key).encode())
                    tokens.append(token)
                    _check(stopping)
                    acme.answer_challenge(challenge, chall.response(account_key))
                deadline = datetime.datetime.now() + datetime.timedelta(seconds=self._order_timeout)
                order = _validated(acme, order, deadline, stopping)
                with self._phase:  # the last moment at which nothing has been issued
                    _check(stopping)
                    self._storing = True  # (a stop now waits for the store)
                order = acme.finalize_order(order, deadline)
            finally:
                for token in tokens:
                    self._challenges.remove(token)
            return self._store_issued(order.fullchain_pem.encode(), key)
        finally:
            acme.net.session.close()

    def _store_issued(self, fullchain: bytes, key: bytes) -> Pair:
        """Store a certificate the CA issued; kept in memory when the storage fails, for the
        next attempt to store instead of ordering again."""
        try:
            pair = self._store(fullchain, key)
        except OSError:
            self._issued = (fullchain, key)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._backoff_path)  # a stored certificate ends the stored backoff
        log.info(
            "acme certificate stored",
            extra={"fields": {**self._fields(), "fingerprint": pair.fingerprint,
                              "not_after": _iso(pair.not_after)}},
        )  # fmt: skip
        return pair

    def _client(self) -> tuple[client.ClientV2, JWK]:
        """A client for the directory, signed in as the stored account (registered anew when
        there is none for this directory, or the CA no longer knows it); the account key."""
        from acme import client, messages  # noqa: PLC0415 - when ordering
        from josepy import jwa  # noqa: PLC0415

        settings = self._settings
        stored = self._read_account()
        key = stored[0] if stored is not None else _new_account_key()
        net = client.ClientNetwork(
            key,
            alg=jwa.ES256,
            user_agent=f"daarion-gateway/{__version__}",
            timeout=self._network_timeout,
        )
        try:
            # acme annotates verify_ssl as a bool, but hands it on to requests' verify=, which
            # also takes the path of a CA file.
            net.verify_ssl = self._ca_bundle()  # type: ignore[assignment]  # a CA file: see above
            acme = client.ClientV2(client.ClientV2.get_directory(settings.directory, net), net)
            if stored is not None:
                try:
                    acme.query_registration(stored[1])
                except messages.Error as exc:
                    if exc.code != "accountDoesNotExist":
                        raise
                else:
                    return acme, key
            registration = messages.NewRegistration.from_data(
                email=settings.email, terms_of_service_agreed=True
            )
            account = acme.new_account(registration)
        except BaseException:
            net.session.close()
            raise
        self._write_account(key, account)
        log.info(
            "acme account registered", extra={"fields": {**self._fields(), "account": account.uri}}
        )
        return acme, key

    # -- in a thread: the files ---------------------------------------------------------------

    def _read_account(self) -> tuple[JWK, messages.RegistrationResource] | None:
        """The stored account key and registration, if they are for this directory."""
        from acme import messages  # noqa: PLC0415 - when ordering
        from josepy import errors, jwk  # noqa: PLC0415

        path = os.path.join(self._storage, "account.json")
        try:
            stored = json.loads(Path(path).read_bytes())
            if stored["directory"] != self._settings.directory:
                return None  # another CA: another account
            key = jwk.JWK.from_json(stored["key"])
            account = messages.RegistrationResource.from_json(stored["account"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, errors.Error) as exc:
            raise CertError(
                f"{path}: not an account file ({exc}); remove it to register anew"
            ) from None
        if not isinstance(key, jwk.JWK) or not isinstance(account, messages.RegistrationResource):
            raise CertError(f"{path}: not an account file; remove it to register anew")
        return key, account

    def _write_account(self, key: JWK, account: messages.RegistrationResource) -> None:
        stored = {
            "directory": self._settings.directory,
            "key": key.to_json(),
            "account": account.to_json(),
        }
        _make_directory(self._storage)
        write_atomically(
            os.path.join(self._storage, "account.json"), json.dumps(stored, indent=2).encode()
        )

    def _ca_bundle(self) -> str:
        """A CA file of the system's CAs (OpenSSL's default file, which ``SSL_CERT_FILE``
        names instead: the OS trust store, with a private CA ``update-ca-certificates``
        added), certifi's (requests' own) and ``ca_bundle`` (when it is set)."""
        import certifi  # noqa: PLC0415 - requests' own CA bundle, when ordering

        parts: list[bytes] = []
        system: str | None = ssl.get_default_verify_paths().cafile  # None: no such file
        if system is not None:
            try:
                parts.append(Path(system).read_bytes())
            except OSError as exc:  # certifi's and ca_bundle are still trusted
                log.warning(
                    "acme system CA file not read",
                    extra={"fields": {"path": system, "reason": str(exc)}},
                )
        parts.append(Path(certifi.where()).read_bytes())
        if self._settings.ca_bundle is not None:
            parts.append(Path(self._settings.ca_bundle).read_bytes())
        path = os.path.join(self._storage, "ca-bundle.pem")
        write_atomically(path, b"".join(part.rstrip(b"\n") + b"\n" for part in parts))
        return path

    def _store(self, fullchain: bytes, key: bytes) -> Pair:
        """Check the CA's certificate against its key and the domains, then put both in
        place: the chain beside its place first (``fullchain.pem.new``), then the key, then
        the chain (a reader that sees the new chain sees its key). A crash between the two
        leaves the new key with the new chain beside it: ``_finish_store`` puts it in place."""
        cert_path, key_path = self.cert_paths
        staged = cert_path + _STAGED
        folder = os.path.dirname(cert_path)
        _make_directory(folder)
        temp_key = _temp_file(folder, key)
        try:
            temp_cert = _temp_file(folder, fullchain)
            try:
                pair = read_pair(temp_cert, temp_key)
                if not covers(pair, self._settings.domains):
                    raise CertError(f"the CA's certificate is for {', '.join(pair.names)} only")
                os.replace(temp_cert, staged)
                _sync_directory(folder)  # the staged chain is on disk before its key is in place
                os.replace(temp_key, key_path)
                os.replace(staged, cert_path)
                _sync_directory(folder)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp_cert)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_key)
        return dataclasses.replace(pair, cert_path=cert_path, key_path=key_path)

    def _finish_store(self) -> None:
        """What a ``_store`` cut short (a crash, a power loss) left, once this process holds
        the lock (no other stores): a staged chain that matches the key in place goes in
        place (the crash came between the key and the chain), any other is removed (it came
        before the key: the pair in place is the previous one, whole); so are temporary files."""
        cert_path, key_path = self.cert_paths
        staged = cert_path + _STAGED
        folder = os.path.dirname(cert_path)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
        if os.path.basename(staged) not in names:
            return
        try:
            read_pair(staged, key_path)
        except CertError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
            return
        os.replace(staged, cert_path)
        _sync_directory(folder)
        log.warning(
            "acme certificate put in place after an interrupted store",
            extra={"fields": {**self._fields(), "path": cert_path}},
        )


def _check(stopping: threading.Event) -> None:
    if stopping.is_set():
        raise _Stopped


def _validated(
    acme: client.ClientV2,
    order: messages.OrderResource,
    deadline: datetime.datetime,
    stopping: threading.Event,
) -> messages.OrderResource:
    """``acme.poll_authorizations``, given up (``_Stopped``) within a second of ``stopping``
    being set: while the CA validates, nothing has been issued, and nothing is lost."""
    from acme import errors, messages  # noqa: PLC0415 - when ordering

    polled: list[messages.AuthorizationResource] = []
    for pending in order.authorizations:
        authorization, _ = acme.poll(pending)
        while authorization.body.status == messages.STATUS_PENDING:
            if datetime.datetime.now() >= deadline:
                raise errors.TimeoutError
            if stopping.wait(1.0):
                raise _Stopped
            authorization, _ = acme.poll(authorization)
        polled.append(authorization)
    failed = [a for a in polled if a.body.status != messages.STATUS_VALID]
    if failed:
        raise errors.ValidationError(failed)
    validated: messages.OrderResource = order.update(authorizations=polled)
    return validated


def _not_after(fullchain: bytes) -> float:
    """When the first certificate of a PEM chain expires (seconds since the epoch)."""
    from cryptography import x509  # noqa: PLC0415 - when ordering

    return x509.load_pem_x509_certificates(fullchain)[0].not_valid_after_utc.timestamp()


def _expected(exc: Exception) -> bool:
    """Whether an order failed the way orders do (the CA refused or did not answer, a file
    would not do), not through a bug of ours: one log line without a traceback."""
    from acme import errors  # noqa: PLC0415 - loaded by the order that failed
    from josepy import errors as jose_errors  # noqa: PLC0415

    # requests' errors are OSErrors
    return isinstance(exc, OSError | CertError | errors.Error | jose_errors.Error)


def _new_key() -> bytes:
    """A new P-256 key for the certificate (PEM, PKCS #8): a new one for every order."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - when ordering
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _new_account_key() -> JWK:
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - when ordering
    from josepy import jwk  # noqa: PLC0415

    return jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))


def _make_directory(path: str) -> None:
    """``path`` with mode 0700 (only this user reads keys and challenges); the parents it
    needs are made 0700 too, those that exist are left as they are."""
    _create(path)
    with contextlib.suppress(PermissionError):  # another user's directory: its owner's mode
        os.chmod(path, 0o700)


def _create(path: str) -> None:
    if not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent:
            _create(parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)


def _sync_directory(folder: str) -> None:
    """Flush ``folder``'s entries to disk: renames in it survive a power loss."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_file(folder: str, data: bytes) -> str:
    """A new file (0600) in ``folder`` holding ``data``, flushed to disk; its path."""
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        os.unlink(temp)
        raise
    return temp


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` (mode 0600) with ``data``: a reader sees the old file or the new one,
    never part of either."""
    temp = _temp_file(os.path.dirname(path), data)
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()
