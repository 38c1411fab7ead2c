"""The HTTPS listener's certificates: TLS settings, the choice by SNI, and reloads.

``Certificates.context`` is the listener's one ``SSLContext``. It holds no certificate of its
own: its SNI callback (called for every ClientHello, with ``None`` when the client sends no
name) hands each handshake the context of the certificate whose names match (exact, then a
``*.`` wildcard), else the first one's. Reloading is therefore one list assignment: new
connections get the new certificate, open ones keep theirs, and the listener never restarts.

Certificates come from ``Source``s: the files of ``tls.certificates``, and the files ACME
stores (a self-signed placeholder stands in until they exist). ``refresh`` reloads a source
whose files changed (``watch`` calls it every few seconds; SIGHUP at once); a pair that does
not load is refused with one log line naming the file and the reason, and the one it would
have replaced keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from typing import Final

from ..certs import CertError, matches, placeholder, read_pair
from ..config.types import Acme
from ..metrics import Metrics
from .acme import certificate_paths

log = logging.getLogger("gateway.tls")

WATCH_INTERVAL: Final = 2.0  # seconds between checks of the certificate files
SETTLE: Final = 1.0  # seconds a pair that does not load may be in the middle of a write
EXPIRING_DAYS: Final = 7  # /health says degraded with a certificate closer to its end
CLOCK_SKEW: Final = 300.0  # seconds a new certificate may start in the future (clocks differ)
# Mozilla's "intermediate" TLS 1.2 suites (ssl-config.mozilla.org, v5.7), forward-secret and
# AEAD only, without the DHE ones (no DH parameters are configured). TLS 1.3's suites are
# OpenSSL's defaults, which are the same list.
CIPHERS: Final = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True)
class Source:
    """Where a certificate comes from: a pair of PEM files, written by the operator or (with
    ``acme`` the domains it is ordered for) by ACME."""

    cert: str
    key: str
    acme: tuple[str, ...] | None = None


Stamp = tuple[int, int, int, int] | None  # both files' (mtime_ns, size); None: missing


@dataclass(frozen=True, slots=True)
class Served:
    """A certificate being served."""

    source: Source
    context: ssl.SSLContext
    names: tuple[str, ...]
    not_after: float
    stamp: Stamp  # of the files it was loaded from
    placeholder: bool = False

    @property
    def name(self) -> str:
        return self.names[0] if self.names else self.source.cert


def acme_source(acme: Acme) -> Source:
    """The certificate ACME keeps for ``acme.domains``."""
    cert, key = certificate_paths(acme)
    return Source(cert, key, acme=acme.domains)


def server_context(min_version: str) -> ssl.SSLContext:
    """A server context with the gateway's TLS settings and no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[min_version]
    context.set_ciphers(CIPHERS)
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


class Certificates:
    def __init__(self, metrics: Metrics, min_version: str = "1.2") -> None:
        self._metrics = metrics
        self._min_version = min_version
        self._served: list[Served] = []
        self._groups: tuple[list[Served], list[Served]] = ([], [])  # real, placeholders
        self._sources: tuple[Source, ...] = ()
        # The files of a refused pair, as refused, and until when that stands (a pair refused
        # for its dates is looked at again once they may have come right).
        self._refused: dict[Source, tuple[Stamp, float]] = {}
        self.context = server_context(min_version)
        self.context.sni_callback = self._pick
        self.watch_interval = WATCH_INTERVAL

    @property
    def served(self) -> list[Served]:
        return list(self._served)

    def configure(self, sources: tuple[Source, ...], min_version: str) -> None:
        """Serve these sources (at start and after each config load). A source already
        served from unchanged files is kept as it is."""
        if min_version != self._min_version:
            # The listener's context decides the version (the one SNI hands over does not):
            # what is served stays, even a pair whose files no longer load.
            self._min_version = min_version
            self.context.minimum_version = VERSIONS[min_version]
        self._sources = sources
        self._update()

    def refresh(self, *, settle: bool = False) -> None:
        """Reload the sources whose files changed since they were loaded. ``settle``: a pair
        that does not load but was written within the last check interval and ``SETTLE``
        seconds is looked at again at the next check before it is refused (a certificate
        and its key are two files, never replaced at the same instant)."""
        self._update(settle=settle)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval)
            try:
                self.refresh(settle=True)
            except Exception:  # a bug must not end the checks: logged, tried again next time
                log.exception("checking the certificate files failed")

    def report(self, now: float | None = None) -> dict[str, dict[str, object]]:
        """Each served certificate by its first name: days left, where it comes from."""
        now = time.time() if now is None else now
        return {
            served.name: {
                "days_left": int((served.not_after - now) // 86400),
                "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(served.not_after)),
                "source": _kind(served),
                **({"names": list(served.names)} if len(served.names) > 1 else {}),
            }
            for served in self._served
        }

    def degraded(self, now: float | None = None) -> bool:
        """Whether a placeholder is served, a source serves nothing, or a certificate ends
        within a week."""
        now = time.time() if now is None else now
        if len(self._served) < len(self._sources):
            return True
        return any(s.placeholder or s.not_after - now < EXPIRING_DAYS * 86400 for s in self._served)

    # -- internals -----------------------------------------------------------------------

    def _update(self, *, settle: bool = False) -> None:
        previous = {served.source: served for served in self._served}
        served: list[Served] = []
        for source in self._sources:
            old = previous.get(source)
            stamp = _stamp(source)
            if old is not None and old.stamp == stamp:
                served.append(old)
            elif self._still_refused(source, stamp):  # said once already
                if old is not None:
                    served.append(old)
            else:
                loaded = self._load(source, stamp, old, settle=settle)
                if loaded is not None:
                    served.append(loaded)
        if served != self._served:
            self._served = served
            self._groups = (
                [s for s in served if not s.placeholder],
                [s for s in served if s.placeholder],
            )
            self._export()

    def _load(
        self, source: Source, stamp: Stamp, old: Served | None, *, settle: bool = False
    ) -> Served | None:
        """The certificate of ``source`` as its files are now; ``old`` (or nothing) when they
        do not load."""
        if stamp is None and source.acme is not None:
            # ACME has not stored it yet: the placeholder (made once) until it has.
            return old if old is not None else self._placeholder(source)
        replacing = old is not None and not old.placeholder
        try:
            pair = read_pair(source.cert, source.key)
            if replacing and old is not None:
                _no_worse(pair.not_before, pair.not_after, old.not_after, source.cert)
            context = server_context(self._min_version)
            context.load_cert_chain(source.cert, source.key)
        except (CertError, ssl.SSLError, OSError) as exc:
            if (
                settle
                and stamp is not None
                and time.time() - max(stamp[0], stamp[2]) / 1e9 < self.watch_interval + SETTLE
            ):
                return old  # perhaps half written: again at the next check
            again = exc.again if isinstance(exc, NotNow) else float("inf")
            self._refused[source] = (stamp, again)
            reason = str(exc) if isinstance(exc, CertError) else f"{source.cert}: {exc}"
            log.error(  # noqa: TRY400 - a bad file is not a bug: one line, no traceback
                "certificate not loaded"
                + ("; the previous one keeps serving" if old is not None else ""),
                extra={"fields": {"cert": source.cert, "key": source.key, "reason": reason}},
            )
            if replacing:
                self._metrics.tls_reloads.labels("failure").inc()
            if old is None and source.acme is not None:
                return self._placeholder(source)  # ACME's files are there but do not load
            return old
        self._refused.pop(source, None)
        if old is not None:
            if replacing:
                self._metrics.tls_reloads.labels("success").inc()
            log.info(
                "certificate loaded",
                extra={"fields": {"cert": source.cert, "names": list(pair.names)}},
            )
        return Served(source, context, pair.names, pair.not_after, stamp)

    def _still_refused(self, source: Source, stamp: Stamp) -> bool:
        refused = self._refused.get(source)
        return refused is not None and refused[0] == stamp and time.time() < refused[1]

    def _placeholder(self, source: Source) -> Served:
        names = source.acme or ()
        cert_pem, key_pem = placeholder(names)
        context = server_context(self._min_version)
        # load_cert_chain reads files only: the placeholder goes through a private temporary
        # directory, removed at once.
        with tempfile.TemporaryDirectory(prefix="daarion-placeholder-") as directory:
            cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
            for path, data in ((cert, cert_pem), (key, key_pem)):
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                    f.write(data)
            pair = read_pair(cert, key)
            context.load_cert_chain(cert, key)
        log.warning(
            "serving a self-signed placeholder until ACME has a certificate",
            extra={"fields": {"domains": list(names)}},
        )
        return Served(source, context, pair.names, pair.not_after, None, placeholder=True)

    def _export(self) -> None:
        gauge = self._metrics.tls_expiry
        self._metrics.remove_series(gauge, lambda labels: True)
        for served in self._served:
            gauge.labels(served.name).set(served.not_after)

    def _pick(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        served = self._served
        if not served:
            return  # nothing to serve: the handshake fails
        if server_name:
            name = server_name.lower().rstrip(".")
            # Real certificates first (exact, then wildcard), then placeholders: a valid
            # *.example beats ACME's stand-in for a.example while its order is pending.
            for group in self._groups:
                for candidate in group:
                    if name in candidate.names:
                        connection.context = candidate.context
                        return
                for candidate in group:
                    if any(matches(pattern, name) for pattern in candidate.names):
                        connection.context = candidate.context
                        return
        connection.context = served[0].context


def _no_worse(not_before: float, not_after: float, serving_until: float, path: str) -> None:
    """Refuse a renewed pair that is not valid now while the one it would replace is: an old
    backup restored, a certificate dated for later (every client would fail)."""
    now = time.time()
    if serving_until <= now:
        return  # the served one is over anyway
    if not_after <= now:
        raise NotNow(f"{path}: expired on {_date(not_after)}", again=serving_until)
    if not_before > now + CLOCK_SKEW:
        again = min(not_before - CLOCK_SKEW, serving_until)
        raise NotNow(f"{path}: not valid before {_date(not_before)}", again=again)


class NotNow(CertError):
    """A pair refused for its dates: ``again``, it may do (it starts, or the one it would
    replace ends)."""

    def __init__(self, message: str, *, again: float) -> None:
        super().__init__(message)
        self.again = again


def _date(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _kind(served: Served) -> str:
    if served.placeholder:
        return "placeholder"
    return "acme" if served.source.acme is not None else "file"


def _stamp(source: Source) -> Stamp:
    try:
        cert, key = os.stat(source.cert), os.stat(source.key)
    except OSError:
        return None
    return (cert.st_mtime_ns, cert.st_size, key.st_mtime_ns, key.st_size)
