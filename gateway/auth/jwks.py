"""A provider's public keys: its JWKS fetched from ``jwks_url`` or read from ``jwks_file``,
at start, every ``jwks_refresh`` seconds, and when a token names a ``kid`` not known yet.

``parse_jwks`` (pure) keeps only the keys a provider can use: RSA, EC (P-256/384/521) and
Ed25519 signature keys of a type, and an ``alg`` when the key names one, that the provider's
algorithms allow; one ``PyJWK`` per (kid, alg), so that pyjwt verifies with exactly that
algorithm. ``KeySource`` holds the current keys and fetches new ones; a failed fetch keeps the
last good keys (state ``stale``). Requests never wait for a fetch: they read ``keys``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import aiohttp
import jwt
import orjson

from ..config.types import AuthProvider
from ..logs import redacted
from .tokens import Keys

log = logging.getLogger("gateway.auth")

MAX_JWKS_BYTES: Final = 256 * 1024
MAX_KEYS: Final = 100
MIN_RSA_BITS: Final = 2048
REFETCH_EVERY: Final = 30.0  # seconds: at most one fetch per provider asked for by a kid
RETRY_EVERY: Final = 30.0  # seconds: after a failed fetch, next try (if sooner than refresh)

_RSA: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_FAMILIES: Final = {
    ("RSA", None): _RSA,
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
}

State = Literal["connected", "stale", "disconnected"]


class JwksError(Exception):
    """Why a JWKS could not be had (for the log)."""


@dataclass(frozen=True)
class KeySet:
    """Usable keys by kid and alg, and each key's JWK (canonical JSON), to tell a key that
    changed or went from one that was added."""

    keys: Keys = field(default_factory=dict)
    prints: dict[tuple[str | None, str], bytes] = field(default_factory=dict)

    def lost_any_of(self, old: KeySet) -> bool:
        """Whether a key of ``old`` is gone or different here (a revocation)."""
        return any(self.prints.get(where) != jwk for where, jwk in old.prints.items())


def _algorithms_of(jwk: dict[str, object], accepted: frozenset[str]) -> frozenset[str]:
    """The algorithms of ``accepted`` that this JWK may verify; empty to skip it."""
    kty, crv, alg = jwk.get("kty"), jwk.get("crv"), jwk.get("alg")
    if jwk.get("use", "sig") != "sig" or "d" in jwk:  # encryption keys; private parts
        return frozenset()
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return frozenset()
    if not isinstance(kty, str) or not isinstance(crv, str | None):
        return frozenset()
    family = _FAMILIES.get((kty, None if kty == "RSA" else crv), frozenset())
    if alg is not None:
        family = family & {alg} if isinstance(alg, str) else frozenset()
    return family & accepted


def parse_jwks(body: bytes, accepted: frozenset[str]) -> KeySet:
    """The usable keys of a JWKS document; ``JwksError`` when it is not one or has none."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise JwksError("not JSON") from None
    members = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(members, list):
        raise JwksError("not a JWKS (no keys list)")
    if len(members) > MAX_KEYS:
        raise JwksError(f"more than {MAX_KEYS} keys")
    keys: dict[str | None, dict[str, jwt.PyJWK]] = {}
    prints: dict[tuple[str | None, str], bytes] = {}
    for jwk in members:
        if not isinstance(jwk, dict) or not isinstance(kid := jwk.get("kid"), str | None):
            continue
        for alg in sorted(_algorithms_of(jwk, accepted)):
            if alg in keys.get(kid, {}):
                continue  # the first key of a kid and alg wins
            try:
                key = jwt.PyJWK(jwk, algorithm=alg)
            except (jwt.PyJWTError, ValueError, TypeError):
                continue
            if alg in _RSA and key.key.key_size < MIN_RSA_BITS:
                continue
            keys.setdefault(kid, {})[alg] = key
            prints[kid, alg] = orjson.dumps(jwk, option=orjson.OPT_SORT_KEYS)
    if not keys:
        raise JwksError("no usable key")
    return KeySet(keys, prints)


async def _read_url(session: aiohttp.ClientSession, url: str, timeout: float) -> bytes:
    async with session.get(
        url,
        timeout=aiohttp.ClientTimeout(total=timeout),
        allow_redirects=False,
        headers={"Accept": "application/json"},
    ) as response:
        if response.status != 200:
            raise JwksError(f"HTTP {response.status}")
        if (response.content_length or 0) > MAX_JWKS_BYTES:
            raise JwksError("the JWKS is too big")
        body = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > MAX_JWKS_BYTES:
                raise JwksError("the JWKS is too big")
        return bytes(body)


def _read_file(path: str) -> bytes:
    with Path(path).open("rb") as file:
        body = file.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise JwksError("the JWKS is too big")
    return body


class KeySource:
    """One provider's JWKS: the current keys, their state, and the fetches."""

    def __init__(
        self,
        name: str,
        provider: AuthProvider,
        clock: Callable[[], float],
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self.name = name
        self.provider = provider
        self.where = provider.jwks_url or provider.jwks_file or ""
        self.keyset = KeySet()
        self.state: State = "disconnected"
        self.generation = 0  # bumped when a key is revoked: cached tokens of it are dropped
        self.fetches = 0
        self.accepted = frozenset(provider.algorithms)  # what its keys may verify
        self._clock = clock
        self._session = session
        self._wanted = asyncio.Event()
        self._last_wanted = -REFETCH_EVERY
        self._failing: str | None = None  # why the last fetch failed, if it did

    def inherit(self, previous: KeySource) -> None:
        """Start from what ``previous`` (the same JWKS, a config ago) holds: a reload whose
        first fetch fails keeps the last good keys, as a running source does."""
        if previous.where == self.where and previous.accepted == self.accepted:
            self.keyset, self.state, self.generation = (
                previous.keyset,
                previous.state,
                previous.generation,
            )

    def want(self) -> bool:
        """Ask the background loop for a fetch now (a token named an unknown kid), unless one
        was asked for within the last 30 s; never waits."""
        now = self._clock()
        if now - self._last_wanted < REFETCH_EVERY:
            return False
        self._last_wanted = now
        self._wanted.set()
        return True

    async def refresh(self) -> bool:
        """Fetch (or read) the JWKS once, within ``jwks_timeout``; on failure keep the keys
        there are. Whether it worked."""
        self.fetches += 1
        timeout = self.provider.jwks_timeout
        try:
            if self.provider.jwks_url is not None:
                body = await _read_url(self._session(), self.provider.jwks_url, timeout)
            else:
                async with asyncio.timeout(timeout):
                    body = await asyncio.to_thread(_read_file, self.where)
            keyset = parse_jwks(body, self.accepted)
        except (JwksError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            self.state = "stale" if self.keyset.keys else "disconnected"
            if reason != self._failing:  # once per outage (and per new reason), not per try
                log.warning(
                    "JWKS fetch failed: %s",
                    "the last good keys stay in use" if self.keyset.keys else "no keys yet",
                    extra={"fields": {"provider": self.name, "jwks": redacted(self.where),
                                      "reason": reason}},
                )  # fmt: skip
            self._failing = reason
            return False
        if keyset.lost_any_of(self.keyset):
            self.generation += 1
        if keyset.prints != self.keyset.prints or self._failing is not None:
            log.info(
                "JWKS loaded",
                extra={"fields": {"provider": self.name, "jwks": redacted(self.where),
                                  "kids": sorted(str(k) for k in keyset.keys)}},
            )  # fmt: skip
        self.keyset, self.state, self._failing = keyset, "connected", None
        return True

    async def run(self) -> None:
        """Refresh every ``jwks_refresh`` seconds (sooner after a failure), or when asked."""
        while True:
            wait = self.provider.jwks_refresh
            if self.state != "connected":
                wait = min(wait, RETRY_EVERY)
            try:
                async with asyncio.timeout(wait):
                    await self._wanted.wait()
            except TimeoutError:
                pass
            self._wanted.clear()
            try:
                await self.refresh()
            except Exception:  # a bug in one fetch must not end the refreshes (logged)
                self.state = "stale" if self.keyset.keys else "disconnected"
                log.exception("JWKS refresh failed", extra={"fields": {"provider": self.name}})
