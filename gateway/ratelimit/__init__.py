"""Rate limiting with nginx's ``limit_req`` arithmetic: zones and decisions (``zones.py``),
the in-memory limiter (``local.py``), the limiter shared through Redis with its fallback
(``shared.py``) and the clients it runs its script with (``redisclients.py``, ``resp.py``),
and the phase that applies a zone to a request (``phase.py``).

Owns: every limit decision and every byte sent to Redis. May import the leaves (``errors``,
``metrics``, ``logs``), ``config`` (zone specs, Redis settings) and ``context`` (types);
never ``app``, ``pipeline``, ``upstream`` or ``websocket``.
"""
