"""A stand-in DAARION service as its own process, for tests that kill and restart a node:
``python -m tests.nodeserver --host 127.0.0.2 --port 8897 --name noda2``. Every path answers
``{"node": <name>, "path": <path>}``; ``/health`` answers ``{"status": "healthy"}``."""

from __future__ import annotations

import argparse

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()

    async def health(request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "healthy", "service": args.name})

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"node": args.name, "path": request.path})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
