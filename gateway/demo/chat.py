"""A WebSocket client for the demo's rooms: ``python -m gateway.demo.chat ROOM [--url URL]
[--token TOKEN]``. Each line typed is sent to the room; every event the room sends (joins,
messages, leaves) is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import aiohttp


async def chat(url: str, room: str, token: str | None) -> int:
    params = {"access_token": token} if token else {}
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(f"{url}/ws/city/rooms/{room}", params=params)
        except aiohttp.WSServerHandshakeError as exc:
            sys.stderr.write(f"refused: {exc.status} {exc.message}\n")
            return 1
        except aiohttp.ClientError as exc:
            sys.stderr.write(f"cannot connect: {exc}\n")
            return 1
        sys.stderr.write(f"in room {room!r}: type a line and Enter; Ctrl-D leaves\n")

        async def typed() -> None:
            while line := await stdin.readline():
                await ws.send_str(line.decode(errors="replace").rstrip("\n"))
            await ws.close()

        sender = asyncio.create_task(typed())
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                print(message.data, flush=True)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        sys.stderr.write(f"closed: {ws.close_code}\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.demo.chat")
    parser.add_argument("room", nargs="?", default="general")
    parser.add_argument("--url", default="ws://127.0.0.1:8080", help="the gateway (ws://...)")
    parser.add_argument("--token", help="an access token (the demo prints one): named, not a guest")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(chat(args.url, args.room, args.token))
    return 130


if __name__ == "__main__":
    sys.exit(main())
