"""``Authenticator``: the providers of ``config.auth``, their keys and the verified-token
cache, behind one synchronous ``verify``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import aiohttp

from ..config.types import Auth
from .cache import TokenCache, cache_key
from .jwks import KeySource
from .tokens import AuthFailed, Identity, Rules, UnknownKey, check_form, invalid, read_header


class Authenticator:
    """Verifies tokens for the providers of ``auth``.

    ``start`` fetches every JWKS (a failure is logged: that provider has no keys until a
    refresh works) and starts one background task per JWKS provider, which refreshes every
    ``jwks_refresh`` seconds and when a token names an unknown ``kid``; ``close`` stops them.
    ``verify`` never waits: it reads the keys there are. ``clock`` gives the time that
    ``exp``, ``nbf`` and ``iat`` are checked against (and the refetch limit counts in).
    ``signature_checks`` counts the tokens verified in full (not answered from the cache).
    """

    def __init__(
        self,
        auth: Auth,
        *,
        clock: Callable[[], float] = time.time,
        previous: Authenticator | None = None,
    ) -> None:
        """``previous``: the authenticator a reload replaces; a provider fetching the same
        JWKS starts with its keys."""
        self._clock = clock
        self._rules = {name: Rules(name, p) for name, p in auth.providers.items()}
        self._sources = {
            name: KeySource(name, p, clock, self._session)
            for name, p in auth.providers.items()
            if p.jwks_url is not None or p.jwks_file is not None
        }
        for name, source in self._sources.items():
            old = previous._sources.get(name) if previous is not None else None
            if old is not None:
                source.inherit(old)
        self._cache = TokenCache(auth.cache_size)
        self._http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.signature_checks = 0

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                trust_env=False,  # no proxy from the environment between us and the IdP
                # The body's size cap is on the bytes that arrive: no compression.
                headers={"User-Agent": "daarion-gateway", "Accept-Encoding": "identity"},
            )
        return self._http

    async def start(self) -> None:
        if self._tasks:
            return  # started already
        await asyncio.gather(*(source.refresh() for source in self._sources.values()))
        self._tasks = [
            asyncio.create_task(source.run(), name=f"jwks-{name}")
            for name, source in self._sources.items()
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def refresh(self, provider: str | None = None) -> None:
        """Fetch one provider's JWKS (or every one's) now, outside the schedule."""
        sources = [s for n, s in self._sources.items() if provider in (None, n)]
        await asyncio.gather(*(source.refresh() for source in sources))

    def state(self) -> dict[str, str]:
        """Per JWKS provider: connected, stale (the last fetch failed; the last good keys are
        in use) or disconnected (no keys yet)."""
        return {name: source.state for name, source in self._sources.items()}

    def verify(self, token: str, providers: tuple[str, ...] | None = None) -> Identity:
        """The identity of a valid token from one of ``providers`` (None: any), tried in
        order among those that accept its ``alg``; ``AuthFailed`` otherwise."""
        now = self._clock()
        check_form(token)  # oversized and non-ASCII tokens: not even hashed
        key = cache_key(token, providers)
        if (entry := self._cache.get(key, now)) is not None:
            identity, generation = entry
            if generation == self._generation(identity.provider):
                return identity
            self._cache.drop(key)
        header = read_header(token)
        alg = header["alg"]
        names = self._rules if providers is None else providers
        candidates = [r for n in names if (r := self._rules.get(n)) and alg in r.algorithms]
        if not candidates:
            raise invalid("the token's algorithm is not accepted")
        failures: list[AuthFailed] = []
        for rules in candidates:
            source = self._sources.get(rules.name)
            try:
                secret_or_key = rules.key_for(header, source.keyset.keys if source else {})
                generation = self._generation(rules.name)
                self.signature_checks += 1
                identity = rules.check(token, alg, secret_or_key, now)
            except UnknownKey as failure:
                if source is not None:
                    source.want()
                failures.append(failure)
            except AuthFailed as failure:
                failures.append(failure)
            else:
                self._cache.put(key, identity, generation, now)
                return identity
        # An expired token was signed by one of them: say so; else the first one's reason.
        expired = [f for f in failures if f.code == "token_expired"]
        raise (expired or failures)[0]

    def _generation(self, provider: str) -> int:
        source = self._sources.get(provider)
        return source.generation if source is not None else 0
