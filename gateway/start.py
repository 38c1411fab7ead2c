"""The ``daarion-gateway`` command's first step, before the rest of the gateway is imported
(that takes about a tenth of a second): for ``serve``, the supervisor's signals are blocked
until its handlers are in (it unblocks them), since their default action would kill a
gateway that is starting (a ``systemctl reload`` or a stop right after a start). Delivered
then, they are done as at any other time."""

from __future__ import annotations

import signal
import sys

from .commands import SIGNALS, serves


def main() -> int:
    if serves(sys.argv[1:]):
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    from .cli import main as run  # noqa: PLC0415 - imported once the signals wait

    return run()
