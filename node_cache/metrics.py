"""The node's Prometheus metrics, through ``prometheus_client``.

The daemon counts events in :class:`NodeCounters` (plain integers: some are bumped per
piece) and knows its state (cache, pins, peers); :class:`NodeCollector` turns both into
metric families at scrape time, in one :class:`~prometheus_client.CollectorRegistry` per
daemon.  A collector rather than ``Counter`` objects: no ``_created`` samples, so the
exposition holds exactly the series it always had.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

PULL_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800)
CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass
class NodeCounters:
    """What happened since the daemon started."""

    bytes_from_peers: int = 0
    bytes_from_origin: int = 0
    bytes_from_relay: int = 0
    bytes_relayed: int = 0  # pieces this node served to nodes of other zones
    pulls: dict[str, int] = field(default_factory=lambda: {"ready": 0, "failed": 0})
    pull_seconds_sum: float = 0.0
    pull_buckets: list[int] = field(default_factory=lambda: [0] * len(PULL_BUCKETS))  # cumulative
    verify_failures: int = 0
    verified_bytes: int = 0  # bytes re-hashed with xxh3 (full verification only)
    evictions: int = 0
    evicted_bytes: int = 0
    repairs: int = 0

    def observe_pull(self, seconds: float, ok: bool) -> None:
        self.pulls["ready" if ok else "failed"] += 1
        self.pull_seconds_sum += seconds
        for i, bound in enumerate(PULL_BUCKETS):
            if seconds <= bound:
                self.pull_buckets[i] += 1


@dataclass(frozen=True)
class NodeGauges:
    """The daemon's state at scrape time."""

    cache_bytes: int
    cache_artifacts: int
    quota_bytes: int
    pinned_artifacts: int
    peers_connected: int
    piece_hash_failures: int
    peers_banned: int
    node_id: str = ""
    zone: str = ""
    pulls_in_progress: int = 0  # queued, downloading or verifying
    pulling_bytes: int = 0  # total size of the artifacts being pulled
    pulling_done_bytes: int = 0  # of which on disk and hash-checked
    unpacked_bytes: int = 0  # unpacked runtime layers (and room promised to ones being unpacked)
    unpacked_layers: int = 0
    used_bytes: int = 0  # what the quota counts: artifacts held or being pulled, and unpacked layers


class NodeCollector(Collector):
    """Every ``modelcast_node_*`` metric, read from the counters and the daemon's gauges."""

    def __init__(self, counters: NodeCounters, gauges: Callable[[], NodeGauges]):
        self.counters = counters
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        m, g = self.counters, self.gauges()

        def counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"modelcast_node_{name}", help_text, value=value)

        def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"modelcast_node_{name}", help_text, value=value)

        yield counter("bytes_from_peers_total", "Payload bytes received from peers.", m.bytes_from_peers)
        yield counter("bytes_from_origin_total", "Bytes fetched from the origin web seed.", m.bytes_from_origin)
        yield counter("bytes_from_relay_total", "Bytes fetched from nodes of other zones, as the origin directed.",
                      m.bytes_from_relay)
        yield counter("bytes_relayed_total", "Bytes served to nodes of other zones.", m.bytes_relayed)
        pulls = CounterMetricFamily("modelcast_node_pulls_total", "Pulls that ended, by result.", labels=["result"])
        for result, n in m.pulls.items():
            pulls.add_metric([result], n)
        yield pulls
        count = sum(m.pulls.values())
        yield HistogramMetricFamily(
            "modelcast_node_pull_duration_seconds", "Time from pull request to a verified artifact.",
            buckets=[*((str(b), c) for b, c in zip(PULL_BUCKETS, m.pull_buckets)), ("+Inf", count)],
            sum_value=round(m.pull_seconds_sum, 3))
        yield gauge("cache_bytes", "Bytes of complete artifacts in the cache.", g.cache_bytes)
        yield gauge("cache_artifacts", "Complete artifacts in the cache.", g.cache_artifacts)
        yield gauge("cache_quota_bytes", "Cache quota (0 = none).", g.quota_bytes)
        yield gauge("cache_used_bytes", "Bytes the quota counts: artifacts held or being pulled, and unpacked "
                    "runtime layers.", g.used_bytes)
        yield gauge("unpacked_bytes", "Bytes of unpacked runtime layers (counted in the quota with their "
                    "artifacts).", g.unpacked_bytes)
        yield gauge("unpacked_layers", "Unpacked runtime layers in the cache.", g.unpacked_layers)
        yield gauge("pinned_artifacts", "Artifacts with at least one pin.", g.pinned_artifacts)
        yield counter("evictions_total", "Artifacts evicted to stay within the quota.", m.evictions)
        yield counter("evicted_bytes_total", "Bytes evicted to stay within the quota.", m.evicted_bytes)
        yield counter("verification_failures_total", "Artifacts that failed verification.", m.verify_failures)
        yield counter("repairs_total", "Corrupt artifacts repaired from the swarm.", m.repairs)
        yield counter("verified_bytes_total", "Bytes re-hashed with xxh3 to verify artifacts.", m.verified_bytes)
        yield counter("piece_hash_failures_total", "Pieces received that failed their hash.", g.piece_hash_failures)
        yield counter("peers_banned_total", "Peers banned for sending bad data.", g.peers_banned)
        yield gauge("peers_connected", "Peers connected across active downloads.", g.peers_connected)
        yield gauge("pulls_in_progress", "Pulls queued, downloading or verifying.", g.pulls_in_progress)
        yield gauge("pulling_bytes", "Total size of the artifacts being pulled.", g.pulling_bytes)
        yield gauge("pulling_done_bytes", "Bytes of the artifacts being pulled that are on disk, piece-checked.",
                    g.pulling_done_bytes)
        info = GaugeMetricFamily("modelcast_node_info", "This node: its id and zone (always 1); join on instance "
                                 "to break node metrics down by zone.", labels=["node_id", "zone"])
        info.add_metric([g.node_id, g.zone], 1)
        yield info


class NodeMetrics:
    """The counters, and one registry holding the collector that exposes them."""

    def __init__(self, gauges: Callable[[], NodeGauges]):
        self.counters = NodeCounters()
        self.registry = CollectorRegistry()
        self.registry.register(NodeCollector(self.counters, gauges))

    def exposition(self) -> bytes:
        """The text a Prometheus scrape of ``GET /metrics`` gets."""
        return generate_latest(self.registry)
