"""Verified tokens remembered until they expire, so that a repeated token costs one signature
check: a bounded LRU keyed by the token's SHA-256 and the providers it was checked against.

Pure: the caller gives the time. Only verified tokens are kept (a failure is never cached:
a flood of bad tokens cannot push the good ones out more than a flood of good ones would).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TypeAlias

from .tokens import Identity

Key: TypeAlias = tuple[bytes, tuple[str, ...] | None]


def cache_key(token: str, providers: tuple[str, ...] | None) -> Key:
    """The token's digest (the token itself is never kept) and the providers asked for."""
    return hashlib.sha256(token.encode("ascii")).digest(), providers


class TokenCache:
    """At most ``size`` identities (0: none), each with the key generation of its provider
    when it was verified; the least recently used goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[Key, tuple[Identity, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key, now: float) -> tuple[Identity, int] | None:
        """The entry, unless absent or expired (``now`` at or past its ``exp``: dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry[0].expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: Key, identity: Identity, generation: int, now: float) -> None:
        if self.size == 0 or now >= identity.expires:
            return
        self._entries[key] = (identity, generation)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def drop(self, key: Key) -> None:
        self._entries.pop(key, None)
