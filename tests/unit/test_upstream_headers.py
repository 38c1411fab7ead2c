"""The request head the upstream gets names the node it goes to: ``Host`` is the node's
address and port as an authority (RFC 3986 3.2.2: an IPv6 address in brackets), the
client's ``Host`` goes on as ``X-Forwarded-Host``."""

from __future__ import annotations

from typing import cast

import pytest
from aiohttp import HttpVersion11
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.request import Request
from gateway.routetable import Entry
from gateway.snapshot import Target
from gateway.upstream.headers import Forwarding, request_headers
from gateway.upstream.redirects import Redirects


def request(host: str) -> Request:
    headers = CIMultiDictProxy(CIMultiDict([("Host", host)]))
    return Request(
        "GET", "/api/city/x", headers, HttpVersion11, True, False, EMPTY_PAYLOAD,
        None, None, cast(StreamWriter, None), "127.0.0.9", "http",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("node", "authority"),
    [
        ("127.0.0.3", "127.0.0.3:7001"),
        ("city.internal", "city.internal:7001"),
        ("fd00::2", "[fd00::2]:7001"),
    ],
)
def test_host_is_the_nodes_authority(node: str, authority: str) -> None:
    target = Target("city", "noda1", node, 7001, 0)
    headers = request_headers(request("gw.example"), target, Forwarding("127.0.0.9", "http", "r"))
    assert headers["Host"] == authority
    assert headers["X-Forwarded-Host"] == "gw.example"
    # A redirect an IPv6 node builds from that Host is recognised as its own.
    entry = Entry("city", "/api/city", "/city", False, None, None, False, None)
    redirects = Redirects(target, entry, "https", "gw.example", cookie_path=True)
    location = f"http://{authority}/city/rooms/"
    assert redirects.url(location) == "https://gw.example/api/city/rooms/"
