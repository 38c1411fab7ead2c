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

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
BIN = Path(sys.executable).parent


def instruction(name: str) -> str:
    """The last ``name`` instruction's arguments, continuation lines joined."""
    text = DOCKERFILE.replace("\\\n", " ")
    return re.findall(rf"^{name}\s+(.*)$", text, re.MULTILINE)[-1]


def exec_form(text: str) -> list[str]:
    return json.loads(text[text.index("[") :])


def test_dockerfile_copies_what_exists_and_follows_the_standards():
    for line in re.findall(r"^COPY (?!--from)(.*)$", DOCKERFILE, re.MULTILINE):
        for source in shlex.split(line)[:-1]:
            assert (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"gateway", "pyproject.toml", "README.md", "routes.yaml"} & set(ignored)
    healthcheck = instruction("HEALTHCHECK")
    for option in ("--interval=30s", "--timeout=10s", "--retries=3", "--start-period=40s"):
        assert option in healthcheck
    assert 'com.daarion.service="gateway"' in DOCKERFILE
    assert re.search(r"^USER gateway$", DOCKERFILE, re.MULTILINE)  # not root
    assert re.search(r"^FROM python:3\.\d+-slim", DOCKERFILE, re.MULTILINE)  # PGO+LTO builds


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
        "REDIS_URL": "memory://",
    }
    assert await run(healthcheck, env) == 1  # nothing listens yet: unhealthy
    server = await asyncio.create_subprocess_exec(
        str(BIN / entrypoint[0]), *entrypoint[1:], *cmd, env=env,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        started = json.loads(await asyncio.wait_for(server.stdout.readline(), 20))
        assert started["message"] == "gateway started"
        assert await run(healthcheck, env) == 0
    finally:
        server.terminate()
        assert await asyncio.wait_for(server.wait(), 20) == 0
