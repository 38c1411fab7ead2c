"""The authentication phase: after the route is found, before the rate limit (whose ``user``
key is the token's subject). A route with ``auth`` gets its token checked here, once; a
verified one gives the request its user and the identity headers the upstream gets.

Where a token may be: ``Authorization: Bearer <token>``; on a WebSocket handshake also (as
``auth.websocket_token`` allows) ``?<name>=<token>`` (taken out of the query sent upstream, and
never logged: log lines have no query) and a ``bearer.<token>`` subprotocol next to the real
one (taken out of the offer sent upstream). A token that expires during a session does not
end it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from ..errors import GatewayError
from .tokens import AuthFailed, Identity

if TYPE_CHECKING:
    from ..config.types import Auth
    from ..context import Exchange, Shared
    from ..snapshot import AuthPolicy

BEARER: Final = "bearer"  # the scheme, in any case (RFC 9110 11.1)
SUBPROTOCOL: Final = "bearer."


def authenticate(
    shared: Shared, ex: Exchange, policy: AuthPolicy, query: str, websocket: bool
) -> str:
    """Check the request's token for ``policy``; return the query to send upstream (a token
    carried in it taken out). Raises the 401 or 403 answer."""
    auth = ex.snapshot.config.auth
    authenticator = shared.authenticator
    if auth is None or authenticator is None:
        # Turned on by a reload: its authenticator is fetching its keys (load_config refuses
        # auth without providers, so nothing else gets here).
        raise GatewayError(
            503, "auth_starting", "authentication is starting", headers={"Retry-After": "1"}
        )
    count = shared.metrics.count_auth
    if len(ex.request.headers.getall("Authorization", ())) > 1:
        # RFC 9110 11.6.2: one field, not a list. Only the first would be checked, and a
        # service reading the last (or all of them, joined) would trust an unchecked one.
        count(ex.service, "invalid_request")
        raise _challenged(400, "invalid_request", "more than one Authorization header", auth.realm)
    try:
        token, query = _token(ex, auth, query, websocket)
    except _Malformed:
        count(ex.service, "invalid_request")
        message = "the Authorization header is not 'Bearer <token>'"
        raise _challenged(400, "invalid_request", message, auth.realm) from None
    if token is None:
        if not policy.required:
            count(ex.service, "anonymous")
            return query
        count(ex.service, "missing_token")
        raise _unauthorized(auth.realm, "missing_token", "a bearer token is needed", None)
    try:
        identity = authenticator.verify(token, policy.providers)
    except AuthFailed as failed:
        count(ex.service, failed.code)
        raise _unauthorized(auth.realm, failed.code, failed.message, "invalid_token") from None
    if policy.roles is not None and policy.roles.isdisjoint(identity.roles):
        count(ex.service, "insufficient_scope")
        message = "the token has none of the roles this route needs"
        raise _challenged(403, "insufficient_scope", message, auth.realm)
    count(ex.service, "ok")
    ex.user = identity.subject
    ex.identity_headers = _identity_headers(identity, auth.identity_headers)
    return query


# The identity headers of the identities verified lately (a cached token gives the same
# Identity object each time): built once, not per request. Bounded; keyed by the object.
_BUILT: dict[int, tuple[Identity, Mapping[str, str], tuple[tuple[str, str], ...]]] = {}
_BUILT_KEPT: Final = 10_000


def _identity_headers(identity: Identity, names: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    built = _BUILT.get(id(identity))
    if built is not None and built[0] is identity and built[1] is names:
        return built[2]
    headers = tuple(
        # roles as the route's check read them: a string is one role, so "admin,root" is
        # left out like a list item holding a comma (a service would split it in two)
        (header, _header_value(identity.roles if claim == "roles" else identity.claims[claim]))
        for claim, header in names.items()
        if identity.claims.get(claim) is not None
    )
    if len(_BUILT) >= _BUILT_KEPT:
        _BUILT.clear()
    _BUILT[id(identity)] = (identity, names, headers)
    return headers


class _Malformed(Exception):
    """An Authorization header that names the bearer scheme in a way the gateway cannot read
    (``Bearer:<token>``): a service might read a token from it that nothing checked."""


def _bearer(value: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (the scheme in any case, then spaces or
    tabs, RFC 9110 11.4); None without one, or for another scheme (Basic, a service's own,
    which passes as it came). ``_Malformed`` for a bearer scheme glued to what follows."""
    parts = value.split(None, 1) if value is not None else ()
    if not parts:
        return None
    scheme = parts[0].lower()
    if scheme == BEARER:
        token = parts[1].strip() if len(parts) > 1 else ""
        return token or None
    if scheme.startswith(BEARER):
        raise _Malformed
    return None


def _token(ex: Exchange, auth: Auth, query: str, websocket: bool) -> tuple[str | None, str]:
    """The request's token, and the query without it."""
    token = _bearer(ex.request.headers.get("Authorization"))
    if not websocket:
        return token, query
    for place in auth.websocket_token:
        if place == "subprotocol":
            offered = _subprotocol_token(ex)
            token = token or offered
        elif query:
            found, query = _take_param(query, place.removeprefix("query:"))
            token = token or found
    return token, query


def _subprotocol_token(ex: Exchange) -> str | None:
    """A ``bearer.<token>`` subprotocol offered with the real one; the handshake leaves it,
    and any other ``bearer.`` offer, out of the offer it sends upstream
    (``ex.token_subprotocol``)."""
    for value in ex.request.headers.getall("Sec-WebSocket-Protocol", ()):
        for item in value.split(","):
            offered = item.strip()
            if offered.lower().startswith(SUBPROTOCOL):
                ex.token_subprotocol = offered
                return offered[len(SUBPROTOCOL) :] or None
    return None


def _take_param(query: str, name: str) -> tuple[str | None, str]:
    """(the value of ``name`` in ``?a=1&name=x``, the query without it)."""
    found = None
    kept = []
    for part in query.removeprefix("?").split("&"):
        key, _, value = part.partition("=")
        if unquote(key) == name:
            found = found or unquote(value) or None
        elif part:
            kept.append(part)
    return found, ("?" + "&".join(kept)) if kept else ""


def _header_value(value: object) -> str:
    """A claim as a header value: a list's items joined by commas (an item holding a comma is
    left out: a service splitting the list would read it as two; so is one with spaces
    around it, " admin", which the route's check did not read as "admin" and a service
    trimming the items would), no control characters, nothing that cannot be written as
    UTF-8 (a lone surrogate in a signed claim)."""
    if isinstance(value, (list, tuple)):
        text = ",".join(
            item for item in map(str, value) if "," not in item and item == item.strip()
        )
    else:
        text = str(value)
    text = text.encode("utf-8", "ignore").decode("utf-8")
    return "".join(ch for ch in text if ch >= " " and ch != "\x7f")


def _challenge(realm: str, error: str | None) -> str:
    return f'Bearer realm="{realm}"' + (f', error="{error}"' if error else "")


def _challenged(status: int, code: str, message: str, realm: str) -> GatewayError:
    """A refusal whose challenge names its code (RFC 6750 3.1)."""
    return GatewayError(
        status, code, message, headers={"WWW-Authenticate": _challenge(realm, code)}
    )


def _unauthorized(realm: str, code: str, message: str, error: str | None) -> GatewayError:
    # RFC 6750 3.1: a request without any token gets no error code in the challenge.
    return GatewayError(401, code, message, headers={"WWW-Authenticate": _challenge(realm, error)})
