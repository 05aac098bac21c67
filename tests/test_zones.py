"""Zones end to end: strict zone swarms, pieces cross zones once, through the origin's relays."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

from node_cache.client import NodeClient

from modelcast.relay_auth import RELAY_TOKEN_HEADER

from .helpers import make_model, publish, pull_all, registry_stats, relay_token, tree_hashes, wait_until_async

MiB = 1 << 20



def test_two_zones_pull_at_once_each_piece_crosses_once(tracker, node_factory, tmp_path):
    sizes = {f"weights/shard-{i}.bin": 8 * MiB for i in range(4)}
    total = sum(sizes.values())
    model = make_model(tmp_path / "model", sizes)
    publish(tracker.url, model, "zoned/m:v1", (tmp_path / "origin").as_uri())
    zones = {"zone-a": [], "zone-b": []}
    for z, (zone, members) in enumerate(zones.items()):
        for i in range(2):
            members.append(node_factory(tracker.url, f"{zone}-{i}", "--download-limit", "8M",
                                        host=f"127.0.{z + 1}.{i + 2}", zone=zone))
    statuses = asyncio.run(pull_all([n for members in zones.values() for n in members], "zoned/m:v1"))
    source = tree_hashes(model)
    assert all(s["state"] == "ready" and tree_hashes(Path(s["path"])) == source for s in statuses)
    served = registry_stats(tracker.url)
    assert served["origin_bytes_served"] <= 1.5 * total, served
    by_zone = {zone: statuses[2 * z: 2 * z + 2] for z, zone in enumerate(zones)}
    for zone, sts in by_zone.items():
        # No peer links cross zones: every byte a zone holds entered it from the origin or
        # from a node of the other zone, as the origin directed.
        entered = sum(s["bytes_from_origin"] + s["bytes_from_relay"] for s in sts)
        assert entered >= total, (zone, sts)
        assert sum(s["bytes_from_relay"] for s in sts) > 0, (zone, sts)
    crossed = sum(s["bytes_from_relay"] for s in statuses)
    print(f"origin {served['origin_bytes_served'] / total:.2f} copies, across zones {crossed / total:.2f} copies "
          f"({served['origin_pushed_across_zones']} pushed, {served['origin_relayed_across_zones']} fetched)")
    assert crossed <= 1.5 * total


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={RELAY_TOKEN_HEADER: token} if token else {}),
                                    timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _put(url: str, data: bytes, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="PUT", headers={RELAY_TOKEN_HEADER: token} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_piece_routes_serve_what_the_node_has_and_refuse_the_rest(tracker, node_factory, tmp_path):
    model = make_model(tmp_path / "model", {"w.bin": 3 * MiB // 2})
    digest = publish(tracker.url, model, "zoned/p:v1", (tmp_path / "origin").as_uri())
    node = node_factory(tracker.url, "n0", host="127.0.0.7")
    asyncio.run(pull_all([node], "zoned/p:v1"))
    health = json.loads(_get(f"{node.url}/v1/health")[1])
    relay = health["relay"]
    name = json.loads(_get(f"{tracker.url}/v1/artifacts/{digest}")[1])["torrent_name"]
    # Relay requests carry a registry-issued token (tests/security/test_relay_tokens.py).
    get = relay_token(tracker, health["node_id"], "GET", digest, f"{name}/w.bin", 0, 3 * MiB // 2 - 1)
    put = relay_token(tracker, health["node_id"], "PUT", digest, f"{name}/w.bin", 0, 3 * MiB // 2 - 1)
    # The pieces are on a listener of their own, on the peer address; the local API has none.
    assert relay.startswith("http://127.0.0.7:") and relay != node.url
    assert _get(f"{node.url}/v1/artifacts/{digest}/pieces/0")[0] == 404
    base = f"{relay}/v1/artifacts/{digest}/pieces"
    data = (model / "w.bin").read_bytes()
    status, piece0 = _get(f"{base}/0", get)
    assert status == 200 and len(piece0) == 256 * 1024 and piece0 == data[:len(piece0)]
    status, last = _get(f"{base}/5", get)  # the file's last piece: its bytes, then the pad file's zeros
    assert status == 200 and last == data[5 * 256 * 1024:] + bytes(len(last) - len(data[5 * 256 * 1024:]))
    status, body = _get(f"{base}/999999?wait=0.2", get)
    assert status == 404 and "not on this node" in json.loads(body)["error"]["message"]
    for bad in ("wait=abc", "wait=-1", "wait=nan", "wait=1e9"):
        status, body = _get(f"{base}/0?{bad}", get)
        assert status == 400, (bad, body)
    # Pushes are taken only for an artifact being pulled: this one is complete.
    status, body = _put(f"{base}/0", b"\0" * 16, put)
    assert status == 409 and "not being pulled" in json.loads(body)["error"]["message"]
    status, _ = _put(f"{relay}/v1/artifacts/sha256:{'0' * 64}/pieces/0", b"x", put)
    assert status == 409
    assert _put(f"{base}/0", b"\0" * 16)[0] == 401  # no token
    # The node is unharmed and its copy intact.
    assert _get(f"{node.url}/v1/health")[0] == 200
    assert _get(f"{base}/0", get) == (200, piece0)


def test_a_node_that_dies_mid_pull_does_not_stop_the_others(tracker, node_factory, tmp_path):
    """Pushes to a dead node are lost; its zone-mate and the other zone still end verified."""
    sizes = {f"weights/shard-{i}.bin": 8 * MiB for i in range(4)}
    model = make_model(tmp_path / "model", sizes, seed=3)
    publish(tracker.url, model, "zoned/d:v1", (tmp_path / "origin").as_uri())
    nodes = [node_factory(tracker.url, f"n{z}{i}", "--download-limit", "3M", host=f"127.0.{z + 1}.{i + 2}",
                          zone=f"zone-{z}") for z in range(2) for i in range(2)]
    victim = nodes[3]

    async def scenario() -> tuple[dict, list[dict]]:
        clients = [NodeClient(n.url) for n in nodes[:3]]
        victim_client = NodeClient(victim.url)
        try:
            digest = (await victim_client.pull("zoned/d:v1", wait=False))["digest"]
            pulls = [asyncio.ensure_future(c.pull("zoned/d:v1", wait=True)) for c in clients]

            async def victim_mid_pull() -> dict | None:
                status = await victim_client.status(digest)
                return status if 0 < status["done_bytes"] < status["total_bytes"] else None

            at_kill = await wait_until_async(victim_mid_pull, 30, message="the victim to be part-way through its pull")
            victim.proc.kill()  # SIGKILL mid-pull: pushes to it now fail
            return at_kill, await asyncio.wait_for(asyncio.gather(*pulls), 90)
        finally:
            await asyncio.gather(*(c.close() for c in clients), victim_client.close())

    at_kill, statuses = asyncio.run(scenario())
    # It died part-way: what it had verified was less than the whole, and no complete copy is in its cache.
    assert at_kill["state"] != "ready" and 0 < at_kill["done_bytes"] < at_kill["total_bytes"], at_kill
    assert not (victim.cache / "artifacts" / "sha256" / at_kill["digest"].split(":")[1]).exists()
    source = tree_hashes(model)
    assert all(s["state"] == "ready" and tree_hashes(Path(s["path"])) == source for s in statuses)
