#!/usr/bin/env python3
"""What a route lookup costs as the route table grows: 10 routes against 1,000.

    .venv/bin/python bench/routes.py            # about 10 s
    .venv/bin/python bench/routes.py --reps 9   # steadier

The table is the gateway's own (``gateway.routetable.RouteTable``, as ``snapshot.py`` builds
it); each table has DAARION-shaped routes (``/api/<service>/``, ``/ws/<service>/``, a few
exact and method-bound ones, the web app at ``/``) and the lookups are a fixed mix of paths
that hit a service, the web app, or nothing, at depths 1 to 6. The target (issue 11): 1,000
routes cost at most 1.5 times what 10 do, per lookup. Pinned to one CPU when it can be.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import timeit

from lib.report import fmt, verdict

from gateway.routetable import Entry, RouteTable

TARGET = 1.5


def table(size: int) -> RouteTable[None]:
    entries: list[Entry[None]] = [Entry("frontend", "/", "/", False, None, None, False, None)]
    services = math.ceil((size - 1) / 4)
    for i in range(services):
        name = f"svc{i}"
        entries += [
            Entry(name, f"/api/{name}/", f"/{name}/", False, None, None, False, None),
            Entry(f"{name}-ws", f"/ws/{name}/", f"/ws/{name}/", False, None, None, True, None),
            Entry(f"{name}-x", f"/api/{name}/snapshot", "/s", True, None, None, False, None),
            Entry(
                f"{name}-up",
                f"/static/{name}/",
                "/u/",
                False,
                frozenset({"GET"}),
                None,
                False,
                None,
            ),
        ]
    return RouteTable(entries[:size])


PATHS = [
    "/api/svc1/rooms",
    "/api/svc2/rooms/general/members/42",
    "/api/svc0/snapshot",
    "/ws/svc1/rooms/general",
    "/static/svc2/a/b/c.png",
    "/index.html",
    "/assets/app.js",
    "/api/unknown/x/y/z",
]


def per_lookup(routes: RouteTable[None], number: int) -> float:
    """Nanoseconds per lookup, over the mix of paths."""

    def run() -> None:
        for path in PATHS:
            routes.match(path, "GET")

    return timeit.timeit(run, number=number) / (number * len(PATHS)) * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--number", type=int, default=20000, help="rounds of the mix per rep")
    opts = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    small, big = table(10), table(1000)
    for routes in (small, big):  # warm up
        per_lookup(routes, opts.number // 10)
    ratios, small_ns, big_ns = [], [], []
    for _ in range(opts.reps):  # interleaved, so drift hits both alike
        s, b = per_lookup(small, opts.number), per_lookup(big, opts.number)
        small_ns.append(s)
        big_ns.append(b)
        ratios.append(b / s)
    ratio = statistics.median(ratios)
    print(f"routes: {len(small.entries)} vs {len(big.entries)}; {len(PATHS)} paths, depth 1-6")
    print(f"  10 routes:    {fmt(statistics.median(small_ns), '.0f')} ns per lookup (median)")
    print(f"  1,000 routes: {fmt(statistics.median(big_ns), '.0f')} ns per lookup (median)")
    print(
        f"  1,000 / 10 = {ratio:.2f} (reps {min(ratios):.2f}-{max(ratios):.2f}; "
        f"target <= {TARGET}): {verdict(ratio <= TARGET)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
