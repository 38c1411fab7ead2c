"""The JWKS side of gateway/auth against a real aiohttp server on 127.0.0.1 (port 0): keys at
start, rotation through an unknown kid (one refetch per 30 s), outages and bad answers (the
last good keys stay), a slow server (start keeps its time), a ``jku`` canary that must hear
nothing, the background refresh, and ``jwks_file``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pytest
from aiohttp import web

from gateway.auth import Authenticator, AuthFailed
from gateway.config.types import Algorithm, Auth, AuthProvider

from .helpers import Upstream
from .jwtkit import claims, jwks, mint, private_key, public_jwk

LOCAL = "127.0.0.1"
ES = private_key("ES256")
ES2 = private_key("ES256", 1)


@dataclass
class JwksServer:
    """What the test server answers: ``body`` after ``delay`` seconds, with ``status``."""

    body: bytes = field(default_factory=lambda: jwks(public_jwk(ES, "k1")))
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(self.delay)
        return web.Response(
            status=self.status,
            body=self.body,
            content_type="application/json",
            headers=self.headers,
        )


Start = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def authenticators() -> AsyncIterator[list[Authenticator]]:
    """Authenticators a test made, closed at its end."""
    made: list[Authenticator] = []
    yield made
    for auth in made:
        await auth.close()


def authenticator(made: list[Authenticator], **provider: Any) -> Authenticator:
    algorithms: tuple[Algorithm, ...] = provider.pop("algorithms", ("ES256",))
    idp = AuthProvider(algorithms=algorithms, **provider)
    auth = Authenticator(Auth(providers=MappingProxyType({"idp": idp})))
    made.append(auth)
    return auth


def token(kid: str, key: Any = ES, **headers: Any) -> str:
    return mint(claims(time.time()), "ES256", key, kid=kid, headers=headers)


def refusal(auth: Authenticator, text: str) -> str:
    with pytest.raises(AuthFailed) as caught:
        auth.verify(text)
    assert caught.value.code == "invalid_token"
    return caught.value.message


async def eventually(check: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.01)


async def test_the_keys_are_fetched_at_start(upstream, authenticators) -> None:
    server = JwksServer()
    up = await upstream(LOCAL, server.handle)
    auth = authenticator(authenticators, jwks_url=f"http://{LOCAL}:{up.port}/jwks")
    assert auth.state() == {"idp": "disconnected"}
    await auth.start()
    assert auth.state() == {"idp": "connected"}
    assert auth.verify(token("k1")).subject == "user-1"
    assert [(s.method, s.raw_path) for s in up.seen] == [("GET", "/jwks")]
    assert up.seen[0].header("Accept-Encoding") == "identity"


async def test_a_new_kid_fails_once_then_passes_after_one_refetch(upstream, authenticators) -> None:
    server = JwksServer()
    up = await upstream(LOCAL, server.handle)
    auth = authenticator(authenticators, jwks_url=f"http://{LOCAL}:{up.port}/jwks")
    await auth.start()
    server.body = jwks(public_jwk(ES, "k1"), public_jwk(ES2, "k2"))  # the IdP rotates
    rotated = token("k2", ES2)
    assert refusal(auth, rotated) == "the token's key is unknown"
    await eventually(lambda: len(up.seen) == 2)
    await eventually(lambda: _passes(auth, rotated))
    assert auth.verify(token("k1")).subject == "user-1"
    # More unknown kids within 30 s: refused, and the IdP hears nothing more.
    for kid in ("k3", "k4", "random"):
        assert refusal(auth, token(kid)) == "the token's key is unknown"
    await asyncio.sleep(0.3)
    assert len(up.seen) == 2


def _passes(auth: Authenticator, text: str) -> bool:
    try:
        auth.verify(text)
    except AuthFailed:
        return False
    return True


async def started(
    upstream: Start, made: list[Authenticator]
) -> tuple[JwksServer, Upstream, str, Authenticator]:
    """A JWKS server, and an authenticator that has its keys: (server, its upstream, URL,
    authenticator)."""
    server = JwksServer()
    up = await upstream(LOCAL, server.handle)
    url = f"http://{LOCAL}:{up.port}/jwks"
    auth = authenticator(made, jwks_url=url)
    await auth.start()
    return server, up, url, auth


async def test_an_outage_keeps_the_last_good_keys(upstream, authenticators) -> None:
    server, up, _, auth = await started(upstream, authenticators)
    server.status = 503
    await auth.refresh()
    assert auth.state() == {"idp": "stale"}
    assert _passes(auth, token("k1"))
    await up.stop()  # the IdP is gone: connections refused
    await auth.refresh()
    assert auth.state() == {"idp": "stale"}
    assert _passes(auth, token("k1"))
    server.status = 200
    await upstream(LOCAL, server.handle, port=up.port)  # back, on the same port
    await auth.refresh()
    assert auth.state() == {"idp": "connected"}


@pytest.mark.parametrize(
    ("status", "body", "headers"),
    [
        (500, b"", {}),
        (302, b"", {"Location": "/elsewhere"}),  # a redirect is not followed
        (200, b"<html>not json</html>", {}),
        (200, b'{"keys": []}', {}),
        (200, b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k1"}]}', {}),
        (200, b" " * (300 * 1024) + b'{"keys": []}', {}),  # over the size cap
    ],
    ids=["500", "redirect", "html", "empty", "symmetric", "oversized"],
)
async def test_a_bad_answer_is_no_keys(upstream, authenticators, status, body, headers) -> None:
    server = JwksServer(status=status, body=body, headers=headers)
    up = await upstream(LOCAL, server.handle)
    auth = authenticator(authenticators, jwks_url=f"http://{LOCAL}:{up.port}/jwks")
    await auth.start()
    assert auth.state() == {"idp": "disconnected"}
    assert [s.raw_path for s in up.seen] == ["/jwks"]
    assert refusal(auth, token("k1")) == "the token's key is unknown"


async def test_a_slow_server_holds_neither_start_nor_requests(upstream, authenticators) -> None:
    server = JwksServer(delay=3.0)
    up = await upstream(LOCAL, server.handle)
    url = f"http://{LOCAL}:{up.port}/jwks"
    slow = authenticator(authenticators, jwks_url=url, jwks_timeout=0.3)
    began = time.monotonic()
    await slow.start()
    assert time.monotonic() - began < 1.0
    assert slow.state() == {"idp": "disconnected"}
    # Keys in hand, then the server slows down: requests go on while a refresh waits.
    server.delay = 0.0
    auth = authenticator(authenticators, jwks_url=url, jwks_timeout=0.3)
    await auth.start()
    server.delay = 3.0
    refreshing = asyncio.create_task(auth.refresh())
    await eventually(lambda: len(up.seen) == 3)
    began = time.monotonic()
    assert _passes(auth, token("k1"))
    assert time.monotonic() - began < 0.05
    await refreshing
    assert auth.state() == {"idp": "stale"}
    assert _passes(auth, token("k1"))


async def test_jku_and_x5u_are_never_fetched(upstream, authenticators) -> None:
    server = JwksServer()
    up = await upstream(LOCAL, server.handle)
    canary = await upstream(LOCAL)
    auth = authenticator(authenticators, jwks_url=f"http://{LOCAL}:{up.port}/jwks")
    await auth.start()
    elsewhere = f"http://{LOCAL}:{canary.port}/attacker"
    pointing = {"jku": f"{elsewhere}/jwks", "x5u": f"{elsewhere}/cert.pem"}
    assert _passes(auth, token("k1", **pointing))
    attacker = private_key("ES256", 2)
    refusal(auth, token("k1", attacker, **pointing))
    refusal(auth, token("attacker", attacker, **pointing))  # unknown kid: a refetch of ours
    await eventually(lambda: len(up.seen) == 2)
    await asyncio.sleep(0.2)
    assert canary.seen == []


async def test_the_background_refresh_runs_every_jwks_refresh(upstream, authenticators) -> None:
    server = JwksServer()
    up = await upstream(LOCAL, server.handle)
    url = f"http://{LOCAL}:{up.port}/jwks"
    auth = authenticator(authenticators, jwks_url=url, jwks_refresh=0.1)
    await auth.start()
    server.body = jwks(public_jwk(ES2, "k2"))
    await eventually(lambda: _passes(auth, token("k2", ES2)))
    assert len(up.seen) >= 2
    await auth.close()
    seen = len(up.seen)
    await asyncio.sleep(0.3)
    assert len(up.seen) == seen  # closed: no more fetches


async def test_a_jwks_file_is_read_at_start_and_on_refresh(tmp_path, authenticators) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(public_jwk(ES, "k1")))
    auth = authenticator(authenticators, jwks_file=str(path), jwks_refresh=0.1)
    await auth.start()
    assert auth.state() == {"idp": "connected"}
    assert _passes(auth, token("k1"))
    await asyncio.to_thread(path.write_bytes, jwks(public_jwk(ES, "k1"), public_jwk(ES2, "k2")))
    await eventually(lambda: _passes(auth, token("k2", ES2)))
    await asyncio.to_thread(path.unlink)
    await eventually(lambda: auth.state() == {"idp": "stale"})
    assert _passes(auth, token("k2", ES2))


async def test_an_outage_is_logged_once_and_its_end_too(upstream, authenticators, caplog) -> None:
    server = JwksServer(status=503)
    up = await upstream(LOCAL, server.handle)
    # A password or a key in the URL is never logged.
    url = f"http://svc:sekrit@{LOCAL}:{up.port}/jwks?api_key=k1"
    auth = authenticator(authenticators, jwks_url=url)
    caplog.set_level("INFO", "gateway.auth")
    await auth.start()
    await auth.refresh()
    await auth.refresh()
    server.status = 200
    await auth.refresh()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "gateway.auth"]
    assert lines == [
        ("WARNING", "JWKS fetch failed: no keys yet"),
        ("INFO", "JWKS loaded"),
    ]
    fields = caplog.records[0].__dict__["fields"]
    assert fields == {
        "provider": "idp",
        "jwks": f"http://***@{LOCAL}:{up.port}/jwks?***",
        "reason": "HTTP 503",
    }


async def test_a_reloads_authenticator_keeps_the_keys_of_an_unchanged_jwks(
    upstream, authenticators
) -> None:
    # Any change to auth (here the cache's size) makes a new authenticator: with the IdP
    # down at that moment, it used to take over with no keys, and every token was a 401.
    server, _, url, old = await started(upstream, authenticators)
    server.status = 503
    idp = AuthProvider(algorithms=("ES256",), jwks_url=url)
    new = Authenticator(Auth(providers=MappingProxyType({"idp": idp}), cache_size=10), previous=old)
    authenticators.append(new)
    await new.start()
    assert new.state() == {"idp": "stale"}
    assert new.verify(token("k1")).subject == "user-1"
    # Another JWKS (a new URL) is another source: nothing is carried over to it.
    other = AuthProvider(algorithms=("ES256",), jwks_url=url + "?v=2")
    moved = Authenticator(Auth(providers=MappingProxyType({"idp": other})), previous=old)
    authenticators.append(moved)
    await moved.start()
    assert moved.state() == {"idp": "disconnected"}


async def test_auth_turned_on_by_a_reload_is_a_503_until_its_keys_are_in(
    upstream, gateway, client
) -> None:
    # The snapshot with auth is served at once; its authenticator starts meanwhile. Those
    # requests get a 503 to retry (they were a 500 internal_error), then the checks apply.
    from gateway.config import parse_config  # noqa: PLC0415

    from .helpers import NODA1, routes  # noqa: PLC0415

    server = JwksServer(delay=1.0)
    idp = await upstream(LOCAL, server.handle)
    up = await upstream(NODA1)
    text = routes({"city": f"{{port: {up.port}, nodes: [noda1], auth: required}}"}, noda1=NODA1)
    plain = routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1)
    gw = await gateway(plain)
    gw.gateway.apply(
        parse_config(
            text + "auth: {providers: {idp: {algorithms: [ES256], "
            f"jwks_url: 'http://{LOCAL}:{idp.port}/jwks'}}}}}}\n"
        )
    )
    good = {"Authorization": f"Bearer {token('k1')}"}
    async with client.get(f"{gw.url}/api/city/x", headers=good) as r:
        assert (r.status, (await r.json())["error"]) == (503, "auth_starting")
        assert r.headers["Retry-After"] == "1"
    await eventually(lambda: gw.gateway.shared.authenticator is not None, within=5)
    async with client.get(f"{gw.url}/api/city/x", headers=good) as r:
        assert r.status == 200
