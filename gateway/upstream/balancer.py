"""Which target serves a request: the first tier (in order of preference) that has a usable
target not yet tried for this request, round-robin within the tier. No I/O."""

from __future__ import annotations

from collections.abc import Callable, Collection

from ..snapshot import Route, Target


class Balancer:
    def __init__(self) -> None:
        self._turns: dict[str, int] = {}  # per service; outlives snapshots
        self._retry_turns: dict[str, int] = {}  # the same, for the choices of retries

    def choose(
        self, route: Route, usable: Callable[[Target], bool], tried: Collection[Target] = ()
    ) -> Target | None:
        for tier in route.tiers:
            candidates = [t for t in tier if t not in tried and usable(t)]
            if len(candidates) == 1:
                return candidates[0]
            if candidates:
                # Retries take their turns apart: from the same counter, a retry's pick among
                # fewer candidates skewed the next requests' share (3:1 with one of three
                # targets refusing).
                turns = self._retry_turns if tried else self._turns
                turn = turns.get(route.service, 0)
                turns[route.service] = turn + 1
                return candidates[turn % len(candidates)]
        return None

    @staticmethod
    def has_other(
        route: Route, usable: Callable[[Target], bool], tried: Collection[Target]
    ) -> bool:
        """Whether ``choose`` would find another target (without taking a turn)."""
        return any(t not in tried and usable(t) for t in route.targets)
