"""How log lines and check show URLs: without what may be a secret."""

from __future__ import annotations

import pytest

from gateway.logs import redacted


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:key@idp.example/jwks?api_key=S", "https://***@idp.example/jwks?***"),
        ("https://idp.example?api_key=S", "https://idp.example?***"),  # no path: the query too
        ("redis://:pw@host:6379?password=S", "redis://***@host:6379?***"),
        ("https://idp.example/a@b/c", "https://idp.example/a@b/c"),  # an '@' in the path
        ("/etc/gateway/jwks.json", "/etc/gateway/jwks.json"),  # a file
    ],
)
def test_a_url_is_shown_without_its_password_and_query(url: str, shown: str) -> None:
    assert redacted(url) == shown
