"""``FrameReader`` checked against wsproto's frame parser as an oracle.

Hypothesis draws conversations (text and binary messages, fragmented or not, pings and pongs
between any two frames, perhaps a close) in either direction, masked (a client's) or not (an
upstream's), then perhaps breaks them once: reserved bits, a reserved opcode, the wrong
masking, a fragmented or oversized control frame, a continuation of nothing, a new data frame
inside a fragmented message, a dropped frame, a flipped FIN. The bytes are encoded here (not
with the gateway's helpers), cut into reads down to single bytes, and fed to both parsers.

They must agree on the frames, in order, with their payloads (rebuilt from the bytes
``FrameReader`` forwards, which must be the stream's own bytes), on whether and where the
stream breaks the protocol, and on close frames (``FrameReader`` hands them to the relay,
which judges the payload with ``parse_close``; wsproto judges it itself).

Where the two deliberately differ, the difference is excluded from the generated streams and
pinned down by a test of its own at the end of this module:

- ``FrameReader`` never decodes text: invalid UTF-8 in a text message goes through (wsproto:
  1007). The generator cuts text messages at character boundaries and keeps them valid.
- close code 1014 (IANA: "Bad Gateway") is accepted by ``parse_close``; wsproto does not know it
  and refuses it. The generator never uses it.
- a length not in its shortest form, or a 64-bit length with the top bit set, is refused by
  wsproto; ``FrameReader`` takes the length as it comes (the top bit makes it too big: 1009).
  The encoder here always writes the shortest form.
- ``FrameReader`` limits a message's size (1009); wsproto's frame layer has no limit. The
  oracle runs with a limit no stream reaches; a model of the limit is checked separately.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode, ParseFailed

from gateway.websocket.frames import (
    BINARY,
    CLOSE,
    CONTINUATION,
    MESSAGE_TOO_BIG,
    PING,
    PONG,
    PROTOCOL_ERROR,
    TEXT,
    Control,
    FrameReader,
    Violation,
    parse_close,
)

NO_LIMIT = 1 << 40


# -- frames, encoded independently of the gateway ----------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One frame to encode. ``key``: the masking key, None for an unmasked frame;
    ``wrong_mask``: to be masked the other way than its direction requires."""

    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0  # the three reserved bits, as a number 0-7
    key: bytes | None = None
    wrong_mask: bool = False


def xor(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def encode(spec: Spec) -> bytes:
    first = (0x80 if spec.fin else 0) | (spec.rsv << 4) | spec.opcode
    mask = 0x80 if spec.key is not None else 0
    n = len(spec.payload)
    if n < 126:
        head = bytes((first, mask | n))
    elif n < 1 << 16:
        head = bytes((first, mask | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, mask | 127)) + n.to_bytes(8, "big")
    if spec.key is None:
        return head + spec.payload
    return head + spec.key + xor(spec.payload, spec.key)


def decode_all(data: bytes) -> list[tuple[int, bool, bytes]]:
    """Whole frames, back to back, as (opcode, fin, unmasked payload); no bytes left over."""
    frames = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        n, pos = b1 & 0x7F, pos + 2
        if n == 126:
            n, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
        key = None
        if b1 & 0x80:
            key, pos = data[pos : pos + 4], pos + 4
        payload = data[pos : pos + n]
        assert len(payload) == n, "a partial frame was forwarded at the end"
        frames.append((b0 & 0x0F, bool(b0 & 0x80), xor(payload, key) if key else payload))
        pos += n
    return frames


# -- what each parser makes of a stream --------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """A data frame: its opcode (CONTINUATION after a message's first), FIN, payload."""

    opcode: int
    fin: bool
    payload: bytes


@dataclass(frozen=True)
class Ping:
    """A ping or a pong."""

    opcode: int
    payload: bytes


@dataclass(frozen=True)
class Close:
    """A valid close frame (code 1005: it had none)."""

    code: int
    reason: str


Event = Data | Ping | Close


@dataclass
class Outcome:
    """The frames read, then the end: ``eof``, ``close``, ``bad close`` (a close frame whose
    payload is invalid) or ``violation <code>``."""

    events: list[Event]
    end: str


def close_event(payload: bytes) -> Close | None:
    parsed = parse_close(payload)
    if parsed is None:
        return None
    code, reason = parsed
    return Close(1005 if code is None else code, reason.decode())


def run_reader(stream: bytes, pieces: list[int], masked: bool, limit: int) -> Outcome:
    """Feed ``stream`` to a ``FrameReader`` in reads of these sizes; rebuild the frames from
    what it forwards and hands over, checking that those are the stream's own bytes."""
    reader = FrameReader(masked=masked, max_message=limit)
    out: list[bytes | Control | Violation] = []
    pos = 0
    for size in pieces:
        out += reader.feed(stream[pos : pos + size])
        pos += size
    assert pos >= len(stream)
    forwarded = b"".join(
        e.raw if isinstance(e, Control) else e for e in out if not isinstance(e, Violation)
    )
    assert stream.startswith(forwarded), "FrameReader forwarded bytes the stream does not have"
    events: list[Event] = []
    end = "eof"
    controls = iter(e for e in out if isinstance(e, Control))
    for opcode, fin, payload in decode_all(forwarded):
        if opcode in (PONG, CLOSE):
            control = next(controls)  # handed over whole, with its payload unmasked
            assert (control.opcode, control.payload) == (opcode, payload)
            assert decode_all(control.raw) == [(opcode, True, payload)]
        if opcode == CLOSE:
            closed = close_event(payload)
            if closed is None:
                end = "bad close"
            else:
                events.append(closed)
                end = "close"
            break
        events.append(
            Ping(opcode, payload) if opcode in (PING, PONG) else Data(opcode, fin, payload)
        )
    assert next(controls, None) is None
    violations = [e for e in out if isinstance(e, Violation)]
    if violations:
        assert out[-1] is violations[0], "a violation is the last thing the reader says"
        assert end == "eof"
        end = f"violation {violations[0].code}"
    assert reader.done == (end != "eof")
    assert not reader.mid_frame
    if reader.done:  # nothing more is read after a close or a violation
        assert reader.feed(encode(Spec(TEXT, b"x", key=b"abcd" if masked else None))) == []
    data = [e for e in events if isinstance(e, Data)]
    assert reader.messages == sum(1 for e in data if e.fin)
    assert reader.payload_bytes == sum(len(e.payload) for e in data)
    return Outcome(events, end)


def run_wsproto(stream: bytes, pieces: list[int], masked: bool) -> Outcome:
    """The same for wsproto's parser (the server's side for a client's frames)."""
    protocol = FrameProtocol(client=not masked, extensions=[])
    events: list[Event] = []
    chunks: list[bytes] = []  # of the data frame being read
    in_message = False  # a data message has begun with an earlier frame
    pos = 0
    try:
        for size in pieces:
            protocol.receive_bytes(stream[pos : pos + size])
            pos += size
            for frame in protocol.received_frames():
                payload = frame.payload
                if frame.opcode is Opcode.CLOSE:
                    assert isinstance(payload, tuple)
                    events.append(Close(int(payload[0]), payload[1]))
                    return Outcome(events, "close")
                assert not isinstance(payload, tuple)
                raw = payload.encode() if isinstance(payload, str) else payload
                if frame.opcode.iscontrol():
                    events.append(Ping(int(frame.opcode), raw))
                    continue
                chunks.append(raw)
                if not frame.frame_finished:
                    continue
                opcode = CONTINUATION if in_message else int(frame.opcode)
                events.append(Data(opcode, frame.message_finished, b"".join(chunks)))
                chunks.clear()
                in_message = not frame.message_finished
    except ParseFailed as failed:
        if str(failed).startswith(("CLOSE", "remote CLOSE", "Error decoding CLOSE")):
            return Outcome(events, "bad close")
        return Outcome(events, f"violation {int(failed.code)}")
    return Outcome(events, "eof")


# -- the conversations -------------------------------------------------------------------------

BIG = (125, 126, 127, 1000, 65_535, 65_536, 70_000)


@st.composite
def binary_payloads(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:  # now and then one of the sizes at a length boundary
        return random.Random(draw(st.integers(0, 1 << 32))).randbytes(draw(st.sampled_from(BIG)))
    return draw(st.binary(max_size=40))


@st.composite
def text_pieces(draw: st.DrawFn) -> list[bytes]:
    """A text message's UTF-8, cut into fragments at character boundaries."""
    if draw(st.integers(0, 9)) == 0:
        text = draw(st.sampled_from(("a", "é", "€", "𝄞"))) * draw(st.sampled_from((42, 70, 30_000)))
    else:
        text = draw(st.text(max_size=30))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=3)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b].encode() for a, b in itertools.pairwise(bounds)]


@st.composite
def messages(draw: st.DrawFn) -> list[Spec]:
    if draw(st.booleans()):
        parts = draw(text_pieces())
        opcode = TEXT
    else:
        payload = draw(binary_payloads())
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        bounds = [0, *cuts, len(payload)]
        parts = [payload[a:b] for a, b in itertools.pairwise(bounds)]
        opcode = BINARY
    return [
        Spec(opcode if i == 0 else CONTINUATION, part, fin=i == len(parts) - 1)
        for i, part in enumerate(parts)
    ]


CLOSE_CODES = st.one_of(
    st.sampled_from((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1004, 1005,
                     1006, 1015, 1016, 2999, 3000, 3999, 4000, 4999, 5000, 999, 0, 65_535)),
    st.integers(0, 65_535),
).filter(lambda code: code != 1014)  # fmt: skip
REASONS = st.one_of(
    st.text(max_size=20).map(str.encode),
    st.sampled_from((b"\xff", b"ok\xc3", b"\xed\xa0\x80")),  # not UTF-8
)


@st.composite
def close_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return b""
    if kind == 1:
        return draw(st.binary(min_size=1, max_size=1))
    return draw(CLOSE_CODES).to_bytes(2, "big") + draw(REASONS)


def controls() -> st.SearchStrategy[Spec]:
    return st.builds(Spec, st.sampled_from((PING, PONG)), st.binary(max_size=125))


MUTATIONS = ("rsv", "opcode", "mask", "fragmented control", "oversized control", "continuation",
             "new data frame", "drop", "flip fin")  # fmt: skip
RESERVED_OPCODES = (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)


@st.composite
def conversations(draw: st.DrawFn) -> tuple[bool, list[Spec], str | None]:
    """(masked, frames, the mutation applied if any)."""
    masked = draw(st.booleans())
    frames = [spec for message in draw(st.lists(messages(), max_size=5)) for spec in message]
    for _ in range(draw(st.integers(0, 4))):
        frames.insert(draw(st.integers(0, len(frames))), draw(controls()))
    if draw(st.booleans()):
        frames.insert(draw(st.integers(0, len(frames))), Spec(CLOSE, draw(close_payloads())))
    mutation = draw(st.one_of(st.none(), st.sampled_from(MUTATIONS)))
    if mutation is not None:
        frames = mutate(frames, mutation, draw)
    out = []
    for spec in frames:
        key = draw(st.binary(min_size=4, max_size=4))
        out.append(replace(spec, key=key if masked != spec.wrong_mask else None))
    return masked, out, mutation


def mutate(frames: list[Spec], mutation: str, draw: st.DrawFn) -> list[Spec]:
    """``frames`` broken once: a frame changed or dropped, or a bad one inserted."""
    frames = list(frames)
    here = bool(frames)  # there is a frame to change, at ``at``; one is inserted before ``at``
    at = draw(st.integers(0, len(frames) - 1 if here else 0))
    if mutation in ("fragmented control", "oversized control", "continuation", "new data frame"):
        at = draw(st.integers(0, len(frames)))
    if mutation == "rsv" and here:
        frames[at] = replace(frames[at], rsv=draw(st.sampled_from((4, 2, 1, 7))))
    elif mutation == "opcode" and here:
        frames[at] = replace(frames[at], opcode=draw(st.sampled_from(RESERVED_OPCODES)))
    elif mutation == "mask" and here:
        frames[at] = replace(frames[at], wrong_mask=True)
    elif mutation == "fragmented control":
        frames.insert(at, Spec(draw(st.sampled_from((PING, PONG, CLOSE))), b"", fin=False))
    elif mutation == "oversized control":
        size = draw(st.integers(126, 200))
        frames.insert(at, Spec(draw(st.sampled_from((PING, PONG, CLOSE))), b"x" * size))
    elif mutation == "continuation":
        frames.insert(at, Spec(CONTINUATION, b"more", fin=draw(st.booleans())))
    elif mutation == "new data frame":
        frames.insert(
            at, Spec(draw(st.sampled_from((TEXT, BINARY))), b"new", fin=draw(st.booleans()))
        )
    elif mutation == "drop" and here:
        del frames[at]
    elif mutation == "flip fin" and here:
        frames[at] = replace(frames[at], fin=not frames[at].fin)
    return frames


@st.composite
def reads(draw: st.DrawFn, length: int) -> list[int]:
    """Read sizes covering ``length`` bytes: a cycle of small and large sizes (single bytes
    often) for the first 3000 bytes, then 4 KiB reads."""
    cycle = draw(
        st.lists(st.sampled_from((1, 1, 2, 3, 5, 13, 64, 1500, 70_000)), min_size=1, max_size=6)
    )
    sizes, pos, i = [], 0, 0
    while pos < length:
        size = cycle[i % len(cycle)] if pos < 3000 else 4096
        sizes.append(size)
        pos += size
        i += 1
    return sizes


ORACLE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@ORACLE
@given(conversation=conversations(), data=st.data())
def test_frame_reader_agrees_with_wsproto(
    conversation: tuple[bool, list[Spec], str | None], data: st.DataObject
) -> None:
    masked, specs, mutation = conversation
    stream = b"".join(map(encode, specs))
    pieces = data.draw(reads(len(stream)))
    ours = run_reader(stream, pieces, masked, NO_LIMIT)
    theirs = run_wsproto(stream, pieces, masked)
    assert ours == theirs
    event(f"{mutation or 'intact'}: {ours.end}")  # see --hypothesis-show-statistics


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation=conversations(), limit=st.integers(0, 300), data=st.data())
def test_the_message_size_limit(
    conversation: tuple[bool, list[Spec], str | None], limit: int, data: st.DataObject
) -> None:
    """A model of ``max_message`` on top of the oracle: the reader stops with 1009 at the first
    data frame that takes its message past the limit, unless the stream broke the protocol
    before."""
    masked, specs, _ = conversation
    stream = b"".join(map(encode, specs))
    pieces = data.draw(reads(len(stream)))
    theirs = run_wsproto(stream, pieces, masked)
    expected = Outcome([], theirs.end)
    size = 0
    for item in theirs.events:
        if isinstance(item, Data):
            size = len(item.payload) + (size if item.opcode == CONTINUATION else 0)
            if size > limit:
                expected.end = f"violation {MESSAGE_TOO_BIG}"
                break
        expected.events.append(item)
    assert run_reader(stream, pieces, masked, limit) == expected
    event(expected.end)


# -- every single violation and every close code, deterministically -------------------------


def violations() -> list[tuple[str, list[Spec]]]:
    """(name, frames) for each way one frame can break the protocol, after a good frame."""
    good = Spec(TEXT, b"hello")
    cases: list[tuple[str, list[Spec]]] = []
    for opcode in (TEXT, BINARY, PING, PONG, CLOSE):
        for rsv in range(1, 8):
            cases.append((f"rsv {rsv} on opcode {opcode}", [good, Spec(opcode, b"", rsv=rsv)]))
        cases.append(
            (f"masked wrongly, opcode {opcode}", [good, Spec(opcode, b"", wrong_mask=True)])
        )
    for opcode in RESERVED_OPCODES:
        cases.append((f"reserved opcode {opcode:#x}", [good, Spec(opcode, b"x")]))
    for opcode in (PING, PONG, CLOSE):
        cases.append((f"fragmented {opcode}", [good, Spec(opcode, b"", fin=False)]))
        cases.append((f"126 bytes in {opcode}", [good, Spec(opcode, b"x" * 126)]))
    for fin in (True, False):
        cases.append((f"continuation of nothing, fin {fin}", [good, Spec(CONTINUATION, b"x", fin)]))
        for opcode in (TEXT, BINARY):
            started = Spec(BINARY, b"a", fin=False)
            cases.append(
                (f"{opcode} inside a message, fin {fin}", [started, Spec(opcode, b"b", fin)])
            )
    return cases


@pytest.mark.parametrize("masked", [True, False], ids=["from a client", "from an upstream"])
@pytest.mark.parametrize(("name", "frames"), violations(), ids=[c[0] for c in violations()])
def test_each_violation_as_wsproto_sees_it(masked: bool, name: str, frames: list[Spec]) -> None:
    key = b"\x01\x02\x03\x04"
    specs = [replace(f, key=key if masked != f.wrong_mask else None) for f in frames]
    trailer = Spec(TEXT, b"after", key=key if masked else None)
    stream = b"".join(map(encode, [*specs, trailer]))
    for pieces in ([len(stream)], [1] * len(stream)):
        ours = run_reader(stream, pieces, masked, NO_LIMIT)
        assert ours == run_wsproto(stream, pieces, masked)
        assert ours.end == f"violation {PROTOCOL_ERROR}"
        assert len(ours.events) == 1  # the good frame went on, nothing of the bad one


CODES = [code for code in [*range(5_001), 5_001, 0xFFFF] if code != 1014]


def test_every_close_code_is_judged_as_wsproto_does() -> None:
    judged: dict[str, list[int]] = {"close": [], "bad close": []}
    for code in CODES:
        stream = encode(Spec(CLOSE, code.to_bytes(2, "big") + b"bye", key=b"\x01\x02\x03\x04"))
        ours = run_reader(stream, [len(stream)], True, NO_LIMIT)
        assert ours == run_wsproto(stream, [len(stream)], True), code
        judged[ours.end].append(code)
        if ours.end == "close":
            assert ours.events == [Close(code, "bye")]
    accepted = judged["close"]
    assert accepted == [*range(1000, 1004), *range(1007, 1014), *range(3000, 5000)]


@pytest.mark.parametrize(
    ("payload", "end"),
    [
        (b"", "close"),  # no code: 1005 for whoever reads it
        (b"\x03", "bad close"),
        (b"\x03\xe8", "close"),
        (b"\x03\xe8" + "тест".encode(), "close"),
        (b"\x03\xe8\xff", "bad close"),
        (b"\x03\xe8ok\xc3", "bad close"),  # cut in the middle of a character
        (b"\x03\xe8\xed\xa0\x80", "bad close"),  # a surrogate is no UTF-8
        (b"\x0f\xa0" + b"r" * 123, "close"),  # the longest reason
    ],
)
def test_close_payloads_are_judged_as_wsproto_does(payload: bytes, end: str) -> None:
    ours, theirs = both(encode(Spec(CLOSE, payload, key=b"\x01\x02\x03\x04")))
    assert ours == theirs
    assert ours.end == end


# -- where FrameReader deliberately differs from wsproto ---------------------------------------

KEY = b"\x0f\xf0\x55\xaa"


def both(stream: bytes, masked: bool = True) -> tuple[Outcome, Outcome]:
    """Each parser's outcome, fed whole and fed byte by byte (which must not matter)."""
    whole, single = [len(stream)], [1] * len(stream)
    ours = run_reader(stream, whole, masked, NO_LIMIT)
    theirs = run_wsproto(stream, whole, masked)
    assert run_reader(stream, single, masked, NO_LIMIT) == ours
    assert run_wsproto(stream, single, masked) == theirs
    return ours, theirs


def test_text_is_never_decoded() -> None:
    """The relay passes text through as it came; judging UTF-8 is the endpoints' job."""
    stream = encode(Spec(TEXT, b"ok \xff\xfe", key=KEY))
    ours, theirs = both(stream)
    assert ours == Outcome([Data(TEXT, True, b"ok \xff\xfe")], "eof")
    assert theirs.end == f"violation {int(CloseReason.INVALID_FRAME_PAYLOAD_DATA)}"


def test_close_code_1014_is_accepted() -> None:
    """1014 (Bad Gateway) is in IANA's registry of close codes; wsproto does not know it."""
    stream = encode(Spec(CLOSE, (1014).to_bytes(2, "big") + b"upstream down", key=KEY))
    ours, theirs = both(stream)
    assert ours == Outcome([Close(1014, "upstream down")], "close")
    assert theirs == Outcome([], "bad close")


@pytest.mark.parametrize(
    ("head", "length"),
    [
        (bytes((0x82, 126)) + (5).to_bytes(2, "big"), 5),  # 2 bytes where 1 would do
        (bytes((0x82, 127)) + (300).to_bytes(8, "big"), 300),  # 8 bytes where 2 would do
    ],
)
def test_a_length_not_in_its_shortest_form_is_taken_as_it_comes(head: bytes, length: int) -> None:
    stream = head + b"z" * length
    ours, theirs = both(stream, masked=False)
    assert ours == Outcome([Data(BINARY, True, b"z" * length)], "eof")
    assert theirs == Outcome([], f"violation {PROTOCOL_ERROR}")


def test_a_64_bit_length_with_the_top_bit_set_is_too_big() -> None:
    stream = bytes((0x82, 127)) + (1 << 63).to_bytes(8, "big")
    ours, theirs = both(stream, masked=False)
    assert ours == Outcome([], f"violation {MESSAGE_TOO_BIG}")
    assert theirs == Outcome([], f"violation {PROTOCOL_ERROR}")


def test_the_oracle_harness_sees_a_difference() -> None:
    """The comparison itself can fail: two streams that differ in one payload byte."""
    a = run_reader(encode(Spec(BINARY, b"abc")), [1, 1, 1, 1, 1], False, NO_LIMIT)
    b = run_wsproto(encode(Spec(BINARY, b"abd")), [5], False)
    assert a == Outcome([Data(BINARY, True, b"abc")], "eof")
    assert b == Outcome([Data(BINARY, True, b"abd")], "eof")
    assert a != b
