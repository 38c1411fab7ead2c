"""What a /metrics scrape costs the gateway, against what a proxied request costs, in one run.

```
.venv/bin/python bench/metrics_cost.py                 # ~15 s: metrics_cache 0 and 1
.venv/bin/python bench/metrics_cost.py --requests 20000 --scrapes 2000
```

For each ``metrics_cache`` value (default: 0, the uncached render, and 1, the default) it
starts the stand-in backend (``bench/pyloadgen.py backend``) and ``daarion-gateway serve`` at
log level INFO (its default) on 127.0.0.1 with ``--services`` services (default 12, a node's
size: the scrape's length grows with it), warms both up (each service requested once), then
sends, over one keep-alive
connection each, ``--requests`` proxied ``GET /api/bench/`` and ``--scrapes`` ``GET /metrics``
back to back, and reads the gateway's CPU time (user + system, from /proc) around each
phase. It prints the gateway's CPU per proxied request and per scrape, and their ratio (the
target: a scrape costs no more than 10 proxied requests).

Scrapes back to back are what four dashboards polling in a loop look like: with the cache on,
all but one per second are answered with the text already rendered. The client runs in this
process and is not counted. Not pinned to CPUs, so figures swing ~10 %: compare the ratio.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

from lib import process, servers, tools

CONFIG = """\
health: {{enabled: false}}
metrics_cache: {cache}
nodes: {{bench: {{host: 127.0.0.1}}}}
services:
  bench: {{port: {backend}, nodes: [bench], http_prefix: ""}}
{more}"""


class KeepAlive:
    """One keep-alive HTTP/1.1 connection that sends GETs and reads Content-Length answers."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((process.LOOPBACK, port), timeout=5)
        self.buffer = b""

    def get(self, path: str) -> int:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buffer) < length:
            self._read()
        self.buffer = self.buffer[length:]
        return int(head.split(b" ", 2)[1])

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the gateway closed the connection")
        self.buffer += data

    def close(self) -> None:
        self.sock.close()


def cpu_per_call(pid: int, port: int, path: str, count: int) -> float:
    """The gateway's CPU microseconds per ``GET path``, over ``count`` calls."""
    client = KeepAlive(port)
    try:
        before = process.cpu_seconds(pid)
        for _ in range(count):
            status = client.get(path)
            if status != 200:
                raise RuntimeError(f"GET {path}: {status}")
        return (process.cpu_seconds(pid) - before) / count * 1e6
    finally:
        client.close()


def measure(
    cache: float, requests: int, scrapes: int, services: int, workdir: Path
) -> tuple[float, float]:
    backend_port, gateway_port = process.free_port(), process.free_port()
    config = workdir / f"cache-{cache}.yaml"
    more = "".join(
        f'  s{i}: {{port: {backend_port}, nodes: [bench], http_prefix: ""}}\n'
        for i in range(services - 1)
    )
    config.write_text(CONFIG.format(cache=cache, backend=backend_port, more=more))
    started = []
    try:
        backend = process.spawn(
            [tools.PYTHON, str(Path(__file__).parent / "pyloadgen.py"), "backend",
             "--port", str(backend_port)]
        )  # fmt: skip
        started.append(backend)
        log = (workdir / f"gateway-{cache}.log").open("wb")
        gateway = process.spawn(servers.gateway_command(config, gateway_port, "INFO"), stdout=log)
        started.append(gateway)
        for port, proc in ((backend_port, backend), (gateway_port, gateway)):
            deadline = time.monotonic() + 20
            while not process.port_open(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"a server on port {port} did not start")
                time.sleep(0.1)
        # Warm-up; a request to each service and a few statuses give the scrape its series.
        for i in range(services - 1):
            cpu_per_call(gateway.pid, gateway_port, f"/api/s{i}/", 3)
        cpu_per_call(gateway.pid, gateway_port, "/api/bench/", min(1000, requests))
        cpu_per_call(gateway.pid, gateway_port, "/metrics", min(50, scrapes))
        proxied = cpu_per_call(gateway.pid, gateway_port, "/api/bench/", requests)
        scrape = cpu_per_call(gateway.pid, gateway_port, "/metrics", scrapes)
        return proxied, scrape
    finally:
        for proc in reversed(started):
            process.stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="proxied requests per run")
    parser.add_argument("--scrapes", type=int, default=1000, help="/metrics scrapes per run")
    parser.add_argument(
        "--services",
        type=int,
        default=12,
        help="services in the config, each requested once before the runs: the scrape's size",
    )
    parser.add_argument(
        "--cache", type=float, action="append", help="metrics_cache values (default: 0 and 1)"
    )
    args = parser.parse_args()
    process.stop_on_signals()
    print(f"gateway: {tools.gateway_code()}")
    print(f"{'metrics_cache':>13}  {'us/request':>10}  {'us/scrape':>9}  {'scrape/request':>14}")
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="metrics-cost-") as tmp:
        for cache in args.cache or [0.0, 1.0]:
            proxied, scrape = measure(cache, args.requests, args.scrapes, args.services, Path(tmp))
            ratio = scrape / proxied
            if cache > 0:
                worst = max(worst, ratio)
            print(f"{cache:>13g}  {proxied:>10.0f}  {scrape:>9.0f}  {ratio:>14.1f}")
    if worst:
        verdict = "ok" if worst <= 10 else "MISS"
        print(f"cached scrape <= 10 proxied requests' CPU: {verdict} ({worst:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
