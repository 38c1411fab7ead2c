"""The command-line options the wrk harnesses built on one gateway stack share (bench/flood.py,
bench/https.py): run length, reps, connections, the gateway's log level, the JSON file,
apt-get, ``--rerun-disturbed`` and ``--keep``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .process import BUSY_CORES


@dataclass(frozen=True)
class WrkOptions:
    duration: int  # seconds per wrk run
    reps: int
    conns: int
    log_level: str  # the gateway's
    json_path: Path | None
    install: bool  # apt-get nginx and wrk when missing
    rerun_disturbed: int
    keep: bool  # the work directory (configs, logs)


@dataclass(frozen=True)
class Defaults:
    """What a harness's shared options default to and say."""

    reps: int
    reps_help: str
    quick_duration: int  # --quick: seconds per run
    quick_reps: int | None  # --quick: reps (None: as given)
    rerun_group: str  # what --rerun-disturbed measures again ("a quiet/flood pair")
    idle_wait: float  # --rerun-disturbed: longest wait for an idle machine


def add_wrk_options(parser: argparse.ArgumentParser, defaults: Defaults) -> None:
    quick = f"{defaults.quick_duration} s runs: a smoke test"
    if defaults.quick_reps is not None:
        quick = f"{defaults.quick_reps} rep of {quick}"
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run (8)")
    parser.add_argument("--reps", type=int, default=defaults.reps, help=defaults.reps_help)
    parser.add_argument("--conns", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--log-level", default="INFO", help="the gateway's (default INFO)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--no-install", action="store_true", help="do not apt-get nginx, wrk")
    parser.add_argument(
        "--rerun-disturbed",
        type=int,
        default=0,
        metavar="N",
        help=f"measure {defaults.rerun_group} again, up to N times, when other work on the "
        f"machine used more than {BUSY_CORES} cores during it (waits up to "
        f"{defaults.idle_wait:.0f} s for an idle machine first; keeps the least disturbed "
        "attempt)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")


def wrk_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: Defaults
) -> dict[str, Any]:
    """The WrkOptions fields from parsed ``args`` (``parser.error`` on bad values)."""
    if min(args.duration, args.reps, args.conns) < 1 or args.rerun_disturbed < 0:
        parser.error("--duration, --reps, --conns must be >= 1; --rerun-disturbed >= 0")
    quick = args.quick
    return {
        "duration": defaults.quick_duration if quick else args.duration,
        "reps": defaults.quick_reps if quick and defaults.quick_reps else args.reps,
        "conns": args.conns,
        "log_level": args.log_level.upper(),
        "json_path": args.json,
        "install": not args.no_install,
        "rerun_disturbed": args.rerun_disturbed,
        "keep": args.keep,
    }
