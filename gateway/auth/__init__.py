"""JWT authentication at the edge (RFC 8725): ``Authenticator`` verifies a token for the
providers of ``config.auth`` and returns its ``Identity``, or raises ``AuthFailed``
(``invalid_token``, ``token_expired``).

``tokens.py``: one provider's checks, pure. ``cache.py``: verified tokens until they expire,
pure. ``jwks.py``: the providers' public keys, fetched and refreshed in the background.
``authenticator.py``: the three together; ``verify`` never waits.

Owns: every decision about a token, and every request to a JWKS. May import ``config`` (its
types), ``certs``, ``logs`` and ``errors``; never a phase, ``upstream``, ``websocket``,
``pipeline`` or ``app``. Answers (401, 403), identity headers and metrics are the caller's.
"""

from .authenticator import Authenticator
from .tokens import AuthFailed, Identity

__all__ = ["AuthFailed", "Authenticator", "Identity"]
