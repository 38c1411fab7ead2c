"""JSON log lines in the node standards' format, and the request id.

Every line is one JSON object: ``timestamp`` (UTC), ``level``, ``service`` ("gateway"),
``message``, ``request_id`` (when a request is being handled), plus the fields the caller
passes as ``extra={"fields": {...}}``. Tracebacks appear only for the gateway's own bugs
(``logger.exception``), folded into the same line; client-caused errors never log one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import sys
import threading
import time
import traceback
from contextvars import ContextVar
from typing import Any, Final, TextIO

import orjson

SERVICE: Final = "gateway"
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

# An incoming X-Request-ID is kept when it is this short and this plain, so that it cannot
# inject anything into logs or headers downstream.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:@+/=-]{1,128}")


def request_id_from(header: str | None) -> str:
    if header is not None and _SAFE_ID.fullmatch(header):
        return header
    return new_request_id()


class _Ids:
    prefix = os.urandom(8).hex()  # this process's; the counter makes each id unique
    counter = itertools.count()

    @classmethod
    def renew(cls) -> None:
        """A forked worker (``serve --workers``) must not repeat its parent's ids."""
        cls.prefix, cls.counter = os.urandom(8).hex(), itertools.count()


os.register_at_fork(after_in_child=_Ids.renew)


def new_request_id() -> str:
    """32 hex digits, unique across processes and restarts (not a secret)."""
    return f"{_Ids.prefix}{next(_Ids.counter):016x}"


_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))


class _Clock:
    """Formats UTC timestamps, reusing the seconds part within the same second (and the
    milliseconds' text from a table: a request's line is formatted at every request)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def format(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._prefix + _MILLIS[int((created - second) * 1000)]


def _line(clock: _Clock, created: float, level: str, message: str) -> dict[str, Any]:
    """The fields every line starts with, in the standards' order (and the request id)."""
    line: dict[str, Any] = {
        "timestamp": clock.format(created),
        "level": level,
        "service": SERVICE,
        "message": message,
    }
    request_id = REQUEST_ID.get()
    if request_id is not None:
        line["request_id"] = request_id
    return line


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        line = _line(self._clock, record.created, record.levelname, record.getMessage())
        if record.name != "gateway" and not record.name.startswith("gateway."):
            line["logger"] = record.name
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line["error"] = f"{type(exc).__name__}: {exc}"
            line["traceback"] = "".join(traceback.format_exception(exc))
        return _dumps(line)


def _dumps(line: dict[str, object]) -> str:
    """One JSON line. Text a client chose (a token's ``sub``, a path) may hold what is not
    UTF-8 (a lone surrogate, which JSON parsers accept in ``\\udc80`` escapes): it is
    written as the escape's text, so that the line is never lost to it."""
    try:
        return orjson.dumps(line, default=str).decode()
    except TypeError:
        return orjson.dumps(_encodable(line), default=str).decode()


def _encodable(value: object) -> object:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_text(str(k)): _encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    return value


def _text(value: str) -> str:
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


_ATOMIC_WRITE: Final = 4000  # characters: under PIPE_BUF bytes for ASCII lines


class LineWriter:
    """Writes lines to a text stream once per event-loop iteration: one ``write`` for all the
    lines of an iteration instead of a system call per line. Outside a running loop (or from
    another thread with no flush pending) lines are written at once."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def write(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
            if self._scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            self._scheduled = loop is not None
        if loop is None:
            self.flush()
        else:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
            self._scheduled = False
        # Several worker processes may share the stream (a pipe): a write of at most
        # PIPE_BUF (4096) bytes is never interleaved with another's, so lines go in such
        # chunks (a single line longer than that is written alone).
        chunk: list[str] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) + 1 > _ATOMIC_WRITE:
                self._write(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1
        if chunk:
            self._write(chunk)

    def _write(self, lines: list[str]) -> None:
        self._stream.write("\n".join(lines) + "\n")
        self._stream.flush()


class JsonHandler(logging.Handler):
    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the caller
            self.handleError(record)

    def flush(self) -> None:
        self.writer.flush()


class _Access:
    """The request line's fast path: no LogRecord, straight to the shared writer."""

    writer: LineWriter | None = None
    enabled = True
    clock = _Clock()


def access_enabled() -> bool:
    return _Access.enabled


def access(message: str, fields: dict[str, object]) -> None:
    """One INFO line from ``gateway.access`` with ``fields`` (and the request id)."""
    writer = _Access.writer
    if writer is None:  # logging not set up by setup_logging: the ordinary way
        logging.getLogger("gateway.access").info(message, extra={"fields": fields})
        return
    line = _line(_Access.clock, time.time(), "INFO", message)
    line.update(fields)
    writer.write(_dumps(line))


def flush() -> None:
    if _Access.writer is not None:
        _Access.writer.flush()


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route every logger (ours, aiohttp's, asyncio's) to JSON lines on ``stream``."""
    writer = LineWriter(stream or sys.stdout)
    root = logging.getLogger()
    root.handlers[:] = [JsonHandler(writer)]
    root.setLevel(level.upper())
    # aiohttp's access log is replaced by the gateway's own request line.
    logging.getLogger("aiohttp.access").disabled = True
    # Nothing in our line format uses these, and looking them up costs on every record.
    logging._srcfile = None  # the documented way to skip findCaller
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    _Access.writer = writer
    _Access.enabled = logging.getLogger("gateway.access").isEnabledFor(logging.INFO)


def redacted(url: str) -> str:
    """A URL as a log line or ``check`` shows it: its password and query (either may hold a
    secret: ``https://user:key@idp/jwks``, ``?api_key=``) replaced by ``***``. A path (a file)
    is shown as it is."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, question, _ = rest.partition("?")
    authority, slash, path = rest.partition("/")
    _, at, host = authority.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}{slash}{path}{'?***' if question else ''}"
