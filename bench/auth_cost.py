"""What verifying a token costs the gateway (gateway/auth), in µs per call, with timeit.

```
.venv/bin/python bench/auth_cost.py             # ~30 s
.venv/bin/python bench/auth_cost.py --number 20000
```

For HS256, RS256 (2048-bit), ES256 (P-256) and EdDSA (Ed25519), one provider each (the
asymmetric ones with a JWKS file): ``Authenticator.verify`` answered from the cache (the same
token again), the full check (``cache_size: 0``: header, signature, claims), and pyjwt's own
``jwt.decode`` of the same token with the same key, for what the gateway adds around it. Then
two refusals that must stay cheap: a forged signature and a 9 KiB token; and what reading the
header to choose the key costs (pyjwt decodes the whole token to give it). The best of
``--repeat`` runs of ``--number`` calls each; one process, one core, not pinned.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import timeit
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.auth import Authenticator, AuthFailed  # noqa: E402 - after the path is set
from gateway.config.types import Auth, AuthProvider  # noqa: E402 - after the path is set
from tests.jwtkit import SECRET, claims, jwks, mint, private_key, public_jwk  # noqa: E402 - same


def best(call: Any, number: int, repeat: int) -> float:
    """µs per call: the best of ``repeat`` runs."""
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def refused(auth: Authenticator, token: str) -> None:
    try:
        auth.verify(token)
    except AuthFailed:
        return
    raise AssertionError("accepted")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    now = time.time()
    rows: list[tuple[str, float, float, float]] = []
    with tempfile.TemporaryDirectory() as work:
        for alg in ("HS256", "RS256", "ES256", "EdDSA"):
            if alg == "HS256":
                key: Any = SECRET
                provider = AuthProvider(algorithms=(alg,), secret=SECRET)
                verify_key: Any = SECRET
                kid = None
            else:
                key, kid = private_key(alg), "k1"
                path = Path(work) / f"{alg}.json"
                path.write_bytes(jwks(public_jwk(key, kid)))
                provider = AuthProvider(algorithms=(alg,), jwks_file=str(path))
                verify_key = key.public_key()
            token = mint(claims(now, exp=int(now) + 3600), alg, key, kid=kid)
            made = []
            for size in (10_000, 0):
                auth = Authenticator(
                    Auth(providers=MappingProxyType({"p": provider}), cache_size=size)
                )
                await auth.refresh()
                auth.verify(token)
                made.append(auth)
            cached, full = made
            rows.append((
                alg,
                best(lambda a=cached, t=token: a.verify(t), args.number, args.repeat),
                best(lambda a=full, t=token: a.verify(t), args.number, args.repeat),
                best(
                    lambda t=token, k=verify_key, a=alg: jwt.decode(
                        t, k, algorithms=[a], options={"verify_aud": False}
                    ),
                    args.number,
                    args.repeat,
                ),
            ))  # fmt: skip
            if alg == "HS256":
                forged = mint(claims(now), alg, "x" * 32)
                huge = "a" * 9 * 1024
                refusals = (
                    best(lambda a=full, t=forged: refused(a, t), args.number, args.repeat),
                    best(lambda a=full, t=huge: refused(a, t), args.number, args.repeat),
                    best(lambda t=token: jwt.get_unverified_header(t), args.number, args.repeat),
                )
    print(f"{'alg':<7} {'cache hit':>10} {'full verify':>12} {'jwt.decode':>11}   (µs/call)")
    for alg, hit, full_cost, bare in rows:
        print(f"{alg:<7} {hit:>10.2f} {full_cost:>12.2f} {bare:>11.2f}")
    print(f"refused: forged HS256 {refusals[0]:.2f} µs, 9 KiB token {refusals[1]:.2f} µs")
    print(f"of a full verify, jwt.get_unverified_header (choosing the key): {refusals[2]:.2f} µs")


if __name__ == "__main__":
    asyncio.run(main())
