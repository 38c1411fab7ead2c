"""Locust load profile for a running gateway: a mix of DAARION API calls.

    .venv/bin/pip install -e '.[load]'
    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 \
        --headless -u 200 -r 50 -t 1m

The figures that the issues' targets refer to come from the benchmark harness (bench/run.py),
which pins CPUs and compares against nginx in the same run; this profile is for exploring a
deployment with realistic paths (unknown routes and bad paths included).
"""

from __future__ import annotations

import random

from locust import FastHttpUser, between, task

SERVICES = ("city", "agents", "secondme", "microdao", "search", "vector")


class ApiClient(FastHttpUser):  # type: ignore[misc]  # locust ships no type information
    wait_time = between(0.0, 0.05)

    @task(20)
    def api_get(self) -> None:
        service = random.choice(SERVICES)
        self.client.get(f"/api/{service}/list?page={random.randint(1, 5)}", name=f"/api/{service}/")

    @task(5)
    def api_post(self) -> None:
        self.client.post("/api/agents/invoke", json={"agent": "echo"}, name="/api/agents/invoke")

    @task(1)
    def health(self) -> None:
        self.client.get("/health")

    @task(1)
    def unknown_service(self) -> None:
        with self.client.get("/api/nope/x", catch_response=True, name="/api/nope/") as response:
            if response.status_code == 404:
                response.success()

    @task(1)
    def bad_path(self) -> None:
        with self.client.get("/api/city/%2e%2e/x", catch_response=True, name="bad path") as r:
            if r.status_code == 400:
                r.success()
