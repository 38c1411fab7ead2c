"""The CORS rules of ``edge/cors.py``, without a server: which origins a ``cors`` section
allows, what preflights get, and what an answer's headers become."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.config import ConfigError, parse_config
from gateway.config.types import Cors
from gateway.edge.cors import (
    ALLOW_ORIGIN,
    Added,
    CorsPolicy,
    Refused,
    compile_cors,
    parse_origin,
    same_origin,
)


def policy(*origins: str, credentials: bool = False, **options: object) -> CorsPolicy:
    return compile_cors(Cors(origins=origins, credentials=credentials, **options), ())  # type: ignore[arg-type]


LISTED = policy("https://app.daarion.city", "https://*.daarion.city", "http://127.0.0.1:8080")


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.daarion.city", True),
        ("https://APP.daarion.city", True),  # host names have no case
        ("https://app.daarion.city:443", True),  # the default port, written
        ("https://app.daarion.city:8443", False),
        ("http://app.daarion.city", False),  # the scheme is part of the origin
        ("https://x.daarion.city", True),
        ("https://a.b.daarion.city", True),  # a subdomain at any depth
        ("https://daarion.city", False),  # the wildcard is for subdomains only
        ("https://evil-daarion.city", False),  # not on a dot boundary
        ("https://daarion.city.evil.test", False),
        ("https://xdaarion.city", False),
        ("http://x.daarion.city", False),  # the wildcard's scheme is https
        ("http://127.0.0.1:8080", True),
        ("http://127.0.0.1", False),
        ("https://127.0.0.1:8080", False),
        ("null", False),  # only when listed
        ("https://app.daarion.city/", False),  # an origin has no path
        ("https://app.daarion.city.", False),
        ("https://user@app.daarion.city", False),
        ("chrome-extension://abc", False),
        ("", False),
    ],
)
def test_which_origins_a_list_allows(origin: str, allowed: bool) -> None:
    assert LISTED.allows(origin) is allowed


def test_null_only_when_listed_and_star_takes_any_http_origin() -> None:
    assert policy("null").allows("null")
    star = policy("*")
    assert star.allows("https://anything.example:1234")
    assert not star.allows("null")  # never implied by *
    assert not star.allows("not an origin")


def test_default_ports_are_one_origin() -> None:
    assert parse_origin("https://a") == parse_origin("https://a:443") == ("https", "a", 443)
    assert parse_origin("http://a:80") == ("http", "a", 80)
    assert parse_origin("https://a:0") is None
    assert parse_origin("https://a:65536") is None
    assert policy("https://a:443").allows("https://a")
    assert policy("http://a").allows("http://a:80")


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(
    st.lists(LABEL, min_size=1, max_size=3), st.text("abcdefghijklmnopqrstuvwxyz.-", max_size=12)
)
def test_the_wildcard_is_a_dot_boundary(labels: list[str], glued: str) -> None:
    """Any subdomain matches; nothing that merely ends with the domain's letters does."""
    wildcard = policy("https://*.daarion.city")
    assert wildcard.allows(f"https://{'.'.join(labels)}.daarion.city")
    host = f"{glued}daarion.city"
    expected = host.endswith(".daarion.city") and parse_origin(f"https://{host}") is not None
    assert wildcard.allows(f"https://{host}") is expected


@given(st.lists(LABEL, min_size=1, max_size=3), st.sampled_from(["http", "https"]))
def test_an_exact_origin_matches_itself_with_or_without_its_default_port(
    labels: list[str], scheme: str
) -> None:
    host = ".".join(labels)
    default = 443 if scheme == "https" else 80
    exact = policy(f"{scheme}://{host}")
    assert exact.allows(f"{scheme}://{host}")
    assert exact.allows(f"{scheme}://{host.upper()}:{default}")
    assert not exact.allows(f"{scheme}://{host}:{default + 1}")
    assert not exact.allows(f"{scheme}://x{host}")


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict((k.replace("_", "-"), v) for k, v in values.items())


def test_a_preflight_is_answered_with_the_configured_set() -> None:
    cors = policy("https://app.daarion.city", credentials=True, max_age=60)
    answer = cors.preflight(
        "https://app.daarion.city",
        headers(Access_Control_Request_Method="put",
                Access_Control_Request_Headers="content-type, X-Request-ID,content-type"),
    )  # fmt: skip
    assert answer == {
        ALLOW_ORIGIN: "https://app.daarion.city",
        "Access-Control-Allow-Methods": "DELETE, GET, HEAD, PATCH, POST, PUT",
        "Access-Control-Allow-Headers": "content-type, X-Request-ID",
        "Access-Control-Max-Age": "60",
        "Access-Control-Allow-Credentials": "true",
        "Vary": "Origin",
    }


def test_star_is_sent_as_star_without_credentials() -> None:
    answer = policy("*").preflight(
        "https://a.example", headers(Access_Control_Request_Method="GET")
    )
    assert isinstance(answer, dict)
    assert answer[ALLOW_ORIGIN] == "*"
    assert "Access-Control-Allow-Headers" not in answer  # none asked for
    assert policy("*").added("https://a.example").cors == ((ALLOW_ORIGIN, "*"), (
        "Access-Control-Expose-Headers", "X-Request-ID, RateLimit, RateLimit-Policy, Retry-After"
    ))  # fmt: skip


@pytest.mark.parametrize(
    ("origin", "method", "requested", "why"),
    [
        ("https://evil.example", "GET", None, "origin"),
        ("https://app.daarion.city", "TRACE", None, "method"),
        ("https://app.daarion.city", "GET", "Authorization, X-Secret", "header"),
    ],
)
def test_a_preflight_is_refused_for_any_part_not_allowed(
    origin: str, method: str, requested: str | None, why: str
) -> None:
    asked = headers(Access_Control_Request_Method=method)
    if requested is not None:
        asked["Access-Control-Request-Headers"] = requested
    answer = policy("https://app.daarion.city").preflight(origin, asked)
    assert isinstance(answer, Refused)
    assert why in answer.message


def test_an_answer_gets_one_set_of_cors_headers_and_keeps_its_vary() -> None:
    upstream = CIMultiDict([
        ("Access-Control-Allow-Origin", "*"), ("access-control-max-age", "5"),
        ("Vary", "Accept-Encoding"), ("X-Frame-Options", "SAMEORIGIN"),
    ])  # fmt: skip
    cors = compile_cors(
        Cors(origins=("https://app.daarion.city",), credentials=True),
        (("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer")),
    )
    cors.added("https://app.daarion.city").apply(upstream)
    assert upstream.getall(ALLOW_ORIGIN) == ["https://app.daarion.city"]
    assert "Access-Control-Max-Age" not in upstream
    assert upstream["Access-Control-Allow-Credentials"] == "true"
    assert upstream.getall("Vary") == ["Accept-Encoding, Origin"]
    assert upstream["X-Frame-Options"] == "SAMEORIGIN"  # its own kept
    assert upstream["Referrer-Policy"] == "no-referrer"


def test_a_disallowed_origin_gets_no_cors_headers_at_all() -> None:
    answer = CIMultiDict([("Access-Control-Allow-Origin", "*"), ("Vary", "origin")])
    LISTED.added("https://evil.example").apply(answer)
    assert [k for k in answer if k.lower().startswith("access-control")] == []
    assert answer.getall("Vary") == ["origin"]  # already there: not twice
    star = CIMultiDict([("Vary", "*")])
    LISTED.added(None).apply(star)
    assert star.getall("Vary") == ["*"]


def test_without_cors_the_upstreams_headers_pass() -> None:
    answer = CIMultiDict([("Access-Control-Allow-Origin", "*")])
    Added(None, (("X-Content-Type-Options", "nosniff"),)).apply(answer)
    assert answer == CIMultiDict(
        [("Access-Control-Allow-Origin", "*"), ("X-Content-Type-Options", "nosniff")]
    )


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "same"),
    [
        ("http://gw.example:8080", "gw.example:8080", "http", True),
        ("https://gw.example", "gw.example", "https", True),
        ("https://gw.example", "GW.example:443", "https", True),
        ("https://gw.example", "gw.example", "http", False),  # 443 against 80
        ("http://gw.example", "gw.example:8080", "http", False),
        ("http://other.example:8080", "gw.example:8080", "http", False),
        ("null", "gw.example", "http", False),
        ("http://gw.example", None, "http", False),
        ("http://[::1]:8080", "[::1]:8080", "http", True),
    ],
)
def test_same_origin_is_the_hosts_name_and_port(
    origin: str, host: str | None, scheme: str, same: bool
) -> None:
    assert same_origin(origin, host, scheme) is same


@pytest.mark.parametrize(
    "origin", ["https://a:99999", "https://a:0", "https://-a.b", "https://a..b"]
)
def test_the_config_refuses_an_origin_that_could_never_match(origin: str) -> None:
    text = f"nodes: {{n: {{host: 127.0.0.3}}}}\nservices: {{}}\ncors: {{origins: ['{origin}']}}\n"
    with pytest.raises(ConfigError, match=r"cors\.origins\[0\]"):
        parse_config(text, env={})
