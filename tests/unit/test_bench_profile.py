"""bench/lib/profile.py: py-spy's raw samples read back and summed up by part, as
`bench/run.py --profile` prints them. The stacks are shaped like real ones of a gateway
worker (py-spy --subprocesses --full-filenames), with the files of this checkout and venv, so
that the line a sample stopped on can be read, as the summary does to find socket writes."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from types import ModuleType

import aiohttp.http_writer
import aiohttp.web_response

import gateway.upstream.http
from bench.lib import profile

ROOT = (
    'process 13209:"python daarion-gateway serve --config x.yaml";'
    'process 13210:"python -m gateway worker --control 8 --log-level INFO";'
    "_run_module_as_main (<frozen runpy>:198);"
    f"<module> ({Path(gateway.__file__).parent / '__main__.py'}:5);"
    f"main ({Path(gateway.__file__).parent / 'cli.py'}:130);"
    "run (/venv/lib/python3.11/site-packages/uvloop/__init__.py:92);"
    "Runner.run (/usr/lib/python3.11/asyncio/runners.py:118)"
)


def line_of(module: ModuleType, text: str) -> int:
    """The number of the first line of ``module`` that holds ``text``."""
    lines = Path(inspect.getfile(module)).read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


def frame(function: str, module: ModuleType, text: str) -> str:
    return f"{function} ({inspect.getfile(module)}:{line_of(module, text)})"


WRITE = frame("StreamWriter._write", aiohttp.http_writer, "transport.write(chunk)")
SERVER = frame("StreamResponse.write", aiohttp.web_response, "async def write(")
RELAY = frame("relay", gateway.upstream.http, "async def relay(")
LOGGING = frame("Logger.info", logging, "def info(")


def stacks(*lines: str) -> list[tuple[list[profile.Frame], int]]:
    return profile.parse_raw("\n".join(lines) + "\n")


def test_frames_read_back() -> None:
    [(frames, count)] = stacks(f"{ROOT};{RELAY} 7")
    assert count == 7
    # The process lines py-spy puts first are no frames; the rest keep their order.
    assert [f.function for f in frames][:2] == ["_run_module_as_main", "<module>"]
    assert frames[-1] == profile.Frame(
        "relay",
        inspect.getfile(gateway.upstream.http),
        line_of(gateway.upstream.http, "def relay("),
    )
    assert frames[-1].name == "relay (gateway/upstream/http.py)"
    assert profile.parse_frame(
        "Runner.run (/usr/lib/python3.11/asyncio/runners.py:118)"
    ).short_file == ("asyncio/runners.py")
    assert profile.parse_frame("<unknown>") == profile.Frame("<unknown>", "", None)
    assert stacks("not a sample", "") == []


def test_parts() -> None:
    def part(line: str) -> str:
        return profile.part(stacks(f"{line} 1")[0][0])

    # Nothing below the loop's runner: its C code. The process's own frames (gateway/cli.py)
    # are not the gateway's request code.
    assert part(ROOT) == profile.LOOP
    assert part(f"{ROOT};{RELAY}") == profile.GATEWAY
    # A write under aiohttp's server (the answer to the client) and one called from the
    # gateway's own code directly.
    assert part(f"{ROOT};{RELAY};{SERVER};{WRITE}") == profile.WRITES_DOWN
    assert part(f"{ROOT};{RELAY};{WRITE}") == profile.WRITES
    # The same frames without the write line: aiohttp's server code.
    assert part(f"{ROOT};{RELAY};{SERVER}") == profile.SERVER
    client = "ClientRequest.send (/venv/lib/python3.11/site-packages/aiohttp/client_reqrep.py:9)"
    assert part(f"{ROOT};{RELAY};{client};{WRITE}") == profile.WRITES_UP
    assert part(f"{ROOT};{RELAY};{client}") == profile.CLIENT
    # A feature takes the whole sample, whatever is under it.
    assert part(f"{ROOT};{RELAY};{LOGGING};{WRITE}") == profile.LOGGING
    ratelimit = "_Connection.call (/work/gateway/ratelimit/resp.py:66)"
    assert part(f"{ROOT};{RELAY};{ratelimit}") == profile.REDIS
    # A task's step shows the coroutine's frames only, with no runner above them.
    assert part(RELAY) == profile.GATEWAY
    assert part("sleep (/usr/lib/python3.11/asyncio/tasks.py:600)") == profile.OTHER


def test_awaited_write_is_no_socket_write() -> None:
    writes = profile._WRITE_CALL.search  # the rule itself
    assert writes("        transport.write(chunk)")
    assert writes("            self._transport.writelines(parts)")
    assert writes("    sock.sendall(data)")
    assert not writes("        await response.write(chunk)")
    assert not writes("    upstream = await client.send(request)")
    assert not writes("    answer = client.send(request)")


def test_summary() -> None:
    lines = profile.summarize(
        stacks(f"{ROOT};{RELAY} 6", f"{ROOT};{RELAY};{SERVER};{WRITE} 3", f"{ROOT} 1"),
        us_per_request=200.0,
    )
    assert lines[0].startswith("10 samples. By part")
    assert "the 200 us /proc measured" in lines[0]
    by_part = lines[1:4]
    assert by_part[0].split() == ["60.0", "%", "120", "us/req", *profile.GATEWAY.split()]
    assert by_part[1].split()[:4] == ["30.0", "%", "60", "us/req"]
    assert by_part[1].endswith(profile.WRITES_DOWN)
    assert by_part[2].endswith(profile.LOOP)
    listed = [line.strip() for line in lines]
    assert "30.0 %  StreamWriter._write (aiohttp/http_writer.py)" in listed
    assert "10.0 %  (event loop's C code)" in listed
    # Inclusive: relay holds 9 of the 10 samples; the process's own frames are not listed.
    assert "90.0 %  relay (gateway/upstream/http.py)" in listed
    assert not any("gateway/cli.py" in line for line in lines)
    assert profile.summarize([]) == ["py-spy recorded no samples"]
