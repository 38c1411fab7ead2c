"""W3C Trace Context (https://www.w3.org/TR/trace-context/): ``traceparent`` parsed strictly,
and the trace a request belongs to. Pure and cheap: no OpenTelemetry object is made here.

A valid incoming ``traceparent`` is continued (same trace id, its parent id as the gateway
span's parent); an absent or invalid one starts a new trace. A recorded span (export.py) has
an id of its own, which upstreams get as their parent; without one the caller's span stays
their parent, so their spans join the caller's.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
# version-traceid-parentid-flags, lowercase hex only (section 3.2.2). The version is checked
# apart: 00 is exactly 55 characters; a higher one may carry more after a "-" (3.2.4).
_FIELDS: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_SAMPLED: Final = 0x01


class Parent(NamedTuple):
    """A valid incoming ``traceparent`` (a tuple: made on every request that has one)."""

    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # the caller's span: 16 lowercase hex digits, not all zero
    sampled: bool


def parse_traceparent(value: str) -> Parent | None:
    """The parent a ``traceparent`` value names, or None when it is not valid: version 00
    exactly as the spec writes it; a higher version (not ff) leniently, its first four
    fields read as 00's and anything after them ignored when it follows a dash."""
    match = _FIELDS.match(value)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff":
        return None
    if version == "00":
        if len(value) != 55:
            return None
    elif len(value) > 55 and value[55] != "-":
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return Parent(trace_id, span_id, bool(int(flags, 16) & _SAMPLED))


def incoming(values: Sequence[str]) -> Parent | None:
    """The parent of a request whose ``traceparent`` headers are ``values``: None for none,
    for more than one (the spec allows one), or for an invalid one."""
    if len(values) != 1:
        return None
    return parse_traceparent(values[0])


_SPAN_BITS: Final = (1 << 64) - 1


class Span(Protocol):
    """What the pipeline and the failover loop do with a recording span (``export.py``'s)."""

    def add_event(self, name: str, attributes: dict[str, str | int]) -> None: ...


class Trace:
    """The trace of one request: its ids, whether it is sampled, and (when sampled with
    tracing on) the recording span. ``continued``: a valid ``traceparent`` came in (else its
    ``tracestate``, which belongs to no trace the gateway knows, is not passed on)."""

    __slots__ = ("continued", "parent_id", "sampled", "span", "span_id", "trace_id")

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        parent_id: str | None,
        sampled: bool,
        span: Span | None = None,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.continued = parent_id is not None
        self.sampled = sampled
        self.span = span

    @classmethod
    def of(cls, parent: Parent | None) -> Trace:
        """The request's trace without a recording span: the parent's passed on as it came
        (its span stays the upstream's parent, since the gateway records none: a new span id
        here would name a parent no one exports, and cut the upstream's spans off the
        caller's), or a new one, not sampled."""
        if parent is None:
            # Python's generator, not os.urandom: a syscall per request was 2 % of the
            # gateway's CPU, and trace ids need to be unique, not secret (OpenTelemetry's
            # SDK makes its ids the same way). Never all zeros (invalid): the "or"s below.
            ids = random.getrandbits(192)
            trace_id, span_id = (ids >> 64) or 1, (ids & _SPAN_BITS) or 1
            return cls(f"{trace_id:032x}", f"{span_id:016x}", None, sampled=False)
        return cls(parent.trace_id, parent.span_id, parent.span_id, parent.sampled)

    def traceparent(self) -> str:
        """The ``traceparent`` an upstream gets: the gateway's span as its parent."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def event(self, name: str, attributes: dict[str, str | int]) -> None:
        """An event on the recording span (a retry, a failover); nothing when unsampled."""
        if self.span is not None:
            self.span.add_event(name, attributes)


# An Exchange's trace until pipeline.handle sets the request's (never sent: it is not valid).
UNTRACED: Final = Trace(_ZERO_TRACE, _ZERO_SPAN, None, sampled=False)
