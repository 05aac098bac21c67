"""The BitTorrent tracker over HTTP: announce and scrape from raw query to bencoded answer.

:class:`TrackerEndpoint` is shared by the aiohttp handlers below and by the announce
fast path (:mod:`tracker.fastpath`), which answers most announces before aiohttp sees
them; both therefore give the same answers.  The protocol work is sans-I/O
(:mod:`tracker.announce`), the swarm state in a swarm store (:mod:`tracker.swarmstore`: in
memory, or Redis, whose answers come later as coroutines).
"""

from __future__ import annotations

import inspect
import time
from typing import Awaitable

from aiohttp import web

from modelcast.config import TrackerConfig
from modelcast.errors import ModelcastError

from .announce import encode_announce, encode_failure, encode_scrape, parse_announce, parse_scrape
from .nodekeys import NodeKeys
from .peer_policy import PeerPolicy
from .swarm import SwarmRegistry, tracker_result
from .swarmstore import settle

BENCODE_TYPE = "text/plain"


def _bencoded(body: bytes) -> web.Response:
    return web.Response(body=body, content_type=BENCODE_TYPE)


class TrackerEndpoint:
    """Announce and scrape from raw query to bencoded answer, shared by the aiohttp handlers and the fast path.

    Never raises for bad input: a malformed request or an unknown info-hash becomes a
    bencoded ``failure reason``, as BitTorrent clients expect.
    """

    def __init__(self, cfg: TrackerConfig, swarms: SwarmRegistry, node_keys: NodeKeys | None = None) -> None:
        self._cfg = cfg
        self._swarms = swarms
        self._node_keys = node_keys or NodeKeys()
        self._policy = PeerPolicy(cfg.trusted_proxies, cfg.origin_seeds)
        # Read by the registry's metrics at scrape time (tracker/metrics.py).  Plain ints: an
        # announce costs one increment, not a prometheus_client Counter.inc().
        self.announces = 0  # answered with peers
        self.scrapes = 0
        self.failures: dict[tuple[str, str], int] = {}  # (announce|scrape, TRACKER_RESULTS entry) -> answers

    def _failed(self, kind: str, exc: ModelcastError) -> bytes:
        key = (kind, tracker_result(exc))
        self.failures[key] = self.failures.get(key, 0) + 1
        # A passing outage (the swarm store is down) says "retry in N s" in the reason itself: BEP 31's
        # "retry in" key counts whole minutes, which would hold libtorrent back 60 s.
        return encode_failure(str(exc))

    def announce(self, raw_query: str | bytes, remote: str | None) -> bytes | Awaitable[bytes]:
        """``GET /announce`` (BEP 3/23/7), with modelcast's extensions; ``remote``: the client's socket address.

        Bytes at once on the in-process store; an awaitable of them on one over the
        network (tracker/swarm_redis.py).
        """
        cfg = self._cfg
        try:
            a = parse_announce(raw_query, default_numwant=cfg.default_numwant, max_numwant=cfg.max_numwant)
            if a.node is not None and not self._node_keys.may_announce_as(a.node, a.node_token):
                a = a._replace(node=None)  # a plain peer: the node's liveness is not its to borrow
            result = self._swarms.announce(a, self._policy.address(a, remote), time.monotonic())
        except ModelcastError as exc:
            return self._failed("announce", exc)
        if inspect.isawaitable(result):
            return self._announced_later(a, result)
        return self._announced(a, result)

    def _announced(self, a, result) -> bytes:
        cfg = self._cfg
        self.announces += 1
        return encode_announce(result.peers, result.counts, interval=cfg.announce_interval_s,
                               min_interval=cfg.min_announce_interval_s, compact=a.compact, no_peer_id=a.no_peer_id)

    async def _announced_later(self, a, result: Awaitable) -> bytes:
        try:
            return self._announced(a, await result)
        except ModelcastError as exc:
            return self._failed("announce", exc)

    def scrape(self, raw_query: str | bytes, remote: str | None = None) -> bytes | Awaitable[bytes]:
        """``GET /scrape`` (BEP 48)."""
        try:
            hashes = parse_scrape(raw_query)
        except ModelcastError as exc:
            return self._failed("scrape", exc)
        self.scrapes += 1
        found = self._swarms.scrape(hashes)
        if inspect.isawaitable(found):
            return self._scraped_later(found)
        return encode_scrape(found)

    async def _scraped_later(self, found: Awaitable) -> bytes:
        try:
            return encode_scrape(await found)
        except ModelcastError as exc:
            return self._failed("scrape", exc)


# Here, not in tracker/state.py: the handlers below read it, and state.py would have to import this module.
TRACKER = web.AppKey("tracker", TrackerEndpoint)


async def announce(request: web.Request) -> web.Response:
    """``GET /announce`` through aiohttp (the fast path answers most announces before they get here)."""
    return _bencoded(await settle(request.app[TRACKER].announce(request.rel_url.raw_query_string, request.remote)))


async def scrape(request: web.Request) -> web.Response:
    """``GET /scrape`` through aiohttp."""
    return _bencoded(await settle(request.app[TRACKER].scrape(request.rel_url.raw_query_string)))
