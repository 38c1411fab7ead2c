"""What upstreams may trust: headers a client could use to pass for another client, another
user or another path never reach a service from a peer that is not a trusted proxy, and
identity headers never reach one from anybody, however they are spelled."""

from __future__ import annotations

import pytest

from .helpers import NODA1, raw_exchange, routes

SPOOFED = [
    "X-User-Id: admin",
    "x-user-id: admin",
    "X-USER-ROLE: admin",
    "X-User-Roles: admin",
    "X-Authenticated-User: admin",
    "X-Remote-User: admin",
    "True-Client-IP: 10.6.6.6",
    "X-Client-IP: 10.6.6.6",
    "CF-Connecting-IP: 10.6.6.6",
    "X-Cluster-Client-IP: 10.6.6.6",
    "X-Real-IP: 10.6.6.6",
    "Forwarded: for=10.6.6.6",
    "X-Forwarded-For: 10.6.6.6",
    "X-Forwarded-Host: evil.test",
    "X-Forwarded-Proto: https",
    "X-Forwarded-Prefix: /admin",
    "X-Forwarded-Port: 443",
    "X-Original-URL: /admin",
    "X-Rewrite-URL: /admin",
    "X-HTTP-Method-Override: DELETE",
]
UNDERSCORED = ["X_User_Id: admin", "x_forwarded_for: 10.6.6.6", "X_Original_URL: /admin"]
GATEWAY_STATED = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}


def request(*lines: str) -> bytes:
    head = "GET /api/city/x HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
    return (head + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


@pytest.mark.parametrize("underscores", [False, True])
async def test_nothing_a_client_claims_about_itself_reaches_the_service(
    upstream, gateway, underscores
):
    up = await upstream(NODA1)
    option = ", limits: {underscores_in_headers: true}" if underscores else ""
    gw = await gateway(
        routes({"city": f"{{port: {up.port}, nodes: [noda1]{option}}}"}, noda1=NODA1)
    )
    response = await raw_exchange(gw.port, request(*SPOOFED, *UNDERSCORED, "X-Kept: yes"))
    assert response.status == 200
    (seen,) = up.seen
    received = {name.lower(): value for name, value in seen.headers}
    for line in [*SPOOFED, *UNDERSCORED]:
        name = line.split(":")[0].lower().replace("_", "-")
        if name in GATEWAY_STATED:
            assert "10.6.6.6" not in received[name], line
            assert "evil" not in received[name], line
        else:
            assert name not in received, line
    assert not any("_" in name for name in received)
    assert received["x-forwarded-for"] == "127.0.0.1"  # the peer, and only it
    assert received["x-forwarded-host"] == "gateway.test"
    assert received["x-forwarded-proto"] == "http"
    assert received["x-kept"] == "yes"


async def test_a_trusted_proxys_headers_are_kept_and_extended_but_never_identity(upstream, gateway):
    up = await upstream(NODA1)
    config = routes({"city": f"{{port: {up.port}, nodes: [noda1]}}"}, noda1=NODA1)
    gw = await gateway(config + "trusted_proxies: [127.0.0.0/8]\n")
    response = await raw_exchange(
        gw.port,
        request(
            "X-Forwarded-For: 203.0.113.9",
            "CF-Connecting-IP: 203.0.113.9",
            "X-Forwarded-Prefix: /city",
            "X-User-Id: admin",
            "X-Authenticated-User: admin",
        ),
    )
    assert response.status == 200
    (seen,) = up.seen
    assert seen.header("X-Forwarded-For") == "203.0.113.9, 127.0.0.1"
    assert seen.header("X-Real-IP") == "203.0.113.9"
    assert seen.header("CF-Connecting-IP") == "203.0.113.9"
    assert seen.header("X-Forwarded-Prefix") == "/city"
    assert seen.header("X-User-Id") is None
    assert seen.header("X-Authenticated-User") is None


async def test_configured_identity_headers_are_removed_in_any_spelling(upstream, gateway):
    up = await upstream(NODA1)
    config = routes(
        {"city": f"{{port: {up.port}, nodes: [noda1], limits: {{underscores_in_headers: true}}}}"},
        noda1=NODA1,
    )
    config += (
        "auth:\n  providers:\n"
        "    daarion: {algorithms: [HS256], secret: a-test-secret-of-at-least-32-bytes}\n"
        "  identity_headers: {sub: X-Daarion-Subject, org: X-Daarion-Org}\n"
    )
    gw = await gateway(config)
    response = await raw_exchange(
        gw.port, request("x-daarion-subject: admin", "X_DAARION_ORG: root", "X-Other: kept")
    )
    assert response.status == 200
    (seen,) = up.seen
    names = {name.lower().replace("_", "-") for name, _ in seen.headers}
    assert "x-daarion-subject" not in names
    assert "x-daarion-org" not in names
    assert seen.header("X-Other") == "kept"
