"""ACME through the whole gateway, against a real Pebble: the HTTPS listener starts with a
placeholder, the CA's http-01 requests are answered on the plain listener (never redirected),
the ordered certificate is served and /health says so, and a restart reuses it."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config import parse_config
from gateway.logs import setup_logging

from .helpers import Handshake, free_port, routes, tls_handshake
from .pebble import Pebble, require


@pytest.fixture
def plain_port() -> int:
    return free_port()


@pytest.fixture
def pebble(tmp_path: Path, plain_port: int) -> Iterator[Pebble]:
    require()
    ca = Pebble(tmp_path / "pebble", plain_port, validity=90 * 86400)  # not "ends soon"
    yield ca
    ca.close()


@pytest.fixture
async def started() -> AsyncIterator[list[Gateway]]:
    gateways: list[Gateway] = []
    stream = io.StringIO()
    setup_logging("INFO", stream)
    yield gateways
    for gateway in gateways:
        await gateway.stop()
    logging.getLogger().handlers.clear()


def config(pebble: Pebble, storage: Path, port: int) -> str:
    return routes({"city": "{port: 1, nodes: [noda1]}"}, noda1="127.0.0.3") + (
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        "tls:\n"
        "  listen: {host: 127.0.0.1, port: 8443}\n"
        "  acme:\n"
        "    domains: [gateway.test]\n"
        f"    directory: {pebble.directory}\n"
        f"    storage: {storage}\n"
        f"    ca_bundle: {pebble.ca_file}\n"
    )


async def start(started: list[Gateway], text: str, port: int) -> Gateway:
    gateway = Gateway(parse_config(text))
    await gateway.start("127.0.0.1", port, ports={"https": 0})
    assert gateway.shared.certificates is not None
    gateway.shared.certificates.watch_interval = 0.1  # from the second check on
    started.append(gateway)
    return gateway


def trusting_root(pebble: Pebble) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=pebble.root().decode())
    return context


async def served(gateway: Gateway, context: ssl.SSLContext) -> Handshake:
    return await tls_handshake(int(gateway.bound["https"][1]), "gateway.test", context)


async def health(port: int) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/health") as r,
    ):
        assert r.status == 200
        document: dict[str, object] = await r.json()
        return document


async def test_a_certificate_is_ordered_at_start_served_and_reused_after_a_restart(
    pebble, tmp_path, plain_port, started
):
    storage = tmp_path / "acme"
    text = config(pebble, storage, plain_port)
    gateway = await start(started, text, plain_port)
    # At once: the placeholder, self-signed, for the domain; /health says so.
    anyone = ssl.create_default_context()
    anyone.check_hostname, anyone.verify_mode = False, ssl.CERT_NONE
    # (The file watcher's first look is 2 s after start: the placeholder is served until then
    # however fast the CA is.)
    assert (await served(gateway, anyone)).names == ("gateway.test",)
    with pytest.raises(ssl.SSLCertVerificationError):  # not the CA's: self-signed
        await served(gateway, trusting_root(pebble))
    body = await health(plain_port)
    assert body["status"] == "degraded"
    assert body["certificates"]["gateway.test"]["source"] == "placeholder"  # type: ignore[index]
    # Soon: the CA's certificate, verified against its root.
    context = trusting_root(pebble)
    for _ in range(200):
        try:
            shook = await served(gateway, context)
        except ssl.SSLError:
            await asyncio.sleep(0.1)
            continue
        break
    else:
        pytest.fail("the ordered certificate was never served")
    assert shook.names == ("gateway.test",)
    assert pebble.issued() == 1
    body = await health(plain_port)
    assert body["status"] == "healthy"
    assert body["acme"] == {"state": "valid", "error": None}
    assert body["certificates"]["gateway.test"]["source"] == "acme"  # type: ignore[index]
    # The challenge path is the gateway's on the plain listener: no redirect, no upstream.
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{plain_port}/.well-known/acme-challenge/unknown-token",
            allow_redirects=False,
        ) as r,
    ):
        assert r.status == 404
        assert (await r.json())["error"] == "not_found"
    for name in ("fullchain.pem", "privkey.pem"):
        path = storage / "certificates" / "gateway.test" / name
        assert os.stat(path).st_mode & 0o077 == 0, name
    # A restart on the same storage serves the stored certificate at once and orders nothing.
    await gateway.stop()
    started.remove(gateway)
    again = await start(started, text, plain_port)
    assert (await served(again, context)).names == ("gateway.test",)
    await asyncio.sleep(0.5)
    assert pebble.issued() == 1
