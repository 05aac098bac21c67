"""The first-copy gate and relay registrations shared by replicas over one Redis (tracker/gate_redis.py).

Real processes: two ``modelcast tracker`` replicas over one PostgreSQL and one Redis the
tests start; proven nodes (a key bound by an authenticated heartbeat) asking from their own
loopback addresses.  Each replica alone would serve every first copy its own gate has not
seen, and believe only relay URLs registered through itself.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.request

from modelcast.relay_auth import check_token
from modelcast.wire import (FIRST_COPY_HEADER, NODE_ID_HEADER, NODE_KEY_HEADER, RELAY_FROM_HEADER,
                            RELAY_FROM_TOKEN_HEADER, RELAY_HEADER, RELAY_TO_HEADER, RELAY_TO_TOKEN_HEADER,
                            ZONE_HEADER, heartbeat_path)

from .helpers import TOKEN, make_model, publish, request_from, start_tracker

MiB = 1 << 20
PIECE = 256 * 1024




class Node:
    """A node id and key, asking from its own loopback address."""

    def __init__(self, source: str, zone: str) -> None:
        self.source, self.zone = source, zone
        self.id, self.key = f"node-{source.replace('.', '-')}", secrets.token_hex(16)
        self.url = f"http://{source}:9"
        self.relay_secret: str | None = None

    def heartbeat(self, replica: str, relay: bool) -> dict:
        body = {"zone": self.zone, "ttl_s": 30, **({"relay": self.url} if relay else {})}
        status, _, answer = request_from(replica + heartbeat_path(self.id), "POST", self.source,
                                     {NODE_KEY_HEADER: self.key, "Authorization": f"Bearer {TOKEN}",
                                      "Content-Type": "application/json"}, json.dumps(body).encode())
        assert status == 200, answer
        answer = json.loads(answer)
        self.relay_secret = answer.get("relay_secret")
        return answer

    def ask(self, replica: str, digest: str, path: str, piece: int, relay: bool) -> tuple[int, dict[str, str]]:
        headers = {"Range": f"bytes={piece * PIECE}-{(piece + 1) * PIECE - 1}", FIRST_COPY_HEADER: "1",
                   ZONE_HEADER: self.zone, "Authorization": f"Bearer {TOKEN}", NODE_ID_HEADER: self.id,
                   NODE_KEY_HEADER: self.key, **({RELAY_HEADER: self.url} if relay else {})}
        status, headers, _ = request_from(f"{replica}/v1/webseed/{digest}/{path}", "GET", self.source, headers)
        return status, headers


def _published(tmp_path, redis_url: str, db: str):
    replicas = [start_tracker(tmp_path / f"r{i}", token=TOKEN, name=f"replica-{i}",
                              extra=["--db", db, "--swarm-store", redis_url]) for i in range(2)]
    model = make_model(tmp_path / "m", {"a.bin": 4 * MiB})
    digest = publish(replicas[0].url, model, "gate/shared:v1", (tmp_path / "o").as_uri())
    with urllib.request.urlopen(f"{replicas[0].url}/v1/artifacts/{digest}", timeout=10) as resp:
        name = json.load(resp)["torrent_name"]
    return replicas, digest, f"{name}/a.bin"


def test_a_first_copy_served_through_one_replica_is_refused_through_another(tmp_path, redis_url, postgres_db):
    replicas, digest, path = _published(tmp_path, redis_url, postgres_db)
    one, two = (r.url for r in replicas)
    try:
        first, second = Node("127.0.3.1", "z"), Node("127.0.3.2", "z")
        for node in (first, second):  # bound (proven) on both replicas
            node.heartbeat(one, relay=False)
            node.heartbeat(two, relay=False)
        assert first.ask(one, digest, path, 0, relay=False)[0] == 206
        # The other node of the zone, asking the other replica for the same bytes, takes them from its peers.
        status, headers = second.ask(two, digest, path, 0, relay=False)
        assert status == 409 and RELAY_FROM_HEADER not in headers, headers
        # Other bytes are served; plain requests (no first-copy header) always are.
        assert second.ask(two, digest, path, 1, relay=False)[0] == 206
        assert first.ask(one, digest, path, 1, relay=False)[0] == 409
        for r in replicas:
            assert "Traceback" not in r.log_text()
    finally:
        for r in replicas:
            r.stop()


def test_a_relay_url_registered_through_one_replica_is_handed_out_by_another(tmp_path, redis_url, postgres_db):
    replicas, digest, path = _published(tmp_path, redis_url, postgres_db)
    one, two = (r.url for r in replicas)
    try:
        holder, asker = Node("127.0.3.3", "a"), Node("127.0.3.4", "b")
        for node in (holder, asker):
            node.heartbeat(two, relay=False)  # bound on replica 2, with no relay URL there
            assert node.heartbeat(one, relay=True)["relay"] == node.url  # its relay registered on replica 1
        # Zone a's node takes bytes through replica 2, naming its URL: replica 2 believes it.
        assert holder.ask(two, digest, path, 0, relay=True)[0] == 206
        # Zone b's first asker is sent to that node, with a token the holder accepts.
        status, headers = asker.ask(two, digest, path, 0, relay=True)
        assert status == 409 and headers.get(RELAY_FROM_HEADER) == holder.url, headers
        assert check_token(holder.relay_secret, headers[RELAY_FROM_TOKEN_HEADER], "GET", holder.id, digest, path,
                           0, PIECE, time.time()) is None
        # Zone b is pulling now: bytes served to zone a through either replica are pushed to its node.
        for replica, piece in ((two, 1), (one, 2)):
            status, headers = holder.ask(replica, digest, path, piece, relay=True)
            assert status == 206 and headers.get(RELAY_TO_HEADER) == asker.url, headers
            assert check_token(asker.relay_secret, headers[RELAY_TO_TOKEN_HEADER], "PUT", asker.id, digest, path,
                               piece * PIECE, PIECE, time.time()) is None
        for r in replicas:
            assert "Traceback" not in r.log_text()
    finally:
        for r in replicas:
            r.stop()


def test_while_redis_is_down_gated_requests_answer_503_and_plain_ones_are_served(tmp_path, postgres_db):
    from harness.redis import RedisServer

    with RedisServer(tmp_path / "redis") as redis_srv:
        replicas, digest, path = _published(tmp_path, redis_srv.url, postgres_db)
        one = replicas[0].url
        try:
            node = Node("127.0.3.5", "z")
            node.heartbeat(one, relay=True)
            assert node.ask(one, digest, path, 0, relay=True)[0] == 206
            redis_srv.stop()
            for piece in (1, 2, 3):
                status, headers = node.ask(one, digest, path, piece, relay=True)
                assert status == 503 and headers.get("Retry-After") == "2", (status, headers)
            # A client of no zone never needed the gate: served.
            status, _, _ = request_from(f"{one}/v1/webseed/{digest}/{path}", "GET", "127.0.3.6",
                                    {"Range": "bytes=0-1023", "Authorization": f"Bearer {TOKEN}"})
            assert status == 206
            # Back, empty (its scripts gone too): the gate answers again, with nothing remembered.
            redis_srv.start()
            assert node.ask(one, digest, path, 0, relay=True)[0] == 206
            assert node.ask(one, digest, path, 0, relay=True)[0] == 409
            log = replicas[0].log_text()
            assert log.count("is unreachable") == 1 and log.count("reachable again") == 1, log[-2000:]
            assert "Traceback" not in log
        finally:
            for r in replicas:
                r.stop()


def test_two_zones_pulling_through_two_replicas_take_one_origin_copy_between_them(tmp_path, redis_url, postgres_db,
                                                                                  node_factory):
    """Zone a's nodes talk to replica 1, zone b's to replica 2: the shared gate still sends each piece
    across zones once (relays between the zones' nodes) instead of one origin copy per replica."""
    import asyncio
    from pathlib import Path

    from .helpers import pull_all, registry_stats, tree_hashes

    replicas = [start_tracker(tmp_path / f"r{i}", token=TOKEN, name=f"replica-{i}",
                              extra=["--db", postgres_db, "--swarm-store", redis_url]) for i in range(2)]
    try:
        sizes = {f"weights/shard-{i}.bin": 8 * MiB for i in range(4)}
        total = sum(sizes.values())
        model = make_model(tmp_path / "model", sizes)
        publish(replicas[0].url, model, "zoned/shared:v1", (tmp_path / "origin").as_uri())
        nodes = [node_factory(replicas[z].url, f"z{z}-{i}", "--download-limit", "8M", host=f"127.0.{z + 4}.{i + 2}",
                              zone=f"zone-{z}") for z in range(2) for i in range(2)]
        statuses = asyncio.run(pull_all(nodes, "zoned/shared:v1"))
        source = tree_hashes(model)
        assert all(s["state"] == "ready" and tree_hashes(Path(s["path"])) == source for s in statuses), statuses
        stats = [registry_stats(r.url) for r in replicas]
        served = sum(s["origin_bytes_served"] for s in stats)
        crossed = sum(s["bytes_from_relay"] for s in statuses)
        print(f"origin {served / total:.2f} copies through two replicas, across zones {crossed / total:.2f} copies "
              f"({sum(s['origin_pushed_across_zones'] for s in stats)} pushed, "
              f"{sum(s['origin_relayed_across_zones'] for s in stats)} fetched)")
        for z in range(2):
            assert sum(s["bytes_from_relay"] for s in statuses[2 * z:2 * z + 2]) > 0, statuses
        assert served <= 1.5 * total, stats
        for r in replicas:
            assert "Traceback" not in r.log_text()
    finally:
        for r in replicas:
            r.stop()
