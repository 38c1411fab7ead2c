"""HTTPS and WSS to a node (``nodes.<name>.tls``): the client-side TLS context, built once per
node per snapshot (``snapshot.compile_snapshot`` calls ``node_tls``) and carried on each of the
node's targets, so that forwarding, WebSocket handshakes and probes all connect alike.

The node's certificate is verified against ``ca`` (else the system store) and the name
``server_name`` (else the node's host: an IP address is verified as one), which is also the SNI
sent; ``cert``/``key`` present a client certificate. TLS 1.2 or later, HTTP/1.1 by ALPN.
``insecure_skip_verify`` is the one way to accept any certificate, and it says so in a warning
each time a snapshot is compiled (every start and reload). No aiohttp here: the snapshot
imports it.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from ..config.types import Node

log = logging.getLogger("gateway.upstream")


@dataclass(frozen=True, slots=True, eq=False)
class UpstreamTls:
    """How to reach one node over TLS, as compiled from one config. A reload builds a new one
    (files re-read), so new connections use what the files say now; pooled connections made
    with an older context are never handed to requests of a newer one (the pool is keyed by the
    context) and close after ``upstream_keepalive_timeout``."""

    context: ssl.SSLContext
    server_hostname: str  # the SNI sent and the name the certificate must carry


def node_tls(name: str, node: Node) -> UpstreamTls | None:
    """The TLS of node ``name``, or None for plain HTTP. The files were checked when the config
    was loaded; one that changed since fails here with ``ssl.SSLError`` or ``OSError``."""
    settings = node.tls
    if settings is None:
        return None
    # With a cafile, create_default_context trusts that file only (not the system store too).
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if settings.cert is not None:
        context.load_cert_chain(settings.cert, settings.key)
    if settings.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning(
            "TLS to node %s accepts any certificate (insecure_skip_verify): its traffic can be "
            "read and changed by whoever sits in between",
            name,
            extra={"fields": {"node": name}},
        )
    host = node.host.removeprefix("[").removesuffix("]")  # an IPv6 address without brackets
    return UpstreamTls(context, settings.server_name or host)
