"""The shared limiter: nginx's limit_req arithmetic as one atomic Redis step.

Decisions that arrive in the same event-loop tick are sent together as one EVALSHA of ``LUA``
that decides every key in turn (atomic per key, and the script as a whole; a key asked for
more than once is read and written once), reading the clock with Redis ``TIME`` so that
gateways on machines with skewed clocks share one clock. At most
``MAX_IN_FLIGHT`` calls run at once; decisions arriving meanwhile wait for the next call, so
batches grow with load instead of connections. On the lean client's connection, once it is up,
a call is written at once and answered by callbacks (``_send``: its reply's, its deadline's),
with no task or coroutine per call; the first call, and one after a NOSCRIPT, run as a task
(``_run``), which connects and loads the script.

Every call is bounded by ``redis.timeout``. The first failure switches to the fallback
(``on_error``: the same zones per process, allow, or deny) without waiting on Redis again
(decisions queued behind the failed calls are the fallback's too); a probe runs the script
on a key of its own every ``PROBE_INTERVAL`` and switches back when it passes (a PING alone
passes on a Redis that refuses writes: out of memory, a read-only replica). One log line per
transition. While connected and idle (no decision answered for ``WATCH_INTERVAL``), the same
check runs, so that a Redis gone while nothing needed it is reported before the next request
meets it. A flushed script or a restarted Redis is reloaded transparently (NOSCRIPT).
Closing the limiter (a reload that changes ``redis``) answers every decision still waiting
from the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextvars import Context
from typing import Final

from redis.crc import key_slot

from ..config import RedisSettings
from ..dial import ReadDeadline, read_timeout
from .local import LocalLimiter
from .redisclients import runner_for
from .resp import ResponseError
from .zones import Decision, Zone

log = logging.getLogger("gateway.ratelimit")

MAX_IN_FLIGHT: Final = 4
MAX_BATCH: Final = 512
PROBE_INTERVAL: Final = 0.25
PROBE_TIMEOUT: Final = 0.5
# While connected with no decision answered for this long, the script is run on the probe's key:
# a Redis that died while no request needed it is found (in /health, the metrics, the alert)
# within two of these, not at the next request.
WATCH_INTERVAL = 5.0
PROBE_KEY: Final = "gateway:probe"  # the bucket the probe decides on (1r/s, gone in 1 s)

# KEYS: bucket keys. ARGV: (rate, burst, ttl) per key, in milli-requests/s, milli-requests, ms.
# Returns, per key: 1/0 (allowed) and the excess with that request counted. A key asked for
# more than once in one call (a client's concurrent requests) is read once, carried from one
# request to the next in ``held``, and written once after the last: the same steps in the same
# order as one call per request, with 3 Redis commands per key instead of 3 per request.
LUA: Final = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local held = {}
local ttls = {}
local order = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[i * 3 - 2])
  local burst = tonumber(ARGV[i * 3 - 1])
  local ttl = tonumber(ARGV[i * 3])
  local state = held[key]
  if state == nil then
    local stored = redis.call('HMGET', key, 'e', 'l')
    state = stored[1] and {tonumber(stored[1]), tonumber(stored[2])} or false
  end
  local allowed, excess = 1, 0
  if state then
    local last = state[2]
    local ms = now - last
    if ms < -60000 then ms = 1 elseif ms < 0 then ms = 0 end
    excess = state[1] - math.floor(rate * ms / 1000) + 1000
    if excess < 0 then excess = 0 end
    if excess > burst then
      allowed = 0
      held[key] = state
    else
      if ms ~= 0 then last = now end
      held[key] = {excess, last}
    end
  else
    held[key] = {0, now}
  end
  if allowed == 1 then
    if not ttls[key] then order[#order + 1] = key end
    ttls[key] = ttl
  end
  out[i * 2 - 1] = allowed
  out[i * 2] = excess
end
for _, key in ipairs(order) do
  local state = held[key]
  redis.call('HSET', key, 'e', state[1], 'l', state[2])
  redis.call('PEXPIRE', key, ttls[key])
end
return out
"""

Pending = tuple[Zone, str, "asyncio.Future[Decision]"]


class _Flight:
    """A batch's call on the lean connection, answered by callbacks (``RedisLimiter._send``)."""

    __slots__ = ("batch", "call", "deadline", "settled")

    def __init__(self, batch: list[Pending], call: asyncio.Future[list[int]]) -> None:
        self.batch = batch
        self.call = call
        self.deadline: ReadDeadline
        self.settled = False  # its decisions are answered (from Redis or the fallback)


class RedisLimiter:
    """The shared limiter with its fallback; see the module docstring."""

    def __init__(
        self,
        settings: RedisSettings,
        on_transition: Callable[[bool], None] = lambda connected: None,
    ) -> None:
        self.settings = settings
        self.local = LocalLimiter()
        self._runner = runner_for(settings.url, LUA, settings.timeout, MAX_IN_FLIGHT + 1)
        self._on_transition = on_transition
        self._connected = True
        self._pending: list[Pending] = []
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._flights: set[_Flight] = set()  # calls answered by callbacks (``_send``)
        self._probe: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._heard = False  # a decision was answered since the watch last looked
        self._closed = False

    @property
    def state(self) -> str:
        return "connected" if self._connected else "disconnected"

    async def decide(self, zone: Zone, key: str) -> Decision:
        if not self._connected or self._closed:
            return self._fallback(zone, key)
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._pending.append((zone, key, future))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _fallback(self, zone: Zone, key: str) -> Decision:
        policy = self.settings.on_error
        if policy == "local":
            return self.local.decide_now(zone, key)
        return Decision(policy == "allow", 0 if policy == "allow" else zone.burst + 1000)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._connected or self._closed:
            self._answer_from_fallback(self._pending)
            self._pending = []
            return
        while self._pending and self._in_flight < MAX_IN_FLIGHT:
            if len(self._pending) <= MAX_BATCH:
                batch, self._pending = self._pending, []
            else:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self._in_flight += 1
            if not self._send(batch):
                self._start_run(batch)

    def _start_run(self, batch: list[Pending]) -> None:
        # Not in the context of the request that scheduled the flush: the batch's lines
        # (Redis unavailable) are nobody's request's.
        task = asyncio.get_running_loop().create_task(self._run(batch), context=Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, batch: list[Pending]) -> bool:
        """The batch's call written now on the connection that is up and answered by callbacks
        (``_answered``, ``_late``): no task, no coroutine. False when there is no connection
        up or the client has only coroutines (``_run`` then makes the call)."""
        keys, args = self._arguments(batch)
        call = self._runner.start(keys, args)
        if call is None:
            return False
        context = Context()  # (as ``_start_run``'s: nobody's request's)
        flight = _Flight(batch, call)
        flight.deadline = ReadDeadline(
            call.get_loop(),
            self.settings.timeout,
            self._runner.unread,
            lambda: self._late(flight),
            context,
        )
        self._flights.add(flight)
        call.add_done_callback(lambda _: self._answered(flight), context=context)
        return True

    def _answered(self, flight: _Flight) -> None:
        call = flight.call
        error = None if call.cancelled() else call.exception()  # (retrieved, whatever follows)
        if flight.settled:  # answered from the fallback already (late, or closed)
            return
        flight.deadline.cancel()
        self._flights.discard(flight)
        if isinstance(error, ResponseError) and str(error).startswith("NOSCRIPT"):
            self._start_run(flight.batch)  # loads the script and calls again; still in flight
            return
        flight.settled = True
        try:
            decisions = _decisions(flight.batch, call.result())  # (raises what it failed with)
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - any failure: fall back
            self._disconnected(exc)
            self._answer_from_fallback(flight.batch)
        else:
            self._settle(flight.batch, decisions)
        self._landed()

    def _late(self, flight: _Flight) -> None:
        if flight.call.done():
            return  # answered in time: ``_answered`` is on its way
        flight.settled = True
        self._flights.discard(flight)
        self._runner.abort()  # its reply may still come: never let the next call take it
        self._disconnected(TimeoutError())
        self._answer_from_fallback(flight.batch)
        self._landed()

    def _landed(self) -> None:
        self._in_flight -= 1
        if self._pending and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _settle(self, batch: list[Pending], decisions: list[Decision]) -> None:
        self._heard = True
        for (_, _, future), decision in zip(batch, decisions, strict=True):
            if not future.done():
                future.set_result(decision)

    async def _run(self, batch: list[Pending]) -> None:
        try:
            # A late loop does not turn an answer that came in time into a fallback.
            async with read_timeout(self.settings.timeout, self._runner.unread):
                decisions = _decisions(batch, await self._call(batch))
        except Exception as exc:  # noqa: BLE001 - any failure of Redis means: fall back
            self._disconnected(exc)
            self._answer_from_fallback(batch)
        except asyncio.CancelledError:  # closed: its requests are answered all the same
            self._answer_from_fallback(batch)
            raise
        else:
            self._settle(batch, decisions)
        finally:
            self._landed()

    def _answer_from_fallback(self, batch: list[Pending]) -> None:
        for zone, key, future in batch:
            if not future.done():
                future.set_result(self._fallback(zone, key))

    async def _call(self, batch: list[Pending]) -> list[int]:
        """The flat answer, (allowed, excess) per decision in the batch's order."""
        if not self._runner.cluster:
            return await self._eval(batch)
        # A cluster runs a script only on keys of one slot: one call per slot, concurrently.
        groups: dict[int, list[Pending]] = {}
        for item in batch:
            groups.setdefault(key_slot(self._redis_key(item[1]).encode()), []).append(item)
        parts = await asyncio.gather(*(self._eval(group) for group in groups.values()))
        by_key = {id(item): part[i * 2 : i * 2 + 2]
                  for group, part in zip(groups.values(), parts, strict=True)
                  for i, item in enumerate(group)}  # fmt: skip
        return [value for item in batch for value in by_key[id(item)]]

    def _redis_key(self, key: str) -> str:
        # Hash-tagged: the whole bucket name picks the cluster slot.
        return f"{self.settings.prefix}{{{key}}}"

    def _arguments(self, batch: list[Pending]) -> tuple[list[str], list[int]]:
        keys = [self._redis_key(key) for _, key, _ in batch]
        args: list[int] = []
        for zone, _, _ in batch:
            args += (zone.rate, zone.burst, zone.ttl_ms)
        return keys, args

    async def _eval(self, batch: list[Pending]) -> list[int]:
        flat: list[int] = await self._runner.run(*self._arguments(batch))
        return flat

    def _disconnected(self, exc: BaseException) -> None:
        if not self._connected or self._closed:
            return  # (closed: a late failure of its start or calls says nothing any more)
        self._connected = False
        log.warning(
            "redis unavailable: rate limits fall back",
            extra={"fields": {"on_error": self.settings.on_error, "reason": _reason(exc)}},
        )
        self._on_transition(False)
        if self._probe is None or self._probe.done():
            # Its "redis is back", maybe minutes later, is not the failed request's line.
            self._probe = asyncio.get_running_loop().create_task(self._recover(), context=Context())

    async def _recover(self) -> None:
        while not self._connected:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                async with asyncio.timeout(max(self.settings.timeout * 4, PROBE_TIMEOUT)):
                    await self._check()
            except Exception as exc:  # noqa: BLE001 - still down: try again next interval
                log.debug("redis probe failed", extra={"fields": {"reason": _reason(exc)}})
                continue
            self._connected = True
            self.local.clear()
            log.info("redis is back: shared rate limits again")
            self._on_transition(True)

    async def _watching(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if self._heard or not self._connected:
                self._heard = False  # (disconnected: the recovery probe is looking)
                continue
            try:
                async with asyncio.timeout(max(self.settings.timeout * 4, PROBE_TIMEOUT)):
                    await self._check()
            except Exception as exc:  # noqa: BLE001 - any failure of Redis means: fall back
                self._disconnected(exc)

    async def start(self) -> None:
        """Check Redis once; if it does not answer, start in the fallback and probe."""
        try:
            async with asyncio.timeout(max(self.settings.timeout, 1.0)):
                await self._runner.ping()  # reachable; a refused write is a first call's failure
        except Exception as exc:  # noqa: BLE001 - unreachable at start: fall back and probe
            self._disconnected(exc)
        if self._watch is None and not self._closed:
            self._watch = asyncio.get_running_loop().create_task(
                self._watching(), context=Context()
            )

    async def _check(self) -> None:
        """The script on the probe's own key, as a decision would run it (writes included)."""
        await self._runner.run([self._redis_key(PROBE_KEY)], [1000, 0, 1000])

    async def close(self) -> None:
        self._closed = True
        self._answer_from_fallback(self._pending)
        self._pending = []
        for flight in self._flights:  # their replies, if any come, are nobody's now
            flight.settled = True
            flight.deadline.cancel()
            self._answer_from_fallback(flight.batch)
        self._flights.clear()
        tasks = [*self._tasks, *(t for t in (self._probe, self._watch) if t is not None)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._runner.aclose()


def _decisions(batch: list[Pending], flat: object) -> list[Decision]:
    """The script's answer (allowed, excess per key) as the batch's decisions, or
    ``ResponseError`` when it is not that (a script of another version under the same name)."""
    if isinstance(flat, list) and len(flat) == 2 * len(batch):
        try:
            return [
                Decision(bool(int(a)), int(e)) for a, e in zip(flat[::2], flat[1::2], strict=True)
            ]
        except (TypeError, ValueError):
            pass
    raise ResponseError(f"the script answered {flat!r:.80} for {len(batch)} keys")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"[:200]
