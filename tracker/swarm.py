"""In-memory swarm state: who is in which swarm, rebuilt from announces after a restart.

Only swarms of published artifacts exist.  A hybrid (v1 + v2) torrent is announced under
two 20-byte keys (the SHA-1 info-hash and the truncated SHA-256 one); both map to the
same :class:`Swarm`, so a peer that announces under either key sees every other peer.

Liveness comes in two kinds:

* A node daemon announces with ``node=ID`` and sends one heartbeat per node (not per
  torrent).  While its heartbeat is live, none of its entries expires; when the heartbeat
  lapses, or the node leaves, every entry of the node goes at once, in every swarm.
* Any other client (aria2, a node whose heartbeat the registry refused) keeps the plain
  per-peer TTL: an entry not re-announced for ``ttl_s`` seconds goes.

No operation scans a whole swarm, or every swarm: announces touch one entry and sample
the handout from per-tier buckets; expiry pops only what is due from a heap of node
deadlines and from one last-seen-ordered index of entries.

Nothing here does I/O or reads the clock: callers pass ``now`` (monotonic seconds), so
expiry is tested without sleeping.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

from modelcast.errors import ArtifactNotFound, ModelcastError

from .announce import DEFAULT_ZONE, Announce, Peer, SwarmCounts
from .handout import BucketKey, bucket_key, sample_peers

Key = bytes
"""A peer's address in compact form (:attr:`Peer.packed`): how a swarm keys its peers.

Bytes cache their hash, so a lookup costs no tuple building and no rehashing."""


class UnknownInfoHash(ArtifactNotFound):
    """An announce or scrape names an info-hash that no published artifact has."""


# How a tracker request that got no peers failed, for the registry's metrics (tracker/metrics.py).
TRACKER_RESULTS = ("unknown_torrent", "invalid", "error")


def tracker_result(exc: BaseException) -> str:
    """The :data:`TRACKER_RESULTS` entry for a tracker request answered with ``exc`` as its failure."""
    if isinstance(exc, UnknownInfoHash):
        return "unknown_torrent"
    return "invalid" if isinstance(exc, ModelcastError) else "error"


@dataclass(slots=True, eq=False)
class _Entry:
    """One peer's place in one swarm.

    Mutable and hashed by identity: a re-announce updates the entry in place, so the
    indexes that hold it (last-seen order, its node's entries) need no rekeying.
    """

    swarm: Swarm
    peer: Peer
    node: str | None = None
    slot: int = -1  # the peer's position in its bucket
    key: str | None = None  # BEP 7's key, as first announced: only its holder may stop the entry


NO_GATEWAYS: dict[str, list[Peer]] = {}  # strict zones: nobody is handed other zones' peers (never mutated)


class Swarm:
    """The peers of one torrent, bucketed for the handout policy, with BEP 48 counters.

    Peers are keyed by address: a node that restarts with a new peer id replaces its
    old entry instead of lingering as a ghost until it expires.  Each bucket is a list
    with every peer's position recorded, so adding, removing (swap with the last),
    replacing and drawing at random are all O(1).
    """

    def __init__(self, zone_gateways: int = -1) -> None:
        self.peers: dict[Key, _Entry] = {}
        # Each zone's first ``zone_gateways`` peers (in join order; a leaver is replaced by
        # another member of its zone): the only ones handed peers of other zones.  0: none,
        # strict zones (pieces cross zones only through the origin's relays,
        # tracker/firstcopy.py); -1: no limit, every peer sees every zone.
        self.zone_gateways = zone_gateways
        self.gateways: dict[str, list[Key]] = {}
        self.buckets: dict[BucketKey, list[Peer]] = {}
        # How many entries have each peer id: more than one means a node came back on
        # another address, and the handout must then compare peer ids to leave out both.
        self.ids: dict[bytes, int] = {}
        self.complete = 0
        self.incomplete = 0
        self.downloaded = 0

    def counts(self) -> SwarmCounts:
        return SwarmCounts(self.complete, self.incomplete, self.downloaded)

    def add(self, entry: _Entry) -> None:
        """Insert ``entry``; its address must not be in the swarm."""
        peer = entry.peer
        self.peers[peer.packed] = entry
        key = bucket_key(peer)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = []
        entry.slot = len(bucket)
        bucket.append(peer)
        self.ids[peer.peer_id] = self.ids.get(peer.peer_id, 0) + 1
        if peer.left == 0:
            self.complete += 1
        else:
            self.incomplete += 1
        if self.zone_gateways > 0 and not peer.origin_seed:
            gw = self.gateways.get(peer.zone)
            if gw is None:
                gw = self.gateways[peer.zone] = []
            if len(gw) < self.zone_gateways and peer.packed not in gw:
                gw.append(peer.packed)

    def update(self, entry: _Entry, peer: Peer) -> None:
        """Replace the peer of ``entry`` by ``peer``, of the same address and the same bucket."""
        old = entry.peer
        self.buckets[bucket_key(peer)][entry.slot] = peer
        entry.peer = peer
        if old.peer_id != peer.peer_id:
            self._forget_id(old.peer_id)
            self.ids[peer.peer_id] = self.ids.get(peer.peer_id, 0) + 1

    def _forget_id(self, peer_id: bytes) -> None:
        left = self.ids.pop(peer_id) - 1
        if left:
            self.ids[peer_id] = left

    def gateway_peers(self) -> dict[str, list[Peer]] | None:
        """Each zone's gateway peers, or None when that cannot limit the handout (O(zones x gateways)).

        With one zone or none, every peer that is not the origin's seed is in that zone,
        so there is no other zone to keep anyone from: the handout is the same without
        the limit, and this is skipped on every announce of a single-zone swarm.  Strict
        zones (no gateways) cost nothing either way: the handout skips other zones' tiers.
        """
        if self.zone_gateways == 0:
            return NO_GATEWAYS
        if self.zone_gateways < 0 or len(self.gateways) < 2:
            return None
        peers = self.peers
        return {zone: [peers[k].peer for k in gw] for zone, gw in self.gateways.items()}

    def _replace_gateway(self, zone: str, key: Key) -> None:
        gw = self.gateways.get(zone)
        if gw is None or key not in gw:
            return
        gw.remove(key)
        # Refill from the zone's buckets: a look at a few peers of each, never a scan.
        for (z, _, origin_seed), bucket in self.buckets.items():
            if z != zone or origin_seed:
                continue
            for peer in bucket[: self.zone_gateways + 1]:
                if len(gw) >= self.zone_gateways:
                    break
                if peer.packed not in gw:
                    gw.append(peer.packed)
        if not gw:
            del self.gateways[zone]

    def remove(self, key: Key, replacing: bool = False) -> _Entry | None:
        """Drop the peer at address ``key``; return its entry, or None if it was not there.

        ``replacing``: the same peer announces again at once (same zone), so it keeps its
        gateway role rather than handing it to another peer and back.
        """
        entry = self.peers.pop(key, None)
        if entry is None:
            return None
        peer = entry.peer
        bkey = bucket_key(peer)
        bucket = self.buckets[bkey]
        slot = entry.slot
        last = bucket.pop()
        if slot < len(bucket):
            bucket[slot] = last
            self.peers[last.packed].slot = slot
        if not bucket:
            # Empty buckets would still cost the handout a look on every announce.
            del self.buckets[bkey]
        self._forget_id(peer.peer_id)
        if peer.left == 0:
            self.complete -= 1
        else:
            self.incomplete -= 1
        if not replacing and self.zone_gateways > 0:
            self._replace_gateway(peer.zone, key)
        return entry

    def peer_list(self) -> list[Peer]:
        return [e.peer for e in self.peers.values()]


class AnnounceResult(NamedTuple):
    """What the tracker answers one announce with."""

    peers: list[Peer]
    counts: SwarmCounts


@dataclass(slots=True)
class _Node:
    """A node daemon the tracker knows of: its swarm entries and, if live, its heartbeat deadline."""

    entries: set[_Entry] = field(default_factory=set)
    expires: float | None = None  # None: no heartbeat yet, so its entries use the per-peer TTL
    queued: float = 0.0  # the deadline of this node's current item in the heap
    seq: int = -1  # the sequence number of that item; older items of the node are stale
    zone: str = DEFAULT_ZONE  # as its last heartbeat said


class SwarmRegistry:
    """Every swarm this tracker serves, the allow-list of info-hashes it accepts, and node liveness."""

    def __init__(self, rng: random.Random | None = None, zone_gateways: int = -1) -> None:
        self._by_key: dict[bytes, Swarm] = {}
        self.zone_gateways = zone_gateways
        self._rng = rng or random.Random()
        self.announces = 0
        # Every entry, in last-announce order, for the per-peer TTL.  Entries of a node
        # with a live heartbeat drop out of it when they reach the front (their node's
        # heartbeat keeps them), and come back when they announce again.
        self._last_seen: OrderedDict[_Entry, float] = OrderedDict()
        self._nodes: dict[str, _Node] = {}
        # (deadline, seq, node_id): one live item per heartbeating node.  A heartbeat only
        # moves the node's deadline; the item is re-queued when it comes due, so a
        # heartbeat is O(1) and expiry pops only what is due.
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = itertools.count()

    # ---- swarms ----------------------------------------------------------------------
    def allow(self, keys: Iterable[bytes]) -> None:
        """Accept announces for ``keys``, all of which name the same torrent.

        Safe to call again with the same keys (a re-publish, or loading at startup): an
        existing swarm is kept, so a re-publish never drops live peers.
        """
        keys = list(keys)
        swarm = next((self._by_key[k] for k in keys if k in self._by_key), None) or Swarm(self.zone_gateways)
        for k in keys:
            if len(k) != 20:
                raise ValueError(f"tracker key must be 20 bytes, got {len(k)}")
            self._by_key.setdefault(k, swarm)

    def is_allowed(self, info_hash: bytes) -> bool:
        return info_hash in self._by_key

    def _swarm(self, info_hash: bytes) -> Swarm:
        swarm = self._by_key.get(info_hash)
        if swarm is None:
            raise UnknownInfoHash(
                f"unknown info_hash {info_hash.hex()}: no artifact published to this registry has it"
            )
        return swarm

    def _drop(self, entry: _Entry, replacing: bool = False) -> bool:
        """Remove one entry from its swarm and from every index; False if it was gone already."""
        swarm = entry.swarm
        if swarm.peers.get(entry.peer.packed) is not entry:
            return False
        swarm.remove(entry.peer.packed, replacing)
        self._last_seen.pop(entry, None)
        self._set_node(entry, None)
        return True

    def _set_node(self, entry: _Entry, node_id: str | None) -> None:
        """Move ``entry`` to the entries of ``node_id`` (None: of no node)."""
        if entry.node is not None:
            node = self._nodes.get(entry.node)
            if node is not None:
                node.entries.discard(entry)
                if not node.entries and node.expires is None:
                    del self._nodes[entry.node]
        entry.node = node_id
        if node_id is not None:
            node = self._nodes.get(node_id)
            if node is None:
                node = self._nodes[node_id] = _Node()
            node.entries.add(entry)

    def announce(self, a: Announce, ip: str, now: float) -> AnnounceResult:
        """Record ``a`` from address ``ip`` and choose the peers to hand back."""
        swarm = self._swarm(a.info_hash)
        self.announces += 1
        peer = Peer(a.peer_id, ip, a.port, a.left, a.zone, a.origin_seed)
        entry = swarm.peers.get(peer.packed)
        if a.event == "stopped":
            # Only the owner stops an entry: the address matched (the request came from it,
            # or from a trusted proxy), and so must the key it was announced with.
            if entry is not None and (entry.key is None or entry.key == a.key):
                self._drop(entry)
            return AnnounceResult([], swarm.counts())
        # A "completed" counts as a download once per peer entry: a client that repeats
        # the event (or a seed that announces it on start) must not inflate the counter.
        if a.event == "completed" and (entry is None or not entry.peer.complete):
            swarm.downloaded += 1
        last_seen = self._last_seen
        if entry is not None and bucket_key(entry.peer) == bucket_key(peer):
            # The common re-announce: same address, same bucket.  Updated in place.
            if entry.key != a.key and entry.peer.peer_id != peer.peer_id:
                # A client restarted at the same address (new peer id, new key): the new key owns it.
                entry.key = a.key
            swarm.update(entry, peer)
            if entry.node != a.node:
                self._set_node(entry, a.node)
            last_seen.pop(entry, None)  # and back in at the end: last-announce order
            last_seen[entry] = now
        else:
            if entry is not None:
                # Same zone: the peer keeps its gateway role rather than handing it on and back
                # (unless it became the origin's seed, which is never a gateway).
                old = entry.peer
                self._drop(entry, replacing=old.zone == peer.zone and old.origin_seed == peer.origin_seed)
            entry = _Entry(swarm, peer, key=a.key)
            swarm.add(entry)
            last_seen[entry] = now
            if a.node is not None:
                self._set_node(entry, a.node)
        # As many distinct peer ids as entries: no peer id is shared, no look-up needed.
        sole = len(swarm.ids) == len(swarm.peers) or swarm.ids[peer.peer_id] == 1
        gateways = swarm.gateway_peers()
        if gateways is NO_GATEWAYS and a.node is None:
            # Strict zones are for node daemons, which get other zones' pieces through the
            # origin's relays; a plain BitTorrent client has only the swarm: every zone,
            # its own first.
            gateways = None
        chosen = (sample_peers(swarm.buckets, peer, a.numwant, self._rng, gateways, sole=sole)
                  if a.numwant > 0 else [])
        return AnnounceResult(chosen, swarm.counts())

    def scrape(self, info_hashes: Iterable[bytes]) -> dict[bytes, SwarmCounts]:
        """Counters for each known info-hash; unknown ones are left out (BEP 48)."""
        return {ih: self._by_key[ih].counts() for ih in info_hashes if ih in self._by_key}

    def swarms(self) -> list[Swarm]:
        """Each distinct swarm once (hybrid torrents have two keys for one swarm)."""
        return list({id(s): s for s in self._by_key.values()}.values())

    def active_swarms(self) -> int:
        """How many swarms have at least one peer."""
        return sum(1 for s in self.swarms() if s.peers)

    def peers_of(self, info_hash: bytes) -> list[Peer]:
        """The peers currently in the swarm of ``info_hash`` (for stats and tests)."""
        return self._swarm(info_hash).peer_list()

    # ---- node liveness ---------------------------------------------------------------
    def heartbeat(self, node_id: str, now: float, ttl: float, zone: str | None = None) -> int:
        """Keep every entry of ``node_id`` alive until ``now + ttl``; return how many it has.

        ``zone`` is the node's zone, as its heartbeat names it (for the live nodes per zone).

        O(1): the heap is touched only when the new deadline is earlier than the queued
        one (the node shortened its ttl) or the node had no heartbeat yet.
        """
        if ttl <= 0:
            raise ValueError(f"heartbeat ttl must be positive, got {ttl}")
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node()
        node.expires = now + ttl
        if zone is not None:
            node.zone = zone
        if node.seq < 0 or node.expires < node.queued:
            self._queue(node_id, node, node.expires)
        return len(node.entries)

    def _queue(self, node_id: str, node: _Node, deadline: float) -> None:
        node.seq = next(self._seq)
        node.queued = deadline
        heapq.heappush(self._deadlines, (deadline, node.seq, node_id))

    def leave(self, node_id: str) -> int:
        """Remove every entry of ``node_id`` from every swarm at once; return how many went."""
        node = self._nodes.pop(node_id, None)
        if node is None:
            return 0
        for entry in node.entries:
            entry.swarm.remove(entry.peer.packed)
            self._last_seen.pop(entry, None)
        # The node's heap item, if any, is now stale: its node is gone.
        return len(node.entries)

    def is_live(self, node_id: str) -> bool:
        """Whether ``node_id`` has a heartbeat that has not been expired yet."""
        node = self._nodes.get(node_id)
        return node is not None and node.expires is not None

    def live_nodes(self) -> int:
        """How many nodes have a live heartbeat."""
        return sum(1 for n in self._nodes.values() if n.expires is not None)

    def live_nodes_by_zone(self) -> dict[str, int]:
        """How many nodes have a live heartbeat, by the zone their heartbeat names (O(nodes))."""
        zones: dict[str, int] = {}
        for n in self._nodes.values():
            if n.expires is not None:
                zones[n.zone] = zones.get(n.zone, 0) + 1
        return zones

    def peer_counts(self) -> dict[tuple[str, bool, bool], int]:
        """Peers of every swarm by (zone, complete, origin_seed): O(swarms x buckets), never a peer scan."""
        counts: dict[tuple[str, bool, bool], int] = {}
        for swarm in self.swarms():
            for key, bucket in swarm.buckets.items():
                counts[key] = counts.get(key, 0) + len(bucket)
        return counts

    # ---- expiry ----------------------------------------------------------------------
    def expire(self, now: float, ttl_s: float) -> int:
        """Drop what is dead at ``now``; return how many entries went.

        Two kinds of death: every entry of a node whose heartbeat is older than its ttl,
        and each entry without a live heartbeat not announced for ``ttl_s`` seconds.
        The cost is the number of due items, not the number of peers.
        """
        removed = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            _, seq, node_id = heapq.heappop(self._deadlines)
            node = self._nodes.get(node_id)
            if node is None or node.seq != seq:
                continue  # the node left, or was re-queued earlier
            if node.expires is not None and node.expires > now:
                self._queue(node_id, node, node.expires)  # heartbeats came in since it was queued
                continue
            removed += self.leave(node_id)
        cutoff = now - ttl_s
        last_seen = self._last_seen
        while last_seen:
            entry, seen = next(iter(last_seen.items()))
            if seen >= cutoff:
                break
            del last_seen[entry]
            if entry.node is not None and self.is_live(entry.node):
                continue  # its node's heartbeat keeps it; node expiry removes it when that lapses
            if self._drop(entry):
                removed += 1
        return removed

    # ---- registry deletes ------------------------------------------------------------
    def disallow(self, keys: Iterable[bytes]) -> int:
        """Stop accepting announces for ``keys`` (their artifact was deleted); return how many were allowed.

        A swarm left without any key is emptied through :meth:`_drop`, so no index (last
        seen, a node's entries) keeps its peers alive.  Unknown keys are ignored.
        """
        popped = [s for s in (self._by_key.pop(k, None) for k in set(keys)) if s is not None]
        for swarm in {id(s): s for s in popped}.values():
            if any(s is swarm for s in self._by_key.values()):
                continue  # another key of it (a hybrid's other hash) is still allowed
            for entry in list(swarm.peers.values()):
                self._drop(entry)
        return len(popped)

    def swarm_totals(self) -> tuple[int, int]:
        """(published swarms, swarms with at least one peer), for metrics."""
        every = self.swarms()
        return len(every), sum(1 for s in every if s.peers)
