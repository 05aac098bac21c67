"""What the registry knows of each node daemon: zone, liveness, and its latest progress report.

Nodes report with their heartbeat (modelcast/progress.py).  :class:`NodeBook` keeps the
latest report of every live node and an index from artifact to the nodes that reported
it, so a rollout view costs the nodes of that artifact, not the fleet.  A node's report
goes when the node leaves or its heartbeat lapses (the same ttl as its swarm entries,
tracker/swarm.py); the node itself is remembered a while longer, without holdings, so
the console can show it as gone (at most :data:`MAX_GONE` of them).

Nothing here does I/O or reads the clock: callers pass ``now`` (monotonic seconds, for
expiry) and ``wall`` (``time.time()``, for display).  Each registry replica knows the
nodes whose heartbeats reach it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

from modelcast.progress import ArtifactProgress

MAX_GONE = 256
# Live nodes the book keeps (each up to MAX_REPORTED_ARTIFACTS entries, about 200 bytes
# each): heartbeats of further nodes still keep their swarm entries alive, but their
# reports are not kept, so whoever can send heartbeats cannot make the registry hold more.
MAX_LIVE = 100_000


@dataclass(slots=True)
class NodeRecord:
    """One node as the registry knows it."""

    node_id: str
    zone: str | None
    first_seen: float  # wall clock
    last_heartbeat: float  # wall clock
    expires: float = 0.0  # monotonic; the node is dead after this
    queued: float | None = None  # the deadline of its item in the expiry heap
    reported: bool = False  # whether its heartbeats carry reports (older nodes send none)
    artifacts: dict[str, ArtifactProgress] = field(default_factory=dict)
    more_artifacts: int = 0
    alive: bool = True
    gone: str | None = None  # "left" or "expired" once not alive
    gone_at: float | None = None  # wall clock

    def to_json(self, wall: float) -> dict:
        return {
            "node": self.node_id, "zone": self.zone, "alive": self.alive, "gone": self.gone,
            "first_seen": self.first_seen, "last_heartbeat": self.last_heartbeat,
            "seconds_since_heartbeat": round(max(0.0, wall - self.last_heartbeat), 3),
            "reported": self.reported,
            "artifacts": [a.to_json() for a in self.artifacts.values()], "more_artifacts": self.more_artifacts,
        }


class NodeBook:
    """Live nodes with their latest reports, recently gone nodes, and artifact -> reporting nodes."""

    def __init__(self, max_gone: int = MAX_GONE, max_live: int = MAX_LIVE) -> None:
        self.max_live = max_live
        self.refused = 0  # heartbeats of nodes beyond max_live, not recorded
        self.live: dict[str, NodeRecord] = {}
        self.gone: OrderedDict[str, NodeRecord] = OrderedDict()  # oldest departure first
        self.max_gone = max_gone
        self._by_digest: dict[str, dict[str, ArtifactProgress]] = {}
        # (deadline, node_id); an item is stale when its node queued another since.
        self._deadlines: list[tuple[float, str]] = []

    def heartbeat(self, node_id: str, zone: str | None, report: tuple[tuple[ArtifactProgress, ...], int] | None,
                  now: float, wall: float, ttl: float) -> NodeRecord | None:
        """Record a heartbeat of ``node_id``, alive until ``now + ttl``, with its report (None: it sent none).

        None when the book is full (:data:`MAX_LIVE` nodes) and the node is not in it.
        """
        node = self.live.get(node_id)
        if node is None and len(self.live) >= self.max_live:
            self.refused += 1
            return None
        if node is None:
            old = self.gone.pop(node_id, None)
            node = self.live[node_id] = NodeRecord(node_id, zone, old.first_seen if old else wall, wall)
        node.zone = zone
        node.last_heartbeat = wall
        node.expires = now + ttl
        # One item per node in the heap: pushed again only when the deadline comes earlier
        # (a shorter ttl); when a later one comes due, expiry re-queues it.
        if node.queued is None or node.expires < node.queued:
            node.queued = node.expires
            heapq.heappush(self._deadlines, (node.expires, node_id))
        if report is not None:
            entries, more = report
            self._unindex(node)
            node.artifacts = {e.digest: e for e in entries}
            node.more_artifacts = more
            node.reported = True
            for digest, entry in node.artifacts.items():
                self._by_digest.setdefault(digest, {})[node_id] = entry
        return node

    def leave(self, node_id: str, wall: float, why: str = "left") -> bool:
        """The node stopped (or died): drop its report, remember it as gone.  False if it was not live."""
        node = self.live.pop(node_id, None)
        if node is None:
            return False
        self._unindex(node)
        node.artifacts, node.more_artifacts = {}, 0
        node.alive, node.gone, node.gone_at = False, why, wall
        self.gone[node_id] = node
        while len(self.gone) > self.max_gone:
            self.gone.popitem(last=False)
        return True

    def expire(self, now: float, wall: float) -> int:
        """Mark gone every node whose heartbeat lapsed at ``now``; return how many."""
        gone = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, node_id = heapq.heappop(self._deadlines)
            node = self.live.get(node_id)
            if node is None or node.queued != deadline:
                continue  # it left, or a shorter ttl queued an earlier item
            if node.expires > now:
                node.queued = node.expires  # heartbeats came in since it was queued
                heapq.heappush(self._deadlines, (node.expires, node_id))
                continue
            gone += self.leave(node_id, wall, "expired")
        return gone

    def _unindex(self, node: NodeRecord) -> None:
        for digest in node.artifacts:
            holders = self._by_digest.get(digest)
            if holders is not None:
                holders.pop(node.node_id, None)
                if not holders:
                    del self._by_digest[digest]

    def holders(self, digest: str) -> list[tuple[NodeRecord, ArtifactProgress]]:
        """The live nodes that reported ``digest``, by zone then node id."""
        by_node = self._by_digest.get(digest, {})
        rows = [(self.live[n], p) for n, p in by_node.items()]
        rows.sort(key=lambda r: (r[0].zone or "", r[0].node_id))
        return rows

    def counts(self, digest: str) -> tuple[int, int]:
        """``(complete, active)``: live nodes holding ``digest``, and pulling it."""
        by_node = self._by_digest.get(digest, {}).values()
        return sum(p.complete for p in by_node), sum(p.active for p in by_node)

    def nodes(self) -> list[NodeRecord]:
        """Live nodes (by zone, then id), then gone ones (latest departure first)."""
        live = sorted(self.live.values(), key=lambda n: (n.zone or "", n.node_id))
        return live + list(reversed(self.gone.values()))
