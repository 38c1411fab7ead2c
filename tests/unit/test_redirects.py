"""Redirect URLs that point at the upstream's own address become the public URLs that reach
the same resource (nginx's proxy_redirect default); anything else passes unchanged."""

from __future__ import annotations

import ssl

import pytest
from multidict import CIMultiDict

from gateway.routetable import Entry
from gateway.snapshot import Target
from gateway.upstream.redirects import Redirects
from gateway.upstream.tls import UpstreamTls

TARGET = Target("city", "noda1", "127.0.0.3", 7001, 0)


def entry(to: str = "/city", path: str = "/api/city") -> Entry[None]:
    return Entry("city", path, to, False, None, None, False, None)


def redirects(
    prefix: str = "/city", host: str | None = "gw.example:8443", path: str = "/api/city"
) -> Redirects:
    return Redirects(TARGET, entry(prefix, path), "https", host, cookie_path=True)


@pytest.mark.parametrize(
    ("location", "public"),
    [
        ("http://127.0.0.3:7001/city/rooms/", "https://gw.example:8443/api/city/rooms/"),
        ("HTTP://127.0.0.3:7001/city/rooms?x=1", "https://gw.example:8443/api/city/rooms?x=1"),
        ("http://127.0.0.3:7001/city", "https://gw.example:8443/api/city"),
        ("http://127.0.0.3:7001/city?next=/", "https://gw.example:8443/api/city?next=/"),
        # Scheme-relative: the upstream's address all the same (it stays scheme-relative).
        ("//127.0.0.3:7001/city/rooms", "//gw.example:8443/api/city/rooms"),
        ("//127.0.0.3:7002/city/rooms", "//127.0.0.3:7002/city/rooms"),
        ("//app.daarion.space/city", "//app.daarion.space/city"),
        # Not the upstream's own address, or not a URL under the route: unchanged.
        ("/city/rooms/", "/city/rooms/"),
        ("rooms/", "rooms/"),
        ("https://app.daarion.space/x", "https://app.daarion.space/x"),
        ("http://127.0.0.3:7002/city/x", "http://127.0.0.3:7002/city/x"),
        ("http://127.0.0.3:70012/city/x", "http://127.0.0.3:70012/city/x"),
        ("http://127.0.0.3:7001/cityx", "http://127.0.0.3:7001/cityx"),
        ("http://127.0.0.3:7001/other", "http://127.0.0.3:7001/other"),
    ],
)
def test_locations(location: str, public: str) -> None:
    assert redirects().url(location) == public


def test_an_empty_upstream_prefix_maps_every_path() -> None:
    r = redirects(prefix="")
    assert r.url("http://127.0.0.3:7001/rooms/") == "https://gw.example:8443/api/city/rooms/"
    assert r.url("http://127.0.0.3:7001") == "https://gw.example:8443/api/city/"
    # A query straight after the address is the root's (it leaked the address before).
    assert r.url("http://127.0.0.3:7001?x=1") == "https://gw.example:8443/api/city/?x=1"
    assert r.url("//127.0.0.3:7001?x=1") == "//gw.example:8443/api/city/?x=1"


@pytest.mark.parametrize("host", [None, "", "evil.example/x", "a b", "gw.example:8443\r\nX: y"])
def test_without_a_usable_host_the_public_url_is_a_path(host: str | None) -> None:
    assert redirects(host=host).url("http://127.0.0.3:7001/city/r") == "/api/city/r"


def test_port_80_may_be_left_out() -> None:
    r = Redirects(Target("city", "noda1", "10.0.0.1", 80, 0), entry(), "http", "gw")
    assert r.url("http://10.0.0.1/city/a") == "http://gw/api/city/a"
    assert r.url("http://10.0.0.1:80/city/a") == "http://gw/api/city/a"


def test_the_headers_rewritten() -> None:
    headers = CIMultiDict(
        {
            "Location": "http://127.0.0.3:7001/city/a",
            "Content-Location": "http://127.0.0.3:7001/city/b",
            "Refresh": "5; url=http://127.0.0.3:7001/city/c",
            "Link": "<http://127.0.0.3:7001/city/d>",
        }
    )
    redirects().apply(headers)
    assert dict(headers) == {
        "Location": "https://gw.example:8443/api/city/a",
        "Content-Location": "https://gw.example:8443/api/city/b",
        "Refresh": "5; url=https://gw.example:8443/api/city/c",
        "Link": "<http://127.0.0.3:7001/city/d>",  # not a redirect header: as it came
    }


def test_routes_with_trailing_slashes_and_the_root() -> None:
    public = redirects(prefix="/static/", path="/public/")
    assert (
        public.url("http://127.0.0.3:7001/static/a.png") == "https://gw.example:8443/public/a.png"
    )
    assert public.url("http://127.0.0.3:7001/static") == "http://127.0.0.3:7001/static"
    root = redirects(prefix="/", path="/")
    assert root.url("http://127.0.0.3:7001/login?next=/") == "https://gw.example:8443/login?next=/"


def test_cookie_paths_are_mapped_with_cookie_path() -> None:
    headers = CIMultiDict(
        [
            ("Set-Cookie", "sid=1; Path=/city/rooms; HttpOnly"),
            ("Set-Cookie", "lang=uk; path=/"),
            ("Set-Cookie", "x=2; Path=/city"),
        ]
    )
    redirects().apply(headers)
    assert headers.getall("Set-Cookie") == [
        "sid=1; Path=/api/city/rooms; HttpOnly",
        "lang=uk; path=/",  # not under the route's upstream path: as it came
        "x=2; Path=/api/city",
    ]
    untouched = CIMultiDict([("Set-Cookie", "sid=1; Path=/city")])
    Redirects(TARGET, entry(), "https", "gw").apply(untouched)  # cookie_path off
    assert untouched.getall("Set-Cookie") == ["sid=1; Path=/city"]


def test_an_https_nodes_own_urls_are_rewritten_and_port_443_may_be_left_out() -> None:
    tls = UpstreamTls(ssl.create_default_context(), "noda1.daarion.test")
    r = Redirects(Target("city", "noda1", "10.0.0.1", 443, 0, tls), entry(), "http", "gw")
    assert r.url("https://10.0.0.1:443/city/a") == "http://gw/api/city/a"
    assert r.url("https://10.0.0.1/city/a") == "http://gw/api/city/a"
    assert r.url("http://10.0.0.1/city/a") == "http://10.0.0.1/city/a"  # another origin
    on_8443 = Redirects(Target("city", "noda1", "10.0.0.1", 8443, 0, tls), entry(), "http", "gw")
    assert on_8443.url("https://10.0.0.1:8443/city/a") == "http://gw/api/city/a"
    assert on_8443.url("http://10.0.0.1:8443/city/a") == "http://10.0.0.1:8443/city/a"
