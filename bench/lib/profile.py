"""Where a gateway's time goes: py-spy samples of the running process (``record``), summed up
by part (aiohttp's client and server, the gateway's code, logging, metrics, the rate limiter's
Redis client, socket writes, the event loop) and by function (``summarize``).

py-spy samples the Python stacks of a process from outside, stopping it for each sample (its
default; ``--nonblocking`` leaves it running but tears stacks: callers from one moment under a
leaf from another). At 100 samples per second that costs the gateway a few % of its speed (the
harness reports the sampled run beside one alone; the VM's noise is often bigger). It sees no
C frames (``--native`` would, at ~40 %): time in C is charged to the Python line that called
it. That is how socket writes are found (the sampled line of the innermost frame calls a
``.write(``, ``.writelines(`` or ``.sendall(``), and a sample with no frame below the event
loop's runner is the loop's own C code (uvloop: epoll, recv, callbacks; the C HTTP parsers).
Samples are taken while the process is not idle in epoll: with the backend on its CPU this
includes time it waited to be scheduled, mostly right after a write that woke another process,
so writes are overstated; /proc's CPU time per request is exact."""

from __future__ import annotations

import linecache
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from . import process

RATE: Final = 100  # samples per second


def record_command(pyspy: str, pid: int, out: Path, rate: int = RATE) -> list[str]:
    """py-spy recording ``pid`` and its children (``serve`` runs its workers as child
    processes: ``python -m gateway worker``) until SIGINT, raw (collapsed stacks with line
    numbers and full file names) to ``out``."""
    return [
        pyspy, "record", "--pid", str(pid), "--subprocesses", "--rate", str(rate),
        "--format", "raw", "--full-filenames", "--output", str(out),
    ]  # fmt: skip


def finish(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int | None:
    """Stop a py-spy record (SIGINT: it writes its file and exits); its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            process.stop(proc)
    return proc.returncode


# -- reading the samples -------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    function: str
    file: str  # as py-spy printed it (full with --full-filenames)
    line: int | None

    @property
    def short_file(self) -> str:
        return short(self.file)

    @property
    def name(self) -> str:
        return f"{self.function} ({self.short_file})"


def short(file: str) -> str:
    """A file name without its installation prefix: ``aiohttp/client.py``,
    ``gateway/upstream/http.py``, ``logging/__init__.py``."""
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in file:
            return file.rsplit(marker, 1)[1]
    if (match := re.search(r"/(gateway/.*)$", file)) is not None:
        return match.group(1)
    if (match := re.search(r"/python3(?:\.\d+)?/(.*)$", file)) is not None:
        return match.group(1)
    return file


def parse_frame(text: str) -> Frame:
    """``func (path/file.py:12)`` as a Frame (a frame py-spy could not name keeps its text)."""
    match = re.fullmatch(r"(.*) \((.*?)(?::(\d+))?\)", text)
    if match is None:
        return Frame(text, "", None)
    line = match.group(3)
    return Frame(match.group(1), match.group(2), int(line) if line else None)


def parse_raw(text: str) -> list[tuple[list[Frame], int]]:
    """py-spy's raw format: a stack per line, root first, frames joined by ``;``, then the
    count. The thread's frame py-spy puts first (``process 12:"python"``, ``thread (0x..)``)
    is left out."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [parse_frame(f) for f in stack.split(";")]
        frames = [f for f in frames if f.file or not f.function.startswith(("process ", "thread "))]
        stacks.append((frames, int(count)))
    return stacks


# -- the parts -----------------------------------------------------------------------------

LOGGING: Final = "logging (stdlib logging, gateway/logs.py)"
METRICS: Final = "metrics (prometheus_client, gateway/metrics.py)"
REDIS: Final = "rate limiter and its Redis client (gateway/ratelimit/)"
TRACING: Final = "tracing (gateway/tracing/)"
WRITES_UP: Final = "socket writes to the upstream by aiohttp's client (transport.write, kernel)"
WRITES_DOWN: Final = "socket writes to the client by aiohttp's server (transport.write, kernel)"
WRITES: Final = "socket writes by gateway code (transport.write, kernel)"
CLIENT: Final = "aiohttp client (ClientSession, connector, ClientResponse)"
SERVER: Final = "aiohttp server (web_protocol, web_request, web_response)"
GATEWAY: Final = "gateway code (gateway/, not the above)"
LOOP: Final = "event loop's C code (uvloop: epoll, recv, callbacks; C HTTP parsers)"
OTHER: Final = "other (asyncio, aiohttp helpers, stdlib) outside the above"
PARTS: Final = (
    LOGGING, METRICS, REDIS, TRACING, WRITES_UP, WRITES_DOWN, WRITES, CLIENT, SERVER, GATEWAY,
    LOOP, OTHER,
)  # fmt: skip

# A feature's whole cost: any frame of the stack in these files.
_FEATURES: Final = (
    (LOGGING, ("logging/", "gateway/logs.py")),
    (METRICS, ("prometheus_client/", "gateway/metrics.py")),
    (REDIS, ("gateway/ratelimit/", "redis/")),
    (TRACING, ("gateway/tracing/", "opentelemetry/")),
)
# A transport's or socket's write (not ``client.send(...)``, nor an awaited ``.write(``: a
# coroutine, whose own frame would be the innermost).
_WRITE_CALL: Final = re.compile(
    r"(?<!await )\b[\w.]+\.(?:write|writelines|sendall|sendmsg|sendto|sendfile)\("
    r"|\bsock\w*\.send\("
)
_CLIENT_FILES: Final = ("aiohttp/client", "aiohttp/connector.py")
_LOOP_FILES: Final = ("asyncio/runners.py", "asyncio/base_events.py", "uvloop/__init__.py")


def _starts(file: str, prefixes: Sequence[str]) -> bool:
    return any(file.startswith(prefix) for prefix in prefixes)


def _writes(frame: Frame) -> bool:
    """Whether the frame's sampled line calls a socket or transport write."""
    if frame.line is None or not frame.file.startswith("/"):
        return False
    return _WRITE_CALL.search(linecache.getline(frame.file, frame.line)) is not None


def work(frames: Sequence[Frame]) -> Sequence[Frame]:
    """The frames of a sample below the event loop (a task's or callback's), without the ones
    that start the process and run the loop (the runner, ``gateway/cli.py``'s ``main``);
    empty when the loop itself was running (its C code: epoll, recv, callbacks)."""
    last = max(
        (i for i, f in enumerate(frames) if _starts(f.short_file, _LOOP_FILES)), default=None
    )
    return frames if last is None else frames[last + 1 :]


def part(frames: Sequence[Frame]) -> str:
    """The part a sample's time belongs to (one of PARTS): a feature if any of its frames
    below the loop is in it; else the innermost frame that is the gateway's, aiohttp's client
    or server code decides: its code, or its socket writes when the innermost frame's line
    writes; the loop's C code when no frame is below the loop."""
    frames = work(frames)
    if not frames:
        return LOOP
    files = [f.short_file for f in frames]
    for name, prefixes in _FEATURES:
        if any(_starts(file, prefixes) for file in files):
            return name
    writes = _writes(frames[-1])
    for file in reversed(files):
        if file.startswith("gateway/"):
            return WRITES if writes else GATEWAY
        if _starts(file, _CLIENT_FILES):
            return WRITES_UP if writes else CLIENT
        if file.startswith(("aiohttp/web", "aiohttp/base_protocol.py")):
            return WRITES_DOWN if writes else SERVER
    return WRITES if writes else OTHER


def _module(frame: Frame) -> str:
    file = frame.short_file
    return "(event loop's C code)" if _starts(file, _LOOP_FILES) else file


def summarize(
    stacks: list[tuple[list[Frame], int]], us_per_request: float | None = None, top: int = 15
) -> list[str]:
    """The profile's summary: shares by part (each sample in one; with ``us_per_request``,
    the gateway's CPU per request, also as us per request), then by module and by function
    of the innermost frame (self time), and the gateway's and aiohttp's functions with
    everything they called (inclusive)."""
    total = sum(count for _, count in stacks)
    if not total:
        return ["py-spy recorded no samples"]
    parts: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        parts[part(frames)] += count
        if frames:
            modules[_module(frames[-1])] += count
            leaves[frames[-1].name] += count
        below = work(frames)
        for name in {f.name for f in below if f.short_file.startswith(("gateway/", "aiohttp/"))}:
            inclusive[name] += count

    def share(counter: Counter[str], n: int | None = None, per_request: bool = False) -> list[str]:
        lines = []
        for name, count in counter.most_common(n):
            fraction = count / total
            us = f"  {fraction * (us_per_request or 0):6.0f} us/req" if per_request else ""
            lines.append(f"    {100 * fraction:5.1f} %{us}  {name}")
        return lines

    per = us_per_request is not None
    return [
        f"{total} samples. By part (each sample counted once, in the first part that holds it"
        + (f"; us per request: the share of the {us_per_request:.0f} us /proc measured" if per
           else "")
        + "):",
        *share(Counter({p: parts[p] for p in PARTS if parts[p]}), per_request=per),
        "  Self time by module (innermost frame):",
        *share(modules, top),
        "  Self time by function (innermost frame):",
        *share(leaves, top),
        "  Inclusive (the function and all it called), gateway and aiohttp functions:",
        *share(inclusive, top),
    ]  # fmt: skip
