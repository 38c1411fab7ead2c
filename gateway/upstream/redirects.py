"""Redirects that don't leak internal addresses (nginx's ``proxy_redirect default``).

An upstream builds absolute URLs from the ``Host`` it was sent, which is its own address
(``http://127.0.0.3:7001/city/rooms/``). In ``Location``, ``Content-Location`` and ``Refresh``
such a URL is rewritten to the public URL that reaches the same resource through the
gateway: the scheme and host the client used, the route's public prefix (``/api/city``) in
place of its upstream prefix (``/city``). Relative URLs, URLs of other hosts and paths outside
the upstream prefix pass unchanged.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from ..snapshot import Target

REWRITTEN: Final = ("Location", "Content-Location")
# A Host header fit to build a URL from: a name or an IP literal, and a port.
_HOST: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?"
)
_REFRESH_URL: Final = re.compile(r"(?i)(\burl\s*=\s*['\"]?)([^'\"\s;]+)")


class Redirects:
    """How one exchange's answer maps the upstream's own URLs to public ones."""

    __slots__ = ("_host", "_proto", "_public_prefix", "_target", "_upstream_prefix")

    def __init__(
        self,
        target: Target,
        upstream_prefix: str,
        public_prefix: str,
        proto: str,
        host: str | None,
    ) -> None:
        # Made for every answer, used by few: only kept here until apply() needs them.
        self._target = target
        self._upstream_prefix = upstream_prefix
        self._public_prefix = public_prefix
        self._proto = proto
        self._host = host

    def url(self, value: str) -> str:
        """``value`` as the client should see it."""
        origin = self._target.origin.lower()  # http://host:port
        origins = (origin, origin.removesuffix(":80")) if self._target.port == 80 else (origin,)
        lowered = value.lower()
        for origin in origins:
            if lowered.startswith(origin) and value[len(origin) : len(origin) + 1] in ("", "/"):
                path = value[len(origin) :] or "/"
                break
        else:
            return value  # relative, or another host's
        prefix = self._upstream_prefix
        if prefix and not (path == prefix or path.startswith((prefix + "/", prefix + "?"))):
            return value  # not under the route: no public URL reaches it
        host = self._host
        # Without a usable Host, a rewritten URL is a path: relative to what the client asked.
        public = f"{self._proto}://{host}" if host and _HOST.fullmatch(host) else ""
        return public + self._public_prefix + path[len(prefix) :]

    def apply(self, headers: CIMultiDict[str]) -> None:
        """Rewrite the headers that may carry the upstream's own URLs, in place."""
        for name in REWRITTEN:
            if name in headers:
                headers[name] = self.url(headers[name])
        if "Refresh" in headers:
            headers["Refresh"] = _REFRESH_URL.sub(
                lambda m: m[1] + self.url(m[2]), headers["Refresh"]
            )
