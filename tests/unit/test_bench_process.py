"""What the benchmark harness reads from /proc about the processes it loads (bench/lib/process.py),
against real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.lib import process

BUSY = "import time\nend = time.monotonic() + 2.0\nwhile time.monotonic() < end: pass\n"
IDLE = "import time\ntime.sleep(2.0)\n"


def spawn_on(cpu: int, code: str) -> subprocess.Popen[bytes]:
    """A Python process pinned to ``cpu`` running ``code``, once it says it is pinned."""
    pinned = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nprint(flush=True)\n{code}"
    child = subprocess.Popen([sys.executable, "-c", pinned], stdout=subprocess.PIPE)
    assert child.stdout is not None
    child.stdout.readline()
    return child


def test_preemptions_count_a_process_sharing_its_cpu_and_not_a_sleeping_one() -> None:
    cpu = min(os.sched_getaffinity(0))
    busy = [spawn_on(cpu, BUSY), spawn_on(cpu, BUSY)]  # two that never yield: one CPU
    idle = spawn_on(cpu, IDLE)
    try:
        before = [process.preemptions(p.pid) for p in (*busy, idle)]
        time.sleep(0.8)
        after = [process.preemptions(p.pid) for p in (*busy, idle)]
    finally:
        for p in (*busy, idle):
            p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
    gained = [b - a for a, b in zip(before, after, strict=True)]
    # The scheduler hands one CPU between two busy processes every few milliseconds.
    assert gained[0] > 10
    assert gained[1] > 10
    assert gained[2] <= 2  # it slept: it gave the CPU up itself (voluntary switches)
