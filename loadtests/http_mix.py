"""Scenario `http`: the DAARION HTTP mix, as the web app calls the API. Each user is its own
client (common.Identity) at 4 requests a second, under the 10 r/s limit: no request should
fail or be refused, so any failure in the stats is the gateway's or a service's.

    loadtests/run http            # or: locust -f loadtests/http_mix.py --host http://127.0.0.1:8080
"""

from __future__ import annotations

import itertools
import random

from common import DaarionUser
from locust import constant_throughput, task

_rooms = itertools.count()
QUERIES = ("gateway", "noda2", "city rooms", "microdao", "agents")


class HttpMix(DaarionUser):
    wait_time = constant_throughput(4)  # requests a second per user (the limit is 10)

    @task(10)
    def rooms(self) -> None:
        self.client.get("/api/city/rooms", headers=self.auth)

    @task(1)
    def create_room(self) -> None:
        name = f"{self.identity.name}-{next(_rooms)}"
        with self.client.post(
            "/api/city/rooms", json={"name": name}, headers=self.auth, catch_response=True
        ) as response:
            if response.status_code != 201:
                response.failure(f"expected 201, got {response.status_code}")

    @task(6)
    def search(self) -> None:
        query = random.choice(QUERIES)
        self.client.get(f"/api/search?q={query}", headers=self.auth, name="/api/search?q=")

    @task(2)
    def search_images(self) -> None:
        self.client.get(
            "/api/search/images?q=city", headers=self.auth, name="/api/search/images?q="
        )

    @task(3)
    def agents(self) -> None:
        self.client.get("/api/agents/agents", headers=self.auth)

    @task(2)
    def invoke(self) -> None:
        body = {"agent": "ag_echo", "input": "hello"}
        self.client.post("/api/agents/invoke", json=body, headers=self.auth)

    @task(1)
    def web_app(self) -> None:
        self.client.get("/")

    @task(1)
    def health(self) -> None:
        self.client.get("/health")

    @task(1)
    def no_token(self) -> None:
        """A protected API without a token: 401, and the service is never asked."""
        self._expect("/api/agents/agents", "401 without a token", 401)

    @task(1)
    def bad_path(self) -> None:
        self._expect("/api/city/%2e%2e/x", "400 bad path", 400)

    def _expect(self, path: str, name: str, status: int) -> None:
        with self.client.get(path, name=name, catch_response=True) as response:
            if response.status_code == status:
                response.success()
            else:
                response.failure(f"expected {status}, got {response.status_code}")
