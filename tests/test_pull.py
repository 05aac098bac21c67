"""End to end on one machine: publish, then pull on real node daemons over a real swarm."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest
from aiohttp import web

from modelcast.manifest import canonical_json
from harness.procs import free_port
from node_cache.client import NodeClient

from .helpers import TOKEN, make_model, metric, publish, pull_all, registry_stats, run_cli, start_node, tree_hashes

MiB = 1 << 20


def test_s3_origin_single_node_pulls_through_web_seed(tracker, s3_bucket, node_factory, tmp_path):
    endpoint, bucket = s3_bucket
    model = make_model(tmp_path / "model", {"model.onnx": 3000, "weights/a.bin": 3 * MiB + 17, "weights/b.bin": MiB})
    digest = publish(tracker.url, model, "s3demo/m:v1", f"s3://{bucket}/origin", "--s3-endpoint", endpoint)
    node = node_factory(tracker.url, "n1")
    out = run_cli("pull", "s3demo/m:v1", "--node", node.url)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.name == digest.split(":")[1]
    assert tree_hashes(path) == tree_hashes(model)
    # No peer has it, so every byte came through the registry's web seed from S3.
    size = 3000 + 3 * MiB + 17 + MiB
    assert metric(node.url, "modelcast_node_bytes_from_origin_total") == size
    assert metric(node.url, "modelcast_node_bytes_from_peers_total") == 0
    assert registry_stats(tracker.url)["origin_bytes_served"] >= size


def test_three_nodes_pull_at_once_origin_serves_at_most_one_and_a_half_copies(tracker, node_factory, tmp_path):
    sizes = {"model.onnx": 4096, **{f"weights/shard-{i}.bin": 8 * MiB for i in range(4)}, "empty.txt": 0}
    model = make_model(tmp_path / "model", sizes)
    total = sum(sizes.values())
    publish(tracker.url, model, "swarm/m:v1", (tmp_path / "origin").as_uri())
    ns = [node_factory(tracker.url, f"n{i}", host=f"127.0.0.{i + 2}") for i in range(3)]


    statuses = asyncio.run(pull_all(ns, "swarm/m:v1"))
    source = tree_hashes(model)
    for s in statuses:
        assert s["state"] == "ready"
        assert tree_hashes(Path(s["path"])) == source
    served = registry_stats(tracker.url)["origin_bytes_served"]
    assert served <= 1.5 * total, f"origin served {served / total:.2f} copies"
    assert sum(s["bytes_from_peers"] for s in statuses) >= 1.5 * total - served


def test_reference_forms_and_one_line_errors(tracker, node_factory, tmp_path):
    model = make_model(tmp_path / "model", {"a.bin": 200_000, "sub/b.bin": 1000})
    digest = publish(tracker.url, model, "refs/m:v1", (tmp_path / "origin").as_uri())
    node = node_factory(tracker.url, "n1")
    paths = set()
    for ref in ("refs/m:v1", f"refs/m@{digest}", digest):
        out = run_cli("pull", ref, "--node", node.url)
        assert out.returncode == 0, out.stderr
        paths.add(out.stdout.strip().splitlines()[-1])
        out = run_cli("inspect", ref, "--registry", tracker.url)
        assert out.returncode == 0 and json.loads(out.stdout)["digest"] == digest
    assert len(paths) == 1

    def one_line_error(out, *needles):
        assert out.returncode != 0
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        for needle in needles:
            assert needle in lines[0], lines[0]

    one_line_error(run_cli("pull", "refs/m:nope", "--node", node.url), "refs/m:nope", "not found")
    one_line_error(run_cli("inspect", "refs/missing:v1", "--registry", tracker.url), "refs/missing:v1")
    one_line_error(run_cli("publish", str(model), "refs/m:v2", "--registry", tracker.url,
                           "--origin", (tmp_path / "origin").as_uri(), "--token", "wrong"), "refs/m:v2", "token")
    dead = f"http://127.0.0.1:{free_port()}"
    one_line_error(run_cli("inspect", "refs/m:v1", "--registry", dead), "refs/m:v1", dead)
    one_line_error(run_cli("ls", env={"MODELCAST_REGISTRY": dead}), dead)
    one_line_error(run_cli("pull", "refs/m:v1", "--node", dead), "refs/m:v1", dead)
    # The environment stands in for the flags.
    out = run_cli("pull", "refs/m:v1", env={"MODELCAST_NODE": node.url})
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] in paths
    out = run_cli("ls", env={"MODELCAST_REGISTRY": tracker.url})
    assert out.returncode == 0 and "refs/m" in out.stdout and "v1" in out.stdout


def test_publish_rejects_link_leaving_the_artifact(tracker, tmp_path):
    model = make_model(tmp_path / "model", {"a.bin": 1000})
    (tmp_path / "secret.txt").write_text("outside")
    (model / "leak").symlink_to(tmp_path / "secret.txt")
    out = run_cli("publish", str(model), "bad/m:v1", "--registry", tracker.url,
                  "--origin", (tmp_path / "origin").as_uri(), "--token", TOKEN)
    assert out.returncode != 0
    assert "leak" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def _hostile_manifest(path: str, torrent_name: str = "m") -> bytes:
    return canonical_json({
        "schema_version": 1, "kind": "model", "name": "evil/m",
        "files": [{"path": path, "size": 10, "xxh3_128": "0" * 32}], "total_size": 10,
        "piece_length": 262144, "info_hash": {"v1": "1" * 40}, "torrent_name": torrent_name,
        "annotations": {}, "created": "2026-01-01T00:00:00Z",
    })


class HostileRegistry:
    """A registry that serves whatever a test gives it: a liar the node must not trust."""

    def __init__(self, manifest: bytes, torrent: bytes = b""):
        self.manifest, self.torrent = manifest, torrent
        self.digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        self.url = ""

    async def __aenter__(self):
        async def resolve(request):
            return web.json_response({"digest": self.digest, "name": "evil/m", "manifest": json.loads(self.manifest)})

        async def manifest(request):
            return web.Response(body=self.manifest, content_type="application/json")

        async def torrent(request):
            return web.Response(body=self.torrent, content_type="application/x-bittorrent")

        async def ok(request):
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_get("/v1/resolve", resolve)
        app.router.add_get(f"/v1/artifacts/{self.digest}", manifest)
        app.router.add_get(f"/v1/artifacts/{self.digest}/torrent", torrent)
        app.router.add_get("/v1/health", ok)
        app.router.add_post("/v1/nodes/{node}/heartbeat", ok)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


async def _pull_from(registry_url: str, tmp_path: Path, ref: str):
    node = await asyncio.to_thread(start_node, tmp_path, registry_url, "victim")
    try:
        return node, await asyncio.to_thread(run_cli, "pull", ref, "--node", node.url)
    finally:
        await asyncio.to_thread(node.stop)


@pytest.mark.parametrize("bad_path", ["../../escape.txt", "/etc/escape.txt", "a/../../escape.txt"])
async def test_pull_rejects_unsafe_manifest_from_a_hostile_registry(bad_path, tmp_path):
    """A registry that serves a manifest escaping the artifact: the node refuses it, writes nothing."""
    async with HostileRegistry(_hostile_manifest(bad_path)) as registry:
        node, out = await _pull_from(registry.url, tmp_path, "evil/m:v1")
    assert out.returncode != 0
    assert "evil/m:v1" in out.stderr and bad_path in out.stderr
    assert not list(tmp_path.rglob("escape.txt"))
    assert not list((node.cache / "artifacts").rglob("*.txt"))


async def test_pull_rejects_a_torrent_holding_a_link(tmp_path):
    """The manifest is clean but the torrent adds a link leaving the artifact: refused before download."""
    import libtorrent as lt
    import xxhash

    src = tmp_path / "src" / "m"
    src.mkdir(parents=True)
    (src / "a.bin").write_bytes(b"x" * 10)
    entries = [lt.create_file_entry("m/a.bin", 10),
               lt.create_file_entry("m/link", 0, lt.file_storage.flag_symlink, 0, "../../../etc/passwd")]
    ct = lt.create_torrent(entries, 262144, lt.create_torrent.symlinks)
    ct.set_priv(True)
    lt.set_piece_hashes(ct, str(src.parent))
    torrent = lt.bencode(ct.generate())
    ih = lt.torrent_info(torrent).info_hashes()
    body = json.loads(_hostile_manifest("a.bin"))
    body["files"][0]["xxh3_128"] = xxhash.xxh3_128_hexdigest(b"x" * 10)
    body["info_hash"] = {"v1": str(ih.v1), "v2": str(ih.v2)}
    async with HostileRegistry(canonical_json(body), torrent) as registry:
        node, out = await _pull_from(registry.url, tmp_path, "evil/m:v1")
    assert out.returncode != 0 and "link" in out.stderr and "evil/m" in out.stderr, out.stderr
    assert not list((node.cache / "artifacts" / "sha256").iterdir())


def test_registry_restart_keeps_everything_and_warm_pull_is_instant(tracker, node_factory, tmp_path):
    model = make_model(tmp_path / "model", {"weights.bin": 24 * MiB, "model.onnx": 5000})
    digest = publish(tracker.url, model, "warm/m:v1", (tmp_path / "origin").as_uri())
    node = node_factory(tracker.url, "n1")
    assert run_cli("pull", "warm/m:v1", "--node", node.url).returncode == 0
    verified = metric(node.url, "modelcast_node_verified_bytes_total")
    assert verified == 24 * MiB + 5000

    tracker.stop()
    tracker.start()
    out = run_cli("inspect", "warm/m:v1", "--registry", tracker.url)
    assert out.returncode == 0 and json.loads(out.stdout)["digest"] == digest
    out = run_cli("ls", "--registry", tracker.url)
    assert "warm/m" in out.stdout

    async def warm_pulls():
        async with NodeClient(node.url) as c:
            timings = []
            for ref in ("warm/m:v1", digest) * 5:
                t0 = time.perf_counter()
                status = await c.pull(ref)
                timings.append(time.perf_counter() - t0)
                assert status["state"] == "ready"
            return timings

    timings = asyncio.run(warm_pulls())
    assert max(timings) < 0.5 and sorted(timings)[len(timings) // 2] < 0.05, timings
    # Neither the warm pulls nor a daemon restart re-hash the artifact.
    assert metric(node.url, "modelcast_node_verified_bytes_total") == verified
    node.stop()
    node.start()
    t0 = time.perf_counter()
    out = run_cli("pull", digest, "--node", node.url)
    assert out.returncode == 0 and time.perf_counter() - t0 < 5
    assert metric(node.url, "modelcast_node_verified_bytes_total") == 0


def test_a_node_whose_peer_finishes_first_takes_the_rest_from_that_peer_not_the_origin(tracker, node_factory,
                                                                                        tmp_path):
    # A node that finishes re-adds its torrent as a seed (node_cache/daemon.py `_complete`),
    # which closes its peers' connections to it.  Its peer still pulling must get back to
    # it within moments (libtorrent's `min_reconnect_time`), and meanwhile must not count
    # itself alone and take the rest unmarked from the origin (node_cache/origin_fill.py).
    sizes = {f"weights/shard-{i}.bin": 8 * MiB for i in range(4)}
    total = sum(sizes.values())
    model = make_model(tmp_path / "model", sizes)
    publish(tracker.url, model, "swarm/late:v1", (tmp_path / "origin").as_uri())
    first = node_factory(tracker.url, "first", "--download-limit", "16M", host="127.0.0.2")
    late = node_factory(tracker.url, "late", "--download-limit", "4M", host="127.0.0.3")

    async def pulls():
        one = asyncio.create_task(pull_all([first], "swarm/late:v1"))
        await asyncio.sleep(0.5)
        two = asyncio.create_task(pull_all([late], "swarm/late:v1"))
        return (await one) + (await two)

    statuses = asyncio.run(pulls())
    source = tree_hashes(model)
    assert all(s["state"] == "ready" and tree_hashes(Path(s["path"])) == source for s in statuses)
    served = registry_stats(tracker.url)["origin_bytes_served"]
    # The late node (4 MiB/s) is still pulling when the first (16 MiB/s) finishes.
    print(f"origin {served / total:.2f} copies; late node {statuses[1]['bytes_from_origin'] / total:.2f} from it")
    assert served <= 1.2 * total, (served / total, statuses)
