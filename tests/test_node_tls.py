"""HTTPS and WSS to nodes (``nodes.<name>.tls``), end to end: real aiohttp upstreams serving
TLS with certificates of a throwaway CA (``trustme``) on 127.0.0.2 ("NODA2") and 127.0.0.3
("NODA1"), another CA as the wrong one, and the gateway between them and a client. Each test
asserts on what the client got, what the backend received, and what ``/metrics``,
``/gateway/upstreams`` and the log lines say."""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import WSMsgType, web

from gateway.cli import summary
from gateway.config import ConfigError, parse_config

from .helpers import NODA1, NODA2, RunningGateway, Upstream, compiled_routes, routes

UNKNOWN_ISSUER = "certificate verify failed: unable to get local issuer certificate"


@dataclass
class Pki:
    """The nodes' CA and a wrong one, and PEM files of them in ``root``."""

    root: Path
    ca: trustme.CA = field(default_factory=trustme.CA)
    wrong: trustme.CA = field(default_factory=trustme.CA)

    def ca_file(self, ca: trustme.CA | None = None) -> str:
        ca = self.ca if ca is None else ca
        path = self.root / ("wrong-ca.pem" if ca is self.wrong else "ca.pem")
        ca.cert_pem.write_to_path(path)
        return str(path)

    def serving(
        self, *names: str, ca: trustme.CA | None = None, clients: trustme.CA | None = None
    ) -> ssl.SSLContext:
        """A node's server context: a certificate for ``names`` (by ``ca``, else the nodes'
        CA); with ``clients``, a client certificate of that CA is required (mutual TLS)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        (self.ca if ca is None else ca).issue_cert(*names).configure_cert(context)
        if clients is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            clients.configure_trust(context)
        return context

    def client_files(self, name: str) -> tuple[str, str]:
        """A client certificate of the nodes' CA for ``name``: (cert file, key file)."""
        issued = self.ca.issue_cert(name)
        cert, key = self.root / f"{name}.pem", self.root / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(cert)
        issued.private_key_pem.write_to_path(key)
        return str(cert), str(key)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def tls_node(host: str, **tls: object) -> str:
    """A node's mapping in routes.yaml: ``host`` reached with ``tls`` (its keys as given)."""
    keys = ", ".join(f"{key}: {'true' if value is True else value}" for key, value in tls.items())
    return f"{{host: {host}, tls: {{{keys}}}}}"


def named(node: str):
    """A backend that says which node it is, how it was reached, and what it was sent."""

    async def handler(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        sslobj = transport.get_extra_info("ssl_object") if transport else None
        peer = sslobj.getpeercert() if sslobj is not None else None
        return web.json_response(
            {
                "node": node,
                "path": request.raw_path,
                "tls": sslobj.version() if sslobj is not None else None,
                "client_cert": dict(peer.get("subjectAltName", ())) if peer else None,
                "peer": list(transport.get_extra_info("peername")) if transport else None,
                "body": (await request.read()).decode(),
            }
        )

    return handler


async def backend(upstream, host: str, node: str, context: ssl.SSLContext | None, kind=None):
    """A backend on ``host`` (HTTPS with ``context``): ``kind(node)`` makes its handler
    (default: ``named``)."""
    return await upstream(host, (kind or named)(node), ssl_context=context)


async def get(client: aiohttp.ClientSession, url: str, **options: Any) -> tuple[int, Any]:
    async with client.request(options.pop("method", "GET"), url, **options) as response:
        return response.status, await response.json()


async def upstreams(client: aiohttp.ClientSession, gw: RunningGateway, service: str) -> Any:
    """``/gateway/upstreams``'s targets of ``service``, by node."""
    async with client.get(gw.url + "/gateway/upstreams") as response:
        report = await response.json()
    return {t["node"]: t for t in report["services"][service]["targets"]}


async def metric(client: aiohttp.ClientSession, gw: RunningGateway, series: str) -> float | None:
    """One series of ``/metrics`` (``name{labels}`` as written), or None when absent."""
    async with client.get(gw.url + "/metrics") as response:
        text = await response.text()
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " ")
    ]
    return values[0] if values else None


def tls_failures(node: str) -> str:
    return f'gateway_upstream_tls_failures_total{{node="{node}"}}'


def wrong_ca_then(
    pki: Pki,
    noda2: Upstream,
    noda1: Upstream,
    extra: str = "",
    *,
    noda1_tls: bool = True,
    probes: bool = False,
) -> str:
    """routes.yaml: ``city`` on noda2, verified against the wrong CA, falling back to noda1
    (on its own port) verified against the right one, or plain without ``noda1_tls``."""
    city = f"{{port: {noda2.port}, nodes: [noda2, {{node: noda1, port: {noda1.port}}}]{extra}}}"
    noda2_node = tls_node(NODA2, ca=pki.ca_file(pki.wrong))
    noda1_node = tls_node(NODA1, ca=pki.ca_file()) if noda1_tls else NODA1
    return routes({"city": city}, probes=probes, noda2=noda2_node, noda1=noda1_node)


def request_lines(gw: RunningGateway) -> list[dict[str, Any]]:
    """The log lines of requests to ``city`` (not to the gateway's own endpoints)."""
    lines = gw.log_lines()
    return [line for line in lines if line["message"] == "request" and line["route"] == "city"]


# -- HTTPS and WSS that verify ---------------------------------------------------------------


async def test_a_tls_node_is_reached_over_https_and_the_backend_sees_the_request(
    pki, upstream, gateway, client
):
    noda2 = await backend(upstream, NODA2, "noda2", pki.serving(NODA2))
    node = tls_node(NODA2, ca=pki.ca_file())
    gw = await gateway(routes({"city": f"{{port: {noda2.port}, nodes: [noda2]}}"}, noda2=node))

    status, body = await get(client, gw.url + "/api/city/rooms?x=1", headers={"X-Request-ID": "r1"})
    assert status == 200
    assert (body["node"], body["path"], body["tls"]) == ("noda2", "/city/rooms?x=1", "TLSv1.3")
    status, posted = await get(client, gw.url + "/api/city/rooms", method="POST", data=b"hi")
    assert (status, posted["body"]) == (200, "hi")
    assert posted["peer"] == body["peer"]  # one kept-alive TLS connection for both

    seen = noda2.seen[0]
    assert seen.raw_path == "/city/rooms?x=1"
    assert seen.header("Host") == f"{NODA2}:{noda2.port}"
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Real-IP") == "127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "http"  # how the client reached the gateway
    assert seen.header("X-Forwarded-Host") == f"127.0.0.1:{gw.port}"
    assert seen.header("X-Request-ID") == "r1"

    target = (await upstreams(client, gw, "city"))["noda2"]
    assert (target["url"], target["state"]) == (f"https://{NODA2}:{noda2.port}", "up")
    assert await metric(client, gw, tls_failures("noda2")) is None  # nothing failed


def wss_room(node: str):
    """A WebSocket backend: a greeting that says how it was reached, then an echo."""

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        await ws.send_str(f"hello from {node} over {sslobj and sslobj.version()}")
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(f"echo: {msg.data}")
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    return handler


async def test_a_wss_session_relays_messages_both_ways(pki, upstream, gateway, client):
    noda2 = await backend(upstream, NODA2, "noda2", pki.serving(NODA2), wss_room)
    node = tls_node(NODA2, ca=pki.ca_file())
    city = f"{{port: {noda2.port}, nodes: [noda2], websocket: true}}"
    gw = await gateway(routes({"city": city}, noda2=node))

    async with client.ws_connect(gw.url + "/ws/city/rooms/general") as ws:
        assert await ws.receive_str(timeout=5) == "hello from noda2 over TLSv1.3"
        await ws.send_str("ping")
        assert await ws.receive_str(timeout=5) == "echo: ping"
        await ws.send_bytes(b"\x01\x02\x03")
        assert await ws.receive_bytes(timeout=5) == b"\x03\x02\x01"
    assert noda2.seen[0].raw_path == "/ws/city/rooms/general"
    assert noda2.seen[0].header("X-Forwarded-For") == "127.0.0.1"
    assert noda2.seen[0].header("Upgrade") == "websocket"


async def test_mutual_tls_presents_the_client_certificate(pki, upstream, gateway, client):
    noda1 = await backend(upstream, NODA1, "noda1", pki.serving(NODA1, clients=pki.ca))
    cert, key = pki.client_files("gateway.daarion.test")
    ca = pki.ca_file()
    city = f"{{port: {noda1.port}, nodes: [noda1]}}"
    with_cert = routes({"city": city}, noda1=tls_node(NODA1, ca=ca, cert=cert, key=key))
    gw = await gateway(with_cert)
    status, body = await get(client, gw.url + "/api/city/a")
    assert (status, body["node"]) == (200, "noda1")
    assert body["client_cert"] == {"DNS": "gateway.daarion.test"}

    without = await gateway(routes({"city": city}, noda1=tls_node(NODA1, ca=ca)))
    async with client.get(without.url + "/api/city/b") as response:
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_disconnected"
    # The node refuses after the TLS 1.3 handshake, as a close: not a failure of its
    # certificate, so not counted as one.
    assert await metric(client, without, tls_failures("noda1")) is None
    assert [s.raw_path for s in noda1.seen] == ["/city/a"]


# -- certificates that do not verify ---------------------------------------------------------


async def test_a_certificate_of_another_ca_is_a_502_with_its_reason_in_view(
    pki, upstream, gateway, client
):
    noda2 = await backend(upstream, NODA2, "noda2", pki.serving(NODA2))
    node = tls_node(NODA2, ca=pki.ca_file(pki.wrong))
    gw = await gateway(routes({"city": f"{{port: {noda2.port}, nodes: [noda2]}}"}, noda2=node))

    async with client.get(gw.url + "/api/city/rooms") as response:
        assert response.status == 502
        error = await response.json()
    assert error["error"] == "upstream_unavailable"  # the client sees the connect failure
    assert "certificate" not in error["message"]  # the reason is the operator's
    assert noda2.seen == []  # the request never went out

    target = (await upstreams(client, gw, "city"))["noda2"]
    assert target["state"] == "failing"
    assert target["reason"] == f"request failed: {UNKNOWN_ISSUER}"
    assert await metric(client, gw, tls_failures("noda2")) == 1.0
    series = 'gateway_upstream_errors_total{kind="connect",service="city"}'
    assert await metric(client, gw, series) == 1.0
    [line] = request_lines(gw)
    assert line["error"] == "upstream_unavailable"
    assert line["upstream_tls_failures"] == [f"noda2 {NODA2}:{noda2.port}: {UNKNOWN_ISSUER}"]


async def test_a_node_that_fails_verification_is_failed_over_in_the_same_request(
    pki, upstream, gateway, client
):
    noda2 = await backend(upstream, NODA2, "noda2", pki.serving(NODA2))
    noda1 = await backend(upstream, NODA1, "noda1", None)  # plain HTTP
    gw = await gateway(wrong_ca_then(pki, noda2, noda1, noda1_tls=False))

    status, body = await get(client, gw.url + "/api/city/rooms")
    assert (status, body["node"], body["tls"]) == (200, "noda1", None)
    # Never sent: even a POST goes on to the next node.
    status, body = await get(client, gw.url + "/api/city/rooms", method="POST", data=b"once")
    assert (status, body["node"], body["body"]) == (200, "noda1", "once")
    assert noda2.seen == []
    assert [s.method for s in noda1.seen] == ["GET", "POST"]

    assert await metric(client, gw, tls_failures("noda2")) == 2.0
    retries = 'gateway_retries_total{kind="connect",service="city"}'
    assert await metric(client, gw, retries) == 2.0
    failovers = 'gateway_failovers_total{node="noda1",service="city"}'
    assert await metric(client, gw, failovers) == 2.0
    for line in request_lines(gw):
        assert (line["status"], line["upstream"]) == (200, f"noda1 {NODA1}:{noda1.port}")
        assert line["upstream_tls_failures"] == [f"noda2 {NODA2}:{noda2.port}: {UNKNOWN_ISSUER}"]
    assert (await upstreams(client, gw, "city"))["noda2"]["reason"] == (
        f"request failed: {UNKNOWN_ISSUER}"
    )


async def test_a_wss_node_that_fails_verification_is_failed_over_to_one_that_verifies(
    pki, upstream, gateway, client
):
    noda2 = await backend(upstream, NODA2, "noda2", pki.serving(NODA2), wss_room)
    noda1 = await backend(upstream, NODA1, "noda1", pki.serving(NODA1), wss_room)
    gw = await gateway(wrong_ca_then(pki, noda2, noda1, ", websocket: true"))

    async with client.ws_connect(gw.url + "/ws/city/rooms/general") as ws:
        assert await ws.receive_str(timeout=5) == "hello from noda1 over TLSv1.3"
        await ws.send_str("still there?")
        assert await ws.receive_str(timeout=5) == "echo: still there?"
    assert noda2.seen == []
    assert await metric(client, gw, tls_failures("noda2")) == 1.0
    assert await metric(client, gw, tls_failures("noda1")) is None
    handshake = next(line for line in gw.log_lines() if line.get("status") == 101)
    assert handshake["upstream_tls_failures"] == [f"noda2 {NODA2}:{noda2.port}: {UNKNOWN_ISSUER}"]


async def test_server_name_is_the_name_verified_and_sent_and_a_reload_changes_it(
    pki, upstream, gateway, client, tmp_path
):
    sent: list[str | None] = []
    serving = pki.serving("noda2.daarion.test")  # a name only, no IP address
    serving.sni_callback = lambda sslobj, name, context: sent.append(name)
    noda2 = await backend(upstream, NODA2, "noda2", serving)
    ca = pki.ca_file()

    def config(**tls: str) -> str:
        city = f"{{port: {noda2.port}, nodes: [noda2]}}"
        return routes({"city": city}, noda2=tls_node(NODA2, ca=ca, **tls))

    path = tmp_path / "routes.yaml"
    path.write_text(config(server_name="noda2.daarion.test"))
    gw = await gateway(path.read_text(), str(path))
    status, body = await get(client, gw.url + "/api/city/a")
    assert (status, body["node"]) == (200, "noda2")
    assert sent == ["noda2.daarion.test"]
    assert noda2.seen[0].header("Host") == f"{NODA2}:{noda2.port}"  # the SNI only, not Host

    # Another name: the kept-alive connection made for the old one is not used for it.
    path.write_text(config(server_name="other.daarion.test"))
    assert gw.gateway.reload()
    async with client.get(gw.url + "/api/city/b") as response:
        assert response.status == 502
    mismatch = "Hostname mismatch, certificate is not valid for 'other.daarion.test'."
    target = (await upstreams(client, gw, "city"))["noda2"]
    assert target["reason"] == f"request failed: certificate verify failed: {mismatch}"
    assert sent == ["noda2.daarion.test", "other.daarion.test"]

    # No server_name: the node's host, an IP address, is what the certificate must carry.
    path.write_text(config())
    assert gw.gateway.reload()
    async with client.get(gw.url + "/api/city/c") as response:
        assert response.status == 502
    ip_mismatch = f"IP address mismatch, certificate is not valid for '{NODA2}'."
    target = (await upstreams(client, gw, "city"))["noda2"]
    assert target["reason"] == f"request failed: certificate verify failed: {ip_mismatch}"
    assert sent[2:] == [None]  # no SNI for an IP address

    assert [s.raw_path for s in noda2.seen] == ["/city/a"]
    assert await metric(client, gw, tls_failures("noda2")) == 2.0


async def test_a_tls_node_whose_port_speaks_plain_http_fails_the_handshake(
    pki, upstream, gateway, client
):
    noda2 = await backend(upstream, NODA2, "noda2", None)  # tls in the config, not on the port
    node = tls_node(NODA2, ca=pki.ca_file())
    gw = await gateway(routes({"city": f"{{port: {noda2.port}, nodes: [noda2]}}"}, noda2=node))
    async with client.get(gw.url + "/api/city/a") as response:
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_unavailable"
    reason = "TLS handshake failed: wrong version number"
    assert (await upstreams(client, gw, "city"))["noda2"]["reason"] == f"request failed: {reason}"
    assert await metric(client, gw, tls_failures("noda2")) == 1.0
    [line] = request_lines(gw)
    assert line["upstream_tls_failures"] == [f"noda2 {NODA2}:{noda2.port}: {reason}"]
    assert noda2.seen == []  # what it got was no HTTP request


# -- probes, the escape hatch, the config ----------------------------------------------------


async def until(check, timeout: float = 5.0) -> None:
    """Wait until ``await check()`` is true (failing after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


async def test_probes_go_over_https_and_one_failing_verification_takes_its_target_down(
    pki, upstream, gateway, client
):
    noda2 = await backend(upstream, NODA2, "noda2", pki.serving(NODA2))
    noda1 = await backend(upstream, NODA1, "noda1", pki.serving(NODA1))
    health = ", health: {interval: 0.1, timeout: 1, rise: 1, fall: 2}"
    gw = await gateway(wrong_ca_then(pki, noda2, noda1, health, probes=True))

    async def noda2_down() -> bool:
        return bool((await upstreams(client, gw, "city"))["noda2"]["state"] == "down")

    await until(noda2_down)
    targets = await upstreams(client, gw, "city")
    assert targets["noda2"]["reason"] == f"2 probes failed: {UNKNOWN_ISSUER}"
    assert targets["noda1"]["state"] == "up"
    assert targets["noda1"]["reason"] == "probe passed: status 200"
    assert noda2.seen == []
    assert {s.raw_path for s in noda1.seen} == {"/health"}  # probed over HTTPS
    assert (await metric(client, gw, tls_failures("noda2")) or 0) >= 2
    down = [line for line in gw.log_lines() if line["message"] == "upstream target is down"]
    assert [(d["node"], d["reason"]) for d in down] == [
        ("noda2", f"2 probes failed: {UNKNOWN_ISSUER}")
    ]
    status, body = await get(client, gw.url + "/api/city/x")
    assert (status, body["node"]) == (200, "noda1")  # a down target is not even tried


async def test_insecure_skip_verify_accepts_any_certificate_and_warns_at_start_and_reload(
    pki, upstream, gateway, client, tmp_path
):
    noda2 = await backend(upstream, NODA2, "noda2", pki.serving("elsewhere.test", ca=pki.wrong))
    noda1 = await backend(upstream, NODA1, "noda1", None)
    services = {
        "city": f"{{port: {noda2.port}, nodes: [noda2]}}",
        "search": f"{{port: {noda1.port}, nodes: [noda1]}}",
    }
    text = routes(services, noda2=tls_node(NODA2, insecure_skip_verify=True), noda1=NODA1)
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    gw = await gateway(text, str(path))
    status, body = await get(client, gw.url + "/api/city/a")
    assert (status, body["node"], body["tls"]) == (200, "noda2", "TLSv1.3")

    def warnings() -> list[dict[str, Any]]:
        return [line for line in gw.log_lines() if "insecure_skip_verify" in line["message"]]

    assert [(w["level"], w["node"]) for w in warnings()] == [("WARNING", "noda2")]
    assert "noda2" in warnings()[0]["message"]
    assert gw.gateway.reload()
    assert [w["node"] for w in warnings()] == ["noda2", "noda2"]  # once more at the reload
    assert await metric(client, gw, tls_failures("noda2")) is None


def test_a_client_certificate_without_its_key_is_a_config_error(pki):
    cert, key = pki.client_files("gateway.daarion.test")
    for tls in ({"cert": cert}, {"key": key}):
        text = routes({"city": "{port: 80, nodes: [noda2]}"}, noda2=tls_node(NODA2, **tls))
        with pytest.raises(ConfigError) as caught:
            parse_config(text)
        assert [(p.path, p.message) for p in caught.value.problems] == [
            ("nodes.noda2.tls", "cert and key go together (a client certificate needs both)")
        ]


def test_one_context_per_node_and_snapshot_carried_on_its_targets(pki):
    text = routes(
        {
            "city": "{port: 7001, nodes: [noda2, noda1], websocket: true}",
            "search": "{port: 8897, nodes: [noda2]}",
        },
        noda2=tls_node(NODA2, ca=pki.ca_file(), server_name="noda2.daarion.test"),
        noda1=NODA1,
    )
    routes_ = compiled_routes(text)
    (city2, city1), (search2,) = routes_["city"].targets, routes_["search"].targets
    assert city1.tls is None
    assert city1.origin == f"http://{NODA1}:7001"
    assert city2.origin == f"https://{NODA2}:7001"
    assert city2.tls is not None
    assert city2.tls is search2.tls  # one per node
    context = city2.tls.context
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert city2.tls.server_hostname == "noda2.daarion.test"

    again = compiled_routes(text)["city"].targets[0]
    assert again.tls is not None
    assert again.tls.context is not context  # a reload: the files read again
    assert (again, again.key) == (city2, city2.key)  # the same target, the same health record

    shown = summary("routes.yaml", parse_config(text, env={}))  # daarion-gateway check
    assert f"-> https://{NODA2}:8897/search (noda2)\n" in shown
    assert f"-> wss://{NODA2}:7001/ws/city (noda2), ws://{NODA1}:7001/ws/city (noda1)" in shown
