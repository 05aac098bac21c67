"""Registry completeness: the read token, deleting tags and artifacts, and concurrent publishes.

Real aiohttp servers, real libtorrent torrents, and real ``modelcast tracker`` processes
where a restart or the CLI is part of what is tested.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from modelcast.config import TrackerConfig
from modelcast.errors import Conflict, Unauthorized
from tracker.client import RegistryClient
from tracker.app import make_app
from tracker.bencode import bdecode

from .helpers import (AUTH, TOKEN, TrackerProcess, announce_query, api_publish, bget, build_artifact, error_of,
                      run_cli, start_tracker, upload)

READER = "reader-token"
pytestmark = pytest.mark.stores("sqlite", "postgresql")


def tracker_process(tmp_path, *extra: str) -> TrackerProcess:
    return start_tracker(tmp_path, token=TOKEN, extra=extra, start=False)


# -- read token ----------------------------------------------------------------------


async def test_read_token_guards_every_read_but_announce(aiohttp_client, tmp_path, art, origin):
    client = await aiohttp_client(make_app(TrackerConfig(data_dir=tmp_path / "reg", token=TOKEN, read_token=READER)))
    upload(art, origin)
    await api_publish(client, art, origin)
    reads = [("/v1/resolve", {"ref": "demo/model:v1"}), (f"/v1/artifacts/{art.digest}", None),
             (f"/v1/artifacts/{art.digest}/torrent", None), ("/v1/artifacts", None),
             (f"/v1/webseed/{art.digest}/model/sub/b.bin", None)]
    for path, params in reads:
        err = await error_of(await client.get(path, params=params), 401)
        assert "Bearer" in err["message"], path
        err = await error_of(await client.get(path, params=params, headers={"Authorization": "Bearer nope"}), 401)
        assert "read token" in err["message"], path
        for token in (READER, TOKEN):  # the write token reads too
            resp = await client.get(path, params=params, headers={"Authorization": f"Bearer {token}"})
            assert resp.status == 200, (path, await resp.text())
    # The read token does not write.
    resp = await client.post("/v1/artifacts", json=art.body(origin), headers={"Authorization": f"Bearer {READER}"})
    await error_of(resp, 401)
    await error_of(await client.delete("/v1/tags/demo/model:v1", headers={"Authorization": f"Bearer {READER}"}), 401)
    # Health and the BitTorrent tracker stay open: clients cannot send headers there.
    assert (await client.get("/v1/health")).status == 200
    announced = await bget(client, "/announce?" + announce_query(bytes.fromhex(art.manifest.info_hash.v1), 1,
                                                                 ip="10.0.0.1"))
    assert b"failure reason" not in announced
    # The client every component uses sends its token on reads.
    async with RegistryClient(str(client.make_url("")), READER) as reg:
        assert (await reg.resolve("demo/model:v1"))[0] == art.digest
        assert (await reg.list_artifacts())["artifacts"][0]["digest"] == art.digest
    async with RegistryClient(str(client.make_url("")), None) as anon:
        with pytest.raises(Unauthorized):
            await anon.resolve("demo/model:v1")


# -- delete --------------------------------------------------------------------------


async def test_delete_tag_keeps_the_artifact(client, art, origin):
    await api_publish(client, art, origin, tag="v1")
    await api_publish(client, art, origin, tag="stable", status=200)
    await error_of(await client.delete("/v1/tags/demo/model:v1"), 401)
    resp = await client.delete("/v1/tags/demo/model:v1", headers=AUTH)
    assert resp.status == 200 and await resp.json() == {"name": "demo/model", "tag": "v1", "digest": art.digest}
    err = await error_of(await client.get("/v1/resolve", params={"ref": "demo/model:v1"}), 404)
    assert "demo/model:v1" in err["message"]
    for ref in ("demo/model:stable", art.digest):
        assert (await client.get("/v1/resolve", params={"ref": ref})).status == 200
    err = await error_of(await client.delete("/v1/tags/demo/model:v1", headers=AUTH), 404)
    assert err["message"] == "tag demo/model:v1 not found in registry"
    err = await error_of(await client.delete(f"/v1/tags/{art.digest}", headers=AUTH), 400)
    assert "NAME:TAG" in err["message"]
    assert (await error_of(await client.delete("/v1/tags/Bad:v1", headers=AUTH), 400))["code"] == "invalid_reference"
    listed = await (await client.get("/v1/artifacts")).json()
    assert [(a["digest"], a["tags"]) for a in listed["artifacts"]] == [(art.digest, ["stable"])]


async def test_delete_artifact_refuses_while_tagged_then_forgets_it_everywhere(client, art, origin):
    upload(art, origin)
    await api_publish(client, art, origin)
    v1 = bytes.fromhex(art.manifest.info_hash.v1)
    await bget(client, "/announce?" + announce_query(v1, 1, ip="10.0.0.1"))
    assert (await client.get(f"/v1/webseed/{art.digest}/model/sub/b.bin")).status == 200  # cached for the web seed

    await error_of(await client.delete(f"/v1/artifacts/{art.digest}"), 401)
    err = await error_of(await client.delete(f"/v1/artifacts/{art.digest}", headers=AUTH), 409)
    assert err["code"] == "conflict" and "demo/model:v1" in err["message"] and "--force" in err["message"]
    await error_of(await client.delete(f"/v1/artifacts/{art.digest}?force=maybe", headers=AUTH), 400)
    err = await error_of(await client.delete(f"/v1/artifacts/{art.digest}?force=1&name=other/m", headers=AUTH), 404)
    assert f"other/m@{art.digest}" in err["message"]

    resp = await client.delete(f"/v1/artifacts/{art.digest}?force=1&name=demo/model", headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {"digest": art.digest, "name": "demo/model", "tags_removed": ["v1"]}
    for ref in ("demo/model:v1", art.digest):
        await error_of(await client.get("/v1/resolve", params={"ref": ref}), 404)
    await error_of(await client.get(f"/v1/artifacts/{art.digest}"), 404)
    await error_of(await client.get(f"/v1/artifacts/{art.digest}/torrent"), 404)
    await error_of(await client.get(f"/v1/webseed/{art.digest}/model/sub/b.bin"), 404)
    assert (await (await client.get("/v1/artifacts")).json())["artifacts"] == []
    # The swarm is gone with its peers: announces for it are refused.
    refused = await bget(client, "/announce?" + announce_query(v1, 1, ip="10.0.0.1"))
    assert refused[b"failure reason"].startswith(b"unknown info_hash")
    assert (await (await client.get("/v1/stats")).json())["swarms"] == 0
    await error_of(await client.delete(f"/v1/artifacts/{art.digest}", headers=AUTH), 404)
    # Publishing it again brings it back, swarm included.
    await api_publish(client, art, origin, status=201)
    assert b"failure reason" not in await bget(client, "/announce?" + announce_query(v1, 1, ip="10.0.0.1"))
    assert (await client.get(f"/v1/webseed/{art.digest}/model/sub/b.bin")).status == 200


async def test_deleting_one_of_two_artifacts_with_one_torrent_keeps_the_swarm(client, tmp_path, origin):
    """Same files, other manifest: one torrent, two artifacts.  The swarm lives while either does."""
    first = build_artifact(tmp_path, created="2025-01-01T00:00:00Z")
    second = build_artifact(tmp_path, created="2025-06-01T00:00:00Z")
    assert first.digest != second.digest and first.manifest.info_hash == second.manifest.info_hash
    await api_publish(client, first, origin, tag=None)
    await api_publish(client, second, origin, tag=None)
    keys = first.manifest.info_hash.tracker_keys()
    await bget(client, "/announce?" + announce_query(keys[0], 1, ip="10.0.0.1"))
    assert (await client.delete(f"/v1/artifacts/{first.digest}", headers=AUTH)).status == 200
    for key in keys:  # both the v1 and the truncated v2 hash
        answer = await bget(client, "/announce?" + announce_query(key, 2, ip="10.0.0.2"))
        assert b"failure reason" not in answer and answer[b"complete"] == 2
    assert (await client.delete(f"/v1/artifacts/{second.digest}", headers=AUTH)).status == 200
    for key in keys:
        assert b"failure reason" in await bget(client, "/announce?" + announce_query(key, 2, ip="10.0.0.2"))


async def test_registry_client_delete_methods(client, art, origin):
    async with RegistryClient(str(client.make_url("")), TOKEN) as reg:
        await reg.publish(art.manifest, art.torrent, origin.url, None, "v1")
        with pytest.raises(Conflict, match="--force"):
            await reg.delete_artifact(art.digest)
        assert (await reg.delete_tag("demo/model", "v1"))["digest"] == art.digest
        assert (await reg.delete_artifact(art.digest, name="demo/model"))["tags_removed"] == []


def test_cli_rm_and_deletes_survive_restart(tmp_path, art, origin):
    tracker = tracker_process(tmp_path)
    tracker.start()
    try:
        asyncio.run(_publish_over_http(tracker.url, art, origin, ("v1", "stable")))
        out = run_cli("rm", "demo/model:v1", "--registry", tracker.url, "--token", TOKEN)
        assert out.returncode == 0 and out.stdout.strip() == f"untagged demo/model:v1 (was {art.digest})", out.stderr
        out = run_cli("rm", art.digest, "--registry", tracker.url, "--token", TOKEN)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and "demo/model:stable" in lines[0] and "--force" in lines[0]
        out = run_cli("rm", "demo/model:v1", "--registry", tracker.url, "--token", "wrong")
        assert out.returncode == 1 and "token" in out.stderr
        out = run_cli("rm", "--force", f"demo/model@{art.digest}", "--registry", tracker.url, "--token", TOKEN)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"deleted demo/model@{art.digest} and its tags stable"

        assert tracker.stop() == 0
        tracker.start()
        out = run_cli("inspect", "demo/model:stable", "--registry", tracker.url)
        assert out.returncode == 1 and "not found" in out.stderr
        out = run_cli("ls", "--registry", tracker.url, "--json")
        assert out.returncode == 0 and art.digest not in out.stdout
        # The allow-list rebuilt at start-up no longer has the deleted artifact's swarm.
        with_hash = f"{tracker.url}/announce?" + announce_query(bytes.fromhex(art.manifest.info_hash.v1), 1,
                                                                ip="10.0.0.1")
        import urllib.request

        with urllib.request.urlopen(with_hash, timeout=5) as resp:
            assert b"failure reason" in bdecode(resp.read())
    finally:
        tracker.stop()


async def _publish_over_http(url: str, built, origin, tags) -> None:
    async with RegistryClient(url, TOKEN) as reg:
        for tag in tags:
            await reg.publish(built.manifest, built.torrent, origin.url, None, tag)


# -- concurrency ---------------------------------------------------------------------


def test_concurrent_publishes_of_one_tag_have_one_winner_and_lose_no_manifest(tmp_path, origin):
    """20 publishes of distinct manifests to one name:tag at once, with resolves racing them, on a real process."""
    builds = [build_artifact(tmp_path, name="race/m", created=f"2025-01-01T00:00:{i:02d}Z") for i in range(20)]
    digests = {b.digest for b in builds}
    assert len(digests) == 20
    tracker = tracker_process(tmp_path)
    tracker.start()
    try:
        seen, published = asyncio.run(_race(tracker.url, builds, origin))
    finally:
        tracker.stop()
    assert sorted(published) == sorted(digests)
    assert seen, "no resolve succeeded while the publishes ran"
    assert seen <= digests


async def _race(url: str, builds, origin) -> tuple[set[str], list[str]]:
    seen: set[str] = set()
    done = asyncio.Event()

    async def resolver(http: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 60
        for _ in range(2000):  # bounded in count and in time
            if done.is_set() or time.monotonic() > deadline:
                return
            async with http.get(f"{url}/v1/resolve", params={"ref": "race/m:latest"}) as resp:
                if resp.status == 404:
                    await asyncio.sleep(0.001)  # pacing of a racing reader (what is tested), not a wait
                    continue
                assert resp.status == 200, await resp.text()
                digest = (await resp.json())["digest"]
            # A resolve never hands out a digest whose manifest is missing.
            async with http.get(f"{url}/v1/artifacts/{digest}") as resp:
                assert resp.status == 200, f"resolve gave {digest}, but its manifest is {resp.status}"
            seen.add(digest)

    async def publisher(http: aiohttp.ClientSession, built) -> str:
        async with http.post(f"{url}/v1/artifacts", json=built.body(origin, "latest"), headers=AUTH) as resp:
            assert resp.status == 201, await resp.text()
            return (await resp.json())["digest"]

    async with aiohttp.ClientSession() as http:
        resolvers = [asyncio.create_task(resolver(http)) for _ in range(4)]
        try:
            published = await asyncio.gather(*(publisher(http, b) for b in builds))
        finally:
            done.set()
            await asyncio.gather(*resolvers)
        async with RegistryClient(url, None) as reg:
            page = await reg.list_artifacts(name="race/m", limit=100)
            # Every manifest is kept, and exactly one carries the tag: the one it resolves to.
            assert {a["digest"] for a in page["artifacts"]} == set(published)
            tagged = [a["digest"] for a in page["artifacts"] if a["tags"]]
            assert len(tagged) == 1 and [a["tags"] for a in page["artifacts"] if a["tags"]] == [["latest"]]
            winner, manifest = await reg.resolve("race/m:latest")
            assert winner == tagged[0] and winner in published and manifest.digest == winner
            for digest in published:
                assert (await reg.resolve(digest))[0] == digest
    return seen, published
