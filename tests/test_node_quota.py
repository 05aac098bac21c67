"""The cache quota and eviction plan (node_cache/quota.py), and pull jobs' states.  No server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelcast.errors import DiskFull, QuotaExceeded
from modelcast.manifest import Manifest
from node_cache.jobs import PullJob, PullState
from node_cache.quota import EvictionPlan, Held, check_disk, plan_eviction, used_bytes

MiB = 1 << 20


def held(digest: str, size_mib: int, *, last_used: float = 0.0, ready: bool = True, busy: bool = False,
         pinned: bool = False, unpacked_mib: int = 0) -> Held:
    return Held(digest, size_mib * MiB, ready=ready, busy=busy, pinned=pinned, last_used=last_used,
                unpacked=unpacked_mib * MiB)


def plan(cache: list[Held], size_mib: int, quota_mib: int, digest: str | None = "new") -> EvictionPlan:
    return plan_eviction(cache, name="m/new", digest=digest, size=size_mib * MiB, quota=quota_mib * MiB)


def test_no_quota_or_room_enough_evicts_nothing():
    cache = [held("a", 50), held("b", 50)]
    assert plan(cache, 500, 0) == EvictionPlan()
    assert plan(cache, 20, 120) == EvictionPlan()


def test_least_recently_used_go_first_and_only_as_many_as_needed():
    cache = [held("new", 10, ready=False, busy=True), held("old", 30, last_used=1), held("older", 30, last_used=0.5),
             held("recent", 30, last_used=9)]
    # 90 used + 40 needed - 100 quota = 30 to free: the oldest alone is enough.
    assert plan(cache, 40, 100) == EvictionPlan(("older",), 30 * MiB)
    assert plan(cache, 70, 100) == EvictionPlan(("older", "old"), 60 * MiB)


def test_pinned_busy_and_incomplete_artifacts_are_never_planned():
    cache = [held("pinned", 30, pinned=True), held("pulling", 30, ready=False, busy=True),
             held("verifying", 30, ready=True, busy=True), held("failed", 30, ready=False), held("free", 30, last_used=5)]
    assert used_bytes(cache) == 120 * MiB  # a failed pull holds no room
    assert plan(cache, 30, 130) == EvictionPlan(("free",), 30 * MiB)


def test_what_cannot_fit_fails_at_once_with_the_sizes_and_evicts_nothing():
    cache = [held("pinned", 40, pinned=True), held("free", 30), held("pulling", 20, ready=False, busy=True)]
    with pytest.raises(QuotaExceeded) as err:
        plan(cache, 80, 100)
    assert str(err.value) == (
        "m/new needs 80.0 MiB but the cache quota of 100.0 MiB leaves 40.0 MiB even after evicting everything "
        "not pinned or in use (40.0 MiB pinned); raise --quota or unpin something (modelcast node ls)")


def test_the_artifact_being_made_room_for_is_neither_counted_nor_evicted():
    # A repair: the artifact's own old entry is the one being pulled again.
    cache = [held("self", 60, last_used=0), held("other", 30, last_used=1)]
    assert used_bytes(cache, exclude="self") == 30 * MiB
    assert plan(cache, 60, 100, digest="self") == EvictionPlan()
    assert plan(cache, 80, 100, digest="self") == EvictionPlan(("other",), 30 * MiB)


# ---- unpacked runtime layers: counted and evicted with their artifacts ------------------------------
def test_unpacked_layers_count_in_the_used_bytes():
    cache = [held("layer", 30, unpacked_mib=40), held("model", 20), held("pulling", 10, ready=False, busy=True),
             held("failed-with-tree", 5, ready=False, unpacked_mib=7)]
    # An unpacked tree is on disk whatever its artifact's state: it always counts.
    assert used_bytes(cache) == (30 + 40 + 20 + 10 + 7) * MiB


def test_evicting_a_layer_artifact_frees_its_unpacked_tree_too():
    cache = [held("layer", 30, unpacked_mib=40, last_used=1), held("model", 20, last_used=2)]
    # 90 used + 40 - 100 = 30 to free: the LRU runtime alone frees 70 (artifact and tree together).
    assert plan(cache, 40, 100) == EvictionPlan(("layer",), 70 * MiB)


def test_room_for_unpacking_counts_the_artifact_and_never_evicts_a_layer_being_activated():
    # Unpacking "b" (busy while it is activated): b itself stays counted (digest=None) and is not a candidate.
    cache = [held("a", 3, unpacked_mib=3, last_used=1), held("b", 3, busy=True, last_used=2)]
    assert plan(cache, 3, 10, digest=None) == EvictionPlan(("a",), 6 * MiB)
    assert plan(cache, 3, 12, digest=None) == EvictionPlan()
    with pytest.raises(QuotaExceeded):
        plan(cache, 5, 7, digest=None)  # b (3) + 5 > 7 even with a gone


def test_a_pinned_runtime_keeps_its_unpacked_tree_and_the_sizes_say_so():
    cache = [held("pinned-runtime", 10, pinned=True, unpacked_mib=30), held("free", 20, unpacked_mib=5)]
    with pytest.raises(QuotaExceeded) as err:
        plan(cache, 80, 100)
    assert "leaves 60.0 MiB" in str(err.value) and "(40.0 MiB pinned)" in str(err.value)
    assert plan(cache, 60, 100) == EvictionPlan(("free",), 25 * MiB)


def test_disk_check_counts_what_is_already_on_disk():
    check_disk(name="m/new", size=100 * MiB, on_disk=60 * MiB, free=40 * MiB, root=Path("/cache"))
    with pytest.raises(DiskFull) as err:
        check_disk(name="m/new", size=100 * MiB, on_disk=50 * MiB, free=40 * MiB, root=Path("/cache"))
    assert str(err.value) == ("m/new needs 50.0 MiB more but the filesystem of /cache has 40.0 MiB free; "
                              "free space or lower the quota")


def test_pull_states_are_an_enum_whose_json_is_the_same_strings():
    manifest = Manifest.from_bytes(json.dumps({
        "schema_version": 1, "kind": "model", "name": "m/x", "files": [{"path": "a", "size": 1, "xxh3_128": "0" * 32}],
        "total_size": 1, "piece_length": 262144, "info_hash": {"v1": "1" * 40}, "torrent_name": "x",
        "annotations": {}, "created": "2026-01-01T00:00:00Z"}).encode())
    job = PullJob("sha256:" + "0" * 64, manifest)
    assert job.state is PullState.QUEUED and job.busy and job.to_json()["state"] == "queued"
    assert [s.value for s in PullState] == ["queued", "downloading", "verifying", "ready", "failed"]
    job.end(PullState.READY)
    assert not job.busy and json.loads(json.dumps(job.to_json()))["state"] == "ready" and job.finished
    assert PullState.READY == "ready"  # code that compares with the strings keeps working
