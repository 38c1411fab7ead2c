"""The Redis clients the limiter runs its script with.

``redis://`` and ``unix://`` URLs use the lean pipelined client in ``resp.py``; Sentinel,
Cluster and TLS (``rediss://``) URLs use redis-py, which knows how to find a master, route
slots and speak TLS. Both are behind one small interface: ``run`` the script, ``ping``,
``unread``, ``aclose``; ``cluster`` says whether a batch must be split by slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import urllib.parse
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from ..config.load import redis_hosts
from .resp import RespClient, ResponseError

CONNECT_TIMEOUT: Final = 1.0
LEAN_SCHEMES: Final = ("redis", "unix")


class LeanRunner:
    """EVALSHA over ``resp.RespClient``; on NOSCRIPT (a flushed or restarted Redis) the
    script is loaded again and the call repeated once."""

    cluster = False

    def __init__(self, url: str, script: str) -> None:
        self._client = RespClient(url, CONNECT_TIMEOUT)
        self._script = script
        self._sha = hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1

    async def run(self, keys: list[str], args: list[int]) -> Any:
        try:
            return await self._client.execute("EVALSHA", self._sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self._client.execute("SCRIPT", "LOAD", self._script)
        return await self._client.execute("EVALSHA", self._sha, len(keys), *keys, *args)

    def start(self, keys: list[str], args: list[int]) -> asyncio.Future[Any] | None:
        """The script's call written now, without a task, on the connection that is up (None
        when none is: ``run`` connects). A NOSCRIPT reply is the caller's to take to ``run``,
        which loads the script; a caller that stops waiting must ``abort``."""
        return self._client.start("EVALSHA", self._sha, len(keys), *keys, *args)

    def abort(self) -> None:
        self._client.abort()

    async def ping(self) -> None:
        await self._client.execute("PING")

    def unread(self) -> bool:
        """Whether an answer came in that the loop has not read yet (see ``dial``)."""
        return self._client.unread()

    async def aclose(self) -> None:
        await self._client.aclose()


class RedisPyRunner:
    def __init__(self, url: str, script: str, timeout: float, max_connections: int) -> None:
        self._client, self._helpers = connect(url, timeout, max_connections)
        self.cluster = isinstance(self._client, RedisCluster)
        self._script = self._client.register_script(script)

    async def run(self, keys: list[str], args: list[int]) -> Any:
        return await self._script(keys=keys, args=args)

    def start(self, keys: list[str], args: list[int]) -> None:
        """Never: redis-py's calls are coroutines (``run``)."""
        return None

    def abort(self) -> None:
        """Nothing to do: ``start`` never started a call."""

    def unread(self) -> bool:
        """Not known: redis-py's connections are its own (its timeouts go by the timer)."""
        return False

    async def ping(self) -> None:
        await self._client.ping()

    async def aclose(self) -> None:
        for client in (self._client, *self._helpers):
            await client.aclose()


def runner_for(
    url: str, script: str, timeout: float, max_connections: int
) -> LeanRunner | RedisPyRunner:
    if urllib.parse.urlsplit(url).scheme in LEAN_SCHEMES:
        return LeanRunner(url, script)
    return RedisPyRunner(url, script, timeout, max_connections)


def connect(url: str, timeout: float, max_connections: int) -> tuple[Any, list[Any]]:
    """A redis-py asyncio client for any of the supported URL forms, and the other clients
    it needs (the sentinels) that must be closed with it.

    Calls get no socket timeout and no retries of their own: every call on a request's path
    is bounded by ``asyncio.timeout(redis.timeout)`` in the limiter, and a failure switches to
    the fallback at once. The connect timeout is generous because only the background probe
    can wait that long (a busy machine may take more than 50 ms to set up a connection).
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "redis+cluster":
        nodes = [ClusterNode(host, port) for host, port in redis_hosts(parsed.netloc)]
        cluster = RedisCluster(
            startup_nodes=nodes,
            username=parsed.username,
            password=parsed.password,
            socket_connect_timeout=CONNECT_TIMEOUT,
            retry=None,
        )
        return cluster, []
    if parsed.scheme == "redis+sentinel":
        master, _, db = parsed.path.strip("/").partition("/")
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            redis_hosts(parsed.netloc),
            sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": CONNECT_TIMEOUT},
            username=parsed.username,
            password=parsed.password,
            socket_connect_timeout=CONNECT_TIMEOUT,
        )
        return sentinel.master_for(master, db=int(db or 0)), list(sentinel.sentinels)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_connect_timeout=CONNECT_TIMEOUT,
        retry=None,
    )
    return aioredis.Redis.from_pool(pool), []  # the client owns (and closes) its pool
