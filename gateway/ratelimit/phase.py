"""The rate-limit phase: refuse (``GatewayError``), delay, or let a request through."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..errors import GatewayError
from .zones import bucket_key

if TYPE_CHECKING:
    from ..context import Exchange, Shared
    from ..snapshot import Route


async def limit(shared: Shared, ex: Exchange, route: Route) -> dict[str, str] | None:
    """Apply ``route``'s zone to this request; return the headers to add to its answer."""
    zone = route.zone
    if zone is None:
        return None
    parts = tuple(_key_part(part, ex, route) for part in zone.key)
    if not any(parts):
        return None  # as in nginx: a request whose key is empty is not limited
    decision = await shared.limiter.decide(zone, bucket_key(zone, parts))
    metrics = shared.metrics
    if not decision.allowed and not zone.dry_run:
        metrics.count_limit(zone.name, "rejected")
        refusal = {
            "RateLimit-Policy": zone.policy,
            "RateLimit": decision.header(zone),
            "Retry-After": str(decision.retry_after(zone)),
        }
        raise GatewayError(
            zone.status, "rate_limited", "too many requests; retry later", headers=refusal
        )
    if not decision.allowed:
        metrics.count_limit(zone.name, "dry_run_rejected")
        ex.rate_limit = "dry_run"
    elif delay := decision.delay_seconds(zone):
        if zone.dry_run:  # nginx's DELAYED_DRY_RUN: counted, passed at once
            metrics.count_limit(zone.name, "dry_run_delayed")
            ex.rate_limit = "dry_run_delayed"
        else:
            metrics.count_limit(zone.name, "delayed")
            ex.rate_limit = "delayed"
            await asyncio.sleep(delay)
    else:
        metrics.count_limit(zone.name, "allowed")
    if not zone.headers:
        return None  # built only when sent: this runs on every limited request
    return {"RateLimit-Policy": zone.policy, "RateLimit": decision.header(zone)}


def _key_part(part: str, ex: Exchange, route: Route) -> str:
    if part == "client_ip":
        return ex.client
    if part == "service":
        return route.service
    if part == "user":
        # Anonymous requests: limited per address. Apart: a subject "ip:203.0.113.7" (an IdP
        # may let users pick theirs) must not share that address's bucket.
        return f"user:{ex.user}" if ex.user else f"ip:{ex.client}"
    return ex.request.headers.get(part.removeprefix("header:"), "")
