"""The lock files (requirements/*.txt, written by scripts/lock) against pyproject.toml: every
range the library declares holds for the locked version, markers survive, the two sets agree,
every pin is hashed, and this environment (made by scripts/bootstrap) is the locked one."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKS = ROOT / "requirements"

# The machines the locks are for (scripts/lock's target), and a few they must keep out or in.
TARGET = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
          "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "python_version": "3.11",
          "python_full_version": "3.11.2"}  # fmt: skip
ENVIRONMENTS = [
    TARGET,
    {**TARGET, "python_full_version": "3.11.14"},  # the image's newer 3.11
    {**TARGET, "sys_platform": "win32", "platform_system": "Windows", "os_name": "nt"},
    {**TARGET, "sys_platform": "darwin", "platform_system": "Darwin"},
    {**TARGET, "implementation_name": "pypy", "platform_python_implementation": "PyPy"},
]


@dataclass(frozen=True)
class Pin:
    version: str
    marker: Marker | None
    hashes: int


def read_lock(name: str) -> dict[str, Pin]:
    """``name==version [; marker]`` entries with their ``--hash`` options (continuation lines
    joined, comments dropped)."""
    lines = [line.split("#", 1)[0] for line in (LOCKS / name).read_text().splitlines()]
    text = "\n".join(lines).replace("\\\n", " ")
    pins: dict[str, Pin] = {}
    for entry in text.splitlines():
        if not entry.strip():
            continue
        hashes = len(re.findall(r"--hash=sha256:[0-9a-f]{64}", entry))
        requirement = Requirement(re.sub(r"--hash=\S+", "", entry).strip())
        name_ = canonicalize_name(requirement.name)
        (spec,) = requirement.specifier  # exactly one ==version per line
        assert spec.operator == "==", entry
        assert name_ not in pins, f"{name} pins {name_} twice"
        pins[name_] = Pin(spec.version, requirement.marker, hashes)
    return pins


RUNTIME = read_lock("runtime.txt")
LOAD = read_lock("load.txt")
DEV = read_lock("dev.txt")
BUILD = read_lock("build.txt")


def declared(group: list[str]) -> list[Requirement]:
    return [Requirement(text) for text in group]


def check_ranges(requirements: list[Requirement], lock: dict[str, Pin], lock_name: str) -> None:
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{lock_name} lacks {requirement} (run scripts/lock)"
        pin = lock[name]
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{lock_name} pins {name}=={pin.version}, outside pyproject's {requirement}"
        )
        for extra in sorted(requirement.extras):  # redis[hiredis]: the extra's packages too
            metadata = importlib.metadata.metadata(requirement.name)
            for wanted in map(Requirement, metadata.get_all("Requires-Dist") or []):
                marker = wanted.marker
                if (
                    marker
                    and marker.evaluate({**TARGET, "extra": extra})
                    and not marker.evaluate({**TARGET, "extra": ""})
                ):
                    assert canonicalize_name(wanted.name) in lock, f"{lock_name}: {wanted}"
        for environment in ENVIRONMENTS:  # the marker survived (uvloop's: not on Windows)
            wanted_there = requirement.marker is None or requirement.marker.evaluate(environment)
            locked_there = pin.marker is None or pin.marker.evaluate(environment)
            assert wanted_there == locked_there, (name, pin.marker, environment)


def test_runtime_lock_satisfies_pyproject_dependencies():
    runtime = declared(PYPROJECT["project"]["dependencies"])
    check_ranges(runtime, RUNTIME, "runtime.txt")
    check_ranges(runtime, DEV, "dev.txt")
    uvloop = RUNTIME["uvloop"]
    assert uvloop.marker is not None
    assert not uvloop.marker.evaluate(ENVIRONMENTS[2])  # win32


def test_dev_lock_satisfies_the_test_extra():
    check_ranges(declared(PYPROJECT["project"]["optional-dependencies"]["test"]), DEV, "dev.txt")


def test_load_and_dev_locks_satisfy_the_load_extra():
    load = declared(PYPROJECT["project"]["optional-dependencies"]["load"])
    check_ranges(load, LOAD, "load.txt")
    check_ranges(load, DEV, "dev.txt")  # tests/test_loadtests.py runs locust


def test_build_lock_satisfies_the_build_system():
    check_ranges(declared(PYPROJECT["build-system"]["requires"]), BUILD, "build.txt")
    assert "pip" in BUILD


@pytest.mark.parametrize(
    ("smaller", "larger", "name"),
    [(RUNTIME, LOAD, "load.txt"), (RUNTIME, DEV, "dev.txt"), (LOAD, DEV, "dev.txt")],
    ids=["runtime-in-load", "runtime-in-dev", "load-in-dev"],
)
def test_each_lock_runs_the_versions_of_the_one_it_extends(smaller, larger, name):
    """What CI tests is what the image runs, and what loadtests/run measures. It is also what
    lets scripts/bootstrap install a larger set over a smaller one."""
    for package, pin in smaller.items():
        assert package in larger, f"{name} lacks {package}"
        assert larger[package].version == pin.version, package
        for environment in ENVIRONMENTS:  # a larger set's marker may be wider
            if pin.marker is None or pin.marker.evaluate(environment):
                wider = larger[package].marker
                assert wider is None or wider.evaluate(environment), package
    for package in BUILD.keys() & larger.keys():
        assert larger[package].version == BUILD[package].version, package


@pytest.mark.parametrize(
    "lock", [RUNTIME, LOAD, DEV, BUILD], ids=["runtime", "load", "dev", "build"]
)
def test_every_pin_is_hashed(lock):
    for name, pin in lock.items():
        assert pin.hashes >= 1, name


def test_this_environment_is_the_locked_one():
    """scripts/bootstrap installed dev.txt and build.txt: every pin that applies here is the
    version installed (a stale .venv or an unlocked install shows here)."""
    for name, pin in {**DEV, **BUILD}.items():
        if pin.marker is None or pin.marker.evaluate():
            assert importlib.metadata.version(name) == pin.version, name
