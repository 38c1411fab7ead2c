"""traceparent parsed as the W3C Trace Context spec writes it (section 3.2 and 4.3)."""

from __future__ import annotations

import pytest

from gateway.tracing.context import Parent, Trace, incoming, parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TRACE}-{SPAN}-01", Parent(TRACE, SPAN, sampled=True)),
        (f"00-{TRACE}-{SPAN}-00", Parent(TRACE, SPAN, sampled=False)),
        (f"00-{TRACE}-{SPAN}-09", Parent(TRACE, SPAN, sampled=True)),  # a bit field
        (f"00-{TRACE}-{SPAN}-02", Parent(TRACE, SPAN, sampled=False)),
        # A higher version: the fields of 00 read, what follows a dash ignored.
        (f"01-{TRACE}-{SPAN}-01", Parent(TRACE, SPAN, sampled=True)),
        (f"cc-{TRACE}-{SPAN}-01-what-the-future-holds", Parent(TRACE, SPAN, sampled=True)),
    ],
)
def test_valid_traceparents(value: str, expected: Parent) -> None:
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        f"00-{TRACE}-{SPAN}-01-",  # version 00 is exactly 55 characters
        f"00-{TRACE}-{SPAN}-01 ",
        f"00-{TRACE.upper()}-{SPAN}-01",  # lowercase hex only
        f"00-{TRACE}-{SPAN.upper()}-01",
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero ids are invalid
        f"00-{TRACE}-{'0' * 16}-01",
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"0-{TRACE}-{SPAN}-01",
        f"00-{TRACE[:-1]}-{SPAN}-01",
        f"00-{TRACE}-{SPAN[:-1]}-01",
        f"00-{TRACE}-{SPAN}-1",
        f"00-{TRACE}-{SPAN}-0g",
        f"00_{TRACE}_{SPAN}_01",
        f"01-{TRACE}-{SPAN}-01x",  # a higher version: more only after a dash
        f"01-{TRACE}-{SPAN}",
    ],
)
def test_invalid_traceparents(value: str) -> None:
    assert parse_traceparent(value) is None


def test_more_than_one_traceparent_is_invalid() -> None:
    one = f"00-{TRACE}-{SPAN}-01"
    assert incoming([one]) == Parent(TRACE, SPAN, sampled=True)
    assert incoming([one, one]) is None
    assert incoming([]) is None


def test_a_continued_trace_without_a_recording_span_passes_the_parent_on() -> None:
    """No span recorded: the caller's span stays the upstream's parent (a recorded one gets
    an id of its own: tests/test_tracing.py)."""
    trace = Trace.of(Parent(TRACE, SPAN, sampled=True))
    assert (trace.trace_id, trace.parent_id, trace.continued, trace.sampled) == (
        TRACE, SPAN, True, True,
    )  # fmt: skip
    assert parse_traceparent(trace.traceparent()) == Parent(TRACE, SPAN, sampled=True)


def test_a_new_trace_has_fresh_valid_ids() -> None:
    traces = [Trace.of(None) for _ in range(100)]
    parsed = [parse_traceparent(t.traceparent()) for t in traces]
    assert all(p is not None and not p.sampled for p in parsed)
    assert len({t.trace_id for t in traces}) == 100
    assert not any(t.continued for t in traces)
