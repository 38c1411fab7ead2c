"""The balancer on its own: which target a request gets, with no I/O and no clock."""

from __future__ import annotations

from collections.abc import Callable, Collection

import pytest

from gateway.snapshot import Route, Target
from gateway.upstream.balancer import Balancer

from ..helpers import compiled_routes

ROUTES = compiled_routes("""\
nodes:
  a: {host: 10.0.0.1}
  b: {host: 10.0.0.2}
  c: {host: 10.0.0.3}
  d: {host: 10.0.0.4}
services:
  pair: {port: 80, nodes: [[a, b], [c, d]]}
  other: {port: 81, nodes: [[a, b]]}
  chain: {port: 82, nodes: [a, b, c]}
""")


def by_node(route: Route) -> dict[str, Target]:
    return {t.node: t for t in route.targets}


def everything(target: Target) -> bool:
    return True


def only(*nodes: str) -> Callable[[Target], bool]:
    return lambda target: target.node in nodes


def picks(
    balancer: Balancer,
    route: Route,
    count: int,
    usable: Callable[[Target], bool],
    tried: Collection[Target] = (),
) -> list[str | None]:
    """The nodes of ``count`` choices in a row (None: no target)."""
    chosen = [balancer.choose(route, usable, tried) for _ in range(count)]
    return [t.node if t else None for t in chosen]


def test_the_route_compiles_to_tiers_in_order_of_preference() -> None:
    route = ROUTES["pair"]
    assert [[t.node for t in tier] for tier in route.tiers] == [["a", "b"], ["c", "d"]]
    assert [t.tier for t in route.targets] == [0, 0, 1, 1]


def test_the_first_tier_is_preferred_and_shared_round_robin() -> None:
    assert picks(Balancer(), ROUTES["pair"], 5, everything) == ["a", "b", "a", "b", "a"]


def test_each_service_has_its_own_turn() -> None:
    balancer = Balancer()
    pair, other = ROUTES["pair"], ROUTES["other"]
    assert picks(balancer, pair, 1, everything) == ["a"]
    assert picks(balancer, other, 3, everything) == ["a", "b", "a"]
    assert picks(balancer, pair, 1, everything) == ["b"]  # other's turns did not count


def test_tried_targets_are_skipped_and_one_candidate_takes_no_turn() -> None:
    balancer = Balancer()
    route = ROUTES["pair"]
    t = by_node(route)
    assert picks(balancer, route, 1, everything, tried=[t["a"]]) == ["b"]
    # Only one candidate: the turn has not moved, so the next plain choice is still "a".
    assert picks(balancer, route, 1, everything) == ["a"]
    assert picks(balancer, route, 1, everything, tried=[t["b"]]) == ["a"]
    assert picks(balancer, route, 1, everything) == ["b"]
    # The whole first tier tried: the second tier, round-robin with the same turn counter.
    assert picks(balancer, route, 3, everything, tried=[t["a"], t["b"]]) == ["c", "d", "c"]


def test_the_fallback_tier_serves_when_the_first_is_unusable() -> None:
    balancer = Balancer()
    route = ROUTES["pair"]
    assert picks(balancer, route, 4, only("c", "d")) == ["c", "d", "c", "d"]
    assert picks(balancer, route, 2, only("b", "c", "d")) == ["b", "b"]
    # Once a first-tier target is usable again, it is preferred.
    assert picks(balancer, route, 2, only("a", "b", "d")) == ["a", "b"]


def test_the_tiers_of_a_chain_are_tried_in_order() -> None:
    balancer = Balancer()
    route = ROUTES["chain"]
    t = by_node(route)
    assert picks(balancer, route, 2, everything) == ["a", "a"]
    assert picks(balancer, route, 1, everything, tried=[t["a"]]) == ["b"]
    assert picks(balancer, route, 1, only("c")) == ["c"]
    assert picks(balancer, route, 1, everything, tried=list(route.targets)) == [None]
    assert picks(balancer, route, 1, only()) == [None]


@pytest.mark.parametrize(
    ("usable", "tried", "expected"),
    [
        (("a", "b", "c", "d"), (), True),
        (("a", "b", "c", "d"), ("a", "b", "c"), True),
        (("a", "b", "c", "d"), ("a", "b", "c", "d"), False),
        (("a",), ("a",), False),  # the only usable one was tried
        (("d",), ("a", "b"), True),  # a later tier counts
        ((), (), False),
    ],
)
def test_has_other(usable: tuple[str, ...], tried: tuple[str, ...], expected: bool) -> None:
    route = ROUTES["pair"]
    t = by_node(route)
    assert Balancer.has_other(route, only(*usable), [t[n] for n in tried]) is expected


def test_has_other_takes_no_turn() -> None:
    balancer = Balancer()
    route = ROUTES["pair"]
    assert picks(balancer, route, 1, everything) == ["a"]
    for _ in range(3):
        assert balancer.has_other(route, everything, [])
    assert picks(balancer, route, 1, everything) == ["b"]


@pytest.mark.parametrize("tier", ["a, b, c", "a, b, c, d"])
def test_retries_do_not_skew_the_share_of_the_others(tier: str) -> None:
    # One target of a tier refuses every connection (not ejected yet): its requests are
    # retried on the others, and every other target ends up with the same share.
    route = compiled_routes(f"""\
nodes: {{a: {{host: 10.0.0.1}}, b: {{host: 10.0.0.2}},
        c: {{host: 10.0.0.3}}, d: {{host: 10.0.0.4}}}}
services:
  flat: {{port: 80, nodes: [[{tier}]]}}
""")["flat"]
    balancer = Balancer()
    served: dict[str, int] = {}
    for _ in range(1200):
        target = balancer.choose(route, everything)
        assert target is not None
        if target.node == "a":
            target = balancer.choose(route, everything, [target])
            assert target is not None
        served[target.node] = served.get(target.node, 0) + 1
    others = len(route.targets) - 1
    assert served == {t.node: 1200 // others for t in route.targets if t.node != "a"}
