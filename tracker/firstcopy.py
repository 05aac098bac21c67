"""The origin's first-copy gate: serve each piece once, let the swarm (and a relay) spread it.

Nodes pulling together each pick, at random, pieces no peer has yet; two may pick the same
piece before either's HAVE reaches the other.  A node marks such requests "first copy"
(header ``X-Modelcast-First-Copy: 1``); the gate answers one whose byte range lies inside a
range served within ``window_s`` with 409, and the node takes that piece from its peers.
Every served range is remembered, with the header or without; requests without it (a lone
or stalled node, a plain BEP 19 client) are always served.

Zones.  The tracker hands a node only its own zone's peers, so a piece served to one zone
never reaches another through the swarm.  A node names its zone (``X-Modelcast-Zone``) and
the URL where it serves pieces (``X-Modelcast-Relay``).  When a first-copy request from
zone B asks for bytes just served to a node of zone A, the gate answers 409 with that
node's URL (``X-Modelcast-Relay-From``) to the first requester of zone B only: that node
fetches the piece from the holder, and zone B's swarm spreads it.  Better still, when the
gate serves bytes to a node of zone A while nodes of zone B are pulling the same artifact
(they asked within the window), it names one of them per other zone
(``X-Modelcast-Relay-To``, round robin) and the served node pushes the bytes there as soon
as it has them: the other zone gets them without asking, at the pace the origin serves.
Either way one copy crosses between zones, chosen by the gate rather than by each node's
piece picker.  Bytes served to another zone by a node that named no relay URL are served
again: one copy per zone.

What no client can do (issue #15): a request that names no zone is served and forgotten, so
plain downloads never make the gate refuse anyone; a requested range is refused at most
:data:`MAX_REFUSALS` times within the window, so no pattern of requests can keep a zone from the origin's
bytes (a node whose swarm did not bring a piece asks again and is served); and relay URLs
are believed only when a node registered them with its heartbeat, at the requester's own
address, and each one handed out carries a token for that exchange only
(tracker/relaytokens.py, modelcast/relay_auth.py).

Solo requesters.  A lone node lets libtorrent fetch from the web seed itself (a BEP 19 URL
seed, ``X-Modelcast-Url-Seed: 1``; node_cache/origin_fill.py): it marks no request and pushes
to nobody.  Such a request is served only while no other node asked for the artifact within
the window; otherwise it is refused (:data:`CROWDED`, nothing remembered) and the node asks
with its own requests, which share the first copy as above.

Where the books are kept (:class:`GateStore`): :class:`FirstCopyGate`, in process (the default:
plain calls, no I/O), or :class:`tracker.gate_redis.RedisGateStore` with ``--swarm-store
redis://`` (every replica shares one gate; its ``admit`` answers an awaitable when it asks
Redis).  Callers await ``admit``'s answer when it is not an :class:`Admission` (tracker/webseed.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Awaitable, Protocol

MAX_NODES_PER_ZONE = 1000
MAX_ZONES = 256  # per artifact; nodes of further zones are not pushed to (they still fetch)
MAX_ARTIFACTS = 2000  # artifacts whose pulling nodes are remembered (the oldest forgotten first)
# A served range refuses at most this many first-copy requests, then serves again: enough for
# the few nodes of a zone that pick one piece at the same moment, too few for a client that
# took bytes and vanished (and so never spread them) to stall a zone.
MAX_REFUSALS = 4


@dataclass(eq=False)
class _Served:
    start: int
    end: int
    at: float
    zone: str
    holder: str | None  # the relay URL of the node it went to, if it named one


@dataclass(frozen=True)
class Admission:
    serve: bool
    relay_from: str | None = None  # with serve False: fetch from this node; None: from your peers
    relay_to: tuple[str, ...] = ()  # with serve True: push the bytes to these nodes, one per other zone
    crowded: bool = False  # with serve False: a solo requester while other nodes pull (ask as they do)


SERVE = Admission(True)
ELSEWHERE = Admission(False)
CROWDED = Admission(False, crowded=True)


class GateStore(Protocol):
    """What the web seed asks of the first-copy gate, in process or in Redis."""

    window_s: float
    refused: int  # counters of this replica's decisions (metrics, /v1/stats)
    relayed: int
    pushed: int

    def admit(self, artifact: str, path: str, start: int, end: int, first_copy: bool,
              now: float | None = None, *, zone: str | None = None,
              relay: str | None = None, node: str | None = None,
              solo: bool = False) -> Admission | Awaitable[Admission]: ...


def make_gate_store(swarms, relays) -> GateStore:
    """The gate for the swarm store ``swarms``: in process, or in its Redis (with ``relays``' registrations)."""
    from .swarm_redis import RedisSwarmStore

    if isinstance(swarms, RedisSwarmStore):
        from .gate_redis import RedisGateStore
        return RedisGateStore(swarms, relays)
    return FirstCopyGate()


class FirstCopyGate:
    """Recently served byte ranges per (artifact, file), bounded in time and count.  No I/O."""

    def __init__(self, window_s: float = 30.0, max_ranges: int = 200_000):
        self.window_s = window_s
        self.max_ranges = max_ranges
        self._order: deque[tuple[tuple[str, str], _Served]] = deque()
        self._ranges: OrderedDict[tuple[str, str], list[_Served]] = OrderedDict()
        # Per artifact and zone, the relay URLs of nodes that asked lately (LRU order).
        self._pulling: dict[str, dict[str, OrderedDict[str, float]]] = {}
        self._turn: dict[tuple[str, str], int] = {}
        # Per artifact, the ids of proven nodes that asked lately, any zone (LRU order).
        self._askers: dict[str, OrderedDict[str, float]] = {}
        # (artifact, path, start, end) -> [refusals, when first refused], oldest first
        self._refusals: OrderedDict[tuple[str, str, int, int], list] = OrderedDict()
        self.refused = 0
        self.relayed = 0
        self.pushed = 0

    def _expire(self, now: float) -> None:
        refusals = self._refusals
        while refusals and (now - next(iter(refusals.values()))[1] > self.window_s or len(refusals) > self.max_ranges):
            refusals.popitem(last=False)
        while self._order and (now - self._order[0][1].at > self.window_s or len(self._order) > self.max_ranges):
            key, served = self._order.popleft()
            ranges = self._ranges.get(key)
            if ranges:
                try:
                    ranges.remove(served)
                except ValueError:
                    pass
                if not ranges:
                    del self._ranges[key]

    def admit(self, artifact: str, path: str, start: int, end: int, first_copy: bool,
              now: float | None = None, *, zone: str | None = None, relay: str | None = None,
              node: str | None = None, solo: bool = False) -> Admission:
        """Whether bytes ``start..end`` of ``path`` may be served now (remembering them if so).

        ``zone``, ``relay`` and ``node`` are the requester's zone, relay URL and node id, if
        it named them.  ``solo``: the requester takes no part in sharing (a node's libtorrent
        URL seed: it never pushes, never marks a request); it is served only while no other
        node asked for the artifact within the window, else refused with :data:`CROWDED`,
        nothing remembered.
        """
        now = time.monotonic() if now is None else now
        self._expire(now)
        if zone is None:
            # Not a node of any zone (a plain BEP 19 client, a probe): served, and it makes
            # nobody wait for a swarm it is not in.
            return SERVE
        key = (artifact, path)
        if relay is not None:
            self._seen(artifact, zone, relay, now)
        if node is not None and self._others_asked(artifact, node, now) and solo:
            return CROWDED  # (every proven requester is noted, solo or not)
        decision = SERVE
        if first_copy:
            covering = [s for s in self._ranges.get(key, ()) if s.start <= start and end <= s.end]
            refused = self._refusals.get((artifact, path, start, end))
            if covering and (refused is None or refused[0] < MAX_REFUSALS):
                decision = self._elsewhere(covering, zone)
                if not decision.serve:
                    if refused is None:
                        self._refusals[(artifact, path, start, end)] = [1, now]
                    else:
                        refused[0] += 1
                if decision is ELSEWHERE:
                    return decision
        # Served, or on its way to the requester from a node of another zone: either way
        # the requester's zone has these bytes now.
        self._remember(key, _Served(start, end, now, zone, relay))
        if decision is SERVE and zone is not None and relay is not None:
            targets = self._push_targets(artifact, zone, now)
            if targets:
                for other, url in targets:
                    self._remember(key, _Served(start, end, now, other, url))
                self.pushed += len(targets)
                return Admission(True, relay_to=tuple(url for _, url in targets))
        return decision

    def _others_asked(self, artifact: str, node: str, now: float) -> bool:
        """Note that ``node`` asked for ``artifact``; whether another node did within the window."""
        askers = self._askers.get(artifact)
        if askers is None:
            askers = self._askers[artifact] = OrderedDict()
            while len(self._askers) > MAX_ARTIFACTS:
                del self._askers[next(iter(self._askers))]
        askers[node] = now
        askers.move_to_end(node)
        while now - next(iter(askers.values())) > self.window_s or len(askers) > MAX_NODES_PER_ZONE:
            askers.popitem(last=False)
        return len(askers) > 1

    def _remember(self, key: tuple[str, str], served: _Served) -> None:
        self._ranges.setdefault(key, []).append(served)
        self._order.append((key, served))

    def _seen(self, artifact: str, zone: str, relay: str, now: float) -> None:
        zones = self._pulling.get(artifact)
        if zones is None:
            zones = self._pulling[artifact] = {}
            while len(self._pulling) > MAX_ARTIFACTS:
                del self._pulling[next(iter(self._pulling))]
        nodes = zones.get(zone)
        if nodes is None:
            if len(zones) >= MAX_ZONES:
                return
            nodes = zones[zone] = OrderedDict()
        nodes[relay] = now
        nodes.move_to_end(relay)
        if len(nodes) > MAX_NODES_PER_ZONE:
            nodes.popitem(last=False)

    def _push_targets(self, artifact: str, zone: str, now: float) -> list[tuple[str, str]]:
        """One node per other zone pulling ``artifact`` lately, in turn: (zone, relay URL)."""
        targets = []
        for other, nodes in list(self._pulling.get(artifact, {}).items()):
            if other == zone:
                continue
            while nodes and now - next(iter(nodes.values())) > self.window_s:
                nodes.popitem(last=False)  # it stopped asking: done, or gone
            if not nodes:
                del self._pulling[artifact][other]
                self._turn.pop((artifact, other), None)
                continue
            turn = self._turn.get((artifact, other), 0)
            self._turn[(artifact, other)] = turn + 1
            urls = list(nodes)
            targets.append((other, urls[turn % len(urls)]))
        return targets

    def _elsewhere(self, covering: list[_Served], zone: str) -> Admission:
        """The answer for bytes already served: from peers, from a holder, or (SERVE) again."""
        if any(s.zone == zone for s in covering):
            # Served to this zone: the swarm brings it.
            self.refused += 1
            return ELSEWHERE
        holder = next((s.holder for s in covering if s.holder), None)
        if holder is None:
            return SERVE  # only nodes of other zones that serve no relay have it: this zone's own copy
        self.relayed += 1
        return Admission(False, holder)
