"""What the benchmark harness reads from /proc about the processes it loads (bench/lib/process.py),
against real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.lib import process

BUSY = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass\n"
IDLE = "import time\ntime.sleep(1.5)\n"


def spawn_on(cpu: int, code: str) -> subprocess.Popen[bytes]:
    pinned = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\n{code}"
    return subprocess.Popen([sys.executable, "-c", pinned])


def test_preemptions_count_a_process_sharing_its_cpu_and_not_a_sleeping_one() -> None:
    cpu = min(os.sched_getaffinity(0))
    busy = [spawn_on(cpu, BUSY), spawn_on(cpu, BUSY)]  # two that never yield: one CPU
    idle = spawn_on(cpu, IDLE)
    try:
        time.sleep(0.3)  # started and pinned
        before = [process.preemptions(p.pid) for p in (*busy, idle)]
        time.sleep(0.8)
        after = [process.preemptions(p.pid) for p in (*busy, idle)]
    finally:
        for p in (*busy, idle):
            p.kill()
            p.wait()
    gained = [b - a for a, b in zip(before, after, strict=True)]
    # The scheduler hands one CPU between two busy processes every few milliseconds.
    assert gained[0] > 10
    assert gained[1] > 10
    assert gained[2] == 0  # it slept: it gave the CPU up itself (voluntary switches)
