"""A request body on its way upstream, within the route's limits (nginx's
``client_max_body_size`` and ``client_body_timeout``).

A ``Content-Length`` over the limit is refused (413) before anything is forwarded. A body
small enough to be sent again on a retry is read whole first; a bigger one (or one of unknown
length) streams to the upstream as it arrives, and the request head goes upstream at once,
not with the first body byte, so that an upstream never sees a connection that stays silent
because its client does. When the client is at fault while its body streams (it pauses past
the timeout, sends more than the limit, or goes away), the body records why (``fault``) and
ends the upstream exchange: the caller answers the client (408, 413, or nothing) and never
counts it against the target.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp.web_protocol import RequestPayloadError

from ..errors import ClientGone, GatewayError
from ..request import expects_continue
from ..snapshot import BodyPolicy

if TYPE_CHECKING:
    from ..request import Request


_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, "body_too_large", f"the request body is over {limit} bytes", close=True
    )


def too_slow(timeout: float) -> GatewayError:
    return GatewayError(
        408, "body_timeout", f"the request body paused for over {timeout:g} s", close=True
    )


BAD_BODY: Final = GatewayError(
    400, "bad_request", "the request body is not valid HTTP/1.1 (its chunks)", close=True
)


class _Fault(Exception):
    """Ends the upstream's read of a body whose client is at fault (``ClientBody.fault``)."""

    def __init__(self, fault: GatewayError | ClientGone) -> None:
        super().__init__(str(fault))
        self.fault = fault


class ClientBody:
    """The client's body as the upstream request reads it: chunk by chunk as it arrives,
    each read within ``policy.timeout``, in all at most ``policy.max_size`` bytes."""

    __slots__ = ("_content", "_policy", "fault", "received")

    def __init__(self, content: aiohttp.StreamReader, policy: BodyPolicy) -> None:
        self._content = content
        self._policy = policy
        self.received = 0
        # Why the client is at fault: a GatewayError (408, 413), or ClientGone.
        self.fault: GatewayError | ClientGone | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        content, limit, timeout = self._content, self._policy.max_size, self._policy.timeout
        while True:
            try:
                # What is in already (all that the socket's last reads brought, often a
                # small body whole) is taken without a wait or a timer: an asyncio.timeout
                # per read was ~10 % of a 16 KiB POST's CPU. The timeout bounds each wait
                # for more.
                chunk = content.read_nowait()
                if not chunk and not content.at_eof():
                    async with asyncio.timeout(timeout):
                        chunk = await content.readany()
            except TimeoutError:
                raise self._fault(too_slow(timeout)) from None
            except (aiohttp.ClientError, OSError) as exc:  # the client went away mid-body
                raise self._fault(ClientGone()) from exc
            except RequestPayloadError as exc:  # its framing broke (a bad chunk)
                raise self._fault(BAD_BODY) from exc
            if not chunk:
                return
            self.received += len(chunk)
            if limit and self.received > limit:
                raise self._fault(too_large(limit))
            yield chunk

    def _fault(self, fault: GatewayError | ClientGone) -> _Fault:
        self.fault = fault
        return _Fault(fault)

    async def read_all(self) -> bytes:
        """The whole body (a small one, read before the first attempt): its fault raised."""
        chunks = []
        try:
            async for chunk in self:
                chunks.append(chunk)
        except _Fault as stopped:
            raise stopped.fault from None
        return b"".join(chunks)


# What the upstream client sends: nothing, the whole body, or the client's as it arrives
# (the request head goes out at once, not with the first body byte).
Body = bytes | ClientBody | None


async def read_body(
    request: Request, policy: BodyPolicy, buffer_up_to: int
) -> tuple[Body, ClientBody | None]:
    """The request body as the upstream call takes it, and the ``ClientBody`` that reads it
    (to ask, after a failure, whether the client was at fault): ``None`` without a body;
    ``bytes`` when it is at most ``buffer_up_to`` bytes long (so it can be sent again on a
    retry); else a stream, passed through as it arrives. 413 at once for a ``Content-Length``
    over the limit."""
    if not request.body_exists:
        return None, None
    length = request.content_length
    if policy.max_size and length is not None and length > policy.max_size:
        raise too_large(policy.max_size)  # before 100 Continue: the client sends nothing
    if expects_continue(request):
        # The client waits for this before sending its body; the gateway answers it itself
        # (and drops Expect upstream) once it has decided to forward the request.
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0
    body = ClientBody(request.content, policy)
    if length is not None and length <= buffer_up_to:
        return await body.read_all(), None
    return body, body
