"""No Docker engine runs here, so the image's own commands are run as the image would run
them: ENTRYPOINT + CMD with the shipped routes.yaml, then the HEALTHCHECK against it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
from pathlib import Path

from .helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
BIN = Path(sys.executable).parent


def instruction(name: str) -> str:
    """The last ``name`` instruction's arguments, continuation lines joined."""
    text = DOCKERFILE.replace("\\\n", " ")
    found: list[str] = re.findall(rf"^{name}\s+(.*)$", text, re.MULTILINE)
    return found[-1]


def exec_form(text: str) -> list[str]:
    form: list[str] = json.loads(text[text.index("[") :])
    return form


def test_dockerfile_copies_what_exists_and_follows_the_standards():
    for line in re.findall(r"^COPY (?!--from)(.*)$", DOCKERFILE, re.MULTILINE):
        for source in shlex.split(line)[:-1]:
            assert (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().split()
    needed = {"gateway", "pyproject.toml", "README.md", "routes.yaml", "requirements"}
    assert not needed & set(ignored)
    healthcheck = instruction("HEALTHCHECK")
    for option in ("--interval=30s", "--timeout=10s", "--retries=3", "--start-period=40s"):
        assert option in healthcheck
    assert 'com.daarion.service="gateway"' in DOCKERFILE
    assert re.search(r"^USER gateway$", DOCKERFILE, re.MULTILINE)  # not root
    assert re.search(r"^FROM python:3\.\d+-slim", DOCKERFILE, re.MULTILINE)  # PGO+LTO builds


def pip_commands(stage: str) -> list[list[str]]:
    """The ``pip install`` / ``pip wheel`` commands of a stage's RUN instructions."""
    text = stage.replace("\\\n", " ")
    commands = []
    for run_line in re.findall(r"^RUN\s+(.*)$", text, re.MULTILINE):
        for command in re.split(r"&&|;", run_line):
            words = shlex.split(command)
            if words[:2] in (["pip", "install"], ["pip", "wheel"]):
                commands.append(words)
    return commands


def test_image_installs_the_locked_runtime_set():
    """Nothing is resolved at build time: the build stage fetches the lock's exact files (by
    hash), the gateway adds itself without dependencies, the final stage installs those wheels
    only. (tests/test_lock.py checks the lock against pyproject.toml.)"""
    build, final = re.split(r"^FROM ", DOCKERFILE, flags=re.MULTILINE)[1:]
    copied = {
        source
        for line in re.findall(r"^COPY (?!--from)(.*)$", build, re.MULTILINE)
        for source in shlex.split(line)[:-1]
    }
    assert {"requirements/runtime.txt", "requirements/build.txt"} <= copied
    commands = pip_commands(build)
    for words in commands:  # every one either installs a lock by hash or takes no dependencies
        if "--require-hashes" in words:
            lock = words[words.index("-r") + 1]
            assert lock in copied, lock  # (the first test checks it exists)
        else:
            assert "--no-deps" in words, words
    locked = [w[w.index("-r") + 1] for w in commands if "--require-hashes" in w]
    assert locked == ["requirements/build.txt", "requirements/runtime.txt"]  # pip, setuptools first
    (gateway,) = [words for words in commands if "." in words]
    assert gateway[:2] == ["pip", "wheel"]
    assert {"--no-deps", "--no-build-isolation"} <= set(gateway)  # the locked setuptools builds it
    assert "--wheel-dir" in gateway
    wheels = gateway[gateway.index("--wheel-dir") + 1]
    runtime = next(w for w in commands if "requirements/runtime.txt" in w)
    assert runtime[:2] == ["pip", "wheel"]
    assert runtime[runtime.index("--wheel-dir") + 1] == wheels
    (install,) = pip_commands(final)
    assert {"--no-index", "--no-deps"} <= set(install)
    assert install[-1] == f"{wheels}/*.whl"
    assert f"COPY --from=build {wheels} {wheels}" in final


async def run(command: list[str], env: dict[str, str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / command[0]), *command[1:], env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await asyncio.wait_for(proc.wait(), 30)


async def test_image_command_serves_and_its_healthcheck_sees_it(tmp_path):
    entrypoint = exec_form(instruction("ENTRYPOINT"))
    cmd = exec_form(instruction("CMD"))
    healthcheck = exec_form(instruction("HEALTHCHECK"))
    env_line = instruction("ENV")
    config = dict(re.findall(r"(\w+)=(\S+)", env_line))["GATEWAY_CONFIG"]
    assert config == "/etc/daarion/routes.yaml"
    port = free_port()
    env = {
        **os.environ,
        "GATEWAY_CONFIG": str(ROOT / "routes.yaml"),  # what COPY puts at /etc/daarion
        "GATEWAY_PORT": str(port),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_ADMIN_PORT": str(free_port()),
        "REDIS_URL": "memory://",
    }
    assert await run(healthcheck, env) == 1  # nothing listens yet: unhealthy
    server = await asyncio.create_subprocess_exec(
        str(BIN / entrypoint[0]), *entrypoint[1:], *cmd, env=env,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        messages: list[str] = []  # the worker's "gateway started" and the supervisor's
        while "gateway started" not in messages:  # "workers started", in either order
            line = await asyncio.wait_for(server.stdout.readline(), 20)
            assert line, messages  # the output ended before the gateway started
            messages.append(json.loads(line)["message"])
        assert await run(healthcheck, env) == 0
    finally:
        server.terminate()
        assert await asyncio.wait_for(server.wait(), 20) == 0
