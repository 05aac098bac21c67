"""The registry application's state: its ``web.AppKey`` keys and the small records they hold.

:func:`tracker.app.make_app` fills them; handlers read them through ``request.app[KEY]``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from aiohttp import web

from adapters.origin import Origin, open_origin
from modelcast.config import TrackerConfig
from modelcast.manifest import FileEntry

from .federation import Upstream
from .firstcopy import GateStore
from .nodebook import NodeBook
from .nodekeys import NodeKeys
from .relaytokens import RelayRegistry
from .store import RegistryStore
from .swarm import SwarmRegistry
from .udp_server import UdpTrackerProtocol


# Zones a client names are counted under their own name up to this many; the rest under
# "_other" (not a valid zone name), so a client cannot grow the registry's metrics without bound.
MAX_COUNTED_ZONES = 256
NO_ZONE = "_none"  # a client that named no zone (a plain BEP 19 client)


@dataclass
class Stats:
    """Counters reported by ``GET /v1/stats`` and, by zone, by ``GET /metrics``."""

    origin_bytes_served: int = 0
    origin_requests: int = 0
    origin_bytes_by_zone: dict[str, int] = field(default_factory=dict)
    origin_requests_by_zone: dict[str, int] = field(default_factory=dict)
    # Of origin_bytes_served, those handed out as presigned object-store URLs: the node
    # read them from S3 itself, so they never passed through this process.
    origin_bytes_redirected: int = 0

    @property
    def origin_bytes_through_registry(self) -> int:
        return self.origin_bytes_served - self.origin_bytes_redirected

    def served(self, zone: str | None, nbytes: int, redirected: bool = False) -> None:
        """Count one answer of ``nbytes`` origin bytes to a node of ``zone`` (None: it named none).

        ``redirected``: the answer was a presigned URL for those bytes, not the bytes.
        """
        self.origin_requests += 1
        self.origin_bytes_served += nbytes
        if redirected:
            self.origin_bytes_redirected += nbytes
        zone = zone or NO_ZONE
        if zone not in self.origin_requests_by_zone and len(self.origin_requests_by_zone) >= MAX_COUNTED_ZONES:
            zone = "_other"
        self.origin_requests_by_zone[zone] = self.origin_requests_by_zone.get(zone, 0) + 1
        self.origin_bytes_by_zone[zone] = self.origin_bytes_by_zone.get(zone, 0) + nbytes


@dataclass(frozen=True)
class WebseedArtifact:
    """What the web seed needs of an artifact: where its bytes live and its file table."""

    origin_url: str
    s3_endpoint: str | None
    torrent_name: str
    files: dict[str, FileEntry]


@dataclass
class OriginCache:
    """Origins by (url, endpoint), built once: an S3 client is slow to create and thread-safe."""

    default_s3_endpoint: str | None
    origins: dict[tuple[str, str | None], Origin] = field(default_factory=dict)

    async def get(self, url: str, s3_endpoint: str | None) -> Origin:
        key = (url, s3_endpoint or self.default_s3_endpoint)
        origin = self.origins.get(key)
        if origin is None:
            origin = await asyncio.to_thread(open_origin, *key)
            origin = self.origins.setdefault(key, origin)
        return origin


CONFIG = web.AppKey("config", TrackerConfig)
STORE = web.AppKey("store", RegistryStore)
SWARMS = web.AppKey("swarms", SwarmRegistry)
STATS = web.AppKey("stats", Stats)
ORIGINS = web.AppKey("origins", OriginCache)
# Web seed artifacts by digest, least recently used first; a delete evicts its entry.
WEBSEED_CACHE = web.AppKey("webseed_cache", OrderedDict)
FIRST_COPY = web.AppKey("first_copy", GateStore)
# Held around every store write that changes which artifacts exist together with the
# swarm allow-list update that follows it, so the allow-list changes in commit order (a
# publish and a delete of one artifact racing must not leave a deleted artifact allowed).
WRITE_LOCK = web.AppKey("write_lock", asyncio.Lock)
# The parent registry when this one is a zone (TrackerConfig.upstream), else absent.
UPSTREAM = web.AppKey("upstream", Upstream)
# The BEP 15 endpoint when TrackerConfig.udp_port is set; tests read its bound port.
UDP_TRACKER = web.AppKey("udp_tracker", UdpTrackerProtocol)
# Every node's zone, liveness and latest progress report (tracker/nodebook.py), from heartbeats.
NODES = web.AppKey("nodes", NodeBook)
# Which key holds each node id (tracker/nodekeys.py): heartbeats, leaves and node= announces.
NODE_KEYS = web.AppKey("node_keys", NodeKeys)
# Each node's registered relay URL and the relay tokens (tracker/relaytokens.py).
RELAYS = web.AppKey("relays", RelayRegistry)
