"""Tokens and keys for the auth tests: signing keys made once per run with ``cryptography``,
their public JWKs, tokens minted by pyjwt, and tokens built by hand (for what pyjwt refuses
to sign: ``alg: none``, an HMAC keyed with a public key, broken encodings)."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

# Exactly the 32 bytes RFC 7518 asks of an HS256 key.
SECRET = "an HS256 test secret of 32 bytes"  # noqa: S105 - a test secret, not a credential
ISSUER = "https://id.daarion.test"
NOW = 1_700_000_000.0

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@functools.cache
def private_key(alg: str, which: int = 0) -> PrivateKey:
    """A signing key for ``alg`` (RS*/PS*, ES256/384/512, EdDSA); ``which`` makes others."""
    del which  # a distinct cache entry is a distinct key
    if alg[:2] in ("RS", "PS"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg.startswith("ES"):
        curves = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}
        return ec.generate_private_key(curves[alg])
    return ed25519.Ed25519PrivateKey.generate()


def public_jwk(key: PrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    """The public half of ``key`` as a JWK, with ``kid`` and any ``extra`` members."""
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    return {**jwk, **extra}


def jwks(*keys: object) -> bytes:
    """A JWKS document of ``keys`` (JWKs, or anything else a broken one might hold)."""
    return orjson.dumps({"keys": list(keys)})


def claims(now: float = NOW, **changes: Any) -> dict[str, Any]:
    """An access token's claims, valid at ``now`` for five minutes; ``name=None`` drops one."""
    base: dict[str, Any] = {
        "sub": "user-1",
        "iss": ISSUER,
        "iat": int(now),
        "exp": int(now) + 300,
        "type": "access",
        "roles": ["citizen", "builder"],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def mint(
    payload: Mapping[str, Any],
    alg: str = "HS256",
    key: PrivateKey | str = SECRET,
    kid: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """A token signed by pyjwt."""
    extra = dict(headers or {})
    if kid is not None:
        extra["kid"] = kid
    return jwt.encode(dict(payload), key, algorithm=alg, headers=extra or None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_token(header: Mapping[str, Any], payload: Mapping[str, Any], signature: bytes) -> str:
    """A token put together without pyjwt: header and payload as JSON, any signature."""
    return ".".join((b64(orjson.dumps(header)), b64(orjson.dumps(payload)), b64(signature)))


def hmac_token(header: Mapping[str, Any], payload: Mapping[str, Any], secret: bytes) -> str:
    """An HS256 token keyed with any bytes (pyjwt refuses a PEM key as an HMAC secret)."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"
