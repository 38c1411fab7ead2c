"""The collector stand-in of `bench/run.py --suite tracing`: `python bench/otlpsink.py --port P`.

An aiohttp + uvloop server on 127.0.0.1 that takes OTLP/HTTP trace exports as a collector
does (``POST /v1/traces``, protobuf, answered 200 with an empty ExportTraceServiceResponse)
and keeps nothing: the bench measures what exporting costs the gateway, not a backend.
``GET /stats``: how many exports and bytes it took.
"""

from __future__ import annotations

import argparse

import uvloop
from aiohttp import web


def app() -> web.Application:
    taken = {"exports": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        taken["exports"] += 1
        taken["bytes"] += len(body)
        # An empty ExportTraceServiceResponse is zero bytes of protobuf.
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def stats(request: web.Request) -> web.StreamResponse:
        return web.json_response(taken)

    application = web.Application()
    application.router.add_post("/v1/traces", traces)
    application.router.add_get("/stats", stats)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        app(),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
