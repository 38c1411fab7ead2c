"""What the scenarios share: a distinct client identity per locust user, and its token.

**Identity.** The gateway limits each client address (the standards' 10 r/s, burst 20). Every
locust user connecting from 127.0.0.1 would be one client, and all but the first 21 requests
of a run would get 429 (what the old profile measured). So each user connects from its own
loopback address, 127.1.x.y (Linux routes all of 127.0.0.0/8 to loopback): the gateway sees
the users as the distinct clients they stand for, with no config change. That needs a gateway
on this machine (the demo, or `serve` on loopback). `LOADTEST_IDENTITY` chooses:

  source   (the default for a loopback host) bind each user's sockets to its own address
  xff      send `X-Forwarded-For: 10.77.x.y`: for a gateway elsewhere whose trusted_proxies
           holds the load generator's address (the gateway believes nobody else's)
  none     one address for everyone (to see what the limit does to a crowd behind one NAT)

**Tokens.** The demo hands out tokens at /demo/token (one user name each); against another
gateway set `LOADTEST_TOKEN` to an access token.
"""

from __future__ import annotations

import itertools
import os
import socket
from typing import Any
from urllib.parse import urlsplit

from locust import HttpUser
from locust.clients import LocustHttpAdapter
from urllib3 import PoolManager

_numbers = itertools.count()


def is_loopback(host: str) -> bool:
    name = urlsplit(host).hostname or ""
    try:
        return socket.gethostbyname(name).startswith("127.")
    except OSError:
        return False


class Identity:
    """One user's client address, and how it is presented."""

    def __init__(self, host: str, distinct: bool = True) -> None:
        self.number = next(_numbers)
        mode = os.environ.get("LOADTEST_IDENTITY") or ("source" if is_loopback(host) else "none")
        if not distinct:
            mode = "none"
        if mode not in ("source", "xff", "none"):
            raise SystemExit(f"LOADTEST_IDENTITY={mode}: use source, xff or none")
        self.mode = mode
        high, low = divmod(self.number, 254)
        self.address = {
            "source": f"127.1.{high % 256}.{low + 1}",
            "xff": f"10.77.{high % 256}.{low + 1}",
            "none": "",
        }[mode]
        self.name = f"load-{self.number}"

    @property
    def source(self) -> tuple[str, int] | None:
        return (self.address, 0) if self.mode == "source" else None

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Forwarded-For": self.address} if self.mode == "xff" else {}


class DaarionUser(HttpUser):
    """An HttpUser with its own identity and, once started, a token (``self.auth``)."""

    abstract = True
    token = True  # fetch one at start
    distinct = True  # its own client identity (False: the load generator's own address)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.identity = Identity(self.host, self.distinct)
        if self.identity.source is not None:
            pool = PoolManager(maxsize=4, source_address=self.identity.source)
            self.client.mount("http://", LocustHttpAdapter(pool_manager=pool))
        self.client.headers.update(self.identity.headers)
        self.auth: dict[str, str] = {}

    def on_start(self) -> None:
        if not self.token:
            return
        token = os.environ.get("LOADTEST_TOKEN")
        if token is None:
            url = f"/demo/token?user={self.identity.name}"
            with self.client.get(url, name="/demo/token", catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"no token from the demo: {response.status_code}")
                    return
                token = response.json()["token"]
        self.auth = {"Authorization": f"Bearer {token}"}
