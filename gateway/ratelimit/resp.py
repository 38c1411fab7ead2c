"""A lean Redis client for the limiter's hot path: one pipelined connection, RESP parsed by
hiredis. redis-py spends about 300 µs of Python per call (pool, retries, command packing);
this spends a fraction of it, which is what keeps the limiter cheap (README, "Performance").

Only what the limiter needs: ``redis://`` and ``unix://`` URLs (user, password, db), any
command, replies in order. A call that is cancelled (its timeout ran out) closes the
connection, so a late reply can never be taken for the next call's; the next call connects
again. Sentinel, Cluster and TLS URLs use redis-py instead (``redisclients.connect``).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections import deque
from typing import Any

import hiredis

from ..dial import open_connection, unread


class ResponseError(Exception):
    """Redis answered with an error (``-ERR ...``, ``-NOSCRIPT ...``)."""


def _encode(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(ResponseError(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"redis connection lost: {exc}"))

    def call(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        if self.transport is None or self.closed:
            raise ConnectionError("redis connection closed")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.transport.write(_encode(args))
        return waiter

    def close(self) -> None:
        self.closed = True  # no call is written on it from now on: the next one connects
        if self.transport is not None:
            self.transport.abort()  # pending calls fail in connection_lost


class RespClient:
    def __init__(self, url: str, connect_timeout: float) -> None:
        parsed = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parsed.query)
        self._unix = parsed.path if parsed.scheme == "unix" else None
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        db = (query.get("db") or [""])[0] if self._unix else parsed.path.strip("/")
        self._db = int(db or 0)
        self._user = urllib.parse.unquote(parsed.username) if parsed.username else None
        self._password = urllib.parse.unquote(parsed.password) if parsed.password else None
        self._connect_timeout = connect_timeout
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    def unread(self) -> bool:
        """Whether its connection's socket holds bytes the loop has not read yet."""
        connection = self._connection
        return connection is not None and unread(connection.transport)

    def start(self, *args: Any) -> asyncio.Future[Any] | None:
        """The call written at once on the connection that is up, its reply the future's
        (a ``ResponseError``, a ``ConnectionError``); None when there is none up (``execute``
        connects). A caller that stops waiting for the reply must ``abort``."""
        connection = self._connection
        if connection is None or connection.closed:
            return None
        return connection.call(args)

    def abort(self) -> None:
        """Closes the connection: a reply still to come can never be taken for another call's."""
        if self._connection is not None:
            self._connection.close()

    async def execute(self, *args: Any) -> Any:
        connection = await self._connected()
        try:
            return await connection.call(args)
        except asyncio.CancelledError:
            connection.close()  # a reply may still come: never let the next call take it
            raise

    async def _connected(self) -> _Connection:
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        if self._connecting is None:  # one connect at a time; concurrent calls wait for it
            self._connecting = asyncio.get_running_loop().create_future()
            try:
                self._connection = await self._connect()
            except BaseException as exc:
                self._connecting.set_exception(ConnectionError(f"cannot connect to redis: {exc}"))
                self._connecting.exception()  # retrieved: no "never retrieved" warning
                raise
            else:
                self._connecting.set_result(self._connection)
            finally:
                self._connecting = None
            return self._connection
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        if self._unix is not None:
            async with asyncio.timeout_at(deadline):
                _, connection = await loop.create_unix_connection(_Connection, self._unix)
        else:
            _, connection = await open_connection(
                _Connection, self._host, self._port, self._connect_timeout
            )
        setup = []
        if self._password is not None:
            auth = (self._user, self._password) if self._user else (self._password,)
            setup.append(connection.call(("AUTH", *auth)))
        if self._db:
            setup.append(connection.call(("SELECT", self._db)))
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.gather(*setup)
        except BaseException:
            connection.close()
            raise
        return connection

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
