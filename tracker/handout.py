"""The peer handout policy without sockets: which peers one announce gets back.

Same zone first, completed before downloading, the origin's seed last, random within a
tier, at most ``numwant``; gateways bound what crosses between zones (Kraken's
``peerhandoutpolicy``).  A swarm keeps its peers in buckets, one per (zone, complete,
origin_seed), each an indexable sequence.  Handout walks the tiers in order and draws a
random sample from each, so an announce costs O(numwant + number of buckets) whatever
the swarm's size.
"""

from __future__ import annotations

import random
from typing import Iterable, Mapping, Sequence

from .announce import Peer

BucketKey = tuple[str, bool, bool]
"""(zone, complete, origin_seed): the peers of one bucket are interchangeable to the policy."""


def bucket_key(peer: Peer) -> BucketKey:
    """The bucket ``peer`` belongs in."""
    return (peer.zone, peer.complete, peer.origin_seed)


def peer_tier(peer: Peer, requester_zone: str) -> tuple[bool, bool, bool]:
    """Sort key of a peer's tier; lower is handed out first.

    The origin's seed comes last whatever its zone, because origin egress is what the
    swarm exists to save; then peers in the requester's zone before others (cheap,
    fast links); then complete peers before downloading ones (they have every piece).
    """
    return (peer.origin_seed, peer.zone != requester_zone, not peer.complete)


def _tier_of_key(key: BucketKey, requester_zone: str) -> int:
    """The tier of a bucket as an index 0..7, in :func:`peer_tier` order (bits: origin, other zone, incomplete)."""
    zone, complete, origin_seed = key
    return (4 if origin_seed else 0) + (2 if zone != requester_zone else 0) + (0 if complete else 1)


def _is_requester(p: Peer, requester: Peer) -> bool:
    # Same address or same peer id (a node that came back on another port).
    return p.packed == requester.packed or p.peer_id == requester.peer_id


def _sample_tier(parts: Sequence[Sequence[Peer]], need: int, requester: Peer, sole: bool, rng: random.Random,
                 out: list[Peer]) -> None:
    """Append up to ``need`` peers drawn uniformly without replacement from the union of ``parts``.

    The requester is never drawn (``sole``: it is excluded by identity alone, see
    :func:`sample_peers`).  The cost is O(need), never the tier's size: a tier that holds
    at most twice what is needed is read whole (and taken whole when it fits, which
    needs no random draws at all; the client receives a set), a bigger one is sampled by
    drawing positions and reading only those.
    """
    rp, rid = requester.packed, requester.peer_id
    lens = [len(part) for part in parts]
    total = sum(lens)
    if total <= 2 * need + 2:
        if sole:
            pool = [p for part in parts for p in part if p is not requester]
        else:
            pool = [p for part in parts for p in part if p.packed != rp and p.peer_id != rid]
        out.extend(pool if len(pool) <= need else rng.sample(pool, need))
        return
    # Sparse (need < total / 2): positions drawn in batches of what is still missing,
    # repeats and the requester dropped, until enough.  random() * total is uniform to
    # within total / 2**53, and one C call instead of randrange's several.
    rand = rng.random
    seen: dict[int, None] = {}
    got: list[Peer] = []
    while len(got) < need and len(seen) < total:
        fresh = [i for i in dict.fromkeys([int(rand() * total) for _ in range(need - len(got))])
                 if i not in seen]
        seen.update(dict.fromkeys(fresh))
        if len(parts) == 1:
            part = parts[0]
            drawn = [part[i] for i in fresh]
        else:
            drawn = [_at(parts, lens, i) for i in fresh]
        if sole:
            got += [p for p in drawn if p is not requester]
        else:
            got += [p for p in drawn if p.packed != rp and p.peer_id != rid]
    out += got


def _at(parts: Sequence[Sequence[Peer]], lens: list[int], i: int) -> Peer:
    """Position ``i`` of the virtual concatenation of ``parts``."""
    for part, n in zip(parts, lens):
        if i < n:
            return part[i]
        i -= n
    raise IndexError(i)


def sample_peers(buckets: Mapping[BucketKey, Sequence[Peer]], requester: Peer, numwant: int,
                 rng: random.Random, gateways: Mapping[str, Sequence[Peer]] | None = None, *,
                 sole: bool = False) -> list[Peer]:
    """Choose at most ``numwant`` peers for ``requester``: best tier first, random within a tier.

    ``buckets`` maps each :func:`bucket_key` to the peers in it; a bucket larger than
    twice ``numwant`` is only indexed at random positions, never iterated.  The
    requester itself (same address or same peer id, which catches a node that came back
    on another port) is never in its own list.  Buckets of every other zone share one
    tier: the policy prefers the requester's own zone but has no order among the rest;
    their keys are sorted within the tier, so that a given random generator makes the
    same choice whatever order the buckets were created in.

    ``gateways`` (each zone's first few peers in the swarm) bounds cross-zone traffic:
    when the requester's zone holds other peers, only a gateway is handed peers of other
    zones, and only their gateways.  Without it every node of a zone would pull across
    the (slower, dearer) inter-zone link, and most of those bytes would be pieces its own
    zone already has.  A requester alone in its zone gets other zones' peers freely.  An
    empty mapping means strict zones: nobody is handed other zones' peers, not even a
    requester alone in its zone (which then takes its own copy from the origin); zones
    exchange pieces only through the origin's relays (tracker/firstcopy.py).

    ``sole``: the caller vouches that no peer in ``buckets`` but ``requester`` itself
    (this very object, if it is there at all) has the requester's address or peer id,
    as the tracker's swarms do (keyed by address, counting peer ids).  The requester is
    then left out by identity, without reading the other peers' fields: in a swarm of
    cold records that saves a cache miss or two per peer handed out.
    """
    if numwant <= 0:
        return []
    zone = requester.zone
    tiers: list[list[BucketKey] | None] = [None] * 8
    for key in buckets:
        t = _tier_of_key(key, zone)
        keys = tiers[t]
        if keys is None:
            tiers[t] = [key]
        else:
            keys.append(key)
    restrict = gateways is not None and (not gateways or _zone_has_others(buckets, requester))
    is_gateway = restrict and any(p.packed == requester.packed for p in gateways.get(zone, ()))
    chosen: list[Peer] = []
    for t, keys in enumerate(tiers):
        if keys is None:
            continue
        need = numwant - len(chosen)
        if need <= 0:
            break
        if restrict and t in (2, 3):  # other zones, not the origin's seed
            if not is_gateway:
                continue
            complete = t == 2
            # A handful of peers at most: sampled from a plain list, no bucket is touched.
            parts = [[p for z, peers in gateways.items() if z != zone for p in peers if p.complete == complete]]
        else:
            if len(keys) > 1:
                keys.sort()
            parts = [buckets[k] for k in keys]
        _sample_tier(parts, need, requester, sole, rng, chosen)
    return chosen


def _zone_has_others(buckets: Mapping[BucketKey, Sequence[Peer]], requester: Peer) -> bool:
    """Whether the requester's zone holds a peer other than the requester (O(buckets))."""
    same = 0
    only: Peer | None = None
    for (zone, _, origin_seed), peers in buckets.items():
        if zone == requester.zone and not origin_seed and peers:
            same += len(peers)
            only = peers[0]
    return same > 1 or (same == 1 and not _is_requester(only, requester))


def bucket_peers(peers: Iterable[Peer]) -> dict[BucketKey, list[Peer]]:
    """Sort a flat list of peers into buckets (O(n); the tracker keeps its buckets up to date instead)."""
    buckets: dict[BucketKey, list[Peer]] = {}
    for p in peers:
        buckets.setdefault(bucket_key(p), []).append(p)
    return buckets


def choose_peers(peers: Iterable[Peer], requester: Peer, numwant: int, rng: random.Random) -> list[Peer]:
    """:func:`sample_peers` over a flat list of peers, for callers that hold no buckets (tools, tests).

    This one is O(len(peers)); the tracker's announce path calls :func:`sample_peers`.
    """
    return sample_peers(bucket_peers(peers), requester, numwant, rng)
