"""loadtests/run: each locust scenario, briefly, against the demo it starts; what locust's
stats say (its CSV) and what the gateway logged. Each run is a few seconds of real load."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import orjson
import pytest

from .helpers import ROOT

RUN = ROOT / "loadtests" / "run"


def run(scenario: str, reports: Path, *args: str, env: dict[str, str] | None = None,
        code: int = 0) -> tuple[dict[tuple[str, str], dict[str, str]], Path, str]:  # fmt: skip
    """Run a scenario; its stats by (type, name), its report folder, what it printed."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LOADTEST_")}
    environment.update(env or {})
    done = subprocess.run(
        [str(RUN), scenario, "--reports", str(reports), *args],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=90, env=environment,
    )  # fmt: skip
    assert done.returncode == code, done.stdout + done.stderr
    assert "locust still running" not in done.stdout  # every user stopped at the run's end
    (folder,) = reports.iterdir()
    assert f"report in {folder}/" in done.stdout
    assert (folder / "report.html").stat().st_size > 0
    with (folder / "stats_stats.csv").open() as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    return rows, folder, done.stdout


def count(rows, kind: str, name: str) -> int:
    return int(rows[(kind, name)]["Request Count"])


def no_failures(rows) -> None:
    total = rows[("", "Aggregated")]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0, {k: r["Failure Count"] for k, r in rows.items()}


def gateway_lines(folder: Path) -> list[dict[str, object]]:
    lines = (folder / "demo.log").read_text().splitlines()
    return [orjson.loads(line) for line in lines if line.startswith("{")]


def test_the_http_mix_passes_with_each_user_its_own_client(tmp_path):
    rows, folder, _ = run("http", tmp_path, "--time", "3s", "--users", "6", "--spawn-rate", "6")
    no_failures(rows)
    # The two heaviest tasks (of the mix's 29 weights, 10 and 6) in ~70 requests; the others
    # may not come up in a run this short.
    assert count(rows, "GET", "/api/city/rooms") > 0
    assert count(rows, "GET", "/api/search?q=") > 0
    requests = [line for line in gateway_lines(folder) if line.get("message") == "request"]
    assert not [line for line in requests if line["status"] == 429]
    # The gateway saw six clients, each user from its own address (common.Identity).
    clients = {line["client"] for line in requests if str(line["path"]).startswith("/api/")}
    assert clients == {f"127.1.0.{i}" for i in range(1, 7)}


def test_rooms_report_the_message_round_trip_as_its_own_type(tmp_path):
    rows, _, _ = run("rooms", tmp_path, "--time", "3s", "--users", "4", "--spawn-rate", "4")
    no_failures(rows)
    assert count(rows, "WS", "join") >= 4
    round_trips = sum(int(r["Request Count"]) for (kind, _), r in rows.items() if kind == "WS-RTT")
    assert round_trips >= 4


def test_the_rate_limit_probe_finds_nginxs_share_of_429s(tmp_path):
    rows, _, printed = run("ratelimit", tmp_path, "--time", "5s", "--users", "2")
    no_failures(rows)  # every round's 429 count within 3 of nginx's arithmetic
    assert count(rows, "CHECK", "429 share") >= 2
    assert count(rows, "GET", "limited (429)") > 0
    assert count(rows, "GET", "allowed (200)") >= 2 * 21
    assert "429 share:" in printed


def test_the_rate_limit_probe_fails_when_the_limit_is_not_the_expected_one(tmp_path):
    # Told the limit is 5 r/s burst 10, the probe finds the gateway's 10 r/s burst 20 wrong.
    env = {"LOADTEST_RATE": "5", "LOADTEST_BURST": "10"}
    rows, _, _ = run("ratelimit", tmp_path, "--time", "3s", "--users", "1", env=env, code=1)
    check = rows[("CHECK", "429 share")]
    assert int(check["Failure Count"]) == int(check["Request Count"]) >= 1


@pytest.mark.timeout(120)
def test_the_failover_drill_loses_no_search_and_sees_noda2_leave_and_return(tmp_path):
    rows, folder, _ = run("failover", tmp_path, "--time", "10s", "--users", "5")
    no_failures(rows)
    assert count(rows, "GET", "/api/search [noda2]") > 0
    assert count(rows, "GET", "/api/search [noda1]") > 0  # while noda2 was offline
    assert count(rows, "DRILL", "noda2 out of rotation") == 1
    assert count(rows, "DRILL", "noda2 back in rotation") == 1
    messages = [line["message"] for line in gateway_lines(folder)]
    assert "demo: noda2 offline" in messages
    assert "demo: noda2 online" in messages
