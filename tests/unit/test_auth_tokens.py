"""Token verification against RFC 8725, on a fake clock and without sockets: tokens minted by
pyjwt with ``cryptography`` keys (HS256, RS256, PS256, ES256, EdDSA) or built by hand; the
asymmetric providers read their JWKS from a file. Every refusal is checked for its code and
for not quoting the token."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import hypothesis
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import strategies as st

from gateway.auth import Authenticator, AuthFailed, Identity
from gateway.auth.jwks import JwksError, KeySource, parse_jwks
from gateway.config.types import Algorithm, Auth, AuthProvider

from ..helpers import FakeClock
from ..jwtkit import (
    ISSUER,
    NOW,
    SECRET,
    b64,
    claims,
    hand_token,
    hmac_token,
    jwks,
    mint,
    private_key,
    public_jwk,
)

ACCESS = MappingProxyType({"type": "access"})


def provider(*algorithms: Algorithm, **changes: Any) -> AuthProvider:
    fields: dict[str, Any] = {"issuer": ISSUER, "claims": ACCESS, "leeway": 30.0}
    fields["secret" if algorithms[0].startswith("HS") else "jwks_file"] = (
        SECRET if algorithms[0].startswith("HS") else "/nonexistent"
    )
    return AuthProvider(algorithms=algorithms, **{**fields, **changes})


def jwks_provider(
    path: Path, keys: list[Mapping[str, Any]], *algorithms: Algorithm, **changes: Any
) -> AuthProvider:
    """A provider whose JWKS file (written at ``path``) holds ``keys``."""
    path.write_bytes(jwks(*keys))
    return provider(*(algorithms or ("RS256",)), jwks_file=str(path), **changes)


def authenticator(
    clock: FakeClock, cache_size: int = 100, **providers: AuthProvider
) -> Authenticator:
    """An Authenticator of ``providers`` (default: one HS256 provider, ``hs``)."""
    chosen = MappingProxyType(providers or {"hs": provider("HS256")})
    return Authenticator(Auth(providers=chosen, cache_size=cache_size), clock=clock)


def refused(auth: Authenticator, token: str, code: str = "invalid_token", **kw: Any) -> str:
    """Assert ``token`` is refused with ``code``; its message, which must quote no part of
    the token."""
    with pytest.raises(AuthFailed) as caught:
        auth.verify(token, **kw)
    assert caught.value.code == code
    message = caught.value.message
    assert not token or token not in message
    assert all(part not in message for part in token.split(".") if len(part) > 8)
    return message


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


JwksAuth = Callable[..., Awaitable[Authenticator]]


@pytest.fixture
async def keyed(tmp_path: Path, clock: FakeClock) -> AsyncIterator[JwksAuth]:
    """``await keyed(keys, *algorithms, **provider_changes)``: an Authenticator with one
    provider ``idp`` whose JWKS file holds ``keys`` (JWK dicts), loaded."""
    made: list[Authenticator] = []

    async def make(
        keys: list[Mapping[str, Any]],
        *algorithms: Algorithm,
        cache_size: int = 100,
        **changes: Any,
    ) -> Authenticator:
        idp = jwks_provider(tmp_path / f"jwks{len(made)}.json", keys, *algorithms, **changes)
        auth = authenticator(clock, cache_size, idp=idp)
        await auth.refresh()
        made.append(auth)
        return auth

    yield make
    for auth in made:
        await auth.close()


def rsa_jwk(kid: str = "k1", **extra: Any) -> dict[str, Any]:
    return public_jwk(private_key("RS256"), kid, **extra)


# -- what passes -------------------------------------------------------------------------------


def test_an_hs256_token_gives_its_identity(clock) -> None:
    auth = authenticator(clock)
    identity = auth.verify(mint(claims(email="a@daarion.city")))
    assert identity == Identity(
        provider="hs",
        subject="user-1",
        roles=("citizen", "builder"),
        claims=identity.claims,
        expires=NOW + 300,
    )
    assert identity.claims["email"] == "a@daarion.city"
    assert auth.verify(mint(claims(roles="admin"))).roles == ("admin",)
    assert auth.verify(mint(claims(roles=None))).roles == ()


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "ES384", "EdDSA"])
async def test_each_asymmetric_algorithm_verifies_with_its_jwks_key(keyed, alg) -> None:
    key = private_key(alg)
    auth = await keyed([public_jwk(key, "k1")], alg)
    assert auth.verify(mint(claims(), alg, key, kid="k1")).subject == "user-1"
    assert auth.state() == {"idp": "connected"}


async def test_a_token_without_kid_uses_the_one_key_for_its_alg(keyed) -> None:
    key = private_key("RS256")
    token = mint(claims(), "RS256", key)
    assert (await keyed([rsa_jwk()])).verify(token).subject == "user-1"
    two = await keyed([rsa_jwk("k1"), public_jwk(private_key("RS256", 1), "k2")])
    assert "names no key" in refused(two, token)


# -- algorithms --------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", [b"", b"bogus"])
async def test_alg_none_is_never_accepted(keyed, clock, spelling, signature) -> None:
    token = hand_token({"alg": spelling, "typ": "JWT"}, claims(), signature)
    assert "not accepted" in refused(authenticator(clock), token)
    assert "not accepted" in refused(await keyed([rsa_jwk()]), token)


def test_the_tokens_alg_only_selects_among_the_providers(clock) -> None:
    auth = authenticator(clock, hs=provider("HS256"))
    secret = SECRET * 2  # long enough for HS384 too
    assert "not accepted" in refused(auth, mint(claims(), "HS384", secret))
    assert "no algorithm" in refused(auth, hand_token({"alg": ["HS256"]}, claims(), b""))
    assert "no algorithm" in refused(auth, hand_token({"typ": "JWT"}, claims(), b""))


async def test_an_rs256_provider_refuses_rs512_signed_by_its_own_key(keyed) -> None:
    key = private_key("RS256")
    auth = await keyed([rsa_jwk()], "RS256")
    assert "not accepted" in refused(auth, mint(claims(), "RS512", key, kid="k1"))


async def test_hs256_signed_with_the_rsa_public_key_fails(keyed, clock, tmp_path) -> None:
    """The classic key confusion: the verifier must never use the public key as a secret."""
    pem = (
        private_key("RS256")
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    token = hmac_token({"alg": "HS256", "typ": "JWT", "kid": "k1"}, claims(), pem)
    auth = await keyed([rsa_jwk()], "RS256", "PS256", "ES256")
    assert "not accepted" in refused(auth, token)
    # With an HS provider beside it, the token goes to that one, whose secret it is not.
    idp = jwks_provider(tmp_path / "idp.json", [rsa_jwk()], "RS256")
    both = authenticator(clock, hs=provider("HS256"), idp=idp)
    await both.refresh()
    assert "signature" in refused(both, token)


async def test_a_key_made_for_one_alg_does_not_verify_another(keyed) -> None:
    """A JWK that says alg RS256 is not used for PS256, though the provider accepts both."""
    key = private_key("RS256")
    auth = await keyed([rsa_jwk(alg="RS256")], "RS256", "PS256")
    assert auth.verify(mint(claims(), "RS256", key, kid="k1"))
    assert "not for its algorithm" in refused(auth, mint(claims(), "PS256", key, kid="k1"))


# -- header parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kid",
    [
        "../../../../etc/passwd",
        "/dev/null",
        "' OR '1'='1' --",
        "k1'; DROP TABLE keys; --",
        "k1\x00",
        "",
        "K1",
        "file:///etc/passwd",
    ],
)
async def test_kid_is_only_a_lookup_key(keyed, kid) -> None:
    key = private_key("RS256")
    auth = await keyed([rsa_jwk("k1")])
    assert refused(auth, mint(claims(), "RS256", key, kid=kid)) == "the token's key is unknown"


@pytest.mark.parametrize("kid", [1, None, ["k1"], {"k": 1}])
async def test_a_kid_that_is_not_a_string_is_malformed(keyed, kid) -> None:
    auth = await keyed([rsa_jwk("k1")])
    token = hand_token({"alg": "RS256", "kid": kid}, claims(), b"x")
    assert refused(auth, token) == "malformed token"


@pytest.mark.parametrize("crit", [["exp"], ["b64"], [], "exp", ["jku"]])
def test_a_crit_header_is_refused(clock, crit) -> None:
    headers = {"crit": crit, "b64": True} if crit == ["b64"] else {"crit": crit}
    message = refused(authenticator(clock), mint(claims(), headers=headers))
    assert message in ("the token has critical header parameters", "malformed token")


async def test_jku_x5u_and_jwk_headers_are_ignored(keyed) -> None:
    """Keys come from the config: a token pointing elsewhere verifies with the configured key
    or not at all; a key the token carries itself is never used."""
    key = private_key("RS256")
    auth = await keyed([rsa_jwk()])
    elsewhere = {"jku": "http://127.0.0.1:9/jwks", "x5u": "http://127.0.0.1:9/cert"}
    assert auth.verify(mint(claims(), "RS256", key, kid="k1", headers=elsewhere))
    attacker = private_key("RS256", 1)
    embedded = {"jwk": public_jwk(attacker, "k1"), "jku": "http://127.0.0.1:9/jwks"}
    assert "signature" in refused(auth, mint(claims(), "RS256", attacker, "k1", embedded))


# -- form --------------------------------------------------------------------------------------


def test_a_9_kib_token_is_refused_before_decoding(clock) -> None:
    auth = authenticator(clock)
    token = mint(claims(padding="x" * 9 * 1024))
    assert refused(auth, token) == "the token is too long"
    assert refused(auth, "!" * 9000) == "the token is too long"  # not even base64


HS = b64(b'{"alg": "HS256"}')
EMPTY = b64(b"{}")
DETACHED = b64(b'{"alg": "HS256", "b64": false}')
MALFORMED = [
    "",
    "abc",
    "a.b",
    "a.b.c",
    "...",
    "!!!.!!!.!!!",
    "é.é.é",
    "\udc80.x.y",
    f"{b64(b'not json')}.{EMPTY}.",
    f"{b64(b'[1, 2]')}.{EMPTY}.",
    f"{HS}.{b64(b'not json')}.",
    f"{HS}.{b64(b'[1]')}.",
    f"{HS}.{EMPTY}.%%%",
    f"{HS}=.{EMPTY}.",
    f"{HS}.{EMPTY}",
    f"{DETACHED}..",
]


@pytest.mark.parametrize("token", MALFORMED)
def test_malformed_tokens_are_invalid(clock, token) -> None:
    refused(authenticator(clock), token)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(data=st.data())
def test_nothing_but_auth_failed_escapes(data) -> None:
    """Random text, and valid tokens with bytes changed: refused with AuthFailed only."""
    auth = authenticator(FakeClock(NOW))
    token = mint(claims())
    choice = data.draw(st.sampled_from(["text", "mutate", "segments"]))
    if choice == "text":
        candidate = data.draw(st.text(max_size=300))
    elif choice == "mutate":
        at = data.draw(st.integers(0, len(token) - 1))
        char = data.draw(st.characters(codec="ascii").filter(lambda c: c != token[at]))
        candidate = token[:at] + char + token[at + 1 :]
    else:
        parts = data.draw(st.lists(st.binary(max_size=60), min_size=1, max_size=4))
        candidate = ".".join(b64(p) for p in parts)
    with pytest.raises(AuthFailed):
        auth.verify(candidate)


# -- claims ------------------------------------------------------------------------------------


def test_iss_is_checked_when_the_provider_sets_it(clock) -> None:
    auth = authenticator(clock)
    assert "issuer" in refused(auth, mint(claims(iss="https://evil.test")))
    assert refused(auth, mint(claims(iss=None))) == "a required claim is missing"
    listed = hmac_token({"alg": "HS256"}, claims(iss=[ISSUER]), SECRET.encode())
    assert refused(auth, listed) == "wrong issuer"  # (pyjwt would not sign it)
    free = authenticator(clock, hs=provider("HS256", issuer=None))
    assert free.verify(mint(claims(iss="https://anyone.test")))


def test_aud_is_checked_when_the_provider_sets_it_and_refused_when_not(clock) -> None:
    """A token for another audience must not be replayed here; a provider that accepts
    audience-bound tokens names its audience (pyjwt's strict default, kept)."""
    auth = authenticator(clock, hs=provider("HS256", audience="gateway"))
    assert auth.verify(mint(claims(aud="gateway")))
    assert auth.verify(mint(claims(aud=["other", "gateway"])))
    assert refused(auth, mint(claims(aud="other"))) == "wrong audience"
    assert refused(auth, mint(claims())) == "a required claim is missing"
    unset = authenticator(clock)
    assert refused(unset, mint(claims(aud="gateway"))) == "wrong audience"


def test_a_refresh_token_never_passes(clock) -> None:
    auth = authenticator(clock)
    assert refused(auth, mint(claims(type="refresh"))) == "the token's type is not access"
    assert refused(auth, mint(claims(type=None))) == "the token's type is not access"
    assert refused(auth, mint(claims(type=["access"]))) == "the token's type is not access"


def test_a_subject_and_well_formed_roles_are_required(clock) -> None:
    auth = authenticator(clock)
    assert refused(auth, mint(claims(sub=None))) == "the token has no subject"
    assert refused(auth, mint(claims(sub=""))) == "the token has no subject"
    assert "roles" in refused(auth, mint(claims(roles={"admin": True})))
    assert "roles" in refused(auth, mint(claims(roles=["admin", 1])))


def test_expired_is_token_expired_after_the_leeway(clock) -> None:
    auth = authenticator(clock, cache_size=0)
    token = mint(claims(exp=int(NOW) - 10))
    assert auth.verify(token)  # 10 s past exp, within the 30 s leeway
    clock.advance(21)
    assert refused(auth, token, "token_expired") == "the token has expired"
    # Expired is said only of a token that verifies: a forged one is just invalid.
    refused(auth, mint(claims(exp=int(NOW) - 100), key="x" * 32))


def test_exp_is_required_and_must_be_a_number(clock) -> None:
    auth = authenticator(clock)
    assert refused(auth, mint(claims(exp=None))) == "a required claim is missing"
    assert refused(auth, mint(claims(exp=str(int(NOW) + 300)))) == "exp is not a date"
    assert refused(auth, mint(claims(exp=True))) == "exp is not a date"
    assert refused(auth, mint(claims(exp=10**400))) == "exp is out of range"
    assert refused(auth, mint(claims(exp=float("nan")))) == "exp is out of range"
    assert refused(auth, mint(claims(exp=float("inf")))) == "exp is out of range"


def test_nbf_and_iat_in_the_future_beyond_the_leeway_are_invalid(clock) -> None:
    auth = authenticator(clock)
    assert auth.verify(mint(claims(nbf=int(NOW) + 25, iat=int(NOW) + 25)))
    assert refused(auth, mint(claims(nbf=int(NOW) + 60))) == "the token is not valid yet"
    assert refused(auth, mint(claims(iat=int(NOW) + 60))) == "the token is issued in the future"
    assert refused(auth, mint(claims(iat="yesterday"))) == "iat is not a date"


# -- several providers -------------------------------------------------------------------------


async def test_the_providers_are_tried_by_alg_in_order(clock, tmp_path) -> None:
    key, other_secret = private_key("ES256"), "another secret, of 32 bytes, ok!"
    auth = authenticator(
        clock,
        hs=provider("HS256"),
        hs2=AuthProvider(algorithms=("HS256",), secret=other_secret),
        idp=jwks_provider(tmp_path / "idp.json", [public_jwk(key, "k1")], "ES256"),
    )
    await auth.refresh()
    second = mint(claims(iss=None), key=other_secret)
    assert auth.verify(second).provider == "hs2"
    assert auth.verify(second, ("hs2",)).provider == "hs2"
    assert "signature" in refused(auth, second, providers=("hs",))
    assert "not accepted" in refused(auth, second, providers=("idp",))
    assert "not accepted" in refused(auth, second, providers=("nobody",))
    assert auth.verify(mint(claims(), "ES256", key, kid="k1")).provider == "idp"
    # One provider's failure does not hide another's expiry.
    expired = mint(claims(exp=int(NOW) - 100))
    assert refused(auth, expired, "token_expired") == "the token has expired"


# -- the cache ---------------------------------------------------------------------------------


def test_a_repeated_token_costs_one_signature_check(clock) -> None:
    auth = authenticator(clock)
    token = mint(claims())
    first = auth.verify(token)
    assert auth.signature_checks == 1
    assert auth.verify(token) is first
    assert auth.signature_checks == 1
    # Asked for other providers, the same token is checked again.
    assert auth.verify(token, ("hs",)) == first
    assert auth.signature_checks == 2


def test_the_cache_is_bounded_and_forgets_the_least_recently_used(clock) -> None:
    auth = authenticator(clock, cache_size=2)
    a, b, c = (mint(claims(sub=s)) for s in "abc")
    auth.verify(a), auth.verify(b), auth.verify(a), auth.verify(c)
    assert len(auth._cache) == 2
    checks = auth.signature_checks
    auth.verify(a)  # kept: used after b
    assert auth.signature_checks == checks
    auth.verify(b)  # pushed out by c
    assert auth.signature_checks == checks + 1
    none = authenticator(clock, cache_size=0)
    none.verify(a), none.verify(a)
    assert none.signature_checks == 2
    assert len(none._cache) == 0


def test_a_cached_token_is_refused_once_it_expires(clock) -> None:
    auth = authenticator(clock)
    token = mint(claims(exp=int(NOW) + 5))
    identity = auth.verify(token)
    clock.advance(4)
    assert auth.verify(token) is identity
    clock.advance(1)  # at exp: out of the cache; the full check still allows the leeway
    assert auth.verify(token) == identity
    assert auth.signature_checks == 2
    clock.advance(30)
    assert refused(auth, token, "token_expired") == "the token has expired"


async def test_cached_tokens_survive_a_new_key_and_not_a_revoked_one(clock, tmp_path) -> None:
    """Rotation adds a kid: tokens of the old one stay cached. A kid gone from the JWKS (or
    its key changed) is a revocation: its tokens are checked again, and fail."""
    old, new = private_key("ES256"), private_key("ES256", 1)
    path = tmp_path / "jwks.json"
    auth = authenticator(clock, idp=jwks_provider(path, [public_jwk(old, "old")], "ES256"))
    await auth.refresh()
    token = mint(claims(), "ES256", old, kid="old")
    identity = auth.verify(token)
    path.write_bytes(jwks(public_jwk(old, "old"), public_jwk(new, "new")))
    await auth.refresh()
    assert auth.verify(token) is identity
    assert auth.verify(mint(claims(), "ES256", new, kid="new"))
    checks = auth.signature_checks
    path.write_bytes(jwks(public_jwk(new, "new")))
    await auth.refresh()
    assert refused(auth, token) == "the token's key is unknown"
    path.write_bytes(jwks(public_jwk(new, "old")))  # the kid reused for another key
    await auth.refresh()
    assert "signature" in refused(auth, token)
    assert auth.signature_checks == checks + 1


# -- the JWKS ----------------------------------------------------------------------------------


def test_only_the_keys_a_provider_can_use_are_kept() -> None:
    rs, p256, p384 = private_key("RS256"), private_key("ES256"), private_key("ES384")
    keyset = parse_jwks(
        jwks(
            public_jwk(rs, "rs"),
            public_jwk(rs, "enc", use="enc"),
            public_jwk(rs, "wrong-alg", alg="RS512"),
            public_jwk(rs, "ops", key_ops=["encrypt"]),
            public_jwk(p256, "p256"),
            public_jwk(p384, "p384"),  # a curve for ES384, not accepted here
            public_jwk(private_key("EdDSA"), "ed"),
            public_jwk(rs, "private", d="AQAB"),
            {"kty": "oct", "k": b64(b"x" * 32), "kid": "oct"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            {"kid": "no-kty"},
            "not a key",
        ),
        frozenset({"RS256", "PS256", "ES256"}),
    )
    assert {kid: sorted(by_alg) for kid, by_alg in keyset.keys.items()} == {
        "rs": ["PS256", "RS256"],
        "p256": ["ES256"],
    }


def test_small_rsa_keys_and_unusable_documents_are_refused() -> None:
    small = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the weak key to refuse
    for body in (
        jwks(public_jwk(small, "small")),
        b"not json",
        b'{"keys": {}}',
        b"[]",
        jwks(),
        jwks(*[public_jwk(private_key("RS256"), str(i)) for i in range(101)]),
    ):
        with pytest.raises(JwksError):
            parse_jwks(body, frozenset({"RS256"}))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)
MEMBER = st.sampled_from(["kty", "crv", "alg", "use", "key_ops", "kid", "n", "e", "x", "y", "d"])
JWK = st.dictionaries(MEMBER, JSON | st.sampled_from(["RSA", "EC", "OKP", "P-256", "Ed25519"]))


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(document=st.one_of(JSON, st.lists(JWK, max_size=5).map(lambda k: {"keys": k})))
def test_a_broken_jwks_raises_jwks_error_only(document) -> None:
    """Whatever an IdP serves, the refresh sees a JwksError (a refresh loop never dies)."""
    try:
        body = orjson.dumps(document)
    except (orjson.JSONEncodeError, TypeError):
        return  # not representable as JSON (a float out of range)
    with pytest.raises(JwksError):
        parse_jwks(body, frozenset({"RS256", "PS256", "ES256", "EdDSA"}))


async def test_an_unreadable_jwks_leaves_the_provider_without_keys(clock, tmp_path) -> None:
    auth = authenticator(clock, idp=provider("RS256", jwks_file=str(tmp_path / "missing")))
    assert auth.state() == {"idp": "disconnected"}
    await auth.refresh()
    assert auth.state() == {"idp": "disconnected"}
    token = mint(claims(), "RS256", private_key("RS256"), kid="k1")
    assert refused(auth, token) == "the token's key is unknown"
    await auth.close()


def test_an_unknown_kid_asks_for_one_fetch_per_30_seconds(clock) -> None:
    source = KeySource("idp", provider("RS256"), clock, lambda: pytest.fail("no session"))
    assert source.want()
    clock.advance(29)
    assert not source.want()
    clock.advance(1)
    assert source.want()


def test_a_secret_shorter_than_the_hash_is_refused(clock) -> None:
    with pytest.raises(ValueError, match="too short for HS256"):
        authenticator(clock, hs=provider("HS256", secret="x" * 31))
    with pytest.raises(ValueError, match="too short for HS512"):
        authenticator(clock, hs=provider("HS256", "HS512", secret="x" * 32))


def test_verify_never_awaits() -> None:
    assert not inspect.iscoroutinefunction(Authenticator.verify)
