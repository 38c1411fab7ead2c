"""Per-service slots on their own: an event loop, no sockets, no sleeps (a timeout of 0 expires
at the loop's next turn)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import GatewayError
from gateway.upstream.slots import Slots, SlotTable

from ..helpers import compiled_routes

LONG = 5.0  # a wait no test lets run out (it would mean a slot was lost)


async def settle() -> None:
    """Let every task that can run, run (a few turns of the loop, no time passing)."""
    for _ in range(5):
        await asyncio.sleep(0)


def waiting(slots: Slots, name: str, order: list[str]) -> asyncio.Task[None]:
    """A task that takes a slot (waiting up to LONG) and notes ``name`` in ``order``."""

    async def take() -> None:
        await slots.acquire(LONG)
        order.append(name)

    return asyncio.create_task(take())


async def test_up_to_limit_acquire_at_once() -> None:
    slots = Slots(2)
    await slots.acquire(0)
    await slots.acquire(0)
    assert slots.in_use == 2
    slots.release()
    assert slots.in_use == 1


async def test_a_full_table_times_out_with_503_upstream_busy() -> None:
    slots = Slots(1)
    await slots.acquire(0)
    with pytest.raises(GatewayError) as caught:
        await slots.acquire(0)
    error = caught.value
    assert (error.status, error.code, error.kind) == (503, "upstream_busy", "busy")
    assert error.message == "too many requests in flight to this service"
    assert error.headers == {"Retry-After": "1"}
    assert slots.in_use == 1
    slots.release()  # the timed-out waiter is gone: the slot is simply free
    assert slots.in_use == 0
    await slots.acquire(0)
    assert slots.in_use == 1


async def test_waiters_are_served_first_come_first_served() -> None:
    slots = Slots(1)
    await slots.acquire(0)
    order: list[str] = []
    tasks = []
    for name in ("first", "second", "third"):
        tasks.append(waiting(slots, name, order))
        await settle()  # queued in this order
    assert order == []
    slots.release()
    await settle()
    assert order == ["first"]
    assert slots.in_use == 1  # handed over, never free in between
    slots.release()
    slots.release()
    await asyncio.gather(*tasks)
    assert order == ["first", "second", "third"]
    assert slots.in_use == 1


async def test_a_newcomer_does_not_overtake_waiters() -> None:
    slots = Slots(1)
    await slots.acquire(0)
    order: list[str] = []
    early = waiting(slots, "early", order)
    await settle()
    slots.release()  # the slot is handed to "early", which has not run yet
    late = waiting(slots, "late", order)
    await settle()
    assert order == ["early"]
    slots.release()
    await asyncio.gather(early, late)
    assert order == ["early", "late"]


async def test_resizing_up_wakes_as_many_waiters_as_fit() -> None:
    slots = Slots(1)
    await slots.acquire(0)
    order: list[str] = []
    tasks = [waiting(slots, name, order) for name in ("w1", "w2", "w3")]
    await settle()
    slots.resize(3)
    await settle()
    assert order == ["w1", "w2"]
    assert (slots.limit, slots.in_use) == (3, 3)
    slots.release()
    await asyncio.gather(*tasks)
    assert order == ["w1", "w2", "w3"]


async def test_resizing_down_lets_the_excess_drain_before_anyone_waits_in() -> None:
    slots = Slots(3)
    for _ in range(3):
        await slots.acquire(0)
    slots.resize(1)
    assert (slots.limit, slots.in_use) == (1, 3)
    order: list[str] = []
    task = waiting(slots, "waiter", order)
    await settle()
    slots.release()
    slots.release()
    await settle()
    assert (order, slots.in_use) == ([], 1)  # in use: 1 of 1, still not the waiter's
    slots.release()
    await task
    assert (order, slots.in_use) == (["waiter"], 1)
    slots.release()
    assert slots.in_use == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    slots = Slots(1)
    await slots.acquire(0)
    order: list[str] = []
    gone = waiting(slots, "gone", order)
    stays = waiting(slots, "stays", order)
    await settle()
    gone.cancel()
    await settle()
    assert gone.cancelled()
    slots.release()
    await stays
    assert order == ["stays"]
    assert slots.in_use == 1
    slots.release()
    assert slots.in_use == 0


async def test_a_slot_handed_to_a_waiter_cancelled_before_it_ran_is_passed_on() -> None:
    slots = Slots(1)
    await slots.acquire(0)
    order: list[str] = []
    unlucky = waiting(slots, "unlucky", order)
    next_in_line = waiting(slots, "next", order)
    await settle()
    slots.release()  # handed to "unlucky"...
    unlucky.cancel()  # ...which is cancelled before it could run
    await settle()
    assert unlucky.cancelled()
    await next_in_line
    assert order == ["next"]
    assert slots.in_use == 1  # nothing leaked, nothing counted twice
    slots.release()
    assert slots.in_use == 0


async def test_a_slot_handed_to_the_last_waiter_cancelled_before_it_ran_is_freed() -> None:
    slots = Slots(1)
    await slots.acquire(0)
    unlucky = waiting(slots, "unlucky", [])
    await settle()
    slots.release()
    unlucky.cancel()
    await settle()
    assert slots.in_use == 0
    await slots.acquire(0)
    assert slots.in_use == 1


ROUTES = compiled_routes("""\
nodes: {a: {host: 10.0.0.1}}
services:
  one: {port: 1, nodes: [a], max_connections: 2}
  two: {port: 2, nodes: [a]}
""")


async def test_the_table_keeps_each_services_slots_across_reloads() -> None:
    table = SlotTable()
    one = table.for_route(ROUTES["one"])
    two = table.for_route(ROUTES["two"])
    assert (one.limit, two.limit) == (2, 256)  # the config's, and the default
    assert table.for_route(ROUTES["one"]) is one
    await one.acquire(0)

    reloaded = compiled_routes("""\
nodes: {a: {host: 10.0.0.1}}
services:
  one: {port: 1, nodes: [a], max_connections: 5}
""")
    table.sync(reloaded)
    assert table.for_route(reloaded["one"]) is one  # the request in flight keeps its slot
    assert (one.limit, one.in_use) == (5, 1)
    again = table.for_route(ROUTES["two"])
    assert again is not two  # forgotten with its service: a new one if it comes back
    assert (again.limit, again.in_use) == (256, 0)
