"""One provider's checks of one token (RFC 8725), pure: no I/O, no clock of its own.

``read_header`` looks at the unverified header only to choose (the provider by ``alg``, the
key by ``kid``); ``Rules.key_for`` picks the key; ``Rules.check`` verifies the signature with
pyjwt, the algorithm pinned to the one the provider accepts and the key was made for, then
every claim against the caller's ``now``. Any failure is an ``AuthFailed`` with a fixed
message: never the token, never a piece of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

import jwt
from jwt.types import Options

from ..config.types import HMAC_ALGORITHMS, HMAC_KEY_BYTES, AuthProvider

MAX_TOKEN: Final = 8192  # bytes; a longer token is refused before any decoding
# NumericDates beyond 9999-12-31 are refused: no real token lives that long, and the
# comparisons stay within floats.
MAX_DATE: Final = 253402300799


Code = Literal["invalid_token", "token_expired"]


class AuthFailed(Exception):
    """A token that does not pass: ``code`` is ``invalid_token`` or ``token_expired``."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code: Code = code
        self.message = message


class UnknownKey(AuthFailed):
    """The token's ``kid`` is not among the provider's keys (yet): worth a refetch."""

    def __init__(self) -> None:
        super().__init__("invalid_token", "the token's key is unknown")


def invalid(message: str) -> AuthFailed:
    return AuthFailed("invalid_token", message)


@dataclass(frozen=True)
class Identity:
    """Who a verified token says the caller is."""

    provider: str
    subject: str  # sub
    roles: tuple[str, ...]  # the roles claim: a string is one role
    claims: Mapping[str, object]
    expires: float  # exp, seconds since the epoch


# A JWKS' keys as a provider holds them: kid (None: a key without one) -> alg -> key.
Keys = Mapping[str | None, Mapping[str, jwt.PyJWK]]


def check_form(token: str) -> None:
    """Refuse, before anything reads it, a token too long or not ASCII."""
    if len(token) > MAX_TOKEN:
        raise invalid("the token is too long")
    if not token.isascii():
        raise invalid("malformed token")


def read_header(token: str) -> dict[str, Any]:
    """The unverified header, checked for what no provider accepts: ``crit`` (no extension is
    supported), an ``alg`` or ``kid`` that is not a string (and the token's form). ``jku``,
    ``x5u``, ``jwk`` and ``x5c`` are ignored: keys come from the config only."""
    check_form(token)
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise invalid("malformed token") from None
    if "crit" in header:
        raise invalid("the token has critical header parameters")
    if not isinstance(header.get("alg"), str):
        raise invalid("the token names no algorithm")
    if not isinstance(header.get("kid", ""), str):
        raise invalid("malformed token")
    return header


# pyjwt checks the signature, iss, aud, and that exp is there; the dates are checked here,
# against the Authenticator's clock (pyjwt reads its own).
_OPTIONS: Final[Options] = {
    "require": ["exp"],
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "enforce_minimum_key_length": True,
}

_PYJWT_MESSAGES: Final[tuple[tuple[type[jwt.PyJWTError], str], ...]] = (
    (jwt.InvalidSignatureError, "the signature does not verify"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.MissingRequiredClaimError, "a required claim is missing"),
    (jwt.InvalidKeyError, "the key cannot verify this token"),
    (jwt.DecodeError, "malformed token"),
)


def _pyjwt_message(exc: jwt.PyJWTError) -> str:
    """A fixed text for pyjwt's failure (its own messages may quote parts of the token)."""
    for kind, message in _PYJWT_MESSAGES:
        if isinstance(exc, kind):
            return message
    return "invalid token"


def _date(claims: Mapping[str, object], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{name} is not a date")
    if not -MAX_DATE <= value <= MAX_DATE:  # also NaN and the infinities
        raise invalid(f"{name} is out of range")
    return float(value)


def _roles(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(r, str) for r in value):
        return tuple(value)
    raise invalid("roles is neither a string nor a list of strings")


class Rules:
    """One provider's checks; its keys (a JWKS') are handed in, so that they can change."""

    def __init__(self, name: str, provider: AuthProvider) -> None:
        self.name = name
        self.provider = provider
        self.algorithms: frozenset[str] = frozenset(provider.algorithms)
        self.symmetric = bool(self.algorithms & HMAC_ALGORITHMS)
        self.secret = (provider.secret or "").encode()
        if self.symmetric:
            short = [a for a in sorted(self.algorithms) if len(self.secret) < HMAC_KEY_BYTES[a]]
            if short:
                raise ValueError(
                    f"auth provider {name}: the secret is too short for {', '.join(short)} "
                    "(RFC 7518: at least as many bytes as the hash: 32, 48, 64)"
                )

    def key_for(self, header: Mapping[str, Any], keys: Keys) -> jwt.PyJWK | bytes:
        """The key that may verify a token with this header: the secret, or the JWKS key of its
        ``kid`` made for its ``alg``. Without a ``kid``, the one key for its ``alg``, if only
        one is. ``UnknownKey`` when the ``kid`` is not there."""
        if self.symmetric:
            return self.secret
        alg, kid = header["alg"], header.get("kid")
        if kid is None:
            fitting = [key for by_alg in keys.values() if (key := by_alg.get(alg)) is not None]
            if len(fitting) != 1:
                raise invalid("the token names no key")
            return fitting[0]
        by_alg = keys.get(kid)
        if by_alg is None:
            raise UnknownKey
        key = by_alg.get(alg)
        if key is None:
            raise invalid("the token's key is not for its algorithm")
        return key

    def check(self, token: str, alg: str, key: jwt.PyJWK | bytes, now: float) -> Identity:
        """Verify the signature with ``key`` and ``alg`` (one the provider accepts), then the
        claims; ``AuthFailed`` otherwise."""
        provider = self.provider
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=_OPTIONS,
                issuer=provider.issuer,
                audience=provider.audience,
            )
        except jwt.PyJWTError as exc:
            raise invalid(_pyjwt_message(exc)) from None
        leeway = provider.leeway
        issued, not_before, expires = (_date(claims, n) for n in ("iat", "nbf", "exp"))
        if issued is not None and issued > now + leeway:
            raise invalid("the token is issued in the future")
        if not_before is not None and not_before > now + leeway:
            raise invalid("the token is not valid yet")
        if expires is None:  # pyjwt has checked that it is there; for the type checker
            raise invalid("the token does not expire")
        if expires <= now - leeway:
            raise AuthFailed("token_expired", "the token has expired")
        for name, value in provider.claims.items():
            if claims.get(name) != value:
                raise invalid(f"the token's {name} is not {value}")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise invalid("the token has no subject")
        return Identity(
            provider=self.name,
            subject=subject,
            roles=_roles(claims.get("roles")),
            claims=MappingProxyType(claims),
            expires=expires,
        )
