"""JWT authentication at the edge (RFC 8725): ``Authenticator`` verifies a token for the
providers of ``config.auth`` and returns its ``Identity``, or raises ``AuthFailed``
(``invalid_token``, ``token_expired``).

``tokens.py``: one provider's checks, pure. ``cache.py``: verified tokens until they expire,
pure. ``jwks.py``: the providers' public keys, fetched and refreshed in the background.
``authenticator.py``: the three together; ``verify`` never waits. ``phase.py``: the phase
(where the token is, the 401 and 403 answers, the identity the upstream gets).

Owns: every decision about a token, and every request to a JWKS. May import ``config`` (its
types), ``certs``, ``logs``, ``errors``, ``metrics``, and for the phase the types of
``context`` and ``snapshot``; never another phase, ``upstream``, ``websocket``, ``pipeline``
or ``app``.
"""

from .authenticator import Authenticator
from .tokens import AuthFailed, Identity

__all__ = ["AuthFailed", "Authenticator", "Identity"]
