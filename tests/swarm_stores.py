"""Both swarm stores behind one synchronous face, so behaviour tests run unchanged on each.

The in-process :class:`tracker.swarm.SwarmRegistry` is used as it is; the Redis store's
coroutines run to completion on a private event loop (the tests drive time through the
``now`` they pass: ``caller_clock=True``).
"""

from __future__ import annotations

import asyncio
import inspect
import random

from tracker.swarm import SwarmRegistry
from tracker.swarm_redis import RedisSwarmStore
from tracker.swarmstore import settle


class SyncSwarmStore:
    """A :class:`RedisSwarmStore` whose calls return their results, not coroutines."""

    def __init__(self, store: RedisSwarmStore) -> None:
        self._store = store
        self._loop = asyncio.new_event_loop()

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            result = attr(*args, **kwargs)
            return self._loop.run_until_complete(result) if inspect.isawaitable(result) else result

        return call

    def is_live(self, node_id: str) -> bool:
        return self._loop.run_until_complete(self._store.is_live(node_id, self._last_now))

    def heartbeat(self, node_id: str, now: float, ttl: float, zone: str | None = None) -> int:
        self._last_now = now

        async def call() -> int:  # written behind: an int at once, or a future of it (a node new here)
            return await settle(self._store.heartbeat(node_id, now, ttl, zone))

        return self._loop.run_until_complete(call())

    def expire(self, now: float, ttl_s: float) -> int:
        self._last_now = now
        return self._loop.run_until_complete(self._store.expire(now, ttl_s))

    _last_now = 0.0

    def close(self) -> None:
        self._loop.run_until_complete(self._store.close())
        self._loop.close()


def make_store(kind: str, redis_url: str | None, rng: random.Random | None = None, zone_gateways: int = -1):
    if kind == "memory":
        return SwarmRegistry(rng, zone_gateways=zone_gateways)
    return SyncSwarmStore(RedisSwarmStore(redis_url, rng=rng, zone_gateways=zone_gateways, caller_clock=True))
