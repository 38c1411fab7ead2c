"""Distributed tracing: the W3C Trace Context of each request (``context.py``: pure, no
OpenTelemetry) and, when ``tracing`` is configured, one OpenTelemetry span per sampled
request exported over OTLP/HTTP (``export.py``: the only module that imports the SDK).

The room imports ``config``, ``metrics`` and ``logs`` only; phases reach it through
``Exchange.trace`` and ``Shared.tracer``.
"""
