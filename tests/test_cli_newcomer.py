"""The command line as a newcomer first meets it: in a shell pipeline (a reader that stops early,
`schema | head`, ends the command quietly, as it ends cat or grep) and with a YAML mistake
(`check` says where and what, in words, with no traceback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def test_schema_into_a_closed_pipe_exits_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (head) has already gone: every write fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "schema"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 128 + signal.SIGPIPE


def test_schema_into_head_prints_its_first_lines():
    result = subprocess.run(  # noqa: S602 - the pipeline users type, a fixed command
        f"'{sys.executable}' -m gateway schema | head -n 3",
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == "{"
    assert len(result.stdout.splitlines()) == 3
    assert result.stderr == ""


def test_check_explains_an_indentation_mistake(tmp_path):
    config = tmp_path / "routes.yaml"
    config.write_text(
        "nodes:\n  noda1: {host: 127.0.0.1}\nservices:\n  city:\n    port: 7001\n"
        "   nodes: [noda1]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{config}: 1 problem(s)",
        "  services (line 6): invalid YAML at line 6, column 4: this line's indentation lines up "
        "with no block above it: the keys of services start at column 3, the keys of "
        "services.city start at column 5 (the parser says: expected <block end>, but found "
        "'<block mapping start>')",
    ]
