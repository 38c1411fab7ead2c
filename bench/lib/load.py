"""The load generators: wrk, bench/pyloadgen.py (its stand-in), bench/wsclient.py (the
WebSocket client) and bench/flooder.py (the flood's attackers): their command lines and the
parsers of what they print."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from . import process
from .tools import BENCH_DIR, PYTHON

# -- what a load generator measured --------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """One row of wrk's "Thread Stats": average, standard deviation, maximum, and the share of
    the samples within one standard deviation of the average (None when wrk printed -nan%)."""

    avg: float
    stdev: float
    max: float
    within_stdev_pct: float | None


@dataclass(frozen=True)
class Load:
    """One load run: what every harness reads. wrk's own extras are None for pyloadgen."""

    requests: int
    seconds: float
    rps: float
    percentiles_ms: dict[int, float]  # {50: ms, 75: ..., 90: ..., 99: ...}; {} without --latency
    non2xx: int
    socket_errors: dict[str, int]  # connect, read, write, timeout
    threads: int | None = None
    connections: int | None = None
    latency_ms: Spread | None = None  # per request, over all threads
    thread_rps: Spread | None = None  # requests per second of one thread, sampled every 100 ms
    read_bytes: float | None = None
    transfer_bytes_per_s: float | None = None

    def percentile(self, q: int) -> float:
        """The ``q``th latency percentile in ms (ValueError if the run printed none)."""
        if q not in self.percentiles_ms:
            raise ValueError(f"no p{q} latency: wrk prints percentiles only with --latency")
        return self.percentiles_ms[q]

    @property
    def p50_ms(self) -> float:
        return self.percentile(50)

    @property
    def p99_ms(self) -> float:
        return self.percentile(99)


@dataclass
class Figures:
    """What the harnesses' runs record of a Load: the first fields of a harness's Run (a
    subclass), or ``Run(**vars(figures(done)), ...)``."""

    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int  # all kinds together


def figures(done: Load) -> Figures:
    return Figures(
        rps=done.rps,
        requests=done.requests,
        p50_ms=done.p50_ms,
        p99_ms=done.p99_ms,
        non2xx=done.non2xx,
        socket_errors=sum(done.socket_errors.values()),
    )


# -- wrk -----------------------------------------------------------------------------------

_SOCKET_ERRORS: Final = ("connect", "read", "write", "timeout")
# wrk's units (src/units.c): times in us, ms, s and m (its "h" is never reached); sizes in
# binary units (1024) with a B after them; counts in metric units (1000). A unit is used from
# 0.85 of it on: 900 requests per second print as 0.90k, 983 bytes as 0.96KB.
_TIME_MS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_BINARY: Final = {
    "": 1.0,
    "K": 1024.0,
    "M": 1024.0**2,
    "G": 1024.0**3,
    "T": 1024.0**4,
    "P": 1024.0**5,
}
_METRIC: Final = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_NUMBER: Final = r"(\d+(?:\.\d+)?)"


def _scaled(text: str, units: dict[str, float], what: str, suffix: str = "") -> float:
    alternatives = "|".join(sorted(units, key=len, reverse=True))  # "ms" before "m"
    match = re.fullmatch(rf"{_NUMBER}({alternatives}){suffix}", text)
    if match is None:
        raise ValueError(f"not a wrk {what}: {text!r}")
    return float(match.group(1)) * units[match.group(2)]


def wrk_ms(text: str) -> float:
    """A wrk duration (``285.00us``, ``1.25s``, ``1.02m``) in milliseconds."""
    return _scaled(text, _TIME_MS, "duration")


def wrk_bytes(text: str) -> float:
    """A wrk size (``46.34MB``, ``0.00B``) in bytes."""
    return _scaled(text, _BINARY, "size", "B")


def wrk_count(text: str) -> float:
    """A wrk rate (``140.92k``, ``4.41``) as a number."""
    return _scaled(text, _METRIC, "number")


def _spread(match: re.Match[str] | None, unit: Callable[[str], float]) -> Spread | None:
    if match is None:
        return None
    avg, stdev, top, within = match.groups()
    return Spread(unit(avg), unit(stdev), unit(top), None if "nan" in within else float(within))


def parse_wrk(output: str) -> Load:
    """wrk 4's summary (with or without ``--latency``; lines a Lua ``done()`` adds are
    ignored): ValueError when a line every run prints is missing."""

    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output without /{pattern}/:\n{output}")
        return match

    def stats(row: str) -> re.Match[str] | None:
        return re.search(rf"^\s+{row}\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)%\s*$", output, re.MULTILINE)

    done = find(r"^\s*(\d+) requests in (\S+), (\S+) read$")
    setup = re.search(r"^\s*(\d+) threads and (\d+) connections$", output, re.MULTILINE)
    errors = re.search(
        r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)$",
        output,
        re.MULTILINE,
    )
    non2xx = re.search(r"^\s*Non-2xx or 3xx responses: (\d+)$", output, re.MULTILINE)
    percentiles = re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", output, re.MULTILINE)
    return Load(
        requests=int(done.group(1)),
        seconds=wrk_ms(done.group(2)) / 1000,
        rps=float(find(r"^Requests/sec:\s+(\d+(?:\.\d+)?)$").group(1)),
        percentiles_ms={int(q): wrk_ms(value) for q, value in percentiles},
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=dict(
            zip(_SOCKET_ERRORS, map(int, errors.groups()) if errors else (0,) * 4, strict=True)
        ),
        threads=int(setup.group(1)) if setup else None,
        connections=int(setup.group(2)) if setup else None,
        latency_ms=_spread(stats("Latency"), wrk_ms),
        thread_rps=_spread(stats(r"Req/Sec"), wrk_count),
        read_bytes=wrk_bytes(done.group(3)),
        transfer_bytes_per_s=wrk_bytes(find(r"^Transfer/sec:\s+(\S+)$").group(1)),
    )


def wrk_command(
    wrk: str,
    url: str,
    conns: int,
    seconds: int,
    *,
    script: Path | None = None,
    pin: list[str] | None = None,
    headers: Sequence[str] = (),
) -> list[str]:
    """``wrk -t1 -cN -dDs --latency`` (one thread: one load CPU), with a Lua script and
    request headers (``-H "Connection: close"``: a new connection per request) if given."""
    command = [*(pin or []), wrk, "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    command += [arg for header in headers for arg in ("-H", header)]
    return command + (["-s", str(script)] if script is not None else []) + [url]


# -- pyloadgen -----------------------------------------------------------------------------


def parse_pyloadgen(output: str) -> Load:
    """The JSON line ``pyloadgen.py load`` prints last (its latencies are NaN without answers)."""
    data = json.loads(output.strip().splitlines()[-1])
    return Load(
        requests=data["requests"],
        seconds=data["seconds"],
        rps=data["rps"],
        percentiles_ms={q: data[f"p{q}_ms"] for q in (50, 75, 90, 99)},
        non2xx=data["non2xx"],
        socket_errors=data["errors"],
    )


def pyloadgen_command(port: int, path: str, conns: int, seconds: int) -> list[str]:
    return [
        sys.executable, str(BENCH_DIR / "pyloadgen.py"), "load", "--port", str(port),
        "--path", path, "--conns", str(conns), "--duration", str(seconds),
    ]  # fmt: skip


def pyloadgen_backend(port: int) -> list[str]:
    """pyloadgen's stand-in for the nginx backend: 200 {"ok":true} on 127.0.0.1:``port``."""
    return [sys.executable, str(BENCH_DIR / "pyloadgen.py"), "backend", "--port", str(port)]


# -- wsclient: JSON lines ------------------------------------------------------------------

Event = dict[str, Any]


def parse_event(line: bytes | str) -> Event:
    """One line of bench/wsclient.py: a JSON object with an ``event``; ValueError otherwise."""
    record = json.loads(line)
    if isinstance(record, dict) and isinstance(record.get("event"), str):
        return record
    raise ValueError(f"not a wsclient event: {line!r}")


def split_events(buffer: bytes) -> tuple[list[Event], bytes]:
    """The complete lines at the start of ``buffer`` as events, and the incomplete rest."""
    *lines, rest = buffer.split(b"\n")
    return [parse_event(line) for line in lines if line.strip()], rest


def parse_events(output: str) -> list[Event]:
    """Every event a finished wsclient.py printed."""
    return [parse_event(line) for line in output.splitlines() if line.strip()]


@dataclass(frozen=True)
class Echo:
    """An ``echo`` run: its ``stop`` line (the measuring window) and its ``closed`` line."""

    echoed: int  # echoes counted in the window
    seconds: float  # the window, exactly
    cpu_seconds: float  # the client's CPU time in the window
    errors: int  # sessions that ended early (by error) or did not drain after the window

    @property
    def rate(self) -> float:
        return self.echoed / self.seconds


def parse_echo(stop: Event, closed: Event) -> Echo:
    return Echo(
        echoed=int(stop["echoed"]),
        seconds=float(stop["seconds"]),
        cpu_seconds=float(stop["cpu_seconds"]),
        errors=sum(closed["errors"].values()) + int(closed["undrained"]),
    )


@dataclass(frozen=True)
class Opened:
    """A ``hold`` client's answer to ``open N``."""

    opened: int
    failed: int
    seconds: float
    failures: dict[str, int]  # handshake errors by kind (all so far)


def parse_opened(record: Event) -> Opened:
    return Opened(
        opened=int(record["opened"]),
        failed=int(record["failed"]),
        seconds=float(record["seconds"]),
        failures=dict(record["failures"]),
    )


def wsclient_command(tag: Path, args: list[str], pin: list[str] | None = None) -> list[str]:
    """bench/wsclient.py with ``args`` (``echo URL ...`` or ``hold URL ...``); ``tag`` marks it
    for pgrep."""
    script = str(BENCH_DIR / "wsclient.py")
    return [*(pin or []), PYTHON, script, "--tag", str(tag), *args]


LINE_TIMEOUT: Final = 30.0


class WsClient:
    """A running bench/wsclient.py: commands in on stdin, events out; stdout is read without
    threads (select + os.read), its stderr goes to a file."""

    def __init__(self, command: list[str], stderr: Path, *, stdin: bool) -> None:
        self.stderr = stderr
        with stderr.open("w") as err:
            self.proc = process.spawn(
                command,
                stdin=subprocess.PIPE if stdin else None,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self._buffer = b""
        self._events: list[Event] = []

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None  # noqa: S101 - started with stdin=PIPE
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float = LINE_TIMEOUT) -> Event:
        """The next event named ``event`` (earlier ones are skipped); RuntimeError on an
        ``error`` event, when the client exits first or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            record = self._next(deadline, event)
            if record["event"] == "error":
                raise RuntimeError(f"client error: {record}")
            if record["event"] == event:
                return record

    def _next(self, deadline: float, waiting_for: str) -> Event:
        assert self.proc.stdout is not None  # noqa: S101 - started with stdout=PIPE
        fd = self.proc.stdout.fileno()
        while not self._events:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"client: no {waiting_for!r} in time\n{self.tail()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait(5)
                raise RuntimeError(
                    f"client exited ({self.proc.returncode}) before {waiting_for!r}\n{self.tail()}"
                )
            events, self._buffer = split_events(self._buffer + chunk)
            self._events.extend(events)
        return self._events.pop(0)

    def tail(self, lines: int = 12) -> str:
        return process.tail(self.stderr, lines)

    def finish(self, timeout: float = 15.0) -> None:
        """Let the client end by itself (``timeout`` seconds at most), then stop it and close
        the pipes to it."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        process.stop(self.proc)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):  # stdin: a write may still be buffered
                    pipe.close()


# -- flooder: its counts -------------------------------------------------------------------


@dataclass(frozen=True)
class Flooded:
    """What bench/flooder.py says (its ``opened``, ``stats`` or ``closed`` line): connections
    open now and opened so far by kind (``idle``, ``partial``, ``slow``), failed connects, the
    connections the server closed or answered (by kind; answers by status), body bytes sent."""

    open: dict[str, int]
    opened: dict[str, int]
    connect_failed: dict[str, int]
    closed_by_server: dict[str, int]
    answered: dict[str, int]
    body_bytes: int
    sources: tuple[str, str, int]  # first and last source address, how many
    seconds: float
    cpu_seconds: float

    @property
    def open_total(self) -> int:
        return sum(self.open.values())

    @property
    def reopened(self) -> int:
        """Connections the server closed (each is opened again while the flood lasts)."""
        return sum(self.closed_by_server.values())


def parse_flooder(record: Event) -> Flooded:
    first, last, count = record["sources"]
    return Flooded(
        open={k: int(v) for k, v in record["open"].items()},
        opened={k: int(v) for k, v in record["opened"].items()},
        connect_failed={k: int(v) for k, v in record["connect_failed"].items()},
        closed_by_server={k: int(v) for k, v in record["closed_by_server"].items()},
        answered={k: int(v) for k, v in record["answered"].items()},
        body_bytes=int(record["body_bytes"]),
        sources=(str(first), str(last), int(count)),
        seconds=float(record["seconds"]),
        cpu_seconds=float(record["cpu_seconds"]),
    )


def flooder_command(
    port: int,
    idle: int,
    slow: int,
    interval: float,
    *,
    slow_path: str,
    pin: list[str] | None = None,
) -> list[str]:
    """bench/flooder.py against 127.0.0.1:``port`` (commands on stdin: ``stats``, ``stop``)."""
    return [
        *(pin or []), PYTHON, str(BENCH_DIR / "flooder.py"), "--port", str(port),
        "--idle", str(idle), "--slow", str(slow), "--interval", str(interval),
        "--slow-path", slow_path,
    ]  # fmt: skip
