"""The command line's names, and the signals ``serve`` handles: what the entry (``start.py``),
the parser (``cli.py``) and the supervisor share, with nothing else imported."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Final

COMMANDS: Final = (
    "serve", "check", "schema", "healthcheck", "restart", "demo", "worker", "preflight"
)  # fmt: skip
# What the supervisor handles: stop (SIGTERM, SIGINT), reload (SIGHUP), restart (SIGUSR2).
SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)


def serves(args: Sequence[str]) -> bool:
    """Whether a command line runs ``serve`` (the command when none is named)."""
    return not args or args[0] == "serve" or args[0] not in (*COMMANDS, "-h", "--help")
