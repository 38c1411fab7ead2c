"""A real ACME CA for the tests: Debian's ``pebble`` (Let's Encrypt's test CA) on free loopback
ports, its HTTPS listener's certificate from a trustme CA, its DNS through a
``pebble-challtestsrv`` that answers every name with 127.0.0.1 (IPv4 only), so that the CA's
http-01 requests for any test domain reach ``http_port`` on this machine.

``Pebble(workdir, http_port)`` starts both; ``stop()``/``start()`` kill and restart the CA on
the same ports (it forgets every account and order, and makes a new root); ``close()`` ends
both. What the CA did is read from its own log: ``issued()``, ``accounts()``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest
import trustme

from .helpers import free_port

PEBBLE: Final = "/usr/bin/pebble"
CHALLTESTSRV: Final = "/usr/bin/pebble-challtestsrv"


def missing() -> str | None:
    """Why Pebble cannot run here (for a skip), or None."""
    for binary in (PEBBLE, CHALLTESTSRV):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (apt-get install pebble)"
    return None


def require() -> None:
    """Skip the test where Pebble is not installed; fail it in CI, which installs it
    (``.ci/run``), so that the ACME tests never pass there by not running."""
    reason = missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def _free_tcp_and_udp_port() -> int:
    """A loopback port free for both TCP and UDP (DNS listens on both)."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _wait(ready: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within 15 s")
        time.sleep(0.05)


class Pebble:
    """Pebble and its DNS, on loopback only (every listener bound to 127.0.0.1)."""

    def __init__(self, workdir: Path, http_port: int, *, validity: int = 2 * 86400) -> None:
        """``http_port``: where the CA sends http-01 requests; ``validity``: the lifetime of
        the certificates it issues, in seconds."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        listener_ca = trustme.CA()
        listener = listener_ca.issue_cert("127.0.0.1")
        (workdir / "listener.pem").write_bytes(
            b"".join(p.bytes() for p in listener.cert_chain_pems)
        )
        listener.private_key_pem.write_to_path(str(workdir / "listener-key.pem"))
        self.ca_file: Final = str(workdir / "listener-ca.pem")  # trusts the ACME listener
        listener_ca.cert_pem.write_to_path(self.ca_file)
        self._context = ssl.create_default_context(cafile=self.ca_file)
        self.port = free_port()
        self.management_port = free_port()
        self.dns_port = _free_tcp_and_udp_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(workdir / "listener.pem"),
                "privateKey": str(workdir / "listener-key.pem"),
                "httpPort": http_port,
                "tlsPort": http_port,  # no tls-alpn-01 here; the port must be set all the same
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
                "certificateValidityPeriod": validity,
            }
        }
        self._config = workdir / "pebble.json"
        self._config.write_text(json.dumps(config))
        self.log = workdir / "pebble.log"
        self._pebble: subprocess.Popen[bytes] | None = None
        dns_management = free_port()
        with (workdir / "challtestsrv.log").open("ab") as log:
            self._dns = subprocess.Popen(
                [CHALLTESTSRV, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                 "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "",
                 "-tlsalpn01", "", "-management", f"127.0.0.1:{dns_management}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            _wait(lambda: _connects(self.dns_port), "pebble-challtestsrv", self._dns)
            for attempt in range(3):
                try:
                    self.start()
                    break
                except RuntimeError:
                    # A port free_port picked was taken by another process before Pebble
                    # bound it (seen in a full run): new ones, before anyone knows them.
                    if attempt == 2 or b"address already in use" not in self.log.read_bytes():
                        raise
                    self.port, self.management_port = free_port(), free_port()
                    pebble = config["pebble"]
                    pebble["listenAddress"] = f"127.0.0.1:{self.port}"
                    pebble["managementListenAddress"] = f"127.0.0.1:{self.management_port}"
                    self._config.write_text(json.dumps(config))
                    self.log.write_bytes(b"")  # the next attempt's lines only
        except BaseException:
            self.close()
            raise

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> None:
        """Start the CA (again: a new root, no accounts, no orders) and wait until it answers."""
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",  # validate at once, not after up to 15 s
            "PEBBLE_WFE_NONCEREJECT": "0",  # no random badNonce refusals
            "PEBBLE_AUTHZREUSE": "0",  # every order gets fresh authorizations
        }
        with self.log.open("ab") as log:
            self._pebble = subprocess.Popen(
                [PEBBLE, "-config", str(self._config), "-strict",
                 "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            )  # fmt: skip
        _wait(self._answers, "pebble", self._pebble)

    def stop(self) -> None:
        if self._pebble is not None and self._pebble.poll() is None:
            self._pebble.kill()
            self._pebble.wait()

    def close(self) -> None:
        self.stop()
        if self._dns.poll() is None:
            self._dns.kill()
            self._dns.wait()

    def root(self) -> bytes:
        """The PEM root the running CA issues under (a new one at every start)."""
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=self._context, timeout=5) as response:
            return bytes(response.read())

    def issued(self) -> int:
        """Certificates issued since the first start."""
        return len(re.findall(rb"Issued certificate serial", self.log.read_bytes()))

    def accounts(self) -> int:
        """Accounts created since the first start."""
        return len(re.findall(rb"There are now \d+ accounts in memory", self.log.read_bytes()))

    def _answers(self) -> bool:
        try:
            url = f"https://127.0.0.1:{self.port}/dir"
            with urllib.request.urlopen(url, context=self._context, timeout=1):
                return True
        except OSError:
            return False


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True
