"""The programs a harness runs: where they are (the repo's .venv, nginx, wrk, taskset, py-spy),
installing the missing ones with apt-get, and what they are (versions, the gateway's
interpreter and the state of its code)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

BENCH_DIR: Final = Path(__file__).resolve().parent.parent
REPO: Final = BENCH_DIR.parent
VENV_BIN: Final = REPO / ".venv" / "bin"
PYTHON: Final = str(VENV_BIN / "python")  # the gateway's interpreter, for the bench's servers
GATEWAY: Final = str(VENV_BIN / "daarion-gateway")
PYSPY_PLACES: Final = ("/tmp/pyspy/bin/py-spy", "/tmp/py-spy/bin/py-spy")  # noqa: S108


@dataclass
class Tools:
    nginx: str | None
    wrk: str | None
    taskset: str | None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def found(cls, *, nginx: bool = True, wrk: bool = True) -> Tools:
        """The programs found now (only those asked for; taskset always)."""
        return cls(
            find_program("nginx") if nginx else None,
            find_program("wrk") if wrk else None,
            find_program("taskset"),
        )


def find_program(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/local/sbin") if (p := Path(d, name)).is_file()),
        None,
    )


def find_pyspy() -> str | None:
    """py-spy on PATH, in the venv (``.venv/bin/python -m pip install py-spy``: not in the
    lock) or in /tmp/pyspy (``pip install --target``)."""
    places = (*PYSPY_PLACES, str(VENV_BIN / "py-spy"))
    return shutil.which("py-spy") or next((p for p in places if Path(p).is_file()), None)


@contextlib.contextmanager
def _services_not_started() -> Iterator[None]:
    """Keep Debian's package scripts from starting a system nginx on port 80 while installing."""
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def apt_install(packages: Sequence[str]) -> bool:
    """apt-get install ``packages`` (root only), once more after apt-get update if that fails."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    print(f"installing {' '.join(packages)} with apt-get ...", flush=True)
    with _services_not_started():
        for step in ([], [["apt-get", "update", "-q"]]):  # retry once with fresh lists
            for command in step:
                subprocess.run(command, env=env, capture_output=True, check=False)
            if subprocess.run(install, env=env, capture_output=True, check=False).returncode == 0:
                return True
    return False


def install_missing(names: Sequence[str]) -> list[str]:
    """apt-get install those of ``names`` that are not found; the names still missing after."""
    missing = [name for name in names if find_program(name) is None]
    if missing and not apt_install(missing):
        return missing
    return []


def nginx_and_wrk(install: bool, needs: str) -> Tools:
    """nginx and wrk (apt-get installed first if missing and ``install``), or SystemExit
    saying what ``needs`` them."""
    if install and (missing := install_missing(["nginx", "wrk"])):
        print(f"could not install {', '.join(missing)} (need root and apt-get)", flush=True)
    found = Tools.found()
    if found.nginx is None or found.wrk is None:
        raise SystemExit(needs)
    return found


def first_line(command: list[str]) -> str:
    """The first line ``command`` prints (stdout, then stderr): a version, a commit."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


_PYTHON_INFO: Final = """
import json, os, sys, sysconfig
info = {"version": sys.version, "executable": sys.executable,
        "real_path": os.path.realpath(sys.executable)}
args = sysconfig.get_config_var("CONFIG_ARGS") or ""
info["enable_optimizations"] = "--enable-optimizations" in args
info["with_lto"] = "--with-lto" in args
try:
    import aiohttp, aiohttp.http_parser as hp
    info["aiohttp"] = aiohttp.__version__
    info["aiohttp_c_parser"] = hp.HttpRequestParser.__module__ == "aiohttp._http_parser"
except ImportError:
    pass
try:
    import uvloop
    info["uvloop"] = uvloop.__version__
except ImportError:
    pass
print(json.dumps(info))
"""


def gateway_python() -> dict[str, Any]:
    """The interpreter that runs the gateway: version, build flags, aiohttp and uvloop."""
    out = subprocess.run([PYTHON, "-c", _PYTHON_INFO], capture_output=True, text=True, check=False)
    info: dict[str, Any] = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr}
    if "real_path" in info and shutil.which("dpkg"):
        owner = subprocess.run(
            ["dpkg", "-S", info["real_path"]], capture_output=True, text=True, check=False
        )
        if owner.returncode == 0:
            info["debian_package"] = owner.stdout.split(":")[0]
    return info


def gateway_code() -> str:
    """The commit the gateway's code is at, and whether gateway/ has uncommitted changes."""
    git = ["git", "-C", str(REPO)]
    head = first_line([*git, "rev-parse", "--short", "HEAD"])
    changed = subprocess.run(
        [*git, "status", "--porcelain", "--", "gateway"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    return f"{head} + uncommitted changes in {len(changed)} gateway/ files" if changed else head
