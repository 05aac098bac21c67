"""The registry's /metrics: guarded like every read, free of secrets, and saying what happened
(tracker answers over HTTP and UDP, heartbeats by zone, origin bytes by zone, routes by name)."""

from __future__ import annotations

import asyncio
import socket

from prometheus_client.parser import text_string_to_metric_families

from modelcast.config import TrackerConfig
from tracker.announce import Announce
from tracker.app import UDP_TRACKER, make_app
from tracker.udp import encode_announce_request, encode_connect_request, parse_reply

from .helpers import AUTH, TOKEN, announce_query, api_publish, error_of, upload

READ_TOKEN = "metrics-reader"
READ = {"Authorization": f"Bearer {READ_TOKEN}"}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def scrape(client, headers=READ) -> dict:
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/plain"
    return samples(await resp.text())


async def test_metrics_need_the_read_token_when_one_is_set_and_show_no_token(aiohttp_client, tmp_path):
    # A write token no metric name could contain by chance (the suite's "secret" is a word
    # that store operation names may hold, e.g. registry_secret).
    write = "w-7f3a9c1e5d"
    client = await aiohttp_client(make_app(TrackerConfig(data_dir=tmp_path / "registry", token=write,
                                                         read_token=READ_TOKEN)))
    err = await error_of(await client.get("/metrics"), 401)
    assert err["code"] == "unauthorized" and "Authorization: Bearer" in err["message"]
    err = await error_of(await client.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401)
    assert READ_TOKEN not in err["message"] and write not in err["message"]
    for headers in (READ, {"Authorization": f"Bearer {write}"}):  # the read token, or the write token (which reads too)
        resp = await client.get("/metrics", headers=headers)
        assert resp.status == 200
        text = await resp.text()
        assert "modelcast_registry_announces_total" in text
        assert READ_TOKEN not in text and write not in text
    # Refused scrapes are counted too, under the route's name.
    found = await scrape(client)
    assert value(found, "modelcast_registry_http_requests_total", route="/metrics", method="GET", code="401") == 2


async def test_metrics_are_open_like_every_read_without_a_read_token(aiohttp_client, tmp_path):
    client = await aiohttp_client(make_app(TrackerConfig(data_dir=tmp_path / "registry", token=TOKEN)))
    await scrape(client, headers={})


async def test_metrics_count_tracker_answers_heartbeats_origin_bytes_and_routes(aiohttp_client, tmp_path, art, origin):
    app = make_app(TrackerConfig(data_dir=tmp_path / "registry", token=TOKEN, peer_ttl_s=60, udp_host="127.0.0.1",
                                 udp_port=0))
    client = await aiohttp_client(app)
    upload(art, origin)
    await api_publish(client, art, origin)
    v1 = bytes.fromhex(art.manifest.info_hash.v1)

    # HTTP announces: two answered with peers, one for an unknown torrent, one malformed.
    for n in (1, 2):
        assert (await client.get(f"/announce?{announce_query(v1, n, left='10', zone='z1')}")).status == 200
    await client.get(f"/announce?{announce_query(b'x' * 20, 3)}")
    await client.get("/announce?info_hash=short")
    # UDP: connect, then one announce that is answered and one for an unknown torrent.
    port = app[UDP_TRACKER].port

    def udp_exchange() -> list[int]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(encode_connect_request(1), ("127.0.0.1", port))
            cid = parse_reply(s.recv(2048)).connection_id
            actions = []
            for tid, ih in ((2, v1), (3, b"y" * 20)):
                a = Announce(ih, b"-UDP000-000000000009", 7009, 0, 0, 0, "started")
                s.sendto(encode_announce_request(cid, tid, a), ("127.0.0.1", port))
                actions.append(parse_reply(s.recv(2048)).action)
            return actions

    assert await asyncio.to_thread(udp_exchange) == [1, 3]  # an announce answer, then an error action
    # Heartbeats: two nodes of zone z1, one of z2, one refused.
    for node, zone in (("n1", "z1"), ("n2", "z1"), ("n3", "z2")):
        resp = await client.post(f"/v1/nodes/{node}/heartbeat", json={"zone": zone, "ttl_s": 30})
        assert resp.status == 200
    assert (await client.post("/v1/nodes/n4/heartbeat", json={"ttl_s": -1})).status == 400
    # The web seed: 1000 bytes to a node of zone z2.
    path = f"/v1/webseed/{art.digest}/model/a.bin"
    resp = await client.get(path, headers={"X-Modelcast-Zone": "z2", "Range": "bytes=0-999"})
    assert resp.status == 206 and len(await resp.read()) == 1000
    await client.get(f"/v1/artifacts/{art.digest}")

    found = await scrape(client, headers={})
    announces = {(dict(labels)["transport"], dict(labels)["result"]): v for (name, labels), v in found.items()
                 if name == "modelcast_registry_announces_total"}
    assert announces == {("http", "ok"): 2, ("http", "unknown_torrent"): 1, ("http", "invalid"): 1,
                         ("http", "error"): 0, ("udp", "ok"): 1, ("udp", "unknown_torrent"): 1,
                         ("udp", "invalid"): 0, ("udp", "error"): 0}
    assert value(found, "modelcast_registry_udp_connects_total") == 1
    assert value(found, "modelcast_registry_heartbeats_total", result="ok") == 3
    assert value(found, "modelcast_registry_heartbeats_total", result="bad_request") == 1
    assert value(found, "modelcast_registry_live_nodes", zone="z1") == 2
    assert value(found, "modelcast_registry_live_nodes", zone="z2") == 1
    # Peers of the swarm: the HTTP ones of zone z1, downloading; the UDP one, complete, in the default zone.
    assert value(found, "modelcast_registry_peers", zone="z1", state="downloading", role="peer") == 2
    assert value(found, "modelcast_registry_peers", zone="default", state="complete", role="peer") == 1
    assert value(found, "modelcast_registry_swarms", state="active") == 1
    assert value(found, "modelcast_registry_origin_served_bytes_total", zone="z2") == 1000
    assert value(found, "modelcast_registry_origin_served_bytes_total", zone="z1") == 0  # known from heartbeats
    assert value(found, "modelcast_registry_origin_requests_total", zone="z2") == 1
    # Routes by their canonical name, never the raw path (which would make a series per digest).
    assert value(found, "modelcast_registry_http_requests_total", route="/v1/artifacts/{digest}", method="GET",
                 code="200") == 1
    assert value(found, "modelcast_registry_http_request_duration_seconds_count",
                 route="/v1/webseed/{digest}/{tail}", method="GET") == 1
    assert not any(art.digest in str(labels) for _, labels in found)
    # The database: the publish and the lookups behind the reads, each timed.
    assert value(found, "modelcast_registry_store_operation_duration_seconds_count", operation="publish") == 1
    assert value(found, "modelcast_registry_store_operation_duration_seconds_count", operation="lookup") >= 2
    assert value(found, "modelcast_registry_store_errors_total", operation="publish") == 0


async def test_zone_labels_stay_bounded_whatever_clients_name(aiohttp_client, tmp_path):
    app = make_app(TrackerConfig(data_dir=tmp_path / "registry", token=TOKEN))
    client = await aiohttp_client(app)
    for i in range(300):
        resp = await client.post(f"/v1/nodes/n{i}/heartbeat", json={"zone": f"zone{i}", "ttl_s": 30})
        assert resp.status == 200
    found = await scrape(client, headers={})
    live = {dict(labels)["zone"]: v for (name, labels), v in found.items() if name == "modelcast_registry_live_nodes"}
    assert len(live) == 256 and sum(live.values()) == 300 and live["_other"] == 45
