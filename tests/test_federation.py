"""Federation: a zone registry (``--upstream``) pulls unknown references through from its parent and keeps them.

The policy tests run a parent and a zone as two real aiohttp servers on loopback; the
end-to-end test runs both as ``modelcast tracker`` processes with real node daemons that
know only the zone registry.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web

from modelcast.config import ENV_UPSTREAM_TOKEN, TrackerConfig
from tracker.app import UPSTREAM, make_app
from tracker.bencode import bdecode, torrent_info_bytes

from .helpers import (AUTH, TOKEN, announce_query, bget, build_artifact, error_of, make_model, metric, publish,
                      registry_stats, run_cli, start_tracker, tree_hashes, upload)

MiB = 1 << 20
PARENT_READ = "parent-read-token"


async def start_pair(aiohttp_client, tmp_path, *, parent_read: str | None = PARENT_READ,
                     upstream_token: str | None = PARENT_READ, ttl: float = 3600.0):
    parent = await aiohttp_client(make_app(TrackerConfig(data_dir=tmp_path / "parent", token=TOKEN,
                                                         read_token=parent_read)))
    zone = await aiohttp_client(make_app(TrackerConfig(
        data_dir=tmp_path / "zone", token=TOKEN, upstream=str(parent.make_url("")), upstream_token=upstream_token,
        upstream_tag_ttl_s=ttl)))
    return parent, zone


async def put(client, built, origin, tag: str | None, status: int | None = None) -> None:
    resp = await client.post("/v1/artifacts", json=built.body(origin, tag), headers=AUTH)
    assert resp.status in ((status,) if status else (200, 201)), await resp.text()


async def resolve(client, ref: str) -> str:
    resp = await client.get("/v1/resolve", params={"ref": ref})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["digest"]


async def listing(client) -> dict[str, list[str]]:
    return {a["digest"]: a["tags"] for a in (await (await client.get("/v1/artifacts")).json())["artifacts"]}


# -- refresh policy ------------------------------------------------------------------


async def test_pulled_tags_follow_the_parent_after_their_ttl_and_local_tags_win(aiohttp_client, tmp_path, origin):
    parent, zone = await start_pair(aiohttp_client, tmp_path)
    upstream = zone.server.app[UPSTREAM]
    a, b, c = (build_artifact(tmp_path, name="fed/m", created=f"2025-0{i}-01T00:00:00Z") for i in (1, 2, 3))

    await put(parent, a, origin, "v1")
    assert await resolve(zone, "fed/m:v1") == a.digest
    assert await listing(zone) == {a.digest: ["v1"]}  # kept here, tag included

    await put(parent, b, origin, "v1")
    assert await resolve(zone, "fed/m:v1") == a.digest  # within its ttl: no round trip to the parent
    upstream.tag_ttl_s = 0.0
    assert await resolve(zone, "fed/m:v1") == b.digest  # due a check: it moved there, so it moves here

    assert (await parent.delete("/v1/tags/fed/m:v1", headers=AUTH)).status == 200
    err = await error_of(await zone.get("/v1/resolve", params={"ref": "fed/m:v1"}), 404)
    assert str(parent.make_url("")).rstrip("/") in err["message"]
    assert await listing(zone) == {a.digest: [], b.digest: []}  # digests never change meaning: both kept

    await put(parent, c, origin, "v1")
    assert await resolve(zone, "fed/m:v1") == c.digest
    # A tag published to the zone itself is local: the parent never moves it back.
    await put(zone, a, origin, "v1", status=200)
    assert await resolve(zone, "fed/m:v1") == a.digest
    resp = await parent.get("/v1/resolve", params={"ref": "fed/m:v1"}, headers=AUTH)
    assert (await resp.json())["digest"] == c.digest
    await put(parent, b, origin, "v1")
    assert await resolve(zone, "fed/m:v1") == a.digest
    # Other tags of the name still come from the parent.
    await put(parent, b, origin, "v2")
    assert await resolve(zone, "fed/m:v2") == b.digest
    assert await listing(zone) == {a.digest: ["v1"], b.digest: ["v2"], c.digest: []}


async def test_digest_references_and_every_read_endpoint_pull_through(aiohttp_client, tmp_path, origin):
    parent, zone = await start_pair(aiohttp_client, tmp_path)
    upstream = zone.server.app[UPSTREAM]
    a = build_artifact(tmp_path, name="fed/a")
    b = build_artifact(tmp_path, name="fed/b")
    await put(parent, a, origin, "v1")
    await put(parent, b, origin, None)

    resp = await zone.get(f"/v1/artifacts/{b.digest}")
    assert resp.status == 200 and await resp.read() == b.manifest.canonical_bytes()
    resp = await zone.get(f"/v1/artifacts/{a.digest}/torrent")
    assert resp.status == 200
    torrent = await resp.read()
    # The zone's torrent names the zone as tracker: its nodes form the zone's own swarm.
    assert bdecode(torrent)[b"announce"] == f"http://{zone.host}:{zone.port}/announce".encode()
    assert torrent_info_bytes(torrent) == torrent_info_bytes(a.torrent)
    for key in a.manifest.info_hash.tracker_keys() + b.manifest.info_hash.tracker_keys():
        assert b"failure reason" not in await bget(zone, "/announce?" + announce_query(key, 1, ip="10.0.0.1"))

    assert await resolve(zone, f"fed/a@{a.digest}") == a.digest
    err = await error_of(await zone.get("/v1/resolve", params={"ref": f"other/m@{a.digest}"}), 404)
    assert "'fed/a'" in err["message"]
    err = await error_of(await zone.get("/v1/resolve", params={"ref": "sha256:" + "0" * 64}), 404)
    assert "upstream registry http://" in err["message"]
    await error_of(await zone.get(f"/v1/artifacts/sha256:{'1' * 64}/torrent"), 404)

    # A zone of many nodes asking for a new tag at once costs the parent one fetch.
    c = build_artifact(tmp_path, name="fed/c")
    await put(parent, c, origin, "v1")
    before = upstream.pulls
    digests = await asyncio.gather(*(resolve(zone, "fed/c:v1") for _ in range(20)))
    assert set(digests) == {c.digest} and upstream.pulls == before + 1

    # Deleting a pulled-through artifact in the zone only forgets it here: the next read pulls it again.
    assert (await zone.delete(f"/v1/artifacts/{c.digest}?force=1", headers=AUTH)).status == 200
    assert c.digest not in await listing(zone)
    assert await resolve(zone, "fed/c:v1") == c.digest


async def test_zone_web_seed_relays_the_parents_bytes(aiohttp_client, tmp_path, origin):
    parent, zone = await start_pair(aiohttp_client, tmp_path)
    a = build_artifact(tmp_path, name="fed/m")
    upload(a, origin)
    await put(parent, a, origin, "v1")
    blob = a.data["a.bin"]
    url = f"/v1/webseed/{a.digest}/model/a.bin"

    resp = await zone.get(url, headers={"Range": "bytes=1000-270999"})
    assert resp.status == 206 and resp.headers["Content-Range"] == f"bytes 1000-270999/{len(blob)}"
    assert await resp.read() == blob[1000:271000]
    resp = await zone.get(url)
    assert resp.status == 200 and await resp.read() == blob
    resp = await zone.get(url, headers={"Range": "bytes=-10"})
    assert resp.status == 206 and await resp.read() == blob[-10:]
    assert (await zone.get(url, headers={"Range": f"bytes={len(blob)}-"})).status == 416
    resp = await zone.head(url)
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(blob)
    await error_of(await zone.get(f"/v1/webseed/{a.digest}/model/nope.bin"), 404)

    zone_stats = await (await zone.get("/v1/stats")).json()
    parent_stats = await (await parent.get("/v1/stats", headers=AUTH)).json()  # its reads need a token
    assert zone_stats["origin_bytes_served"] == 270_000 + len(blob) + 10
    assert parent_stats["origin_bytes_served"] == zone_stats["origin_bytes_served"]

    # Without the parent's read token the zone cannot pull, and says what to do.
    other = await aiohttp_client(make_app(TrackerConfig(data_dir=tmp_path / "zone2", upstream=str(parent.make_url("")))))
    err = await error_of(await other.get("/v1/resolve", params={"ref": "fed/m:v1"}), 502)
    assert err["code"] == "unreachable" and "--upstream-token" in err["message"]


class LyingParent:
    """A parent registry that serves one artifact's manifest with another artifact's torrent."""

    def __init__(self, manifest_of, torrent_of, bad_bytes: bool = False):
        self.manifest, self.torrent = manifest_of.manifest, torrent_of.torrent
        self.bad_bytes = bad_bytes

    def app(self) -> web.Application:
        async def resolve(request):
            return web.json_response({"digest": self.manifest.digest, "name": self.manifest.name,
                                      "manifest": self.manifest.body()})

        async def manifest(request):
            data = self.manifest.canonical_bytes()
            return web.Response(body=data + b" " if self.bad_bytes else data, content_type="application/json")

        async def torrent(request):
            return web.Response(body=self.torrent, content_type="application/x-bittorrent")

        app = web.Application()
        app.router.add_get("/v1/resolve", resolve)
        app.router.add_get("/v1/artifacts/{digest}", manifest)
        app.router.add_get("/v1/artifacts/{digest}/torrent", torrent)
        return app


@pytest.mark.parametrize("bad_bytes", [False, True], ids=["torrent-of-other-files", "manifest-bytes-off-digest"])
async def test_a_lying_parent_is_refused_and_nothing_is_kept(aiohttp_client, tmp_path, bad_bytes):
    a = build_artifact(tmp_path, name="fed/m")
    b = build_artifact(tmp_path, name="fed/other", files={"x.bin": b"x" * 5000})
    liar = await aiohttp_client(LyingParent(a, b, bad_bytes).app())
    zone = await aiohttp_client(make_app(TrackerConfig(data_dir=tmp_path / "zone", upstream=str(liar.make_url("")))))
    for path, params in (("/v1/resolve", {"ref": "fed/m:v1"}), ("/v1/resolve", {"ref": a.digest}),
                         (f"/v1/artifacts/{a.digest}/torrent", None)):
        err = await error_of(await zone.get(path, params=params), 502)
        assert err["code"] == "unreachable" and "upstream" in err["message"], err
    assert await listing(zone) == {}
    v1 = bytes.fromhex(a.manifest.info_hash.v1)
    assert b"failure reason" in await bget(zone, "/announce?" + announce_query(v1, 1, ip="10.0.0.1"))


# -- end to end ------------------------------------------------------------------------


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_zone_nodes_pull_through_their_zone_registry_and_keep_working_without_the_parent(tmp_path, node_factory):
    parent = start_tracker(tmp_path, data_dir=tmp_path / "parent", name="parent", token=TOKEN, read_token=PARENT_READ,
                           start=False)
    zone = start_tracker(tmp_path, data_dir=tmp_path / "zone", name="zone", token=TOKEN,
                         extra=["--upstream", parent.url, "--upstream-tag-ttl", "1"],
                         env={ENV_UPSTREAM_TOKEN: PARENT_READ}, start=False)  # the token comes from the environment
    parent.start()
    try:
        zone.start()
        sizes = {"model.onnx": 5000, "weights/a.bin": 3 * MiB + 7, "weights/b.bin": MiB, "empty.txt": 0}
        model = make_model(tmp_path / "model", sizes)
        total = sum(sizes.values())
        digest = publish(parent.url, model, "fed/m:v1", (tmp_path / "origin").as_uri())

        # A node that knows only its zone's registry.
        n1 = node_factory(zone.url, "n1", "--token", TOKEN, host="127.0.0.2")
        out = run_cli("pull", "fed/m:v1", "--node", n1.url)
        assert out.returncode == 0, out.stderr
        path = Path(out.stdout.strip().splitlines()[-1])
        assert path.name == digest.split(":")[1] and tree_hashes(path) == tree_hashes(model)
        zone_stats, parent_stats = registry_stats(zone.url), registry_stats(parent.url, PARENT_READ)
        # The bytes came through the zone's web seed from the parent; the swarm is the zone's.
        assert zone_stats["origin_bytes_served"] >= total and parent_stats["origin_bytes_served"] >= total
        assert zone_stats["announces"] >= 1 and parent_stats["announces"] == 0

        status, body = get_json(f"{zone.url}/v1/resolve?ref=fed/m:nope")
        assert status == 404 and parent.url in body["error"]["message"]

        assert parent.stop() == 0
        # Not a wait for something to happen: the time that passes is what is tested (past
        # the tag's 1 s ttl the zone asks the parent, fails, and serves what it kept).
        time.sleep(1.2)
        status, body = get_json(f"{zone.url}/v1/resolve?ref=fed/m:v1")
        assert status == 200 and body["digest"] == digest
        status, body = get_json(f"{zone.url}/v1/artifacts")
        assert status == 200 and [(a["digest"], a["tags"]) for a in body["artifacts"]] == [(digest, ["v1"])]
        status, body = get_json(f"{zone.url}/v1/resolve?ref=fed/other:v1")
        assert status == 502 and parent.url in body["error"]["message"]

        # A second node of the zone gets every byte from the first, through the zone's tracker alone.
        n2 = node_factory(zone.url, "n2", "--token", TOKEN, host="127.0.0.3")
        out = run_cli("pull", "fed/m:v1", "--node", n2.url)
        assert out.returncode == 0, out.stderr
        assert tree_hashes(Path(out.stdout.strip().splitlines()[-1])) == tree_hashes(model)
        # (Peer byte counts include the hybrid torrent's pad files, hence >=.)
        assert metric(n2.url, "modelcast_node_bytes_from_peers_total") >= total
        assert metric(n2.url, "modelcast_node_bytes_from_origin_total") == 0
    finally:
        zone.stop()
        parent.stop()
