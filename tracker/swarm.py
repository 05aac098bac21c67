"""In-memory swarm state: who is in which swarm, rebuilt from announces after a restart.

Only swarms of published artifacts exist.  A hybrid (v1 + v2) torrent is announced under
two 20-byte keys (the SHA-1 info-hash and the truncated SHA-256 one); both map to the
same :class:`Swarm`, so a peer that announces under either key sees every other peer.

Nothing here does I/O or reads the clock: callers pass ``now`` (monotonic seconds), so
expiry is tested without sleeping.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

from modelcast.errors import ArtifactNotFound

from .protocol import Announce, Peer, SwarmCounts, choose_peers


class UnknownInfoHash(ArtifactNotFound):
    """An announce or scrape names an info-hash that no published artifact has."""


@dataclass
class _Entry:
    peer: Peer
    last_seen: float


class Swarm:
    """The peers of one torrent, with BEP 48 counters kept up to date on every change.

    Peers are keyed by (ip, port): a node that restarts with a new peer id replaces its
    old entry instead of lingering as a ghost until it expires.  The dict is kept in
    last-seen order, so expiry pops stale peers from the front without a full scan.
    """

    def __init__(self) -> None:
        self.peers: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self.complete = 0
        self.incomplete = 0
        self.downloaded = 0

    def counts(self) -> SwarmCounts:
        return SwarmCounts(self.complete, self.incomplete, self.downloaded)

    def _count(self, peer: Peer, delta: int) -> None:
        if peer.complete:
            self.complete += delta
        else:
            self.incomplete += delta

    def remove(self, addr: tuple[str, int]) -> bool:
        """Drop the peer at ``addr``; True if it was there."""
        entry = self.peers.pop(addr, None)
        if entry is None:
            return False
        self._count(entry.peer, -1)
        return True

    def update(self, peer: Peer, event: str, now: float) -> None:
        """Apply one announce of ``peer`` with ``event``; ``stopped`` removes it at once."""
        if event == "stopped":
            self.remove(peer.addr)
            return
        old = self.peers.pop(peer.addr, None)
        if old is not None:
            self._count(old.peer, -1)
        # A "completed" counts as a download once per peer entry: a client that repeats
        # the event (or a seed that announces it on start) must not inflate the counter.
        if event == "completed" and (old is None or not old.peer.complete):
            self.downloaded += 1
        self.peers[peer.addr] = _Entry(peer, now)
        self._count(peer, +1)

    def expire(self, deadline: float) -> int:
        """Drop peers last seen before ``deadline``; return how many went."""
        removed = 0
        while self.peers:
            addr, entry = next(iter(self.peers.items()))
            if entry.last_seen >= deadline:
                break
            self.remove(addr)
            removed += 1
        return removed

    def peer_list(self) -> list[Peer]:
        return [e.peer for e in self.peers.values()]


@dataclass(frozen=True)
class AnnounceResult:
    """What the tracker answers one announce with."""

    peers: list[Peer]
    counts: SwarmCounts


class SwarmRegistry:
    """Every swarm this tracker serves, and the allow-list of info-hashes it accepts."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._by_key: dict[bytes, Swarm] = {}
        self._rng = rng or random.Random()
        self.announces = 0

    def allow(self, keys: Iterable[bytes]) -> None:
        """Accept announces for ``keys``, all of which name the same torrent.

        Safe to call again with the same keys (a re-publish, or loading at startup): an
        existing swarm is kept, so a re-publish never drops live peers.
        """
        keys = list(keys)
        swarm = next((self._by_key[k] for k in keys if k in self._by_key), None) or Swarm()
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

    def announce(self, a: Announce, ip: str, now: float) -> AnnounceResult:
        """Record ``a`` from address ``ip`` and choose the peers to hand back."""
        swarm = self._swarm(a.info_hash)
        self.announces += 1
        peer = Peer(peer_id=a.peer_id, ip=ip, port=a.port, left=a.left, zone=a.zone, origin_seed=a.origin_seed)
        swarm.update(peer, a.event, now)
        if a.event == "stopped":
            return AnnounceResult([], swarm.counts())
        chosen = choose_peers(swarm.peer_list(), peer, a.numwant, self._rng)
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

    def expire(self, now: float, ttl_s: float) -> int:
        """Drop every peer not seen for ``ttl_s`` seconds; return how many went."""
        deadline = now - ttl_s
        return sum(s.expire(deadline) for s in self.swarms())

    def peers_of(self, info_hash: bytes) -> list[Peer]:
        """The peers currently in the swarm of ``info_hash`` (for stats and tests)."""
        return self._swarm(info_hash).peer_list()
