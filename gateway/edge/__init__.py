"""What faces clients before any routing: who the client is (trusted proxies). The room for
TLS, client limits and connection caps.

May import the leaves (``errors``, ``metrics``, ``logs``) and ``config``; never a phase.
"""
