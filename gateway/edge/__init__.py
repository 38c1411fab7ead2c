"""What faces clients before any routing: accepting connections, who the client is (trusted
proxies). The room for TLS, client limits and connection caps, and for the certificates TLS
serves (``acme``).

May import the leaves (``errors``, ``metrics``, ``logs``, ``certs``) and ``config``; never a
phase.
"""
