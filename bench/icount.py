"""Instructions per request, counted by callgrind: a figure this VM's noise does not move.

`.venv/bin/python bench/icount.py [--code NAME=PROGRAM ...] [--shape get|post16k]`

On this VM, req/s and CPU per request swing 10-30 % between runs of the same build (the
benchmark tables' ranges), so a change of 1-2 % cannot be seen in `bench/run.py`. callgrind
counts the user-space instructions a process executes: the same build under the same load
gives the same count within ~0.3 % (two runs of one build: 533.8 and 535.0 thousand per GET),
whatever else the machine is doing. It sees neither the kernel nor time spent waiting, and a
sequential client does not show what only concurrency costs or saves (batched writes, the
limiter's batches): a companion to the harness, not a replacement. Each build runs in turn
under `valgrind --tool=callgrind` with every feature on (the shared rate limiter through a
Redis started here, metrics, INFO logs), behind a small asyncio backend, and gets `--warm-up`
requests, its counters zeroed (`callgrind_control -z`), then `--requests` keep-alive requests
one at a time on one connection, and a dump; the count of that dump over the requests is the
figure. Only loopback addresses; needs valgrind (Debian's `valgrind` package).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lib.process import process_tree, spawn, stop

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BACKEND = """
import asyncio, sys
ANSWER = (b"HTTP/1.1 200 OK\\r\\nContent-Length: 11\\r\\nContent-Type: text/plain\\r\\n\\r\\n"
          b"hello world")
class Backend(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        while (end := self.buffer.find(b"\\r\\n\\r\\n")) >= 0:
            head, length = self.buffer[:end].lower(), 0
            if (at := head.find(b"content-length: ")) >= 0:
                length = int(head[at + 16:].split(b"\\r\\n")[0])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.transport.write(ANSWER)
async def main():
    server = await asyncio.get_running_loop().create_server(Backend, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""
CONFIG = """redis: {{url: "redis://127.0.0.1:{redis}/0"}}
rate_limits:
  bench: {{rate: 1000000r/s, burst: 1000000}}
default_rate_limit: bench
nodes:
  bench: {{host: 127.0.0.1}}
services:
  bench: {{port: {backend}, nodes: [bench], http_prefix: ""}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def request_bytes(shape: str) -> bytes:
    head = "GET /api/bench/x HTTP/1.1\r\nHost: bench\r\nUser-Agent: icount\r\n"
    if shape == "get":
        return (head + "\r\n").encode()
    body = b"x" * 16384
    head = head.replace("GET", "POST", 1) + f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def exchange(sock: socket.socket, request: bytes, count: int) -> None:
    """``count`` requests one at a time, each answer read whole (a 200 with its length)."""
    for _ in range(count):
        sock.sendall(request)
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            data += sock.recv(65536)
        head = data[:end].lower()
        if not head.startswith(b"http/1.1 200"):
            raise SystemExit(f"the gateway answered {data[:200]!r}")
        length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(data) < end + 4 + length:
            data += sock.recv(65536)


def wait_healthy(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if sock.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.5)
    raise SystemExit(f"the gateway did not answer /health within {seconds:g} s")


@contextlib.contextmanager
def running(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = spawn(command, stdout=out)
    try:
        yield proc
    finally:
        stop(proc)


def serving_child(root: int) -> int:
    """The worker under callgrind (the supervisor's child that callgrind_control knows)."""
    for pid in reversed(process_tree(root)):
        asked = ["callgrind_control", "-s", str(pid)]
        if pid != root and subprocess.run(asked, capture_output=True, check=False).returncode == 0:
            return pid
    raise SystemExit("no worker process under callgrind")


def count(program: str, shape: str, warm_up: int, requests: int, work: Path) -> float:
    """Instructions per request of ``program`` (its daarion-gateway) under callgrind."""
    redis_port, backend_port, gateway_port = free_port(), free_port(), free_port()
    config = work / "routes.yaml"
    config.write_text(CONFIG.format(redis=redis_port, backend=backend_port))
    python = Path(program).read_text().splitlines()[0].removeprefix("#!").strip()
    redis = ["redis-server", "--port", str(redis_port), "--bind", HOST, "--save", ""]
    gateway = [
        "valgrind", "--tool=callgrind", "--trace-children=yes",
        f"--callgrind-out-file={work}/cg.%p", python, program, "serve", "--config", str(config),
        "--host", HOST, "--port", str(gateway_port), "--log-level", "INFO",
    ]  # fmt: skip
    with (
        running(redis, work / "redis.log"),
        running([sys.executable, "-c", BACKEND, str(backend_port)], work / "backend.log"),
        running(gateway, work / "gateway.log") as proc,
    ):
        wait_healthy(gateway_port, 180)
        with socket.create_connection((HOST, gateway_port)) as sock:
            exchange(sock, request_bytes(shape), warm_up)
            worker = serving_child(proc.pid)
            subprocess.run(
                ["callgrind_control", "-z", str(worker)], capture_output=True, check=True
            )
            exchange(sock, request_bytes(shape), requests)
            subprocess.run(
                ["callgrind_control", "-d", str(worker)], capture_output=True, check=True
            )
        dumps = sorted(work.glob(f"cg.{worker}.*"))
        if not dumps:
            raise SystemExit(f"callgrind wrote no dump for {worker}")
    for line in dumps[-1].read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1]) / requests
    raise SystemExit(f"no totals in {dumps[-1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--code",
        action="append",
        default=[],
        metavar="NAME=PROGRAM",
        help="another build's daarion-gateway (repeatable; the first is this checkout's)",
    )
    parser.add_argument("--shape", choices=("get", "post16k"), default="get")
    parser.add_argument("--warm-up", type=int, default=300)
    parser.add_argument("--requests", type=int, default=2000)
    opts = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            print(f"icount needs {tool} (apt-get install valgrind redis-server)", file=sys.stderr)
            return 2
    builds = [("gateway", str(ROOT / ".venv" / "bin" / "daarion-gateway"))]
    for code in opts.code:
        name, _, program = code.partition("=")
        if not name or not Path(program).is_file():
            parser.error(f"--code {code}: NAME=PROGRAM, PROGRAM a daarion-gateway")
        builds.append((name, program))
    results: list[tuple[str, float]] = []
    for name, program in builds:
        with tempfile.TemporaryDirectory(prefix="daarion-icount-") as work:
            per = count(program, opts.shape, opts.warm_up, opts.requests, Path(work))
        results.append((name, per))
        print(f"{name:>12}  {per / 1000:8.1f} thousand instructions per {opts.shape}", flush=True)
    first = results[0][1]
    for name, per in results[1:]:
        print(f"{name:>12} / {results[0][0]}: {per / first:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
