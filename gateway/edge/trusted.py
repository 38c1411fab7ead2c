"""Who the client is: the socket peer, or, behind trusted proxies, the address they report.

``X-Forwarded-For`` is believed only when the peer is in ``trusted_proxies``; it is then read
right to left past trusted hops, and the first untrusted address is the client. ``X-Real-IP``,
``Forwarded``, ``True-Client-IP`` and the like are never believed. IPv4-mapped IPv6
(``::ffff:1.2.3.4``) is the same client as ``1.2.3.4``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache
from typing import Final

# Headers a client could use to pass for someone or somewhere else. From a peer that is not a
# trusted proxy they are removed (and the gateway states its own X-Forwarded-*), as Traefik does
# by default: every X-Forwarded-*, and these client-address and URL- or method-override ones.
CLIENT_ADDRESS: Final = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "x-client-ip",
        "client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-cluster-client-ip",
        "x-original-forwarded-for",
        "x-originating-ip",
        "x-remote-ip",
        "x-remote-addr",
    }
)
OVERRIDES: Final = frozenset(
    {
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x-override-url",
        "x-original-host",
        "x-host",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    }
)
# Identity headers removed from every request, from trusted proxies too (the gateway is what
# says who a user is), besides those auth.identity_headers names.
IDENTITY: Final = frozenset(
    {
        "x-user-id",
        "x-user-role",
        "x-user-roles",
        "x-user-email",
        "x-user",
        "x-authenticated-user",
        "x-authenticated-userid",
        "x-auth-user",
        "x-remote-user",
        "remote-user",
    }
)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Networks:
    """A set of CIDRs."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in cidrs
        )

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: IPAddress) -> bool:
        return any(address in network for network in self._networks)

    def holds(self, address: str) -> bool:
        """Whether an address given as text (a client address) is in one of them."""
        parsed = parse(address)
        return parsed is not None and self.trusts(parsed)


class TrustedProxies(Networks):
    def proto(self, peer: str | None, forwarded_proto: str | None, scheme: str) -> str:
        """``X-Forwarded-Proto`` from a trusted proxy (TLS ended there), else our own scheme."""
        if forwarded_proto in ("http", "https") and self._networks:
            peer_ip = parse(peer)
            if peer_ip is not None and self.trusts(peer_ip):
                return forwarded_proto
        return scheme

    def client(self, peer: str | None, forwarded_for: list[str]) -> str:
        """The client address for a request from ``peer`` with these X-Forwarded-For values."""
        if not self._networks or not forwarded_for:
            return canonical(peer)
        peer_ip = parse(peer)
        if peer_ip is None or not self.trusts(peer_ip):
            return canonical(peer)
        hops = [h.strip() for value in forwarded_for for h in value.split(",")]
        client = peer_ip
        for hop in reversed(hops):
            hop_ip = parse(hop)
            if hop_ip is None:
                break  # garbage: nothing left of it can be trusted
            client = hop_ip
            if not self.trusts(hop_ip):
                break
        return str(client)


@lru_cache(maxsize=4096)
def canonical(peer: str | None) -> str:
    """The peer address as text, IPv4-mapped IPv6 unwrapped (cached: peers repeat)."""
    address = parse(peer)
    return str(address) if address is not None else peer or ""


@lru_cache(maxsize=4096)
def parse(text: str | None) -> IPAddress | None:
    """An address, with IPv4-mapped IPv6 unwrapped; None for anything else."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
