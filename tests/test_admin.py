"""The operator's endpoints: /metrics and /gateway/* answer the clients of admin.allow only,
on the admin listener only when there is one; /health answers everyone everywhere."""

from __future__ import annotations

import orjson

from .helpers import NODA1, routes


def config(extra: str) -> str:
    return routes({"city": "{port: 1, nodes: [noda1]}"}, noda1=NODA1) + extra


async def get(client, url: str, **headers: str) -> tuple[int, bytes]:
    async with client.get(url, headers=headers) as r:
        return r.status, await r.read()


def _without_id(body: bytes) -> dict[str, object]:
    document: dict[str, object] = orjson.loads(body)
    document.pop("request_id")
    return document


async def test_loopback_is_the_default_audience(gateway, client):
    gw = await gateway(config(""))
    assert (await get(client, f"{gw.url}/metrics"))[0] == 200
    assert (await get(client, f"{gw.url}/gateway/upstreams"))[0] == 200


async def test_others_get_the_404_of_an_unknown_path_and_health_still_answers(gateway, client):
    gw = await gateway(config("admin: {allow: [10.0.0.0/8, 'fd00::/8']}\n"))
    unknown_status, unknown = await get(client, f"{gw.url}/gateway/nothing-here")
    for path in ("/metrics", "/gateway/upstreams"):
        status, body = await get(client, f"{gw.url}{path}")
        assert status == unknown_status == 404
        assert (
            body.replace(b'"request_id"', b"").split(b",")[:2]
            == unknown.replace(b'"request_id"', b"").split(b",")[:2]
        )
        assert b"127.0.0.3" not in body
    status, body = await get(client, f"{gw.url}/health")
    assert status == 200
    assert b'"status"' in body


async def test_the_client_address_is_the_one_trusted_proxies_report(gateway, client):
    gw = await gateway(config("trusted_proxies: [127.0.0.0/8]\nadmin: {allow: [10.1.0.0/16]}\n"))
    assert (await get(client, f"{gw.url}/metrics"))[0] == 404
    assert (await get(client, f"{gw.url}/metrics", **{"X-Forwarded-For": "10.1.2.3"}))[0] == 200
    assert (await get(client, f"{gw.url}/metrics", **{"X-Forwarded-For": "10.2.0.1"}))[0] == 404


async def test_with_an_admin_listener_they_are_served_there_and_on_no_public_one(gateway, client):
    gw = await gateway(config("admin: {listen: {host: 127.0.0.1, port: 9101}}\n"))
    status, body = await get(client, f"{gw.admin_url}/metrics")
    assert status == 200
    assert b"http_requests_total" in body
    assert (await get(client, f"{gw.admin_url}/gateway/upstreams"))[0] == 200
    assert (await get(client, f"{gw.admin_url}/health"))[0] == 200
    assert (await get(client, f"{gw.url}/metrics"))[0] == 404
    assert (await get(client, f"{gw.url}/gateway/upstreams"))[0] == 404
    assert (await get(client, f"{gw.url}/health"))[0] == 200
    # The admin listener routes nothing.
    status, body = await get(client, f"{gw.admin_url}/api/city/x")
    assert status == 404
    assert b'"not_found"' in body


async def test_a_reload_that_removes_the_admin_listener_opens_nothing_before_the_restart(
    gateway, client
):
    # The admin listener serves on until the restart the reload warns of: the public
    # listeners must not start serving /metrics and /gateway/* meanwhile.
    from gateway.config import parse_config  # noqa: PLC0415

    gw = await gateway(config("admin: {listen: {host: 127.0.0.1, port: 9101}}\n"))
    gw.gateway.apply(parse_config(config("")))
    assert (await get(client, f"{gw.url}/metrics"))[0] == 404
    assert (await get(client, f"{gw.url}/gateway/upstreams"))[0] == 404
    assert (await get(client, f"{gw.admin_url}/metrics"))[0] == 200
    warned = [x["message"] for x in gw.log_lines() if "admin.listen" in x["message"]]
    assert warned == ["a changed admin.listen takes effect only after a restart"]


async def test_the_admin_listener_keeps_its_allow_list(gateway, client):
    gw = await gateway(
        config("admin: {listen: {host: 127.0.0.1, port: 9101}, allow: [10.0.0.0/8]}\n")
    )
    assert (await get(client, f"{gw.admin_url}/metrics"))[0] == 404
