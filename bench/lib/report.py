"""Reporting: medians, paired ratios, number formats, verdicts, aligned tables and the JSON
results file."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .process import BUSY_CORES

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    class HarnessOptions(DataclassInstance, Protocol):
        @property
        def json_path(self) -> Path | None: ...


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def verdict(ok: bool | None) -> str:
    return "?" if ok is None else "ok" if ok else "MISS"


def yes(value: object) -> str:
    return "yes" if value is True else "no" if value is False else "?"


class Measured(Protocol):
    @property
    def target(self) -> str: ...


M = TypeVar("M", bound=Measured)


def paired(
    mine: Iterable[M],
    runs: Sequence[M],
    other: str,
    same: Callable[[M], Hashable],
    compare: Callable[[M, M], float | None],
) -> list[float]:
    """``compare(run, base)`` for each of ``mine``, base being ``other``'s run in ``runs`` with
    the same ``same(run)`` (the rep and the load shape): paired figures, which drift on a shared
    machine hits alike. Runs without a base, or that ``compare`` gives None for, are left out."""
    bases: dict[Hashable, M] = {}
    for run in runs:
        if run.target == other:
            bases.setdefault(same(run), run)
    values = []
    for run in mine:
        base = bases.get(same(run))
        if base is not None and (value := compare(run, base)) is not None:
            values.append(value)
    return values


def disturbance(
    other_cpu: Sequence[float],
    runs: str = "runs",
    noisy: str = "their figures are noisy; rerun when it is idle",
) -> str | None:
    """A warning when other work on the machine used more than BUSY_CORES during some runs."""
    disturbed = [cores for cores in other_cpu if cores > BUSY_CORES]
    if not disturbed:
        return None
    return (
        f"WARNING: {len(disturbed)} of {len(other_cpu)} {runs} shared the machine with other "
        f"work (other CPU up to {max(disturbed):.2f} cores): {noisy}"
    )


def table(rows: Sequence[Sequence[str]], *, left: int = 1, rule: bool = True) -> list[str]:
    """Rows of cells as aligned lines, indented by two spaces: the first ``left`` columns
    left-aligned, the others right-aligned; with ``rule``, dashes under the first row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for number, cells in enumerate(rows):
        lines.append(
            "  "
            + "  ".join(
                c.ljust(w) if i < left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
        if rule and number == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return lines


def print_table(rows: Sequence[Sequence[str]], *, left: int = 1, rule: bool = True) -> None:
    for line in table(rows, left=left, rule=rule):
        print(line)


def print_headline(target: str, lines: Sequence[str], environment: dict[str, Any]) -> None:
    """The headline (what was aimed at, then its lines) and the environment."""
    print(f"\nHeadline ({target}):")
    for line in lines:
        print(f"  {line}")
    print("\nEnvironment:")
    for key, value in environment.items():
        print(f"  {key}: {value}")


def write_results(options: HarnessOptions, **parts: object) -> None:
    """``--json PATH``'s results file, when the ``options`` (a dataclass) have a ``json_path``:
    the options, then ``parts``."""
    if (path := options.json_path) is not None:
        given = {**dataclasses.asdict(options), "json_path": str(path)}
        write_json(path, {"options": given, **parts})


def finish(
    started: float,
    options: HarnessOptions,
    environment: dict[str, Any],
    headline: list[str],
    *,
    runs: Sequence[DataclassInstance],
    discarded: Sequence[DataclassInstance],
    **more: object,
) -> int:
    """The end of a bench that went well: its results file (``--json``: the options, the
    environment, every run kept and dropped, ``more``, the headline, the time it took), the
    time printed; the exit status (0)."""
    elapsed = time.monotonic() - started
    write_results(
        options,
        environment=environment,
        runs=[dataclasses.asdict(run) for run in runs],
        discarded_runs=[dataclasses.asdict(run) for run in discarded],
        **more,
        headline=headline,
        elapsed_seconds=elapsed,
    )
    print(f"\nElapsed: {elapsed:.1f} s")
    return 0


def write_json(path: Path, data: dict[str, Any]) -> None:
    """The results as JSON at ``path`` (what JSON cannot hold is written as text)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nJSON written to {path}")
