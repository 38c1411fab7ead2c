"""WebSocket frames (RFC 6455 section 5), as the relay needs them; no I/O here.

The relay does not reassemble messages: it reads each frame's header and passes the frame on
as it came, byte for byte (a client's frames stay masked with the client's key, which the
upstream accepts as well as any other key; an upstream's frames stay unmasked, as a client
expects). ``FrameReader.feed`` turns the bytes one leg sent into what to do with them:

- ``bytes``: a run of whole or partial frames to forward as they are (data frames, pings);
- ``Control``: a pong or a close frame, whole, for the relay to decide on (the answers to
  the gateway's own keepalive pings stay here; close codes are checked before they go on);
- ``Violation``: the leg broke the protocol (1002) or sent a message over the size limit
  (1009); the reader reads nothing more.

Extensions: the reserved bits a frame may carry are the agreed extensions' (``reserved_bits``).
With ``permessage-deflate`` (RFC 7692) RSV1 marks a compressed message on its first frame and
nowhere else; the payloads stay compressed through the relay, so sizes are compressed sizes.

A frame's payload streams through as it arrives, so a session holds no more than a header
and a control frame of its own, whatever the message size; only pongs and close frames are
held until they are whole (at most 131 bytes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA
_OPCODES: Final = frozenset({CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG})
PROTOCOL_ERROR: Final = 1002
MESSAGE_TOO_BIG: Final = 1009
MAX_CONTROL_PAYLOAD: Final = 125
MAX_REASON: Final = MAX_CONTROL_PAYLOAD - 2  # a close frame's reason, after its code
RSV1: Final = 0x40
RESERVED: Final = 0x70  # RSV1, RSV2, RSV3
DEFLATE: Final = "permessage-deflate"


@dataclass(frozen=True, slots=True)
class Control:
    """A whole pong or close frame: ``payload`` unmasked, ``raw`` the frame as it came."""

    opcode: int
    payload: bytes
    raw: bytes


@dataclass(frozen=True, slots=True)
class Violation:
    code: int  # PROTOCOL_ERROR or MESSAGE_TOO_BIG
    reason: str


Event = bytes | Control | Violation
CLOSE_INSIDE: Final = Violation(PROTOCOL_ERROR, "a close frame inside an unfinished frame")


def unmask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` repeated (masking and unmasking alike)."""
    n = len(payload)
    if not n:
        return payload
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def control_frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """A whole control frame (FIN set); ``masked`` for frames to an upstream."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError("a control frame carries at most 125 bytes")
    if not masked:
        return bytes((0x80 | opcode, len(payload))) + payload
    key = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + unmask(payload, key)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason[:MAX_REASON]


def parse_close(payload: bytes) -> tuple[int | None, bytes] | None:
    """(code, reason) of a close frame's payload: code None when it has none; None when the
    payload is malformed (one byte, a reason that is not UTF-8, or a code no endpoint may
    send, such as 1005, 1006 and 1015: so a code passed on is always one that may be sent)."""
    if not payload:
        return None, b""
    if len(payload) == 1:
        return None
    code = int.from_bytes(payload[:2], "big")
    if not (1000 <= code <= 4999) or code in (1004, 1005, 1006, 1015) or 1016 <= code < 3000:
        return None
    try:
        payload[2:].decode()  # a reason is UTF-8 text
    except UnicodeDecodeError:
        return None
    return code, payload[2:]


def extension_names(value: str | None) -> list[str]:
    """The extension names in a ``Sec-WebSocket-Extensions`` value (parameters left out)."""
    if not value:
        return []
    return [n for e in value.split(",") if (n := e.split(";", 1)[0].strip().lower())]


def reserved_bits(extensions: str | None) -> tuple[int, int]:
    """The reserved bits a session's frames may carry with the ``extensions`` the upstream
    accepted: (on the first frame of a data message, on any frame). ``permessage-deflate``
    sets RSV1 on first frames only; an extension the gateway does not know may use any bit
    anywhere (it cannot check what it does not know; nothing else is relaxed)."""
    names = set(extension_names(extensions))
    if not names:
        return 0, 0
    if names == {DEFLATE}:
        return RSV1, 0
    return RESERVED, RESERVED


def _header(data: bytes, pos: int, end: int) -> tuple[int, int, int] | None:
    """(payload length, header length, mask bit) of the frame at ``pos``; None when the
    header has not all arrived."""
    b1 = data[pos + 1]
    length = b1 & 0x7F
    head = 2
    if length == 126:
        head = 4
        if end - pos >= head:
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
    elif length == 127:
        head = 10
        if end - pos >= head:
            length = int.from_bytes(data[pos + 2 : pos + 10], "big")
    masked = b1 & 0x80
    if masked:
        head += 4
    return None if end - pos < head else (length, head, masked)


class FrameReader:
    """Reads one direction of a session: ``masked`` is what RFC 6455 requires of the frames
    that leg sends (a client's are masked, a server's are not)."""

    __slots__ = (
        "_fin",
        "_in_message",
        "_masked",
        "_max_message",
        "_message_size",
        "_pending",
        "_remaining",
        "_reserved_any",
        "_reserved_first",
        "done",
        "messages",
        "payload_bytes",
    )

    def __init__(
        self, *, masked: bool, max_message: int, reserved: tuple[int, int] = (0, 0)
    ) -> None:
        self._masked = 0x80 if masked else 0
        self._max_message = max_message
        self._reserved_first, self._reserved_any = reserved  # see ``reserved_bits``
        self._pending = b""  # an incomplete header, or an incomplete pong or close frame
        self._remaining = 0  # payload bytes of the current data frame still to come
        self._fin = 0  # the FIN bit of the data frame whose payload is still coming
        self._in_message = False  # a fragmented message has begun and not ended
        self._message_size = 0
        self.done = False  # after a close frame or a violation: nothing more is read
        self.messages = 0  # data messages whose last frame's header has been read
        self.payload_bytes = 0  # data payload bytes announced by the headers read

    @property
    def mid_frame(self) -> bool:
        """Whether part of a frame has been forwarded and the rest has not: nothing else
        may be written to the other leg until it has."""
        return self._remaining > 0

    def passed(self) -> tuple[int, int]:
        """(messages, payload bytes) that have been through the reader whole: a message
        counts once its last byte has been read, the frame in flight by what has come of it."""
        remaining = self._remaining
        in_flight = 1 if remaining and self._fin else 0
        return self.messages - in_flight, self.payload_bytes - remaining

    def feed(self, data: bytes) -> list[Event]:  # noqa: PLR0915 - the relay's hot path: one call per read, not two
        if self.done:
            return []
        if (
            data
            and data[0] == 0x88
            and (self._remaining or self._pending)
            and self._close_inside(data)
        ):
            self.done = True  # the leg gave up on its frame, and closes
            return [CLOSE_INSIDE]
        if self._pending:
            data, self._pending = self._pending + data, b""
        end = len(data)
        remaining = self._remaining
        if remaining >= end:  # all of it is the payload of the frame being forwarded
            self._remaining = remaining - end
            return [data] if end else []
        self._remaining = 0
        events: list[Event] = []
        start, pos = 0, remaining  # ``start``: where the run of bytes to forward begins
        while end - pos >= 2:
            header = _header(data, pos, end)
            if header is None:
                break
            length, head, masked = header
            b0 = data[pos]
            opcode = b0 & 0x0F
            problem = self._check(b0, opcode, length, masked)
            if problem is not None:
                if start < pos:
                    events.append(data[start:pos])
                events.append(problem)
                self.done = True
                return events
            frame_end = pos + head + length
            if opcode >= CLOSE:  # a control frame: 125 bytes at most, checked above
                if frame_end > end:
                    break  # held until it is whole
                if opcode == PING:
                    pos = frame_end  # forwarded as it is, in the run
                    continue
                payload = data[pos + head : frame_end]
                if masked:
                    payload = unmask(payload, data[pos + head - 4 : pos + head])
                if start < pos:
                    events.append(data[start:pos])
                events.append(Control(opcode, payload, data[pos:frame_end]))
                pos = start = frame_end
                if opcode == CLOSE:
                    self.done = True  # nothing may follow a close frame
                    return events
                continue
            self._count(b0, length)
            if frame_end > end:  # the payload streams through with the next reads
                self._remaining = frame_end - end
                self._fin = b0 & 0x80  # (only such a frame's FIN is ever asked for)
                pos = end
                break
            pos = frame_end
        if pos < end:
            self._pending = data[pos:]  # at most a header or a control frame
        if start < pos:
            events.append(data[start:pos])
        return events

    def _count(self, b0: int, length: int) -> None:
        self.payload_bytes += length
        if b0 & 0x80:  # FIN: the message ends with this frame
            self._in_message = False
            self.messages += 1
        else:
            self._in_message = True

    def _close_inside(self, data: bytes) -> bool:
        """Whether ``data``, a read that began inside an unfinished frame (its payload, a
        held control frame or a header), is exactly one well-formed close frame from this
        leg that cannot finish that frame. By the bytes alone those are the frame's; but a
        peer whose frame had more to come does not stop on a read boundary with a valid
        close frame unless it closes. (A read that finishes the frame, or a close that comes
        in the same read as the frame's last bytes, cannot be told from payload, and is read
        as payload; a read that continues a header split between reads is that header's.)"""
        pending = self._pending
        if len(data) < 2:
            return False
        if pending:
            held = _header(pending, 0, len(pending)) if len(pending) >= 2 else None
            if held is None:
                return False
            outstanding = held[0] + held[1] - len(pending)  # the held frame's bytes to come
        else:
            outstanding = self._remaining
        if len(data) >= outstanding:  # these bytes can finish the frame: they are its own
            return False
        b1 = data[1]
        length, masked = b1 & 0x7F, b1 & 0x80
        head = 6 if masked else 2
        if masked != self._masked or length > MAX_CONTROL_PAYLOAD or len(data) != head + length:
            return False
        payload = data[head:]
        if masked:
            payload = unmask(payload, data[2:6])
        return parse_close(payload) is not None

    def _check(self, b0: int, opcode: int, length: int, masked: int) -> Violation | None:
        """Whether a frame with this header may be passed on; data frames also count here
        toward their message's size."""
        if b0 & 0x70 and b0 & 0x70 & ~(  # RESERVED, as a literal: this runs for every frame
            self._reserved_first if 0 < opcode < 3 else self._reserved_any  # TEXT, BINARY
        ):
            return Violation(PROTOCOL_ERROR, "reserved bits set that no agreed extension allows")
        if opcode not in _OPCODES:
            return Violation(PROTOCOL_ERROR, "unknown opcode")
        if masked != self._masked:
            return Violation(PROTOCOL_ERROR, "masked wrongly for its direction")
        if opcode >= CLOSE:
            if not b0 & 0x80 or length > MAX_CONTROL_PAYLOAD:
                return Violation(PROTOCOL_ERROR, "fragmented or oversized control frame")
            return None
        if (opcode == CONTINUATION) != self._in_message:
            return Violation(PROTOCOL_ERROR, "continuation frame out of place")
        size = length + (self._message_size if opcode == CONTINUATION else 0)
        if size > self._max_message:
            return Violation(MESSAGE_TOO_BIG, "message too big")
        self._message_size = size
        return None
