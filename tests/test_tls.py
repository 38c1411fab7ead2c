"""The HTTPS listener: versions, SNI, ALPN, the handshake timeout, everything the plain listener
serves served the same way, HSTS, certificate reloads and their metrics, and /health.

Certificates come from ephemeral CAs (trustme), clients are real ssl clients.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import time
import warnings

import pytest
import trustme

from .helpers import (
    NODA1,
    NODA2,
    CertFiles,
    free_port,
    routes,
    sample,
    tls_handshake,
    trusting,
    write_cert,
)

GATEWAY_NAMES = ("gateway.test", "127.0.0.1")


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def tls_config(port: int, *certs: CertFiles, extra: str = "") -> str:
    listed = ", ".join(c.yaml() for c in certs)
    return routes({"city": f"{{port: {port}, nodes: [noda1], websocket: true}}"}, noda1=NODA1) + (
        f"listen: {{host: 127.0.0.1, port: 8080}}\n"
        f"tls:\n  listen: {{host: 127.0.0.1, port: 8443}}\n  certificates: [{listed}]\n{extra}"
    )


def no_sni(ca: trustme.CA) -> ssl.SSLContext:
    context = trusting(ca)
    context.check_hostname = False
    return context


async def test_a_request_over_https_is_served_as_over_http_and_says_https_upstream(
    upstream, gateway, client, ca, tmp_path
):
    up = await upstream(NODA1)
    extra = "  redirect_http: false\n"
    gw = await gateway(tls_config(up.port, write_cert(ca, tmp_path, *GATEWAY_NAMES), extra=extra))
    context = trusting(ca)
    async with client.get(f"{gw.https_url}/api/city/rooms?x=1", ssl=context) as r:
        assert r.status == 200
        assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
    seen = up.seen[-1]
    assert seen.raw_path == "/city/rooms?x=1"
    assert seen.header("X-Forwarded-Proto") == "https"
    # The plain listener (redirect off) serves the same route, without HSTS.
    async with client.get(f"{gw.url}/api/city/rooms") as r:
        assert r.status == 200
        assert "Strict-Transport-Security" not in r.headers
    assert up.seen[-1].header("X-Forwarded-Proto") == "http"


async def test_hsts_is_on_the_gateways_own_answers_and_errors_over_https_only(
    gateway, client, ca, tmp_path
):
    extra = "  hsts: {max_age: 600, include_subdomains: true, preload: true}\n"
    gw = await gateway(tls_config(1, write_cert(ca, tmp_path, *GATEWAY_NAMES), extra=extra))
    context = trusting(ca)
    want = "max-age=600; includeSubDomains; preload"
    for path, status in (("/health", 200), ("/nowhere", 404), ("/api/city/x", 502)):
        async with client.get(f"{gw.https_url}{path}", ssl=context) as r:
            assert (r.status, r.headers.get("Strict-Transport-Security")) == (status, want), path
    async with client.get(f"{gw.url}/health") as r:
        assert r.status == 200
        assert "Strict-Transport-Security" not in r.headers
    # A request the parser refuses, over TLS: its JSON error carries HSTS too.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.https_port, ssl=context, server_hostname="gateway.test"
    )
    writer.write(b"GET / HTTP/1.1\r\nHost: gateway.test\r\nBad Header: x\r\n\r\n")
    head = (await reader.read(4096)).decode("latin-1")
    writer.close()
    assert head.startswith("HTTP/1.1 400")
    assert f"Strict-Transport-Security: {want}" in head


async def test_tls_12_and_13_are_served_and_older_versions_refused(gateway, ca, tmp_path):
    gw = await gateway(tls_config(1, write_cert(ca, tmp_path, *GATEWAY_NAMES)))
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = trusting(ca)
        context.minimum_version = context.maximum_version = version
        shook = await tls_handshake(gw.https_port, "gateway.test", context)
        assert shook.version == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
    old = trusting(ca)
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is what is tested
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer what the server refuses
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_handshake(gw.https_port, "gateway.test", old)


async def test_min_version_13_refuses_tls_12(gateway, ca, tmp_path):
    extra = '  min_version: "1.3"\n'
    gw = await gateway(tls_config(1, write_cert(ca, tmp_path, *GATEWAY_NAMES), extra=extra))
    context = trusting(ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_handshake(gw.https_port, "gateway.test", context)
    assert (await tls_handshake(gw.https_port, "gateway.test", trusting(ca))).version == "TLSv1.3"


async def test_sni_picks_the_certificate_by_exact_or_wildcard_name_else_the_first(
    gateway, ca, tmp_path
):
    first = write_cert(ca, tmp_path / "a", "gateway.test")
    wildcard = write_cert(ca, tmp_path / "b", "*.daarion.test")
    exact = write_cert(ca, tmp_path / "c", "app.daarion.test")
    gw = await gateway(tls_config(1, first, wildcard, exact))
    port = gw.https_port
    shook = await tls_handshake(port, "app.daarion.test", trusting(ca))
    assert shook.names == ("app.daarion.test",)  # exact beats the wildcard listed before it
    assert (await tls_handshake(port, "city.daarion.test", trusting(ca))).names == (
        "*.daarion.test",
    )
    # The wildcard covers one label only: a.b.daarion.test is not its name.
    assert (await tls_handshake(port, "a.b.daarion.test", no_sni(ca))).names == ("gateway.test",)
    assert (await tls_handshake(port, "unknown.test", no_sni(ca))).names == ("gateway.test",)
    assert (await tls_handshake(port, None, no_sni(ca))).names == ("gateway.test",)
    assert (await tls_handshake(port, "GATEWAY.TEST", trusting(ca))).names == ("gateway.test",)


async def test_alpn_is_http11_even_when_the_client_offers_h2(gateway, ca, tmp_path):
    gw = await gateway(tls_config(1, write_cert(ca, tmp_path, *GATEWAY_NAMES)))
    context = trusting(ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    assert (await tls_handshake(gw.https_port, "gateway.test", context)).alpn == "http/1.1"


async def test_a_client_that_does_not_finish_its_handshake_is_closed(gateway, ca, tmp_path):
    extra = "  handshake_timeout: 0.5\n"
    gw = await gateway(tls_config(1, write_cert(ca, tmp_path, *GATEWAY_NAMES), extra=extra))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.https_port)
    started = time.monotonic()
    writer.write(b"\x16\x03\x01")  # the start of a ClientHello, never finished
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert 0.4 < time.monotonic() - started < 3
    writer.close()
    # Meanwhile and after, handshakes that finish are served.
    assert (await tls_handshake(gw.https_port, "gateway.test", trusting(ca))).version


async def test_websocket_sessions_over_wss(upstream, gateway, client, ca, tmp_path):
    from aiohttp import web  # noqa: PLC0415 - only this test's upstream needs it

    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"echo {message.data}")
        return ws

    up = await upstream(NODA1, handler=echo)
    gw = await gateway(tls_config(up.port, write_cert(ca, tmp_path, *GATEWAY_NAMES)))
    url = f"wss://127.0.0.1:{gw.https_port}/ws/city/room1"
    async with client.ws_connect(url, ssl=trusting(ca)) as ws:
        await ws.send_str("hello")
        message = await ws.receive(timeout=5)
        assert message.data == "echo hello"
    assert up.seen[-1].header("X-Forwarded-Proto") == "https"


async def test_a_changed_certificate_is_served_to_new_connections_and_a_bad_one_refused(
    gateway, client, ca, tmp_path
):
    files = write_cert(ca, tmp_path, "gateway.test")
    gw = await gateway(tls_config(1, files))
    port = gw.https_port
    assert (await tls_handshake(port, "gateway.test", trusting(ca))).names == ("gateway.test",)
    # A connection open before the change keeps working after it, with its certificate.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=trusting(ca), server_hostname="gateway.test"
    )

    async def health_on_it() -> bytes:
        writer.write(b"GET /health HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0])
        await reader.readexactly(length)
        return head.partition(b"\r\n")[0]

    assert await health_on_it() == b"HTTP/1.1 200 OK"
    # Renewed: the same name and a new key, written in place (as certbot does).
    renewed = write_cert(ca, tmp_path / "new", "gateway.test", "www.gateway.test")
    os.replace(renewed.cert, files.cert)
    os.replace(renewed.key, files.key)
    gw.gateway.reload_certificates()
    shook = await tls_handshake(port, "gateway.test", trusting(ca))
    assert shook.names == ("gateway.test", "www.gateway.test")
    assert await health_on_it() == b"HTTP/1.1 200 OK"
    cert = writer.get_extra_info("ssl_object").getpeercert()
    assert [v for k, v in cert["subjectAltName"] if k == "DNS"] == ["gateway.test"]
    writer.close()
    # A broken file: refused with one line naming it; the last good certificate serves on.
    files.cert.write_text("not a certificate")
    gw.gateway.reload_certificates()
    shook = await tls_handshake(port, "gateway.test", trusting(ca))
    assert shook.names == ("gateway.test", "www.gateway.test")
    refused = [line for line in gw.log_lines() if line["message"].startswith("certificate not")]
    assert len(refused) == 1
    assert refused[0]["cert"] == str(files.cert)
    assert "not a PEM certificate" in refused[0]["reason"]
    gw.gateway.reload_certificates()  # the same broken file: said once, not at every check
    assert len([x for x in gw.log_lines() if x["message"].startswith("certificate not")]) == 1
    async with client.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    assert sample(text, 'gateway_tls_certificate_reloads_total{result="success"}') == 1
    assert sample(text, 'gateway_tls_certificate_reloads_total{result="failure"}') == 1


async def test_a_certificate_file_change_is_noticed_without_a_signal(gateway, ca, tmp_path):
    files = write_cert(ca, tmp_path, "gateway.test")
    gw = await gateway(tls_config(1, files))
    certificates = gw.gateway.shared.certificates
    assert certificates is not None
    certificates.watch_interval = 0.1  # from the next check on (the first waits 2 s)
    renewed = write_cert(ca, tmp_path / "new", "gateway.test", "api.gateway.test")
    os.replace(renewed.key, files.key)
    os.replace(renewed.cert, files.cert)
    for _ in range(60):
        await asyncio.sleep(0.1)
        shook = await tls_handshake(gw.https_port, "gateway.test", trusting(ca))
        if shook.names == ("gateway.test", "api.gateway.test"):
            break
    else:
        pytest.fail("the changed certificate was never served")


async def test_expiry_metric_and_health_list_each_certificate(gateway, client, ca, tmp_path):
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    long_lived = write_cert(
        ca, tmp_path / "a", "gateway.test", not_after=now + datetime.timedelta(days=60)
    )
    gw = await gateway(tls_config(1, long_lived))
    async with client.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    expiry = sample(text, 'gateway_tls_certificate_expiry_timestamp_seconds{name="gateway.test"}')
    assert expiry == (now + datetime.timedelta(days=60)).timestamp()
    async with client.get(f"{gw.url}/health") as r:
        body = await r.json()
    assert body["status"] == "healthy"
    assert body["certificates"]["gateway.test"]["days_left"] in (59, 60)
    assert body["certificates"]["gateway.test"]["source"] == "file"
    # A certificate that ends within a week: degraded.
    short = write_cert(
        ca, tmp_path / "b", "gateway.test", not_after=now + datetime.timedelta(days=3)
    )
    for suffix in ("cert", "key"):
        os.replace(getattr(short, suffix), getattr(long_lived, suffix))
    gw.gateway.reload_certificates()
    async with client.get(f"{gw.url}/health") as r:
        body = await r.json()
    assert r.status == 200
    assert body["status"] == "degraded"
    assert body["certificates"]["gateway.test"]["days_left"] in (2, 3)


async def test_health_lists_certificates_to_admin_clients_only(gateway, client, ca, tmp_path):
    extra = "admin: {allow: [10.0.0.0/8]}\n"
    gw = await gateway(tls_config(1, write_cert(ca, tmp_path, "gateway.test"), extra=extra))
    async with client.get(f"{gw.url}/health") as r:
        body = await r.json()
    assert r.status == 200
    assert "certificates" not in body
    assert body["status"] == "healthy"


async def raw_get(port: int, target: str, host: str | None) -> tuple[int, dict[str, str]]:
    """A GET written byte for byte on the plain listener: (status, headers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {target} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "")
    writer.write(head.encode("latin-1") + b"Connection: close\r\n\r\n")
    answer = (await reader.read()).decode("latin-1")
    writer.close()
    status_line, *lines = answer.partition("\r\n\r\n")[0].split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers


async def test_the_plain_listener_redirects_to_https_keeping_path_query_and_port(
    upstream, gateway, ca, tmp_path
):
    up = await upstream(NODA1)
    gw = await gateway(tls_config(up.port, write_cert(ca, tmp_path, *GATEWAY_NAMES)))
    port = gw.https_port
    status, headers = await raw_get(gw.port, "/api/city/rooms?a=1&b=%2F", "Gateway.Test:8080")
    assert status == 308
    assert headers["Location"] == f"https://gateway.test:{port}/api/city/rooms?a=1&b=%2F"
    assert "Strict-Transport-Security" not in headers  # never over plain HTTP
    status, headers = await raw_get(gw.port, "/", "[::1]")
    assert (status, headers["Location"]) == (308, f"https://[::1]:{port}/")
    # The gateway's own endpoints are not redirected; nothing reached the upstream.
    assert (await raw_get(gw.port, "/health", "gateway.test"))[0] == 200
    assert (await raw_get(gw.port, "/metrics", "gateway.test"))[0] == 200
    assert up.seen == []


@pytest.mark.parametrize(
    "host",
    [None, "", "evil.test/path", "a@b.test", "bad_host.test", "-x.test", "x..test", "[zz::1]",
     "gateway.test:99999x", "a" * 64 + ".test", "gateway.test, other.test"],
)  # fmt: skip
async def test_a_redirect_never_names_something_that_is_not_a_host(gateway, ca, tmp_path, host):
    gw = await gateway(tls_config(1, write_cert(ca, tmp_path, *GATEWAY_NAMES)))
    status, headers = await raw_get(gw.port, "/x", host)
    assert status == 400
    assert "Location" not in headers


async def test_the_redirect_names_public_port_and_leaves_out_443(gateway, ca, tmp_path):
    files = write_cert(ca, tmp_path, *GATEWAY_NAMES)
    gw = await gateway(tls_config(1, files, extra="  public_port: 443\n"))
    status, headers = await raw_get(gw.port, "/x?y", "gateway.test")
    assert (status, headers["Location"]) == (308, "https://gateway.test/x?y")
    gw = await gateway(tls_config(1, files, extra="  public_port: 8443\n"))
    status, headers = await raw_get(gw.port, "/x", "gateway.test")
    assert headers["Location"] == "https://gateway.test:8443/x"


def test_check_validates_the_files_and_lists_every_tls_problem_at_once(ca, tmp_path):
    import subprocess  # noqa: PLC0415 - only the command-line tests run a process
    import sys  # noqa: PLC0415

    good = write_cert(ca, tmp_path, "gateway.test", "www.gateway.test")
    config = tmp_path / "routes.yaml"

    def check(text: str) -> subprocess.CompletedProcess[str]:
        config.write_text(text)
        return subprocess.run(
            [sys.executable, "-m", "gateway", "check", "--config", str(config)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip

    result = check(tls_config(1, good))
    assert result.returncode == 0, result.stderr
    assert "https on 127.0.0.1:8443 (TLS 1.2+, plain HTTP redirected to it, HSTS)" in result.stdout
    assert (
        f"certificate {good.cert}: gateway.test, www.gateway.test, until 3000-01-01"
        in result.stdout
    )  # trustme's
    other = write_cert(trustme.CA(), tmp_path / "other", "gateway.test")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    text = tls_config(
        1,
        CertFiles(good.cert, other.key),  # a key of another certificate
        CertFiles(tmp_path / "missing.pem", good.key),
        CertFiles(broken, good.key),
    ).replace("port: 8443", "port: 8080") + (
        "admin: {allow: [10.0.0.0/8, 300.1.0.0/16, not-a-cidr]}\n"
    )
    result = check(text)
    assert result.returncode == 2
    problems = result.stderr.splitlines()[1:]
    assert [p.split(":")[0].split(" (line")[0].strip() for p in problems] == [
        "tls.listen.port",
        "tls.certificates[0]",
        "tls.certificates[1]",
        "tls.certificates[2]",
        "admin.allow[1]",
        "admin.allow[2]",
    ], result.stderr
    assert "the key does not match the certificate" in problems[1]
    assert "no such certificate file" in problems[2]
    assert "not a PEM certificate" in problems[3]
    assert "8080 is also listen's port" in problems[0]


async def test_rate_limits_and_failover_hold_over_https(upstream, gateway, client, ca, tmp_path):
    preferred = await upstream(NODA2)
    fallback = await upstream(NODA1)
    text = routes(
        {"search": f"{{port: {preferred.port}, nodes: [noda2, {{node: noda1, port: "
                   f"{fallback.port}}}], rate_limit: tight}}"},
        noda1=NODA1, noda2=NODA2,
    ) + (
        "rate_limits: {tight: {rate: 1r/m, burst: 1}}\n"
        "tls:\n  listen: {host: 127.0.0.1, port: 8443}\n"
        f"  certificates: [{write_cert(ca, tmp_path, *GATEWAY_NAMES).yaml()}]\n"
    )  # fmt: skip
    gw = await gateway(text)
    context = trusting(ca)
    url = f"{gw.https_url}/api/search/q"
    async with client.get(url, ssl=context) as r:
        assert r.status == 200
    assert len(preferred.seen) == 1
    await preferred.stop()  # NODA2 goes away: the next request is served by NODA1
    async with client.get(url, ssl=context) as r:
        assert r.status == 200
    assert len(fallback.seen) == 1
    async with client.get(url, ssl=context) as r:  # over the burst
        assert r.status == 429
        assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
        assert (await r.json())["error"] == "rate_limited"


async def test_no_redirect_for_what_a_trusted_proxy_says_came_over_https(gateway, ca, tmp_path):
    files = write_cert(ca, tmp_path, *GATEWAY_NAMES)
    text = tls_config(1, files, extra="trusted_proxies: [127.0.0.0/8]\n")
    gw = await gateway(text)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"GET /health/x HTTP/1.1\r\nHost: gateway.test\r\nX-Forwarded-Proto: https\r\n"
        b"Connection: close\r\n\r\n"
    )
    head = (await reader.read()).decode("latin-1")
    writer.close()
    assert not head.startswith("HTTP/1.1 308")  # TLS ended at the proxy: no 308 loop
    status, _ = await raw_get(gw.port, "/x", "gateway.test")  # the proxy said nothing: 308
    assert status == 308


def test_a_tls_section_needs_certificates_or_acme_and_a_disabled_one_needs_neither():
    from gateway.config import ConfigError, parse_config  # noqa: PLC0415

    base = routes({"city": "{port: 1, nodes: [noda1]}"}, noda1=NODA1)
    with pytest.raises(ConfigError, match=r"tls .*needs certificates, or acme \(enabled\)"):
        parse_config(base + "tls: {listen: {port: 8443}}\n")
    with pytest.raises(ConfigError, match=r"needs certificates, or acme"):
        parse_config(base + "tls: {acme: {domains: [gateway.test], enabled: false}}\n")
    config = parse_config(base + "tls: {enabled: false}\n")  # GATEWAY_TLS=false: nothing asked
    assert config.tls is not None
    assert not config.tls.enabled


async def test_a_valid_wildcard_beats_acmes_placeholder_for_its_domain(ca, tmp_path):
    # While ACME's order for gw.daarion.test is pending, its self-signed stand-in is served;
    # a valid *.daarion.test from files covers that name and is what clients get.
    from gateway.edge.tls import Certificates, Source  # noqa: PLC0415
    from gateway.metrics import Metrics  # noqa: PLC0415

    wildcard = write_cert(ca, tmp_path / "w", "*.daarion.test")
    acme = tmp_path / "acme"  # nothing stored yet: the placeholder
    certificates = Certificates(Metrics())
    certificates.configure(
        (
            Source(str(wildcard.cert), str(wildcard.key)),
            Source(str(acme / "c.pem"), str(acme / "k.pem"), acme=("gw.daarion.test",)),
        ),
        "1.2",
    )
    assert [s.placeholder for s in certificates.served] == [False, True]
    server = await asyncio.start_server(
        lambda r, w: w.close(), "127.0.0.1", 0, ssl=certificates.context
    )
    port = server.sockets[0].getsockname()[1]
    try:
        shook = await tls_handshake(port, "gw.daarion.test", trusting(ca))
        assert shook.names == ("*.daarion.test",)
        # A name only the placeholder has: the placeholder (no real one covers it).
        assert (await tls_handshake(port, "other.test", no_sni(ca))).names == ("*.daarion.test",)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("when", ["expired", "not_yet_valid"])
async def test_a_renewed_file_that_is_not_valid_now_never_replaces_a_valid_one(
    gateway, ca, tmp_path, when
):
    files = write_cert(ca, tmp_path, "gateway.test")
    gw = await gateway(tls_config(1, files))
    port = gw.https_port
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    dates = (now - 30 * day, now - day) if when == "expired" else (now + day, now + 90 * day)
    leaf = ca.issue_cert(
        "gateway.test", "new.gateway.test", not_before=dates[0], not_after=dates[1]
    )
    files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    files.key.write_bytes(leaf.private_key_pem.bytes())
    gw.gateway.reload_certificates()
    assert (await tls_handshake(port, "gateway.test", trusting(ca))).names == ("gateway.test",)
    (refused,) = [x for x in gw.log_lines() if x["message"].startswith("certificate not")]
    reason = "expired on" if when == "expired" else "not valid before"
    assert f"{files.cert}: {reason} " in refused["reason"]


async def test_a_reload_leaves_acmes_challenges_to_the_running_acme_client(gateway, ca, tmp_path):
    # The ACME client runs until the restart a changed tls.acme needs: its challenges must
    # be answered until then (with acme turned off by a reload they got a 308 to https://,
    # and every renewal of the running client failed).
    from gateway.config import parse_config  # noqa: PLC0415
    from gateway.edge.acme import ChallengeStore  # noqa: PLC0415

    storage = tmp_path / "acme"
    dead = free_port()
    files = write_cert(ca, tmp_path, "gateway.test")
    base = tls_config(1, files)
    with_acme = base + (
        f"  acme: {{domains: [acme.test], directory: 'https://127.0.0.1:{dead}/dir',"
        f" storage: '{storage}'}}\n"
    )
    gw = await gateway(with_acme)
    ChallengeStore(str(storage)).put("tok123", b"tok123.thumb")
    challenge = "/.well-known/acme-challenge/tok123"
    assert (await raw_get(gw.port, challenge, "acme.test"))[0] == 200
    gw.gateway.apply(parse_config(base))
    assert (await raw_get(gw.port, challenge, "acme.test"))[0] == 200


async def test_a_reload_of_min_version_keeps_what_is_served(gateway, ca, tmp_path):
    # The listener's context decides the version; the certificates stay as served, even
    # one whose files no longer load (they used to be dropped and loaded anew).
    files = write_cert(ca, tmp_path, "gateway.test")
    text = tls_config(1, files)
    gw = await gateway(text)
    port = gw.https_port
    gw.gateway.shared.certificates.watch_interval = 3600  # only this test's reloads look
    from gateway.config import parse_config  # noqa: PLC0415

    # (Both checked while the files are good.)
    newer = parse_config(text + '  min_version: "1.3"\n')
    slower = parse_config(text + '  min_version: "1.3"\n  handshake_timeout: 3\n')
    files.cert.write_text("half written")
    gw.gateway.apply(newer)
    shook = await tls_handshake(port, "gateway.test", trusting(ca))
    assert (shook.names, shook.version) == (("gateway.test",), "TLSv1.3")
    old = trusting(ca)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_handshake(port, "gateway.test", old)
    warned = [x for x in gw.log_lines() if "handshake_timeout" in x["message"]]
    assert warned == []
    gw.gateway.apply(slower)
    warned = [x["message"] for x in gw.log_lines() if "handshake_timeout" in x["message"]]
    assert warned == ["a changed tls.handshake_timeout takes effect only after a restart"]


def test_a_pair_half_written_since_the_last_check_is_looked_at_again(ca, tmp_path, caplog):
    # The watch looks every watch_interval (2 s): a write it first sees 1.5 s late is still
    # perhaps half done (the key not yet replaced), not refused with an ERROR at once.
    from gateway.edge.tls import Certificates, Source  # noqa: PLC0415
    from gateway.metrics import Metrics  # noqa: PLC0415

    files = write_cert(ca, tmp_path, "gateway.test")
    certificates = Certificates(Metrics())
    assert certificates.watch_interval == 2.0
    certificates.configure((Source(str(files.cert), str(files.key)),), "1.2")
    renewed = write_cert(ca, tmp_path / "new", "gateway.test", "www.gateway.test")
    os.replace(renewed.cert, files.cert)  # the certificate first: it does not match the key
    written = time.time() - 1.5
    for path in (files.cert, files.key):
        os.utime(path, (written, written))
    certificates.refresh(settle=True)
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []
    assert list(certificates.served[0].names) == ["gateway.test"]
    os.replace(renewed.key, files.key)
    certificates.refresh(settle=True)
    assert list(certificates.served[0].names) == ["gateway.test", "www.gateway.test"]


async def test_a_reload_from_files_to_acme_serves_the_files_until_the_restart(
    gateway, ca, tmp_path
):
    # ACME starts at the restart a changed tls.acme needs; until then the files serve on
    # (not an empty set, nor a placeholder no ACME client will ever replace).
    from gateway.config import parse_config  # noqa: PLC0415

    files = write_cert(ca, tmp_path, "gateway.test")
    text = tls_config(1, files)
    gw = await gateway(text)
    acme_only = text.replace(f"  certificates: [{files.yaml()}]\n", "") + (
        f"  acme: {{domains: [gateway.test], directory: 'https://127.0.0.1:{free_port()}/d',"
        f" storage: '{tmp_path / 'acme'}'}}\n"
    )
    gw.gateway.apply(parse_config(acme_only))
    shook = await tls_handshake(gw.https_port, "gateway.test", trusting(ca))
    assert shook.names == ("gateway.test",)  # verified by the CA: the file's, no placeholder
    warned = [x["message"] for x in gw.log_lines() if "tls.acme" in x["message"]]
    assert warned == ["a changed tls.acme takes effect only after a restart"]


def test_a_pair_refused_for_its_dates_is_taken_once_they_come_right(ca, tmp_path, monkeypatch):
    # A renewal dated 12 h ahead (or a clock behind) is refused while the served one is
    # valid; when that one ends, the same files (unchanged) must be looked at again, not
    # the expired one served on because the refusal was remembered for good.
    import types  # noqa: PLC0415

    from gateway.edge import tls as module  # noqa: PLC0415
    from gateway.edge.tls import Certificates, Source  # noqa: PLC0415
    from gateway.metrics import Metrics  # noqa: PLC0415

    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    files = write_cert(ca, tmp_path, "gateway.test", not_after=now + 2 * day)
    certificates = Certificates(Metrics())
    certificates.configure((Source(str(files.cert), str(files.key)),), "1.2")
    leaf = ca.issue_cert("gateway.test", not_before=now + day / 2, not_after=now + 90 * day)
    files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    files.key.write_bytes(leaf.private_key_pem.bytes())
    certificates.refresh()
    assert certificates.served[0].not_after == (now + 2 * day).replace(microsecond=0).timestamp()
    later = now.timestamp() + 3 * 86400  # the first has ended, the second has begun
    monkeypatch.setattr(module, "time", types.SimpleNamespace(time=lambda: later))
    certificates.refresh()
    assert certificates.served[0].not_after > later + 80 * 86400
