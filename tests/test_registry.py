"""The registry + tracker over real HTTP: a real aiohttp server, real torrents made by the
publisher's own torrent code, a real file origin, real libtorrent clients, and a real
``modelcast tracker`` process for restarts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from urllib.parse import quote_from_bytes

import libtorrent as lt
import pytest

from modelcast.config import TrackerConfig
from modelcast.errors import ArtifactNotFound, Unauthorized
from modelcast.manifest import Manifest
from tracker.client import RegistryClient
from tracker.announce import decode_compact_peers
from tracker.app import make_app
from tracker.bencode import bdecode, torrent_info_bytes

from .helpers import (AUTH, TOKEN, announce_query, api_publish, bget, build_artifact, error_of, free_port,
                      start_tracker, upload, wait_until_async)

# The libtorrent clients below are added with add_torrent(dict), which libtorrent 2.1's
# Python bindings flag as deprecated.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.stores("sqlite", "postgresql")]


# -- publish, resolve, auth ----------------------------------------------------------


async def test_publish_and_resolve_all_reference_forms(client, art, origin):
    body = await api_publish(client, art, origin)
    assert body == {"digest": art.digest, "name": "demo/model", "tag": "v1", "created": True}
    for ref in ("demo/model:v1", f"demo/model@{art.digest}", art.digest):
        resp = await client.get("/v1/resolve", params={"ref": ref})
        assert resp.status == 200, ref
        answer = await resp.json()
        assert answer["digest"] == art.digest and answer["name"] == "demo/model"
        assert Manifest.from_json(answer["manifest"]) == art.manifest
    resp = await client.get(f"/v1/artifacts/{art.digest}")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert await resp.read() == art.manifest.canonical_bytes()


async def test_resolve_unknown_names_the_reference(client, art, origin):
    await api_publish(client, art, origin)
    err = await error_of(await client.get("/v1/resolve", params={"ref": "demo/model:v9"}), 404)
    assert err == {"code": "not_found", "message": "artifact demo/model:v9 not found in registry"}
    # The digest exists, but under another name: still not found, and the message says why.
    err = await error_of(await client.get("/v1/resolve", params={"ref": f"other/model@{art.digest}"}), 404)
    assert f"other/model@{art.digest}" in err["message"] and "demo/model" in err["message"]
    err = await error_of(await client.get("/v1/resolve", params={"ref": "sha256:" + "0" * 64}), 404)
    assert "sha256:" + "0" * 64 in err["message"]
    err = await error_of(await client.get("/v1/resolve", params={"ref": "Bad Name"}), 400)
    assert err["code"] == "invalid_reference"
    await error_of(await client.get(f"/v1/artifacts/sha256:{'1' * 64}"), 404)
    await error_of(await client.get("/v1/artifacts/not-a-digest"), 400)


async def test_writes_need_the_token(client, art, origin):
    resp = await client.post("/v1/artifacts", json=art.body(origin))
    err = await error_of(resp, 401)
    assert err["code"] == "unauthorized" and "Bearer" in err["message"]
    resp = await client.post("/v1/artifacts", json=art.body(origin), headers={"Authorization": "Bearer wrong"})
    assert (await error_of(resp, 401))["code"] == "unauthorized"
    resp = await client.post("/v1/artifacts", json=art.body(origin), headers=AUTH)
    assert resp.status == 201
    # Reads stay open.
    assert (await client.get("/v1/resolve", params={"ref": "demo/model:v1"})).status == 200


async def test_registry_client_against_real_server(client, art, origin):
    """The client every other component uses, end to end, including error translation."""
    async with RegistryClient(str(client.make_url("")), TOKEN) as reg:
        assert await reg.health() == {"ok": True}
        answer = await reg.publish(art.manifest, art.torrent, origin.url, None, "v1")
        assert answer["created"] is True
        digest, manifest = await reg.resolve("demo/model:v1")
        assert (digest, manifest) == (art.digest, art.manifest)
        assert (await reg.find_by_content(art.manifest.content_key))["digest"] == art.digest
        with pytest.raises(ArtifactNotFound, match="demo/model:v2 not found"):
            await reg.resolve("demo/model:v2")
    async with RegistryClient(str(client.make_url("")), None) as anon:
        with pytest.raises(Unauthorized):
            await anon.publish(art.manifest, art.torrent, origin.url, None, "v1")


# -- publish validation ----------------------------------------------------------------


async def test_torrent_file_list_must_match_manifest(client, tmp_path, origin):
    bad = build_artifact(tmp_path, torrent_files={"a.bin": 300_000, "sub/b.bin": 1234, "extra.bin": 10})
    err = await error_of(await client.post("/v1/artifacts", json=bad.body(origin), headers=AUTH), 400)
    assert err["code"] == "invalid_manifest" and "extra.bin" in err["message"]
    # Same names, a different size.
    bad = build_artifact(tmp_path, created="2025-02-02T00:00:00Z", torrent_files={"a.bin": 300_001, "sub/b.bin": 1234})
    err = await error_of(await client.post("/v1/artifacts", json=bad.body(origin), headers=AUTH), 400)
    assert "torrent files differ" in err["message"]


async def test_torrent_of_another_artifact_is_refused(client, tmp_path, origin):
    a = build_artifact(tmp_path, name="demo/a")
    b = build_artifact(tmp_path, name="demo/b", created="2025-03-03T00:00:00Z")
    body = a.body(origin, torrent=base64.b64encode(b.torrent).decode())
    err = await error_of(await client.post("/v1/artifacts", json=body, headers=AUTH), 400)
    assert "info-hashes" in err["message"]
    body = a.body(origin, torrent=base64.b64encode(b"d4:spam4:eggse").decode())
    err = await error_of(await client.post("/v1/artifacts", json=body, headers=AUTH), 400)
    assert "not a valid torrent" in err["message"]


async def test_symlink_and_dotdot_are_refused(client, tmp_path, origin):
    bad = build_artifact(tmp_path, symlink="link")
    err = await error_of(await client.post("/v1/artifacts", json=bad.body(origin), headers=AUTH), 400)
    assert err["code"] == "unsafe_path" and "symlink" in err["message"]
    good = build_artifact(tmp_path, created="2025-04-04T00:00:00Z")
    body = good.body(origin)
    body["manifest"]["files"][0]["path"] = "../escape.bin"
    err = await error_of(await client.post("/v1/artifacts", json=body, headers=AUTH), 400)
    assert err["code"] == "unsafe_path" and ".." in err["message"]


@pytest.mark.parametrize("mutate, code, needle", [
    (lambda b: b.update(origin={"url": "http://example.com/x"}), "bad_request", "file:///DIR or s3://"),
    (lambda b: b.update(tag="-bad"), "invalid_reference", "invalid tag"),
    (lambda b: b.update(torrent="%%%"), "bad_request", "base64"),
    (lambda b: b["manifest"].update(extra="x"), "invalid_manifest", "extra"),
    (lambda b: b["manifest"].update(total_size=1), "invalid_manifest", "total_size"),
    (lambda b: b.pop("manifest"), "invalid_manifest", "manifest"),
])
async def test_publish_body_validation(client, art, origin, mutate, code, needle):
    body = art.body(origin)
    mutate(body)
    err = await error_of(await client.post("/v1/artifacts", json=body, headers=AUTH), 400)
    assert err["code"] == code and needle in err["message"]


async def test_malformed_json_body(client):
    resp = await client.post("/v1/artifacts", data=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    err = await error_of(resp, 400)
    assert err["code"] == "bad_request" and "not valid JSON" in err["message"]
    err = await error_of(await client.post("/v1/artifacts", json=[1, 2], headers=AUTH), 400)
    assert "JSON object" in err["message"]


async def test_republish_is_idempotent_and_tags_move(client, tmp_path, art, origin):
    await api_publish(client, art, origin, tag="v1")
    again = await api_publish(client, art, origin, tag="latest", status=200)
    assert again == {"digest": art.digest, "name": "demo/model", "tag": "latest", "created": False}
    newer = build_artifact(tmp_path, created="2025-06-01T00:00:00Z")
    assert newer.digest != art.digest
    await api_publish(client, newer, origin, tag="latest")
    resolved = await (await client.get("/v1/resolve", params={"ref": "demo/model:latest"})).json()
    assert resolved["digest"] == newer.digest
    resolved = await (await client.get("/v1/resolve", params={"ref": "demo/model:v1"})).json()
    assert resolved["digest"] == art.digest
    page = await (await client.get("/v1/artifacts", params={"name": "demo/model"})).json()
    tags = {a["digest"]: a["tags"] for a in page["artifacts"]}
    assert tags == {art.digest: ["v1"], newer.digest: ["latest"]}


async def test_list_pagination_and_filters(client, tmp_path, origin):
    built = [build_artifact(tmp_path, name=f"demo/m{i % 2}", created=f"2025-01-0{i + 1}T00:00:00Z") for i in range(5)]
    for b in built:
        await api_publish(client, b, origin, tag=None)
    seen, after, pages = [], None, 0
    while True:
        params = {"limit": "2", **({"after": after} if after else {})}
        page = await (await client.get("/v1/artifacts", params=params)).json()
        pages += 1
        assert len(page["artifacts"]) <= 2
        seen += [(a["name"], a["digest"]) for a in page["artifacts"]]
        after = page["next"]
        if not after:
            break
    assert pages == 3
    assert seen == sorted((b.manifest.name, b.digest) for b in built)
    item = (await (await client.get("/v1/artifacts", params={"limit": "1"})).json())["artifacts"][0]
    assert set(item) == {"digest", "name", "kind", "total_size", "created", "tags"}
    only = await (await client.get("/v1/artifacts", params={"name": "demo/m1"})).json()
    assert {a["digest"] for a in only["artifacts"]} == {b.digest for b in built if b.manifest.name == "demo/m1"}
    # Same files, different creation time: one content key, several digests.
    by_key = await (await client.get("/v1/artifacts", params={"content_key": built[0].manifest.content_key})).json()
    assert {a["digest"] for a in by_key["artifacts"]} == {b.digest for b in built if b.manifest.name == "demo/m0"}
    for bad in ({"limit": "0"}, {"limit": "501"}, {"limit": "x"}, {"after": "nonsense"}, {"name": "UPPER"}):
        await error_of(await client.get("/v1/artifacts", params=bad), 400)


# -- torrent and web seed ------------------------------------------------------------


async def test_torrent_endpoint_keeps_info_hash_and_sets_announce(client, art, origin):
    await api_publish(client, art, origin)
    resp = await client.get(f"/v1/artifacts/{art.digest}/torrent")
    assert resp.status == 200 and resp.content_type == "application/x-bittorrent"
    data = await resp.read()
    assert bdecode(data)[b"announce"] == f"http://{client.host}:{client.port}/announce".encode()
    assert torrent_info_bytes(data) == torrent_info_bytes(art.torrent)
    before, after = lt.torrent_info(art.torrent).info_hashes(), lt.torrent_info(data).info_hashes()
    assert (str(after.v1), str(after.v2)) == (str(before.v1), str(before.v2))
    await error_of(await client.get(f"/v1/artifacts/sha256:{'2' * 64}/torrent"), 404)


async def test_webseed_serves_ranges_from_file_origin(client, art, origin):
    upload(art, origin)
    await api_publish(client, art, origin)
    url = f"/v1/webseed/{art.digest}/model/a.bin"
    blob = art.data["a.bin"]
    stats0 = await (await client.get("/v1/stats")).json()

    resp = await client.get(url, headers={"Range": "bytes=1000-70999"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 1000-70999/{len(blob)}"
    assert await resp.read() == blob[1000:71000]
    resp = await client.get(f"/v1/webseed/{art.digest}/model/sub/b.bin")
    assert resp.status == 200 and await resp.read() == art.data["sub/b.bin"]

    stats1 = await (await client.get("/v1/stats")).json()
    assert stats1["origin_requests"] == stats0["origin_requests"] + 2
    assert stats1["origin_bytes_served"] == stats0["origin_bytes_served"] + 70_000 + 1234

    assert (await client.get(url, headers={"Range": f"bytes={len(blob)}-"})).status == 416
    await error_of(await client.get(f"/v1/webseed/{art.digest}/model/nope.bin"), 404)
    await error_of(await client.get(f"/v1/webseed/{art.digest}/other/a.bin"), 404)
    await error_of(await client.get(f"/v1/webseed/sha256:{'3' * 64}/model/a.bin"), 404)


async def test_webseed_missing_blob_is_an_origin_error(client, art, origin):
    await api_publish(client, art, origin)  # published, but the bytes were never uploaded
    err = await error_of(await client.get(f"/v1/webseed/{art.digest}/model/a.bin"), 502)
    assert err["code"] == "origin_error" and "missing" in err["message"]


async def test_webseed_streams_from_s3_origin(aiohttp_client, tmp_path, s3_bucket):
    from adapters.origin import S3Origin

    endpoint, bucket = s3_bucket
    s3 = S3Origin(bucket, "pfx", endpoint_url=endpoint)
    built = build_artifact(tmp_path)
    for f in built.manifest.files:
        s3.put_blob(f.xxh3_128, built.root / "model" / f.path, f.size)
    client = await aiohttp_client(make_app(TrackerConfig(data_dir=tmp_path / "reg", s3_endpoint=endpoint)))
    body = {**built.body(s3), "origin": {"url": s3.url, "s3_endpoint": None}}
    assert (await client.post("/v1/artifacts", json=body)).status == 201
    blob = built.data["a.bin"]
    url = f"/v1/webseed/{built.digest}/model/a.bin"
    resp = await client.get(url, headers={"Range": "bytes=5-262148"})
    assert resp.status == 206 and resp.headers["Content-Range"] == f"bytes 5-262148/{len(blob)}"
    assert await resp.read() == blob[5:262149]
    resp = await client.get(url, headers={"Range": "bytes=-10"})
    assert resp.status == 206 and await resp.read() == blob[-10:]
    resp = await client.get(url)
    assert resp.status == 200 and await resp.read() == blob
    assert (await client.get(url, headers={"Range": f"bytes={len(blob) + 5}-"})).status == 416
    stats = await (await client.get("/v1/stats")).json()
    assert stats["origin_requests"] == 3 and stats["origin_bytes_served"] == 262144 + 10 + len(blob)


# -- tracker -------------------------------------------------------------------------


async def test_announce_and_scrape_end_to_end(client, art, origin):
    await api_publish(client, art, origin)
    v1 = bytes.fromhex(art.manifest.info_hash.v1)
    v2 = bytes.fromhex(art.manifest.info_hash.v2)[:20]
    a = await bget(client, "/announce?" + announce_query(v1, 1, event="started", ip="10.0.0.1", left="0"))
    assert a[b"interval"] == 30 and a[b"min interval"] == 5 and a[b"peers"] == b""
    # The second peer announces under the truncated v2 hash, as libtorrent does for hybrids.
    b = await bget(client, "/announce?" + announce_query(v2, 2, event="started", ip="10.0.0.2", left="5"))
    assert decode_compact_peers(b[b"peers"]) == [("10.0.0.1", 7001)]
    assert (b[b"complete"], b[b"incomplete"]) == (1, 1)
    c = await bget(client, "/announce?" + announce_query(v1, 3, ip="2001:db8::3", left="5"))
    assert decode_compact_peers(c[b"peers"]) == [("10.0.0.1", 7001), ("10.0.0.2", 7002)]
    d = await bget(client, "/announce?" + announce_query(v1, 1, ip="10.0.0.1"))
    assert sorted(decode_compact_peers(d[b"peers"], d.get(b"peers6", b""))) == [
        ("10.0.0.2", 7002), ("2001:db8::3", 7003)]
    # Without ip= the request's own address is the peer's.
    e = await bget(client, "/announce?" + announce_query(v1, 4, numwant="1"))
    assert len(e[b"peers"]) == 6

    s = await bget(client, "/scrape?" + announce_query(v1, 0).split("&")[0] + "&info_hash=" + quote_from_bytes(v2, safe=""))
    assert s[b"files"][v1] == {b"complete": 2, b"downloaded": 0, b"incomplete": 2}
    assert s[b"files"][v2] == s[b"files"][v1]

    stop = await bget(client, "/announce?" + announce_query(v1, 2, event="stopped", ip="10.0.0.2", left="5"))
    assert stop[b"incomplete"] == 1
    stats = await (await client.get("/v1/stats")).json()
    assert stats["announces"] == 6 and stats["swarms"] == 1

    # Bytes that a decoded-then-split query would mangle ('&', '=', '%', '+', NUL, non-UTF-8)
    # must reach the tracker intact: the failure names exactly this hash.
    nasty = bytes([0x26, 0x3D, 0x25, 0x2B, 0x00, 0xFF, 0xFE, 0x80]) + bytes(range(12))
    unknown = await bget(client, "/announce?" + announce_query(nasty, 1))
    assert unknown[b"failure reason"].startswith(b"unknown info_hash " + nasty.hex().encode())
    assert (await bget(client, "/scrape?" + announce_query(b"\x99" * 20, 0).split("&")[0])) == {b"files": {}}


@pytest.mark.parametrize("query", [
    "", "info_hash=abc", "info_hash=%ZZ&peer_id=1", "port=99999999999999999999999",
    "info_hash=" + "%00" * 20 + "&peer_id=" + "%00" * 20 + "&port=-1&left=0",
    "info_hash=%ff%fe" + "x" * 18 + "&peer_id=" + "y" * 20 + "&port=1&left=0&zone=%ff",
])
async def test_malformed_announce_is_a_bencoded_failure(client, query):
    body = await bget(client, "/announce?" + query)
    assert set(body) == {b"failure reason"} and body[b"failure reason"]
    # Some of these are valid scrapes (a scrape has no port or peer_id); none may crash it.
    scrape = await bget(client, "/scrape?" + query)
    assert len(scrape) == 1 and (b"failure reason" in scrape or scrape == {b"files": {}})
    assert (await client.get("/v1/health")).status == 200


async def test_silent_peers_expire_in_the_background(aiohttp_client, tmp_path, art, origin):
    client = await aiohttp_client(make_app(TrackerConfig(data_dir=tmp_path / "reg", peer_ttl_s=0.3)))
    body = art.body(origin)
    assert (await client.post("/v1/artifacts", json=body)).status == 201
    v1 = bytes.fromhex(art.manifest.info_hash.v1)
    await bget(client, "/announce?" + announce_query(v1, 1, ip="10.0.0.1"))
    assert (await (await client.get("/v1/stats")).json())["swarms"] == 1
    await wait_until_async(lambda: _no_swarm(client), 3, message="the silent peer's swarm to expire")
    b = await bget(client, "/announce?" + announce_query(v1, 2, ip="10.0.0.2"))
    assert b[b"peers"] == b"" and b[b"complete"] == 1  # only the requester itself


async def _no_swarm(client) -> bool:
    return (await (await client.get("/v1/stats")).json())["swarms"] == 0


async def test_unknown_route_is_a_json_404(client):
    err = await error_of(await client.get("/v1/nope"), 404)
    assert err["code"] == "not_found"


async def test_real_libtorrent_clients_swarm_through_the_tracker(client, tmp_path, art, origin):
    """A libtorrent seed and leech find each other only through this tracker's announce."""
    await api_publish(client, art, origin)
    torrent = await (await client.get(f"/v1/artifacts/{art.digest}/torrent")).read()

    def session(port: int) -> lt.session:
        return lt.session({
            "listen_interfaces": f"127.0.0.1:{port}", "enable_dht": False, "enable_lsd": False,
            "enable_upnp": False, "enable_natpmp": False, "allow_multiple_connections_per_ip": True,
            "alert_mask": 0, "stop_tracker_timeout": 2,
        })

    # Sessions live only in this dict so that teardown controls when they are destroyed.
    sessions = {"seed": session(free_port()), "leech": session(free_port())}
    seed_h = sessions["seed"].add_torrent({"ti": lt.torrent_info(torrent), "save_path": str(art.root),
                                           "flags": lt.torrent_flags.seed_mode})
    leech_dir = tmp_path / "leech"
    leech_h = sessions["leech"].add_torrent({"ti": lt.torrent_info(torrent), "save_path": str(leech_dir)})

    def seeding() -> bool:
        if leech_h.status().is_seeding:
            return True
        leech_h.force_reannounce()
        return False

    try:
        await wait_until_async(seeding, 20, 0.2,
                               lambda: f"the leech (stuck: {leech_h.status().state} {leech_h.status().progress})")
        assert (leech_dir / "model" / "a.bin").read_bytes() == art.data["a.bin"]
        assert (leech_dir / "model" / "sub" / "b.bin").read_bytes() == art.data["sub/b.bin"]
        stats = await (await client.get("/v1/stats")).json()
        assert stats["announces"] >= 2 and stats["swarms"] == 1
    finally:
        # Removing a torrent sends its "stopped" announces to this tracker, which runs on
        # this event loop: let the loop answer them before destroying the sessions, or
        # the destructor blocks the loop until libtorrent's stop_tracker_timeout.
        sessions["seed"].remove_torrent(seed_h)
        sessions["leech"].remove_torrent(leech_h)
        del seed_h, leech_h
        with contextlib.suppress(TimeoutError):  # asserted below, once the sessions are gone
            await wait_until_async(lambda: _no_swarm(client), 5, message="the stopped announces")
        sessions.clear()
    # A clean stop leaves the swarm at once (no waiting for peer_ttl_s).
    assert (await (await client.get("/v1/stats")).json())["swarms"] == 0


async def test_real_libtorrent_downloads_from_the_web_seed(client, tmp_path, art, origin):
    """With no peer at all, a libtorrent client gets every byte through the BEP 19 web seed."""
    upload(art, origin)
    await api_publish(client, art, origin)
    torrent = await (await client.get(f"/v1/artifacts/{art.digest}/torrent")).read()
    async with RegistryClient(str(client.make_url("")), None) as reg:
        webseed = reg.webseed_url(art.digest)
    sessions = {"leech": lt.session({
        "listen_interfaces": f"127.0.0.1:{free_port()}", "enable_dht": False, "enable_lsd": False,
        "enable_upnp": False, "enable_natpmp": False, "alert_mask": 0, "stop_tracker_timeout": 1,
    })}
    leech_dir = tmp_path / "leech"
    handle = sessions["leech"].add_torrent({"ti": lt.torrent_info(torrent), "save_path": str(leech_dir),
                                            "url_seeds": [webseed]})
    try:
        await wait_until_async(lambda: handle.status().is_seeding, 20, 0.1,
                               lambda: f"the web seed download (stuck at {handle.status().progress:.0%})")
        for path, data in art.data.items():
            assert (leech_dir / "model" / path).read_bytes() == data
        stats = await (await client.get("/v1/stats")).json()
        assert stats["origin_bytes_served"] >= art.manifest.total_size and stats["origin_requests"] >= 2
    finally:
        sessions["leech"].remove_torrent(handle)
        del handle
        # Let the loop answer the "stopped" announce before the session's destructor waits for it.
        with contextlib.suppress(TimeoutError):
            await wait_until_async(lambda: _no_swarm(client), 5, message="the stopped announce")
        sessions.clear()


# -- durability ----------------------------------------------------------------------


async def test_registry_survives_restart(tmp_path, art, origin):
    svc = start_tracker(tmp_path, data_dir=tmp_path / "registry-data", token=TOKEN, log_path=tmp_path / "tracker.log",
                        start=False)
    url = svc.url
    await asyncio.to_thread(svc.start)
    try:
        async with RegistryClient(url, TOKEN) as reg:
            await reg.publish(art.manifest, art.torrent, origin.url, None, "v1")
            await reg.publish(art.manifest, art.torrent, origin.url, None, "stable")
        assert await asyncio.to_thread(svc.stop) == 0  # SIGTERM is a clean exit
        await asyncio.to_thread(svc.start)
        async with RegistryClient(url, TOKEN) as reg:
            for ref in ("demo/model:v1", "demo/model:stable", art.digest):
                digest, manifest = await reg.resolve(ref)
                assert digest == art.digest and manifest == art.manifest
            page = await reg.list_artifacts()
            assert [(a["digest"], a["tags"]) for a in page["artifacts"]] == [(art.digest, ["stable", "v1"])]
            assert torrent_info_bytes(await reg.torrent(art.digest)) == torrent_info_bytes(art.torrent)
        # The tracker's allow-list came back too: announces for the artifact are accepted.
        import aiohttp

        async with aiohttp.ClientSession() as http:
            v1 = bytes.fromhex(art.manifest.info_hash.v1)
            async with http.get(f"{url}/announce?" + announce_query(v1, 1, ip="10.0.0.1")) as resp:
                assert b"failure reason" not in bdecode(await resp.read())
    finally:
        await asyncio.to_thread(svc.stop)
