"""Redirects that don't leak internal addresses (nginx's ``proxy_redirect default`` and
``proxy_cookie_path``).

An upstream builds absolute URLs from the ``Host`` it was sent, which is its own address
(``http://127.0.0.3:7001/city/rooms/``). In ``Location``, ``Content-Location`` and ``Refresh``
such a URL is rewritten to the public URL that reaches the same resource through the route
that reached the upstream: the scheme and host the client used, the route's ``path`` in place
of its ``to`` (``/api/city`` for ``/city``). Relative URLs, URLs of other hosts and paths
outside ``to`` pass unchanged. With ``cookie_path``, a ``Set-Cookie`` ``Path=`` under ``to``
is mapped the same way.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from ..routetable import Entry
    from ..snapshot import Target

REWRITTEN: Final = ("Location", "Content-Location")
# A Host header fit to build a URL from: a name or an IP literal, and a port.
_HOST: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?"
)
_REFRESH_URL: Final = re.compile(r"(?i)(\burl\s*=\s*['\"]?)([^'\"\s;]+)")
_COOKIE_PATH: Final = re.compile(r"(?i)(;\s*path\s*=\s*)([^;]*)")


def under(prefix: str, path: str) -> bool:
    """Whether ``path`` is ``prefix`` or below it, on a segment boundary."""
    if not prefix or prefix.endswith("/"):
        return path.startswith(prefix)
    return path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] in ("", "/", "?")


class Redirects:
    """How one exchange's answer maps the upstream's own URLs to public ones."""

    __slots__ = ("_cookie_path", "_entry", "_host", "_proto", "_target")

    def __init__(
        self,
        target: Target,
        entry: Entry[Any],
        proto: str,
        host: str | None,
        *,
        cookie_path: bool = False,
    ) -> None:
        # Made for every answer, used by few: only kept here until apply() needs them.
        self._target = target
        self._entry = entry
        self._proto = proto
        self._host = host
        self._cookie_path = cookie_path

    def url(self, value: str) -> str:
        """``value`` as the client should see it."""
        target = self._target
        origin = target.origin.lower()  # http://host:port, or https://
        default = 80 if target.tls is None else 443  # the scheme's port, which may be left out
        origins = (
            (origin, origin.removesuffix(f":{default}")) if target.port == default else (origin,)
        )
        # A scheme-relative URL (//host:port/x) names the upstream as well as a whole one.
        relative = value.startswith("//")
        lowered = (origin.partition("//")[0] + value if relative else value).lower()
        skipped = len(lowered) - len(value)
        for origin in origins:
            end = len(origin) - skipped
            if lowered.startswith(origin) and value[end : end + 1] in ("", "/", "?"):
                path = value[end:]
                path = path if path.startswith("/") else "/" + path  # "" or "?q": the root's
                break
        else:
            return value  # relative, or another host's
        public = self.path(path.partition("?")[0])
        if public is None:
            return value  # not under the route: no public URL reaches it
        public += path[len(path.partition("?")[0]) :]  # the query, as it was
        host = self._host
        # Without a usable Host, a rewritten URL is a path: relative to what the client asked.
        if not (host and _HOST.fullmatch(host)):
            return public
        return (f"//{host}" if relative else f"{self._proto}://{host}") + public

    def path(self, upstream: str) -> str | None:
        """The public path of an upstream path under the route's ``to``, else None."""
        to, public = self._entry.to, self._entry.path
        if not under(to, upstream):
            return None
        return (public + upstream[len(to) :]) or "/"

    def apply(self, headers: CIMultiDict[str]) -> None:
        """Rewrite the headers that may carry the upstream's own URLs, in place."""
        for name in REWRITTEN:
            if name in headers:
                headers[name] = self.url(headers[name])
        if "Refresh" in headers:
            headers["Refresh"] = _REFRESH_URL.sub(
                lambda m: m[1] + self.url(m[2]), headers["Refresh"]
            )
        if self._cookie_path and "Set-Cookie" in headers:
            cookies = headers.popall("Set-Cookie")
            for cookie in cookies:
                headers.add("Set-Cookie", _COOKIE_PATH.sub(self._cookie, cookie))

    def _cookie(self, match: re.Match[str]) -> str:
        public = self.path(match[2].strip())
        return match[0] if public is None else match[1] + public
