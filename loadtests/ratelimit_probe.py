"""Scenario `ratelimit`: is the gateway's limit the standards' (10 r/s, burst 20 per client
address, nginx's arithmetic)? Each user is its own client (common.Identity) and probes in
rounds: from an empty bucket it sends 60 requests paced at 50 a second, well over the rate,
then waits for its bucket to drain. For the send times it actually achieved, nginx's
algorithm says how many of the 60 pass (21 at once, then one per 100 ms); the gateway must
agree within 3 requests. In locust's stats:

  GET    allowed (200)     requests that passed
  GET    limited (429)     requests refused, each with Retry-After (a 429 without is a failure)
  CHECK  429 share         one per round: a failure when the counts disagree with nginx's

At the end it prints the share of 429s, measured and expected. LOADTEST_RATE and
LOADTEST_BURST (10, 20) describe another zone.

    loadtests/run ratelimit
"""

from __future__ import annotations

import logging
import os
import time

from common import DaarionUser
from locust import constant, events, task

RATE = float(os.environ.get("LOADTEST_RATE", "10"))  # requests a second
BURST = int(os.environ.get("LOADTEST_BURST", "20"))
SENT_PER_ROUND = 60
PACE = 1 / 50  # seconds between two sends
TOLERANCE = 3  # requests: a send time and its arrival differ by a little
PATH = "/api/city/rooms"
totals = {"sent": 0, "limited": 0, "expected_limited": 0}


def nginx_allowed(times_ms: list[int], rate: float = RATE, burst: int = BURST) -> list[bool]:
    """ngx_http_limit_req's decisions for requests at these times (ms) on an empty bucket:
    excess in milli-requests, drained by the rate since the last *accepted* request."""
    decisions, excess, last = [], None, 0
    for now in times_ms:
        if excess is None:  # a new bucket: the first request passes with no excess
            excess, last = 0, now
            decisions.append(True)
            continue
        candidate = max(excess - int(rate * 1000 * (now - last) / 1000) + 1000, 0)
        if candidate > burst * 1000:
            decisions.append(False)
        else:
            excess, last = candidate, now
            decisions.append(True)
    return decisions


class LimitProbe(DaarionUser):
    token = False  # the city's rooms need none
    wait_time = constant(BURST / RATE + 0.5)  # an empty bucket between rounds

    @task
    def probe_round(self) -> None:
        times, limited = [], 0
        start = time.monotonic()
        for i in range(SENT_PER_ROUND):
            delay = start + i * PACE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            times.append(round(time.monotonic() * 1000))
            with self.client.get(PATH, catch_response=True, name="probe") as response:
                if response.status_code == 200:
                    response.request_meta["name"] = "allowed (200)"
                elif response.status_code == 429:
                    response.request_meta["name"] = "limited (429)"
                    limited += 1
                    if "Retry-After" not in response.headers:
                        response.failure("429 without Retry-After")
                        continue
                    response.success()
                else:
                    response.failure(f"expected 200 or 429, got {response.status_code}")
        expected = SENT_PER_ROUND - sum(nginx_allowed(times))
        totals["sent"] += SENT_PER_ROUND
        totals["limited"] += limited
        totals["expected_limited"] += expected
        within = abs(limited - expected) <= TOLERANCE
        self.environment.events.request.fire(
            request_type="CHECK",
            name="429 share",
            response_time=100 * limited / SENT_PER_ROUND,  # the round's share, in %
            response_length=0,
            exception=None
            if within
            else AssertionError(
                f"{limited} of {SENT_PER_ROUND} refused; nginx's arithmetic says {expected}"
            ),
            context={},
        )


@events.quitting.add_listener
def _report(environment: object, **kwargs: object) -> None:
    sent = totals["sent"]
    if sent:
        line = (
            f"429 share: {100 * totals['limited'] / sent:.1f} % measured, "
            f"{100 * totals['expected_limited'] / sent:.1f} % expected from {RATE:g} r/s burst "
            f"{BURST} ({sent} requests in whole rounds)"
        )
        logging.getLogger("probe").info(line)
        print(line, flush=True)
