"""The swarm-store interface: where the tracker keeps swarms, node liveness and the allow-list.

Two implementations answer the same calls with the same handout:

* :class:`tracker.swarm.SwarmRegistry`, in process (the default): plain calls, no I/O.
* :class:`tracker.swarm_redis.RedisSwarmStore` (``--swarm-store redis://host:port/db``, env
  ``MODELCAST_SWARM_STORE``): shared by every replica; its calls are coroutines.

The calls (``now`` is ``time.monotonic()``; the Redis store uses the wall clock instead):

======================================  ============================================================
``announce(a, ip, now)``                record an announce, answer :class:`~tracker.swarm.AnnounceResult`
``scrape(info_hashes)``                 BEP 48 counters of the known ones
``heartbeat(node_id, now, ttl, zone)``  keep a node's entries alive ``ttl`` s; how many entries it has (Redis:
                                        written behind, an int at once, the count as of the node's
                                        previous heartbeat there; awaitable for a node new there)
``leave(node_id)``                      drop a node's entries from every swarm; how many went
``expire(now, peer_ttl_s)``             drop dead nodes' and silent peers' entries; how many went
``allow(keys)`` / ``disallow(keys)``    the allow-list (publish / delete)
``peers_of(info_hash)``                 the peers of one swarm (stats, tests)
``is_allowed(info_hash)``               plain call on both: this replica's view of the allow-list
``live_nodes_by_zone()``,               plain calls on both, for metrics (the Redis store answers
``peer_counts()``, ``swarm_totals()``   from figures its expiry loop refreshes every 2 s)
======================================  ============================================================

A caller that may run over either store passes a call's result through :func:`settle`
(or checks :func:`inspect.isawaitable` itself, as the fast path does, to stay synchronous
on the in-process store).
"""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

T = TypeVar("T")

ENV_SWARM_STORE = "MODELCAST_SWARM_STORE"


async def settle(value: Any) -> Any:
    """``value``, awaited if it is awaitable (the Redis store's calls are coroutines)."""
    if inspect.isawaitable(value):
        return await value
    return value


def validate_swarm_store(url: str | None) -> str | None:
    """``url`` if it names a store this tracker can use (None or ``memory``: in process), else a clear error."""
    from urllib.parse import urlsplit

    from modelcast.errors import BadRequest

    if not url or url == "memory":
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise BadRequest(f"--swarm-store {url!r} is not redis://HOST:PORT/DB (or rediss://, unix://)")
    return url


def make_swarm_store(url: str | None, *, zone_gateways: int, peer_ttl_s: float):
    """The store ``url`` names: in process for None, Redis for ``redis://``."""
    if url is None:
        from .swarm import SwarmRegistry
        return SwarmRegistry(zone_gateways=zone_gateways)
    from .swarm_redis import RedisSwarmStore
    return RedisSwarmStore(url, zone_gateways=zone_gateways, peer_ttl_s=peer_ttl_s)
