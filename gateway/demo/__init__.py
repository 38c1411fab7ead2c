"""``daarion-gateway demo``: the gateway in front of stand-in DAARION services on loopback,
in one process (``stack.py``; the stand-ins in ``standins.py``, the config in ``demo.yaml``).

This module is what the command line loads for every command, so it holds the options only
and imports the gateway when the demo runs.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="listen port (8080; 0: a free one)")
    parser.add_argument(
        "--free-ports",
        action="store_true",
        help="put the stand-in services on free ports instead of DAARION's (7001, 8897, ...)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; its log level is $GATEWAY_LOG_LEVEL's (INFO), as for serve."""
    from .stack import main  # noqa: PLC0415 - the whole gateway, for the demo only

    level = os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        level = "INFO"
    return main(args.host, args.port, args.free_ports, level)
