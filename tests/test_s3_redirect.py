"""S3 origins: nodes read the ranges the first-copy gate admits from presigned URLs, not through the registry.

The registry decides which range a node may take (the gate stays where it is) and answers
307 with a SigV4 query-signed URL of the S3-compatible server (moto, a real server process)
whose signature covers exactly that Range header and lasts ``--presign-ttl`` seconds.  A
client that does not ask for redirects (aria2, a federated child, curl) still gets the
bytes streamed as before.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp

from modelcast.manifest import Manifest
from modelcast.wire import ACCEPT_REDIRECT_HEADER, ZONE_HEADER, bearer

from .helpers import TOKEN, make_model, metric, publish, pull_all, registry_stats, tree_hashes

MiB = 1 << 20


def _manifest(registry: str, digest: str) -> Manifest:
    import urllib.request

    req = urllib.request.Request(f"{registry}/v1/artifacts/{digest}", headers=bearer(TOKEN))
    with urllib.request.urlopen(req, timeout=10) as resp:
        return Manifest.from_bytes(resp.read())


def test_nodes_read_s3_bytes_from_presigned_urls_and_none_pass_through_the_registry(
        tracker, s3_bucket, node_factory, tmp_path):
    endpoint, bucket = s3_bucket
    sizes = {"model.onnx": 5000, **{f"weights/shard-{i}.bin": 6 * MiB + i for i in range(3)}, "empty.txt": 0}
    model = make_model(tmp_path / "model", sizes)
    total = sum(sizes.values())
    publish(tracker.url, model, "s3redir/m:v1", f"s3://{bucket}/origin", "--s3-endpoint", endpoint)
    nodes = [node_factory(tracker.url, f"n{i}", host=f"127.0.0.{i + 2}") for i in range(3)]


    source = tree_hashes(model)
    for status in asyncio.run(pull_all(nodes, "s3redir/m:v1")):
        assert status["state"] == "ready"
        assert tree_hashes(Path(status["path"])) == source
    stats = registry_stats(tracker.url)
    # Every origin byte a node took came from S3 directly: the registry only signed.
    assert stats["origin_bytes_through_registry"] == 0, stats
    assert stats["origin_bytes_redirected"] == stats["origin_bytes_served"] > 0
    # The gate still holds the fleet to about one copy from the origin (1.00-1.2 copies
    # measured; bounded here as for a file origin, tests/test_pull.py, since a loaded CI
    # machine can delay a node's first peers).
    print(f"S3 origin: {stats['origin_bytes_served'] / total:.2f} copies, all as presigned URLs")
    assert stats["origin_bytes_served"] <= 1.5 * total, f"{stats['origin_bytes_served'] / total:.2f} copies"
    # Each node took from S3 what the registry admitted for it (a fetch that failed after its 307 takes less).
    assert 0 < sum(metric(n.url, "modelcast_node_bytes_from_origin_total") for n in nodes) <= stats["origin_bytes_served"]


def test_a_presigned_url_covers_exactly_the_asked_range_for_seconds_and_others_still_get_bytes(
        tracker, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    model = make_model(tmp_path / "model", {"weights.bin": 3 * MiB + 5})
    digest = publish(tracker.url, model, "s3redir/r:v1", f"s3://{bucket}/origin", "--s3-endpoint", endpoint)
    manifest = _manifest(tracker.url, digest)
    url = f"{tracker.url}/v1/webseed/{digest}/{quote(manifest.torrent_name)}/weights.bin"
    data = (model / "weights.bin").read_bytes()

    async def go():
        async with aiohttp.ClientSession() as http:
            headers = {**bearer(TOKEN), ZONE_HEADER: "default", "Range": "bytes=1000-1999"}
            async with http.get(url, headers={**headers, ACCEPT_REDIRECT_HEADER: "1"}, allow_redirects=False) as r:
                assert r.status == 307
                assert await r.read() == b""
                location = r.headers["Location"]
            query = parse_qs(urlsplit(location).query)
            assert location.startswith(endpoint + "/")
            assert "range" in query["X-Amz-SignedHeaders"][0].split(";"), query  # the range is signed
            assert query["X-Amz-Expires"] == ["30"]  # the registry's default --presign-ttl
            assert "X-Amz-Credential" in query and TOKEN not in location
            async with http.get(location, headers={"Range": "bytes=1000-1999"}) as r:
                assert r.status == 206
                assert await r.read() == data[1000:2000]
            # Without the header (aria2, curl, a federated child): the bytes themselves.
            async with http.get(url, headers=headers, allow_redirects=False) as r:
                assert r.status == 206
                assert await r.read() == data[1000:2000]

    asyncio.run(go())
    stats = registry_stats(tracker.url)
    assert stats["origin_bytes_redirected"] == 1000
    assert stats["origin_bytes_through_registry"] == 1000
