"""loadtests/run: start the demo, run one locust scenario against it headless, keep the report.

    loadtests/run http --time 60s --users 50

The demo runs as its own process (`python -m gateway demo --port <free> --free-ports`), its
log lines going to the report's folder; locust runs as another. What is written to
loadtests/reports/<timestamp>-<scenario>/:

    report.html        locust's report: the stats, the charts, the failures
    stats_stats.csv    one row per request name, and the Aggregated row
    stats_stats_history.csv, stats_failures.csv, stats_exceptions.csv
    demo.log           the gateway's JSON log lines (one per request)
    locust.log         locust's own output

Exit status: locust's (1 when any request failed), or 2 when the demo did not start.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# scenario: (locustfile, users, spawn rate, run time), the defaults
SCENARIOS = {
    "http": ("http_mix.py", 50, 10, "60s"),
    "rooms": ("ws_rooms.py", 40, 10, "60s"),
    "ratelimit": ("ratelimit_probe.py", 5, 5, "30s"),
    "failover": ("failover_drill.py", 20, 10, "60s"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, demo: subprocess.Popen[bytes], seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if demo.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:  # noqa: S310 - our loopback URL
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def seconds(run_time: str) -> int:
    """locust's --run-time (``90``, ``60s``, ``2m``, ``1h30m``) in seconds."""
    if run_time.isdigit():
        return int(run_time)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", run_time)
    if parts is None or not any(parts.groups()):
        raise SystemExit(f"--time {run_time}: use e.g. 90s, 2m, 1h30m")
    hours, minutes, secs = (int(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def run_locust(command: list[str], limit: float) -> int:
    """Run locust; one that has not ended ``limit`` seconds in gets Ctrl-C (it then writes
    its reports), then is killed."""
    locust = subprocess.Popen(command, cwd=HERE)
    try:
        return locust.wait(limit)
    except subprocess.TimeoutExpired:
        print(f"loadtests: locust still running {limit:g} s in; stopping it", flush=True)
        locust.send_signal(signal.SIGINT)
        try:
            return locust.wait(15)
        except subprocess.TimeoutExpired:
            locust.kill()
            locust.wait()
            return 1
    finally:
        if locust.poll() is None:
            locust.kill()
            locust.wait()


def main() -> int:
    parser = argparse.ArgumentParser(prog="loadtests/run", description=__doc__.split("\n")[0])
    parser.add_argument("scenario", nargs="?", default="http", choices=sorted(SCENARIOS))
    parser.add_argument("--time", help="how long locust runs (60s, 2m; default per scenario)")
    parser.add_argument("--users", type=int, help="locust users (default per scenario)")
    parser.add_argument("--spawn-rate", type=float, help="users started a second")
    parser.add_argument("--reports", default=str(HERE / "reports"), help="where reports go")
    args = parser.parse_args()
    locustfile, users, spawn_rate, run_time = SCENARIOS[args.scenario]
    run_time = args.time or run_time
    limit = seconds(run_time) + 30  # start-up, and the users' last requests
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.reports) / f"{stamp}-{args.scenario}"
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GATEWAY_LOG_LEVEL": os.environ.get("GATEWAY_LOG_LEVEL", "INFO")}
    print(f"loadtests: starting the demo on {url} (its log: {out / 'demo.log'})", flush=True)
    with (out / "demo.log").open("wb") as demo_log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--port", str(port), "--free-ports"],
            cwd=ROOT, stdout=demo_log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            if not wait_healthy(url, demo):
                print(f"loadtests: the demo did not start; see {out / 'demo.log'}", flush=True)
                return 2
            command = [
                str(Path(sys.executable).with_name("locust")), "-f", str(HERE / locustfile),
                "--headless", "--host", url,
                "--users", str(args.users or users),
                "--spawn-rate", str(args.spawn_rate or spawn_rate),
                "--run-time", run_time,
                "--csv", str(out / "stats"), "--html", str(out / "report.html"),
                "--logfile", str(out / "locust.log"), "--only-summary",
            ]  # fmt: skip
            print(f"loadtests: {args.scenario}: {' '.join(command[3:])}", flush=True)
            code = run_locust(command, limit)
        finally:
            demo.send_signal(signal.SIGTERM)
            try:
                demo.wait(15)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
    print(f"loadtests: report in {out}/ (report.html, stats_stats.csv)", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
