"""Memory of 100 MiB streamed through the gateway: `.venv/bin/python bench/streams.py`.

Issue 17's bound: a big upload and a big download go through the gateway with bounded
memory, whatever upstream client it has. The script starts an upstream in this process
(127.0.0.1: ``POST /up`` reads and counts the body, ``GET /down`` streams ``--mib`` MiB in
64 KiB writes), runs ``daarion-gateway serve`` in front of it, and sends one upload and one
download of ``--mib`` MiB each through it, the client reading and writing as fast as it can.
For each it prints the throughput and the worker's peak RSS over its RSS before (the peak is
reset in between through ``/proc/PID/clear_refs``). ``--code NAME=DIR`` runs the same with the
``gateway`` package found in DIR (``git archive COMMIT gateway | tar -x -C DIR``), to compare
builds in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

CHUNK = 64 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM back to the current RSS


async def upstream(size: int) -> tuple[web.AppRunner, int]:
    async def up(request: web.Request) -> web.Response:
        total = 0
        async for data in request.content.iter_any():
            total += len(data)
        return web.Response(text=str(total))

    async def down(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        await response.prepare(request)
        block = b"d" * CHUNK
        for _ in range(size // CHUNK):
            await response.write(block)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=0)
    app.router.add_post("/up", up)
    app.router.add_get("/down", down)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status < 500:  # the gateway is up and reaches it
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the gateway did not come up at {url}")


def worker_of(supervisor: int) -> int:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one worker, found {children}")
    return int(children[0])


async def measure(name: str, code: str | None, size: int, backend: int) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "routes.yaml"
        config.write_text(
            "nodes:\n  local: {host: 127.0.0.1}\n"
            f"services:\n  bench: {{port: {backend}, nodes: [local], http_prefix: '',"
            " limits: {client_max_body_size: 0}, timeouts: {response: 60}}\n"
        )
        env = dict(os.environ)
        if code is not None:
            env["PYTHONPATH"] = code
        command = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        proc = await asyncio.create_subprocess_exec(
            *command, "--port", str(port), "--log-level", "WARNING",
            env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}/api/bench"
            await wait_ready(base + "/ready")
            worker = worker_of(proc.pid)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

                async def body() -> AsyncIterator[bytes]:
                    block = b"u" * CHUNK
                    for _ in range(size // CHUNK):
                        yield block

                before = kib(worker, "VmRSS")
                reset_peak(worker)
                started = time.monotonic()
                headers = {"Content-Length": str(size)}
                async with session.post(base + "/up", data=body(), headers=headers) as response:
                    got = int(await response.text())
                up_s = time.monotonic() - started
                up_peak = kib(worker, "VmHWM")
                if got != size:
                    raise RuntimeError(f"the upstream read {got} of {size} bytes")
                reset_peak(worker)
                down_before = kib(worker, "VmRSS")
                started = time.monotonic()
                read = 0
                async with session.get(base + "/down") as response:
                    async for data in response.content.iter_any():
                        read += len(data)
                down_s = time.monotonic() - started
                down_peak = kib(worker, "VmHWM")
                if read != size:
                    raise RuntimeError(f"read {read} of {size} bytes")
            mib = size / 2**20
            print(
                f"{name:>10}: upload {mib:.0f} MiB in {up_s:.2f} s ({mib / up_s:.0f} MiB/s), "
                f"worker peak RSS +{(up_peak - before) / 1024:.1f} MiB over {before / 1024:.1f};"
                f" download {down_s:.2f} s ({mib / down_s:.0f} MiB/s), "
                f"peak +{(down_peak - down_before) / 1024:.1f} MiB over {down_before / 1024:.1f}"
            )
        finally:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 15)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def main(size: int, builds: list[tuple[str, str | None]]) -> None:
    runner, backend = await upstream(size)
    try:
        for name, directory in builds:
            await measure(name, directory, size, backend)
    finally:
        await runner.cleanup()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100, help="MiB each way (default 100)")
    parser.add_argument(
        "--code", action="append", default=[], metavar="NAME=DIR",
        help="also measure the gateway package in DIR (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    builds: list[tuple[str, str | None]] = [("this", None)]
    for item in args.code:
        name, _, directory = item.partition("=")
        builds.append((name, str(Path(directory).resolve())))
    asyncio.run(main(args.mib * 2**20, builds))


if __name__ == "__main__":
    cli()
