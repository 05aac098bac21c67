"""A lone node lets libtorrent fetch the origin's bytes itself (a BEP 19 URL seed, issue #13).

The bytes go from the socket to the disk inside libtorrent, hashed there, never through the
daemon's Python.  The registry serves such requests only while no other node pulls the
artifact, and only from a file origin (tracker/firstcopy.py, tracker/webseed.py); otherwise
the node asks with its own requests, which share the first copy and follow S3 redirects.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from .helpers import make_model, metric, publish, pull_all, registry_stats, tree_hashes

MiB = 1 << 20
SIZES = {"model.onnx": 3000, "weights/a.bin": 9 * MiB + 17, "weights/b.bin": 4 * MiB, "empty.txt": 0}
SIZE = sum(SIZES.values())


def test_a_lone_node_takes_the_origin_bytes_through_libtorrent(tracker, node_factory, tmp_path):
    model = make_model(tmp_path / "model", SIZES)
    publish(tracker.url, model, "lone/m:v1", (tmp_path / "origin").as_uri())
    node = node_factory(tracker.url, "n1")
    [status] = asyncio.run(pull_all([node], "lone/m:v1"))
    assert status["state"] == "ready", status
    assert tree_hashes(Path(status["path"])) == tree_hashes(model)
    # Every byte from the origin, all of them fetched by libtorrent, none counted as a peer's.
    assert status["bytes_from_url_seed"] == status["bytes_from_origin"] == SIZE, status
    assert status["bytes_from_peers"] == 0 and status["peers"] == 0, status
    assert metric(node.url, "modelcast_node_bytes_from_origin_total") == SIZE
    assert metric(node.url, "modelcast_node_bytes_from_peers_total") == 0
    assert SIZE <= registry_stats(tracker.url)["origin_bytes_served"] <= 1.05 * SIZE


def test_without_the_url_seed_the_node_asks_itself(tracker, node_factory, tmp_path):
    model = make_model(tmp_path / "model", SIZES)
    publish(tracker.url, model, "lone/m:v1", (tmp_path / "origin").as_uri())
    node = node_factory(tracker.url, "n1", "--no-url-seed")
    [status] = asyncio.run(pull_all([node], "lone/m:v1"))
    assert status["state"] == "ready", status
    assert tree_hashes(Path(status["path"])) == tree_hashes(model)
    assert status["bytes_from_url_seed"] == 0 and status["bytes_from_origin"] == SIZE, status


def test_an_s3_origin_sends_the_url_seed_back_to_presigned_reads(tracker, s3_bucket, node_factory, tmp_path):
    """libtorrent would neither follow the registry's presigned redirect nor should it make the
    registry stream S3 bytes: the registry refuses it (421) and the node reads the object store
    itself, with no payload through the registry."""
    endpoint, bucket = s3_bucket
    model = make_model(tmp_path / "model", SIZES)
    publish(tracker.url, model, "lone/s3:v1", f"s3://{bucket}/origin", "--s3-endpoint", endpoint)
    node = node_factory(tracker.url, "n1")
    [status] = asyncio.run(pull_all([node], "lone/s3:v1"))
    assert status["state"] == "ready", status
    assert tree_hashes(Path(status["path"])) == tree_hashes(model)
    assert status["bytes_from_url_seed"] == 0 and status["bytes_from_origin"] == SIZE, status
    stats = registry_stats(tracker.url)
    assert stats["origin_bytes_redirected"] == stats["origin_bytes_served"] >= SIZE, stats


def test_a_node_that_finds_a_seed_takes_nothing_from_the_origin(tracker, node_factory, tmp_path):
    """The tracker says a seed is in the swarm: no URL seed, every byte from the seed, none
    from the origin (a download held in upload mode while it decided could not connect to a
    seed, which closes upload-only connections, and ended up asking the origin)."""
    model = make_model(tmp_path / "model", SIZES)
    publish(tracker.url, model, "lone/m:v1", (tmp_path / "origin").as_uri())
    a = node_factory(tracker.url, "a", host="127.0.0.2")
    [first] = asyncio.run(pull_all([a], "lone/m:v1"))
    assert first["bytes_from_url_seed"] == SIZE, first
    served = registry_stats(tracker.url)["origin_bytes_served"]
    b = node_factory(tracker.url, "b", "--webseed-grace", "60", host="127.0.0.3")
    [second] = asyncio.run(pull_all([b], "lone/m:v1"))
    assert second["state"] == "ready", second
    assert tree_hashes(Path(second["path"])) == tree_hashes(model)
    assert second["bytes_from_origin"] == second["bytes_from_url_seed"] == 0, second
    assert second["bytes_from_peers"] >= SIZE, second
    assert registry_stats(tracker.url)["origin_bytes_served"] == served
