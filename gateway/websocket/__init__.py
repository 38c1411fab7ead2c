"""WebSocket sessions: the handshake phase (checks, the upstream's 101 through the failover
loop, the client's 101), the upstream handshake on a connection of the gateway's own, the frame
reader (pure), the relayed session (one protocol per leg) and the keepalive sweep.

Owns: every byte of a session after the handshake. May import the leaves (``errors``,
``metrics``, ``logs``), ``snapshot`` and ``context`` (types), and ``upstream``'s failover
loop and headers; never ``app`` or ``pipeline``.
"""
