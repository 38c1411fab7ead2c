"""Scenario `failover`, against the demo: users search (the multimodal service, on noda2 with
noda1 as its fallback) while a drill takes noda2 down a third of the way into the run and
brings it back at two thirds. No search should fail: the gateway retries refused connections
on noda1, ejects noda2, and returns to it once its probes pass. In locust's stats:

  GET    /api/search [noda2], [noda1]   which node answered (the body's served_by)
  DRILL  noda2 offline / online         the demo's control (POST /demo/noda2/...)
  DRILL  noda2 out of rotation          from noda2 going down until /gateway/upstreams says
                                        it is ejected or down (the response time)
  DRILL  noda2 back in rotation         from noda2 returning until it is up again

    loadtests/run failover
"""

from __future__ import annotations

import time

from common import DaarionUser
from locust import constant, constant_throughput, task


class Searcher(DaarionUser):
    wait_time = constant_throughput(4)

    @task
    def search(self) -> None:
        with self.client.get("/api/search?q=drill", headers=self.auth, name="/api/search",
                             catch_response=True) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(f"expected 200, got {response.status_code}")
                return
            node = response.json().get("served_by")
            response.request_meta["name"] = f"/api/search [{node}]"


class Drill(DaarionUser):
    fixed_count = 1  # one drill, however many searchers
    token = False
    distinct = False  # it reads /gateway/upstreams: from the load generator's own address
    wait_time = constant(3600)

    def _fire(self, name: str, started: float, failure: str | None = None) -> None:
        self.environment.events.request.fire(
            request_type="DRILL",
            name=name,
            response_time=(time.monotonic() - started) * 1000,
            response_length=0,
            exception=AssertionError(failure) if failure else None,
            context={},
        )

    def _noda2(self) -> str:
        with self.client.get("/gateway/upstreams", name="/gateway/upstreams",
                             catch_response=True) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(f"/gateway/upstreams: {response.status_code}")
                return "unknown"
            targets = response.json()["services"]["search"]["targets"]
            return str(next(t["state"] for t in targets if t["node"] == "noda2"))

    def _switch(self, state: str) -> float:
        started = time.monotonic()
        with self.client.post(f"/demo/noda2/{state}", name=f"noda2 {state}",
                              catch_response=True) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(f"the demo's control answered {response.status_code}")
            response.request_meta["request_type"] = "DRILL"
        return started

    def _until(self, name: str, started: float, states: set[str], limit: float) -> None:
        while (state := self._noda2()) not in states:
            if time.monotonic() - started > limit:
                self._fire(name, started, f"noda2 still {state} after {limit:g} s")
                return
            time.sleep(0.1)
        self._fire(name, started)

    @task
    def drill(self) -> None:
        run_time = self.environment.parsed_options.run_time or 60
        begun = time.monotonic()
        time.sleep(max(run_time * 0.3 - (time.monotonic() - begun), 0))
        down = self._switch("offline")
        self._until("noda2 out of rotation", down, {"ejected", "down"}, 15)
        time.sleep(max(run_time * 0.6 - (time.monotonic() - begun), 0))
        up = self._switch("online")
        self._until("noda2 back in rotation", up, {"up"}, 15)
