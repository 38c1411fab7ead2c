"""Choosing and reaching a target: the balancer (which target), the health book (what is
known of each target and node) and its probes, per-service slots, the one failover loop, and
HTTP forwarding through the upstream client.

Owns: every decision about upstreams and every byte sent to them over HTTP. May import the
leaves (``errors``, ``metrics``, ``logs``), ``snapshot`` and ``context`` (types), and
``aiohttp_private``; never ``app``, ``pipeline`` or another room's phase.
"""
