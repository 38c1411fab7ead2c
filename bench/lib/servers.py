"""The servers under test: nginx and gateway command lines, a work directory for their configs
and logs, starting them pinned and stopping every one, and asking them things over HTTP
(status, JSON, /metrics) and through their logs."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from . import process
from .process import LOOPBACK, Layout, Server
from .tools import GATEWAY, Tools

# -- nginx ---------------------------------------------------------------------------------

NGINX_MAIN: Final = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{body}
}}
"""


# The benches' backend: one worker answering ``{"ok":true}`` to any path (bench/run.py's).
NGINX_BACKEND: Final = """\
    server {
        listen 127.0.0.1:%(port)d backlog=1024;
        default_type application/json;
        location / { return 200 '{"ok":true}'; }
    }"""

# nginx as the reverse proxy the gateway is compared with (bench/run.py's): upstream keepalive,
# HTTP/1.1 upstream, X-Forwarded-For; ``/api/bench/X`` goes to ``/X`` on the backend.
# Request bodies as the gateway takes them: up to 100 MiB (its client_max_body_size default),
# held in memory up to 64 KiB (its REPLAY_LIMIT) and passed on as they arrive
# (proxy_request_buffering off): nginx never writes one to a temporary file, which the gateway
# never does either. (The gateway reads a body of up to 64 KiB whole before sending it; nginx
# sends what it has read, which for a body that comes with its head is the same one write.)
NGINX_UPSTREAM: Final = """\
    upstream backend {
        server 127.0.0.1:%(backend)d;
        keepalive 256;
    }"""
NGINX_PROXY_LOCATION: Final = """\
        location /api/bench/ {
            proxy_pass http://backend/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            client_max_body_size 100m;
            client_body_buffer_size 64k;
            proxy_request_buffering off;
        }"""
NGINX_PROXY: Final = f"""\
{NGINX_UPSTREAM}
    server {{
        listen 127.0.0.1:%(port)d backlog=1024;
{NGINX_PROXY_LOCATION}
    }}"""


def nginx_command(nginx: str, home: Path, body: str) -> list[str]:
    """Write ``home``/nginx.conf (one worker, in the foreground, everything under ``home``)
    with ``body`` (server blocks) in its http block; the command that runs it."""
    home.mkdir(exist_ok=True)
    conf = home / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(dir=home, body=body))
    return [nginx, "-p", str(home), "-c", str(conf), "-e", str(home / "error.log")]


# -- the gateway ---------------------------------------------------------------------------


def gateway_command(
    config: Path,
    port: int,
    log_level: str,
    *,
    host: str = LOOPBACK,
    workers: int | None = None,
    program: str | None = None,
) -> list[str]:
    """``daarion-gateway serve`` of ``config`` on ``host:port`` (``program``: another build's
    ``daarion-gateway`` instead of this checkout's)."""
    command = [program or GATEWAY, "serve", "--config", str(config)]
    command += ["--host", host, "--port", str(port)]
    command += ["--log-level", log_level]
    return command + (["--workers", str(workers)] if workers is not None else [])


def check_config(path: Path) -> str:
    """``daarion-gateway check`` of a config the harness wrote: its summary, or RuntimeError."""
    out = subprocess.run(
        [GATEWAY, "check", "--config", str(path)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"config rejected:\n{out.stdout}{out.stderr}")
    return out.stdout.strip()


WARNING_LEVELS: Final = ("WARNING", "ERROR", "CRITICAL")


def count_warnings(log: Path, offset: int = 0) -> int:
    """WARNING and worse lines of a gateway's JSON log after ``offset`` bytes."""
    with contextlib.suppress(OSError), log.open("rb") as lines:
        lines.seek(offset)
        text = lines.read()
        return sum(text.count(f'"level":"{level}"'.encode()) for level in WARNING_LEVELS)
    return 0


def warning_messages(log: Path) -> dict[str, int]:
    """A gateway's WARNING and worse log messages and how often each came (e.g. ``WARNING:
    redis unavailable: rate limits fall back``: a run then measured the fallback)."""
    counts: dict[str, int] = {}
    with log.open("rb") as lines:
        for line in lines:
            if b'"level":"INFO"' in line or b'"level":"DEBUG"' in line:
                continue  # the request lines: skip them without parsing
            with contextlib.suppress(ValueError, AttributeError):
                record = json.loads(line)
                message = f"{record['level']}: {record['message']}"
                counts[message] = counts.get(message, 0) + 1
    return counts


# -- asking over HTTP ----------------------------------------------------------------------


def get_over(
    sock: socket.socket, path: str, host: str = LOOPBACK, headers: Sequence[str] = ()
) -> bytes:
    """``GET path`` with ``Connection: close`` (and ``headers``, "Name: value" lines) on a
    connected socket (plain or TLS): the whole answer, up to the server's close (what came
    before an error, if one comes)."""
    return request_over(sock, "GET", path, host=host, headers=headers)


def request_over(
    sock: socket.socket,
    method: str,
    path: str,
    *,
    host: str = LOOPBACK,
    headers: Sequence[str] = (),
    body: bytes | None = None,
) -> bytes:
    """``method path`` with ``Connection: close``, ``headers`` and ``body`` (sent with its
    Content-Length) on a connected socket: the whole answer, up to the server's close."""
    extra = "".join(f"{header}\r\n" for header in headers)
    if body is not None:
        extra += f"Content-Length: {len(body)}\r\n"
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    chunks = []
    with contextlib.suppress(OSError):
        sock.sendall(head.encode() + (body or b""))
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split_answer(answer: bytes) -> tuple[int | None, bytes, bytes]:
    """An HTTP/1 answer as (status, head, body); (None, b"", b"") if it is not one."""
    head, _, body = answer.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(match.group(1)), head, body) if match else (None, b"", b"")


def header_values(head: bytes, name: str) -> list[str]:
    """The values of header ``name`` (any case) in an answer's head (its status line first),
    in order; [] when it has none."""
    wanted = name.lower().encode()
    values = []
    for line in head.split(b"\r\n")[1:]:
        field, sep, value = line.partition(b":")
        if sep and field.strip().lower() == wanted:
            values.append(value.strip().decode("latin-1"))
    return values


def dechunk(body: bytes) -> bytes | None:
    """A body sent with ``Transfer-Encoding: chunked``, its chunks joined (extensions and
    trailers dropped); None when it is not whole, well-formed chunked framing."""
    chunks: list[bytes] = []
    at = 0
    while True:
        end = body.find(b"\r\n", at)
        if end < 0:
            return None
        size_text = body[at:end].split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
            return None
        size, at = int(size_text, 16), end + 2
        if size == 0:
            return b"".join(chunks) if body.endswith(b"\r\n", at) else None
        if body[at + size : at + size + 2] != b"\r\n":
            return None
        chunks.append(body[at : at + size])
        at += size + 2


def http_answer(
    port: int,
    path: str,
    headers: Sequence[str] = (),
    timeout: float = 2.0,
    *,
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int | None, bytes, bytes]:
    """``method path`` with ``headers`` (and ``body``) on 127.0.0.1:``port``: (status, head,
    body); (None, b"", b"") without an answer."""
    answer = b""
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout) as sock:
        sock.settimeout(timeout)
        answer = request_over(sock, method, path, headers=headers, body=body)
    return split_answer(answer)


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int | None, bytes]:
    """``GET path`` on 127.0.0.1:``port``: (status, body); (None, b"") without an answer."""
    status, _, body = http_answer(port, path, timeout=timeout)
    return status, body


def http_status(port: int, path: str, headers: Sequence[str] = ()) -> int | None:
    return http_answer(port, path, headers)[0]


def http_json(port: int, path: str) -> Any:
    """The JSON body of ``GET path`` (None if there is no answer or it is not JSON)."""
    try:
        return json.loads(http_get(port, path)[1])
    except ValueError:
        return None


def http_text(port: int, path: str) -> str:
    """The body of ``GET path`` ("" when there is no answer)."""
    return http_get(port, path, timeout=5.0)[1].decode(errors="replace")


@dataclass(frozen=True)
class Sample:
    """One sample of a Prometheus text page."""

    name: str
    labels: dict[str, str]
    value: float


_SAMPLE: Final = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL: Final = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[Sample]:
    """The samples of a Prometheus text page (/metrics), comments left out."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is not None:
            labels = dict(_LABEL.findall(match.group(2) or ""))
            samples.append(Sample(match.group(1), labels, float(match.group(3))))
    return samples


def select(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    """The samples of ``name`` whose labels include ``labels``."""
    return [
        s
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels`` (None: no sample); with
    ``serve --workers`` each worker has its own samples."""
    found = select(samples, name, **labels)
    return sum(s.value for s in found) if found else None


def total_by(samples: list[Sample], name: str, label: str, **labels: str) -> dict[str, float]:
    """Non-zero sums of the samples of ``name`` by the value of ``label``."""
    by: dict[str, float] = {}
    for sample in select(samples, name, **labels):
        key = sample.labels.get(label, "")
        by[key] = by.get(key, 0.0) + sample.value
    return {key: value for key, value in by.items() if value}


# -- the processes of a bench --------------------------------------------------------------


@dataclass
class Workspace:
    path: Path
    keep: bool  # set it to keep the directory (logs, configs) after the bench


@contextlib.contextmanager
def workspace(prefix: str, keep: bool = False, kept: str = "") -> Iterator[Workspace]:
    """A fresh work directory, removed at the end unless ``keep`` (or ``.keep`` set meanwhile);
    when kept, ``kept`` + "work directory kept: PATH" is printed."""
    space = Workspace(Path(tempfile.mkdtemp(prefix=prefix)), keep)
    space.path.chmod(0o755)  # nginx workers run as an unprivileged user when started by root
    try:
        yield space
    finally:
        if space.keep:
            print(f"{kept}work directory kept: {space.path}")
        else:
            shutil.rmtree(space.path, ignore_errors=True)


T = TypeVar("T")


def run_stack(stack: Stack, space: Workspace, work: Callable[[], T]) -> T | int:
    """``work()`` (start the stack's servers, measure), then every process of ``stack`` stopped
    whatever happens; on Ctrl-C or a RuntimeError (a server that did not start, a load
    generator that failed) the exit status (130, 1) after saying why, the work directory kept
    on an error."""
    try:
        return work()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        space.keep = True
        return 1
    finally:
        stack.close()
        if left := stack.leftovers():
            print(f"WARNING: processes left running: {left}", file=sys.stderr)


class Stack:
    """The processes of one bench: servers started pinned to the layout's server CPUs with
    their output in ``workdir``/NAME.log, and others (load generators, clients) adopted;
    ``close()`` stops every one, ``leftovers()`` says whether any survived."""

    def __init__(self, tools: Tools, layout: Layout, workdir: Path) -> None:
        self.tools = tools
        self.layout = layout
        self.workdir = workdir
        self.servers: list[Server] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self.sessions: list[int] = []  # of everything started (a session id is its pid)

    def prefix(self, cpus: frozenset[int] | None) -> list[str]:
        return process.pin_prefix(self.tools.taskset, cpus)

    def start(
        self, name: str, command: list[str], port: int, env: dict[str, str] | None = None
    ) -> Server:
        log = self.workdir / f"{name}.log"
        with log.open("w") as out:
            proc = process.spawn([*self.prefix(self.layout.servers), *command], env=env, stdout=out)
        server = Server(name, proc, port, log)
        self.servers.append(server)
        self.sessions.append(proc.pid)
        return server

    def ready(self, server: Server, check: Callable[[], bool]) -> None:
        """Wait for ``check``, then pin every thread the server has started meanwhile."""
        process.wait_ready(server, check)
        process.pin_tree(server.proc.pid, self.layout.servers)

    def nginx_server(
        self, name: str, body: str, env: dict[str, str] | None = None, **values: object
    ) -> Server:
        """nginx with ``body`` % {"port": a free port, **values}, its files in ``workdir``/NAME
        (not ready yet); ``env``: its environment (nginx reads OPENSSL_CONF at start-up)."""
        assert self.tools.nginx is not None  # noqa: S101 - only called when nginx exists
        port = process.free_port()
        text = body % {"port": port, **values}
        command = nginx_command(self.tools.nginx, self.workdir / name, text)
        return self.start(name, command, port, env)

    def gateway_server(
        self,
        name: str,
        config: Path,
        log_level: str,
        *,
        env: dict[str, str] | None = None,
        host: str = LOOPBACK,
        workers: int | None = None,
        program: str | None = None,
    ) -> Server:
        """The gateway serving ``config`` on a free port of ``host`` (not ready yet)."""
        port = process.free_port(host)
        command = gateway_command(
            config, port, log_level, host=host, workers=workers, program=program
        )
        return self.start(name, command, port, env)

    def adopt(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop ``proc`` (a load generator or client started elsewhere) with the rest."""
        self.others.append(proc)
        self.sessions.append(proc.pid)

    def close(self) -> None:
        for proc in self.others:
            process.stop(proc)
        for server in reversed(self.servers):
            process.stop(server.proc)

    def leftovers(self) -> list[str]:
        """Processes still alive in any session started here, or naming the work directory."""
        return process.leftovers(self.sessions, self.workdir)
