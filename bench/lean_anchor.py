"""An anchor for issue 17, not a server to run: the gateway's own parts behind a bare asyncio
protocol server, to measure what a rewrite of the request path around them would buy.

What it keeps of the gateway, called as the pipeline calls them: the config and its compiled
snapshot (``Gateway``), the target check and the route table, the shared rate limiter through
Redis (one decision per request), the balancer and health book (``first_target``), the
service's slot and in-flight gauge, the headers both ways (``request_headers``,
``request_head``, ``response_headers``), the gateway's upstream client and pool, the
per-request metrics and the JSON access line. What it leaves out is what a rewrite would
replace: aiohttp's server (its protocol, request and response objects, a task per request
started from a task per connection) and the pipeline's layering (``Exchange``, the phases'
coroutines, failover's loop, ``Whole``): here llhttp's callbacks (``httptools``, uvicorn's
parser) feed one coroutine per request, started as a task, whose answer is one write.

It serves what ``bench/run.py --shapes get`` sends and nothing else (GET and HEAD of a routed
path, answered whole, no body, no TLS, no keep-alive limits, no pipelining): any other
request gets a 500 and the connection is closed. Run it as a build of the harness:

    bench/run.py --suite lean --shapes get --code anchor=bench/lean_anchor \\
        --code anchor-aiohttp=bench/lean_anchor_aiohttp

(``bench/lean_anchor`` runs this file with the checkout's ``.venv``; both take
``daarion-gateway serve``'s arguments: ``serve --config FILE --host H --port P --log-level L``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import sys
from pathlib import Path
from typing import Any

import httptools
import uvloop
from aiohttp import http_writer, web
from aiohttp.helpers import rfc822_formatted_time
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import logs, routing
from gateway.aiohttp_private import Whole
from gateway.app import Gateway
from gateway.config import parse_config
from gateway.context import Shared
from gateway.logs import request_id_from
from gateway.ratelimit.zones import bucket_key
from gateway.routetable import Found
from gateway.snapshot import Route, Target
from gateway.upstream.client import request_head
from gateway.upstream.failover import first_target
from gateway.upstream.headers import Forwarding, request_headers
from gateway.upstream.http import response_headers


class Request:
    """What ``request_headers`` reads of aiohttp's request: its headers and the peer."""

    __slots__ = ("headers", "method", "raw_path", "remote", "url")

    def __init__(self, remote: str) -> None:
        self.remote = remote
        self.headers: Any = None
        self.method = ""
        self.url = b""
        self.raw_path = ""


class Protocol(asyncio.Protocol):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.request: Request | None = None
        self.raw: list[tuple[bytes, bytes]] = []
        self.remote = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] - uvloop's TCPTransport
        self.remote = transport.get_extra_info("peername")[0]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.request = Request(self.remote)
        self.raw = []

    def on_url(self, url: bytes) -> None:
        if self.request is not None:
            self.request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.request
        if request is None:
            return
        request.method = self.parser.get_method().decode()
        request.raw_path = request.url.decode("latin-1")
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in self.raw:
            headers.add(name.decode("latin-1"), value.decode("latin-1"))
        request.headers = CIMultiDictProxy(headers)

    def on_message_complete(self) -> None:
        request = self.request
        if request is None or self.transport is None:
            return
        self.request = None
        asyncio.get_running_loop().create_task(handle(self.gateway, self.transport, request))


async def handle(gateway: Gateway, transport: asyncio.Transport, request: Request) -> None:
    """The protocol server's request: the answer written as one write (none when the client
    left meanwhile, as at the end of each wrk run)."""
    try:
        status, reason, answer, body = await exchange(gateway, request)
        data = http_writer._serialize_headers(f"HTTP/1.1 {status} {reason}", answer) + body
    except Exception:  # noqa: BLE001 - the anchor answers what it cannot serve with a 500
        if not transport.is_closing():
            transport.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            transport.close()  # once what it holds is written
        return
    if not transport.is_closing():
        transport.write(data)


async def aiohttp_handle(gateway: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    """aiohttp's server's request (``--server aiohttp``): the same exchange, answered with
    the gateway's ``Whole``."""
    try:
        status, reason, answer, body = await exchange(gateway, request)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - as handle(): a 500, without aiohttp's ERROR line
        failed = Whole(status=500, headers={})
        failed.force_close()
        return failed
    return Whole(status=status, reason=reason, headers=answer, body=body)


async def exchange(gateway: Gateway, request: Request) -> tuple[int, str, CIMultiDict[str], bytes]:
    shared = gateway.shared
    started = shared.clock()
    snapshot = shared.snapshot
    headers = request.headers
    raw_path = request.raw_path
    client = request.remote
    request_id = request_id_from(headers.get("X-Request-ID"))
    status = 500
    route_id = service = "unmatched"
    target: Target | None = None
    try:
        if raw_path == "/metrics":  # for the harness's checks of what was answered
            body, content_type = shared.metrics.render(headers.get("Accept"))
            answer = CIMultiDict(
                {
                    "Content-Type": content_type,
                    "Content-Length": str(len(body)),
                    "Date": rfc822_formatted_time(),
                }
            )
            status = 200
            return status, "OK", answer, body
        checked = routing.check_target(raw_path)
        found = snapshot.table.match(checked.path, request.method, "")
        if not isinstance(found, Found) or request.method not in ("GET", "HEAD"):
            raise LookupError("not what the anchor serves")
        entry = found.entry
        route = entry.policy
        service, route_id = route.service, entry.id
        path_qs = routing.upstream_path(entry.to, found.rest) + checked.query
        zone = route.zone
        extra = None
        if zone is not None:
            decision = await shared.limiter.decide(zone, bucket_key(zone, (client,)))
            shared.metrics.count_limit(zone.name, "allowed" if decision.allowed else "rejected")
            if zone.headers:
                extra = {"RateLimit-Policy": zone.policy, "RateLimit": decision.header(zone)}
        target, _usable = first_target(shared, route)
        return await _forward(shared, request, route, target, path_qs, request_id, extra)
    finally:
        seconds = shared.clock() - started
        shared.metrics.observe_request(service, route_id, request.method, status, seconds)
        if logs.access_enabled():
            _log(request, status, seconds, route_id, target)


async def _forward(  # noqa: PLR0917 - the pipeline's Exchange, spelled out
    shared: Shared,
    request: Request,
    route: Route,
    target: Target,
    path_qs: str,
    request_id: str,
    extra: dict[str, str] | None,
) -> tuple[int, str, CIMultiDict[str], bytes]:
    """In the service's slot: the request to ``target``, its whole answer back."""
    slots = shared.slots.for_route(route)
    await slots.acquire(route.connect_timeout)
    gauge = shared.metrics.active_for(route.service)
    gauge.inc()
    try:
        forwarding = Forwarding(request.remote, "http", request_id)
        out = request_headers(request, target, forwarding)  # type: ignore[arg-type]
        head, _ = request_head(request.method, path_qs, out, None)
        pool = shared.upstream._pool  # the anchor drives the pool itself
        if pool is None:
            raise RuntimeError("the upstream client is not open")
        connection = pool.take(target) or await pool.connect(target, route.connect_timeout)
        upstream = await connection.start(
            head, None, chunked=False, head_only=request.method == "HEAD",
            timeout=route.response_timeout,
        )  # fmt: skip
        try:
            body = await upstream.read() if upstream.complete else b""
            answer = response_headers(upstream, request_id, extra, None, route.added)
        finally:
            upstream.release()
    finally:
        gauge.dec()
        slots.release()
    answer["Date"] = rfc822_formatted_time()
    return upstream.status, upstream.reason, answer, body


def _log(request: Request, status: int, seconds: float, route: str, target: Target | None) -> None:
    """The access line, with the pipeline's fields (``pipeline._finish``)."""
    fields: dict[str, object] = {
        "method": request.method,
        "path": request.raw_path.partition("?")[0][:512],
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "client": request.remote,
        "route": route,
        "trace_id": None,
    }
    if target is not None:
        fields["upstream"] = target.label
    logs.access("request", fields)


async def serve(config_path: str, text: str, host: str, port: int, front: str) -> None:
    gateway = Gateway(parse_config(text, config_path), config_path=config_path, config_text=text)
    shared = gateway.shared
    shared.upstream.open(shared.snapshot.config.upstream_keepalive_timeout)
    await shared.limiter.start()
    gc.freeze()  # as the worker does: what start-up made is out of the collector's reach
    loop = asyncio.get_running_loop()
    if front == "aiohttp":
        handler = functools.partial(aiohttp_handle, gateway)
        server = await loop.create_server(
            web.Server(handler, access_log=None), host, port, backlog=1024
        )
    else:
        server = await loop.create_server(lambda: Protocol(gateway), host, port, backlog=1024)
    print(f"anchor listening on {host}:{port}", file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--server", choices=["protocol", "aiohttp"], default="protocol",
        help="the front: the bare protocol (default) or aiohttp's low-level server",
    )  # fmt: skip
    args = parser.parse_args()
    logs.setup_logging(args.log_level)
    from gateway.lifecycle.worker import GC_THRESHOLDS  # noqa: PLC0415

    gc.set_threshold(*GC_THRESHOLDS)
    text = Path(args.config).read_text(encoding="utf-8")
    uvloop.run(serve(args.config, text, args.host, args.port, args.server))


if __name__ == "__main__":
    main()
