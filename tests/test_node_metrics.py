"""The node's metrics exposition (node_cache/metrics.py): the series it always had, through prometheus_client."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from node_cache.metrics import NodeGauges, NodeMetrics

NAMES = {  # name: type, as the hand-built exposition had them
    "modelcast_node_bytes_from_peers": "counter", "modelcast_node_bytes_from_origin": "counter",
    "modelcast_node_bytes_from_relay": "counter", "modelcast_node_bytes_relayed": "counter",
    "modelcast_node_pulls": "counter", "modelcast_node_pull_duration_seconds": "histogram",
    "modelcast_node_cache_bytes": "gauge", "modelcast_node_cache_artifacts": "gauge",
    "modelcast_node_cache_quota_bytes": "gauge", "modelcast_node_pinned_artifacts": "gauge",
    "modelcast_node_evictions": "counter", "modelcast_node_evicted_bytes": "counter",
    "modelcast_node_verification_failures": "counter", "modelcast_node_repairs": "counter",
    "modelcast_node_verified_bytes": "counter", "modelcast_node_piece_hash_failures": "counter",
    "modelcast_node_peers_banned": "counter", "modelcast_node_peers_connected": "gauge",
    "modelcast_node_pulls_in_progress": "gauge", "modelcast_node_pulling_bytes": "gauge",
    "modelcast_node_pulling_done_bytes": "gauge", "modelcast_node_info": "gauge",
    "modelcast_node_cache_used_bytes": "gauge", "modelcast_node_unpacked_bytes": "gauge",
    "modelcast_node_unpacked_layers": "gauge",
}


def test_exposition_has_every_series_with_its_type_and_no_created_samples():
    metrics = NodeMetrics(lambda: NodeGauges(cache_bytes=300, cache_artifacts=2, quota_bytes=1 << 30,
                                             pinned_artifacts=1, peers_connected=3, piece_hash_failures=4,
                                             peers_banned=5, node_id="n1", zone="z1", pulls_in_progress=1,
                                             pulling_bytes=1000, pulling_done_bytes=250))
    c = metrics.counters
    c.bytes_from_origin += 1234
    c.observe_pull(0.7, ok=True)
    c.observe_pull(45, ok=False)
    text = metrics.exposition().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {n: f.type for n, f in families.items()} == NAMES
    assert "_created" not in text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines["modelcast_node_bytes_from_origin_total"]) == 1234
    assert float(lines['modelcast_node_pulls_total{result="ready"}']) == 1
    assert float(lines['modelcast_node_pulls_total{result="failed"}']) == 1
    assert float(lines['modelcast_node_pull_duration_seconds_bucket{le="1"}']) == 1
    assert float(lines['modelcast_node_pull_duration_seconds_bucket{le="60"}']) == 2
    assert float(lines['modelcast_node_pull_duration_seconds_bucket{le="+Inf"}']) == 2
    assert float(lines["modelcast_node_pull_duration_seconds_count"]) == 2
    assert float(lines["modelcast_node_cache_quota_bytes"]) == 1 << 30
    assert float(lines["modelcast_node_peers_banned_total"]) == 5
    assert float(lines['modelcast_node_info{node_id="n1",zone="z1"}']) == 1
    assert float(lines["modelcast_node_pulling_done_bytes"]) == 250
    assert "# HELP modelcast_node_bytes_from_peers_total Payload bytes received from peers." in text
