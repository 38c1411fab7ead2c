"""promtool (Debian's package `prometheus`), for the tests of infra/prometheus: skipped where it
is not installed, failed under CI, which installs it (.ci/run), as tests/pebble.py does."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def require() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require(), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
