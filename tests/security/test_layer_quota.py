"""Unpacked runtime layers count against the node's quota and are evicted with their artifacts (issue #15).

Real registry, real node daemon with ``--quota``: two small runtime layers (plain tars made
here) are published and activated in turn.  The quota holds one runtime with its unpacked
tree plus the second's artifact, not both unpacked: activating the second must evict the
first (its tree first, then its artifact), the node's used bytes must include the unpacked
bytes and stay within the quota, and the sizes must come back after a restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request

import pytest

from modelcast.errors import QuotaExceeded
from node_cache.runtime import UNPACKED_RECORD, RuntimeClient, layer_path, layers_dir, this_interpreter

from ..helpers import metric, publish
from .test_layer_unpack import folder, make_layer, reg

MiB = 1 << 20
PAYLOAD = 3 * MiB


def publish_layer(tracker_url: str, tmp, name: str) -> tuple[str, int]:
    """A runtime artifact whose layer unpacks to one 3 MiB file; returns (digest, its unpacked bytes)."""
    art = make_layer(tmp / name, [folder("site-packages"), reg("site-packages/blob.bin", os.urandom(PAYLOAD))])
    target = this_interpreter()
    digest = publish(tracker_url, art, f"rt/{name}:v1", (tmp / f"origin-{name}").as_uri(), "--kind", "runtime",
                     "--annotation", "accelerator=cpu", "--annotation", f"python_abi={target.python_abi}",
                     "--annotation", f"platform=linux_{target.machine}")
    return digest, PAYLOAD + (art / "layer.json").stat().st_size


def listing(node_url: str) -> dict:
    with urllib.request.urlopen(f"{node_url}/v1/artifacts", timeout=10) as resp:
        return json.load(resp)


def activate(node_url: str, ref: str) -> dict:
    async def go():
        async with RuntimeClient(node_url) as client:
            return await client.activate(ref)
    return asyncio.run(go())


def on_disk(tree) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(tree) for f in fs
               if f != UNPACKED_RECORD)


def test_activating_a_second_layer_evicts_the_first_unpacked_tree_and_the_quota_holds(tmp_path, tracker,
                                                                                      node_factory):
    a, unpacked_a = publish_layer(tracker.url, tmp_path, "a")
    b, unpacked_b = publish_layer(tracker.url, tmp_path, "b")
    quota = 10 * MiB  # one runtime (about 3 MiB) with its tree (3 MiB), plus the next artifact; never two trees
    node = node_factory(tracker.url, "n1", "--quota", str(quota))

    first = activate(node.url, "rt/a:v1")
    assert first["digest"] == a and first["path"] == str(layer_path(node.cache, a))
    view = listing(node.url)
    size_a = next(x["total_bytes"] for x in view["artifacts"] if x["digest"] == a)
    assert view["unpacked_bytes"] == unpacked_a == on_disk(first["path"])
    assert view["used_bytes"] == size_a + unpacked_a <= quota
    assert next(x["unpacked_bytes"] for x in view["artifacts"] if x["digest"] == a) == unpacked_a
    assert metric(node.url, "modelcast_node_unpacked_bytes") == unpacked_a
    assert metric(node.url, "modelcast_node_cache_used_bytes") == size_a + unpacked_a

    # The second runtime: its artifact fits beside the first with its tree; its tree does not.
    second = activate(node.url, "rt/b:v1")
    assert second["digest"] == b
    view = listing(node.url)
    assert [x["digest"] for x in view["artifacts"]] == [b], "the first runtime was not evicted"
    assert not layer_path(node.cache, a).exists(), "the first runtime's unpacked tree is still on disk"
    size_b = view["artifacts"][0]["total_bytes"]
    assert view["unpacked_bytes"] == unpacked_b
    assert view["used_bytes"] == size_b + unpacked_b <= quota
    assert metric(node.url, "modelcast_node_evictions_total") == 1
    assert metric(node.url, "modelcast_node_evicted_bytes_total") == size_a + unpacked_a
    # Nothing in layers/ or elsewhere in the cache is outside what the node counts.
    assert sorted(p.name for p in layers_dir(node.cache).iterdir()) == [b.split(":")[1]]

    # Durable: after a restart (and a crash's half-unpacked leftover) the same bytes are counted.
    node.stop()
    leftover = layers_dir(node.cache) / f".staging-{'cd' * 32}-1-deadbeef"
    (leftover / "site-packages").mkdir(parents=True)
    (leftover / "site-packages" / "half.bin").write_bytes(b"h" * MiB)
    node.start()
    view = listing(node.url)
    assert view["unpacked_bytes"] == unpacked_b and view["used_bytes"] == size_b + unpacked_b
    assert not leftover.exists(), "a half-unpacked staging folder survived the restart"
    again = activate(node.url, "rt/b:v1")  # already unpacked: nothing more counted
    assert again["path"] == second["path"] and listing(node.url)["used_bytes"] == size_b + unpacked_b


def test_a_pinned_runtime_keeps_its_tree_and_the_next_activation_fails_with_the_sizes(tmp_path, tracker,
                                                                                     node_factory):
    a, unpacked_a = publish_layer(tracker.url, tmp_path, "a")
    publish_layer(tracker.url, tmp_path, "b")
    node = node_factory(tracker.url, "n1", "--quota", str(10 * MiB))
    activate(node.url, "rt/a:v1")
    req = urllib.request.Request(f"{node.url}/v1/pins", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"ref": "rt/a:v1", "holder": "worker"}).encode())
    urllib.request.urlopen(req, timeout=10).close()
    with pytest.raises(QuotaExceeded, match="pinned"):
        activate(node.url, "rt/b:v1")
    view = listing(node.url)
    assert layer_path(node.cache, a).is_dir() and view["unpacked_bytes"] == unpacked_a
    assert view["used_bytes"] <= 10 * MiB
