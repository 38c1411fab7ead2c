"""The forwarding phase of an HTTP request: the body (read whole first when it is small
enough to replay), a slot under the service's ``max_connections``, the failover loop over
``http.send``, then the answer streamed back with ``http.relay``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import GatewayError, UpstreamAborted
from .body import read_body
from .client import Response
from .failover import REPLAY_LIMIT, Failed, attempt, first_target, status_kind
from .headers import Forwarding, public_host
from .http import relay
from .redirects import Redirects

if TYPE_CHECKING:
    from aiohttp import web

    from ..context import Exchange, Shared
    from ..routetable import Entry
    from ..snapshot import Route, Target


async def forward(
    shared: Shared,
    ex: Exchange,
    entry: Entry[Route],
    path_qs: str,
    extra_headers: Mapping[str, str] | None,
) -> web.StreamResponse:
    """Forward ``ex.request`` on ``entry`` (a route) to a target and stream back its answer."""
    request, route = ex.request, entry.policy
    first = first_target(shared, route)  # before anything: 503 at once when all are down
    # A body of up to REPLAY_LIMIT bytes is read whole before a slot is taken (nginx's
    # proxy_request_buffering): a client that trickles it holds no upstream slot meanwhile,
    # and it can be sent again on a retry. A bigger one streams, in its slot.
    body, streamed = await read_body(request, route.body, REPLAY_LIMIT)
    slots = shared.slots.for_route(route)
    await slots.acquire(route.connect_timeout)
    gauge = shared.metrics.active_for(route.service)
    gauge.inc()
    try:
        forwarding = Forwarding(
            ex.client, ex.proto, ex.request_id, ex.peer_trusted, ex.identity_headers,
            ex.snapshot.identity_strip, ex.trace.traceparent(), ex.trace.continued,
        )  # fmt: skip
        client = shared.upstream

        async def send(target: Target) -> Response:
            try:
                upstream = await client.send(
                    request, target=target, path_qs=path_qs, body=body, streamed=streamed,
                    connect_timeout=route.connect_timeout,
                    response_timeout=route.response_timeout, forwarding=forwarding,
                    underscores=route.underscores_in_headers,
                )  # fmt: skip
            except GatewayError as err:
                raise Failed.of(err) from None
            if upstream.status >= 500:
                raise Failed(
                    status_kind(upstream.status),
                    f"status {upstream.status}",
                    GatewayError(
                        502, "upstream_status", f"the upstream answered {upstream.status}"
                    ),
                    answer=upstream,  # passed on when no other target is tried
                    discard=Response.close,  # its body unread: the connection is not reused
                )
            return upstream

        replayable = streamed is None
        upstream, target = await attempt(shared, ex, route, first, send, replayable=replayable)
        host = public_host(request.headers, ex.peer_trusted)
        redirects = Redirects(target, entry, ex.proto, host, cookie_path=route.cookie_path)
        try:
            return await relay(
                request, upstream, ex.request_id, extra_headers=extra_headers,
                streamed=streamed, redirects=redirects, added=ex.added,
                close=shared.draining,
            )  # fmt: skip
        except UpstreamAborted as aborted:
            if not aborted.by_client:
                shared.health.failed(target, "aborted mid-response", route.probe, route.ejection)
            raise
    finally:
        gauge.dec()
        slots.release()
