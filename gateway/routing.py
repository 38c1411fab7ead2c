"""Request target checks and the upstream path. Pure functions, no I/O (the route table that
picks a route is ``routetable.py``).

The raw request target is checked once, and the *same* path is used both to pick the route
and to build the upstream path, so that nothing the check and the route saw can differ from
what the upstream receives. Two normalizations make that path the one an upstream reads:
escapes of unreserved characters are decoded (``%61dmin`` is ``admin``, RFC 3986 6.2.2.2; an
upstream decodes them, so a route for ``/api/city/admin/`` must see them decoded too), and
runs of slashes are merged (nginx's ``merge_slashes``: ``/api/city//admin`` is
``/api/city/admin``). Escapes of the other characters a route path may hold (the sub-delims but
``;``, ``:`` and ``@``: ``%40me`` is ``@me``) are decoded likewise. Nothing else is decoded or
re-encoded: other escapes (``%20``, ``%3B``) pass as sent, and so does the query.

Refused with 400 (nothing is forwarded):
- a target that is not origin-form (absolute-form ``http://...``, ``*``, or starting ``//``);
- raw control bytes, spaces, backslashes or non-ASCII in the path;
- a malformed percent escape;
- a ``.`` or ``..`` segment in any encoding (``%2e``, ``%2E``, mixed; also ``..;x``, which
  some servers read as ``..``);
- an encoded slash, backslash or control byte (``%2f``, ``%5c``, ``%00``...), and those
  escapes encoded twice (``%252e``), which a second decoder would turn back into them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes

from .errors import GatewayError

# Characters of a path that need no further look: RFC 3986 pchar minus "%", plus "/".
_PLAIN_PATH: Final = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
# Characters never allowed raw in a path (controls, space, backslash, DEL, non-ASCII).
_FORBIDDEN_RAW: Final = re.compile(r"[\x00-\x20\\\x7f-\U0010ffff]")
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORBIDDEN_DECODED: Final = re.compile(rb"[\x00-\x1f\x7f/\\]")
_DOUBLE_ENCODED: Final = re.compile(r"%(?:2e|2f|5c|00)", re.IGNORECASE)
# An escape of a character a route path may hold: unreserved (ALPHA, DIGIT, "-", ".", "_",
# "~"; the same URI as the character itself, RFC 3986 6.2.2.2), the sub-delims but ";"
# ("!$&'()*+,="), ":" and "@". Upstreams decode them all in a path, so a route for
# "/api/users/@me/" must see "%40me" decoded too. Not "%3B": decoded, it would make a path
# parameter of what was a segment's data.
_ROUTABLE_ESCAPE: Final = re.compile(
    r"%(?:2[146789A-Ea-e]|3[0-9AaDd]|4[0-9A-Fa-f]|5[0-9AaFf]|6[1-9A-Fa-f]|7[0-9AaEe])"
)
_PARAMETERS: Final = re.compile(r";[^/]*")
_SLASHES: Final = re.compile(r"//+")


def _unescape(match: re.Match[str]) -> str:
    return chr(int(match[0][1:], 16))


@dataclass(frozen=True, slots=True)
class RequestTarget:
    """A checked request target: the path and the query (``""`` or ``"?..."``), both raw."""

    path: str
    query: str


def bad_path(message: str) -> GatewayError:
    return GatewayError(400, "bad_path", message)


def check_target(raw: str) -> RequestTarget:
    """Split and check a raw request target; raise ``GatewayError`` (400) if unsafe."""
    if not raw.startswith("/") or raw.startswith("//"):
        raise GatewayError(400, "bad_request_target", "the request target must be a path")
    end = raw.find("#")
    if end >= 0:
        raw = raw[:end]  # a fragment is never forwarded
    path, sep, query = raw.partition("?")
    if not (_PLAIN_PATH.fullmatch(path) and "/." not in path):
        _check_segments(path)
        if "%" in path:
            path = _ROUTABLE_ESCAPE.sub(_unescape, path)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    return RequestTarget(path, sep + query)


def _check_segments(path: str) -> None:
    if _FORBIDDEN_RAW.search(path):
        raise bad_path("the path holds control characters, spaces, backslashes or non-ASCII")
    for segment in path.split("/"):
        if "%" in segment:
            if _BAD_ESCAPE.search(segment):
                raise bad_path("the path holds a malformed percent escape")
            decoded = unquote_to_bytes(segment)
            if _FORBIDDEN_DECODED.search(decoded):
                raise bad_path("the path holds an encoded slash, backslash or control byte")
            if _DOUBLE_ENCODED.search(decoded.decode("latin-1")):
                raise bad_path("the path holds a doubly encoded dot, slash or backslash")
        else:
            decoded = segment.encode()
        if decoded.partition(b";")[0] in (b".", b".."):
            raise bad_path("the path holds a dot segment")


def without_parameters(path: str) -> str:
    """``path`` with each segment's ``;parameters`` removed: the path that servers which
    strip them (Tomcat, Jetty, Spring) route on (``/admin;x/y`` is their ``/admin/y``)."""
    return _PARAMETERS.sub("", path)


def upstream_path(prefix: str, rest: str) -> str:
    """``<prefix><rest>``; ``rest`` is "" or starts with "/", so the result stays under prefix.

    With an empty prefix, ``/api/svc//host/x`` would map to ``//host/x``, which URL parsers
    (and redirects built from it) read as another host: refused.
    """
    path = prefix + rest
    if path.startswith("//"):
        raise bad_path("the path would start with // upstream")
    return path or "/"
