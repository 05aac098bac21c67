"""The Redis swarm store: the same swarms as the in-process one, shared by replicas, through outages.

Against a real ``redis-server`` (harness/redis.py) and, for the replicas, a real
PostgreSQL (harness/postgres.py); behaviour tests of each store are in
tests/test_tracker_protocol.py and tests/test_tracker_liveness.py (``make_swarms``).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from harness.redis import RedisServer
from harness.starters import start_tracker
from tracker.announce import Announce
from tracker.bencode import bdecode
from tracker.swarm_redis import RedisSwarmStore

from .helpers import TOKEN, announce_query, make_model, publish, pull_all, tree_hashes
from .swarm_stores import make_store

MiB = 1 << 20


# -- both stores, the same swarms ---------------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("announce"), st.integers(0, 1), st.integers(1, 5), st.integers(1, 3), st.sampled_from("ab"),
              st.sampled_from((0, 5)), st.booleans(), st.sampled_from(("", "started", "completed", "stopped")),
              st.sampled_from((None, "n1", "n2"))),
    st.tuples(st.just("heartbeat"), st.sampled_from(("n1", "n2"))),
    st.tuples(st.just("leave"), st.sampled_from(("n1", "n2"))),
    st.tuples(st.just("expire")),
)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(_op, max_size=40), gateways=st.integers(-1, 2))
def test_random_operations_leave_the_same_swarms_on_both_stores(redis_server, ops, gateways):
    """Announces (moves between buckets and zones, new peer ids on an old address, stops), heartbeats,
    leaves and expiry: after each, both stores hold the same peers with the same counters."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    hashes = [b"\x81" * 20, b"\x82" * 20]
    memory = make_store("memory", None, random.Random(0), gateways)
    shared = make_store("redis", redis_server.url, random.Random(0), gateways)
    try:
        for s in (memory, shared):
            for ih in hashes:
                s.allow([ih])
        now = 0.0
        for op in ops:
            now += 1.0
            for s in (memory, shared):
                if op[0] == "announce":
                    _, swarm_i, host, pid, zone, left, origin, event, node = op
                    a = Announce(hashes[swarm_i], bytes([pid]) * 20, 6000 + host % 2, 0, 0, left, event, True, 50,
                                 None, zone, None, False, origin, node)
                    res = s.announce(a, f"10.0.0.{host}", now)
                    assert all(p.peer_id != a.peer_id for p in res.peers)
                elif op[0] == "heartbeat":
                    s.heartbeat(op[1], now, 3.0)
                elif op[0] == "leave":
                    s.leave(op[1])
                else:
                    s.expire(now, 5.0)
            for ih in hashes:
                assert sorted(memory.peers_of(ih)) == sorted(shared.peers_of(ih)), op
            assert memory.scrape(hashes) == shared.scrape(hashes), op
    finally:
        shared.close()


# -- replicas over one Redis ------------------------------------------------------------------


async def test_two_replicas_share_swarms_and_a_leave_through_one_empties_the_other(redis_url):
    ih = b"\x91" * 20
    a, b = RedisSwarmStore(redis_url, zone_gateways=0), RedisSwarmStore(redis_url, zone_gateways=0)
    try:
        await a.allow([ih])
        # b never saw the publish (its database view lags): it learns the swarm from Redis.
        await a.heartbeat("n1", 0, 3.0, "z")
        await a.announce(Announce(ih, b"\x01" * 20, 6001, 0, 0, 0, numwant=0, zone="z", node="n1"), "10.0.0.1", 0)
        res = await b.announce(Announce(ih, b"\x02" * 20, 6002, 0, 0, 5, zone="z", node="n2"), "10.0.0.2", 0)
        assert [p.ip for p in res.peers] == ["10.0.0.1"] and (res.counts.complete, res.counts.incomplete) == (1, 1)
        assert await b.leave("n1") == 1
        assert [p.ip for p in await a.peers_of(ih)] == ["10.0.0.2"]
        # A delete through one replica: the other refuses the swarm at its next announce.
        await a.disallow([ih])
        with pytest.raises(Exception, match="unknown info_hash"):
            await b.announce(Announce(ih, b"\x02" * 20, 6002, 0, 0, 5, zone="z"), "10.0.0.2", 0)
    finally:
        await a.close()
        await b.close()


async def test_heartbeats_are_written_behind_and_every_replica_sees_them_and_a_leave(redis_url):
    """A node's first heartbeat to a replica waits for its write (an exact count); the next are answered
    at once and reach Redis within a few flush intervals; a leave through the other replica is not undone
    by a heartbeat still held."""
    from tracker.swarmstore import settle

    ih = b"\x93" * 20
    a, b = RedisSwarmStore(redis_url, zone_gateways=0), RedisSwarmStore(redis_url, zone_gateways=0)
    try:
        await a.allow([ih])
        first = a.heartbeat("n1", time.monotonic(), 3.0, "z")
        assert asyncio.isfuture(first) and await first == 0
        await b.announce(Announce(ih, b"\x01" * 20, 6001, 0, 0, 0, numwant=0, zone="z", node="n1"), "10.0.0.1", 0)
        # Answered from memory, not a round trip; the announce went through the other replica, so
        # this count is the write's: the heartbeat after the next write has it.
        answers = []
        for _ in range(40):
            answer = a.heartbeat("n1", time.monotonic(), 3.0, "z")
            assert isinstance(answer, int)
            answers.append(answer)
            if answer == 1:
                break
            await asyncio.sleep(a.flush_interval_s)
        assert answers[-1] == 1, answers
        assert await b.is_live("n1")
        # A heartbeat still held when the node leaves is not written after the leave (the node would be
        # live again, with no entries, until its ttl lapsed).
        a.heartbeat("n1", time.monotonic(), 3.0, "z")
        assert await a.leave("n1") == 1
        await asyncio.sleep(3 * a.flush_interval_s)
        assert not await b.is_live("n1") and await b.peers_of(ih) == []
        assert await settle(a.heartbeat("n1", time.monotonic(), 3.0, "z")) == 0
    finally:
        await a.close()
        await b.close()


# -- tracker processes over Redis + PostgreSQL ----------------------------------------------


def _http(method: str, url: str, body: dict | None = None, timeout: float = 5) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


def _announce(url: str, ih: bytes, n: int, **extra) -> dict:
    with urllib.request.urlopen(f"{url}/announce?{announce_query(ih, n, **extra)}", timeout=5) as resp:
        return bdecode(resp.read())


def _peer_ports(answer: dict) -> set[int]:
    peers = answer.get(b"peers", b"")
    return {int.from_bytes(peers[i + 4:i + 6], "big") for i in range(0, len(peers), 6)}


def _info_hash(url: str, digest: str) -> bytes:
    status, _, manifest = _http("GET", f"{url}/v1/artifacts/{digest}")
    assert status == 200, manifest
    return bytes.fromhex(manifest["info_hash"]["v1"])


def _replicas(tmp_path: Path, redis_url: str, db: str, n: int = 2, extra: tuple[str, ...] = ()) -> list:
    return [start_tracker(tmp_path / f"r{i}", token=TOKEN, name=f"replica-{i}",
                          extra=["--db", db, "--swarm-store", redis_url, *extra]) for i in range(n)]


def test_three_replicas_forget_a_dead_node_within_4s_and_a_stopped_one_within_1s(tmp_path, redis_url, postgres_db):
    """The node heartbeats and announces to replica 0 only; replicas 1 and 2's peer lists forget it."""
    replicas = _replicas(tmp_path, redis_url, postgres_db, n=3)
    r0, others = replicas[0], replicas[1:]

    def seen_by_every_other() -> list[set[int]]:
        return [_peer_ports(_announce(r.url, ih, 9, left="5")) for r in others]

    try:
        model = make_model(tmp_path / "model", {"w.bin": 256 * 1024})
        digest = publish(r0.url, model, "rep/m:v1", (tmp_path / "origin").as_uri())
        ih = _info_hash(others[-1].url, digest)
        for node, n in (("dies", 1), ("stops", 2)):
            status, _, answer = _http("POST", f"{r0.url}/v1/nodes/{node}/heartbeat", {"zone": "default", "ttl_s": 3.0})
            assert status == 200, answer
            _announce(r0.url, ih, n, node=node, numwant="0")
        assert seen_by_every_other() == [{7001, 7002}] * 2
        # "stops" leaves cleanly; "dies" simply goes silent (no more heartbeats).
        stopped_at = time.monotonic()
        status, _, answer = _http("DELETE", f"{r0.url}/v1/nodes/stops")
        assert status == 200 and answer["removed"] == 1, answer
        assert all(7002 not in seen for seen in seen_by_every_other())
        assert time.monotonic() - stopped_at <= 1.0
        for _ in range(2):  # "dies" heartbeats a little longer, then is killed
            time.sleep(0.5)
            _http("POST", f"{r0.url}/v1/nodes/dies/heartbeat", {"zone": "default", "ttl_s": 3.0})
        died_at = time.monotonic()
        gone_after = None
        for _ in range(60):
            time.sleep(0.1)
            if all(7001 not in seen for seen in seen_by_every_other()):
                gone_after = time.monotonic() - died_at
                break
        assert gone_after is not None and gone_after <= 4.0, gone_after
        print(f"dead node gone from both other replicas' peer lists {gone_after:.2f} s after its last heartbeat")
        # Another replica's metrics, from the figures its expiry loop keeps (no Redis call per scrape).
        with urllib.request.urlopen(f"{others[0].url}/metrics", timeout=5) as resp:
            assert b"modelcast_registry_swarms" in resp.read()
    finally:
        for r in replicas:
            r.stop()


def test_redis_outage_answers_retry_and_recovers_by_itself(tmp_path, postgres_db):
    with RedisServer(tmp_path / "redis") as redis_srv:
        (r0,) = _replicas(tmp_path, redis_srv.url, postgres_db, n=1)
        try:
            model = make_model(tmp_path / "model", {"w.bin": 64 * 1024})
            digest = publish(r0.url, model, "out/m:v1", (tmp_path / "origin").as_uri())
            ih = _info_hash(r0.url, digest)
            _announce(r0.url, ih, 1)
            for _ in range(2):  # n2 is known here: its heartbeats are answered at once, written behind
                status, _, body = _http("POST", f"{r0.url}/v1/nodes/n2/heartbeat", {"ttl_s": 3.0})
                assert status == 200 and body["entries"] == 0, body
            redis_srv.stop()
            # The first write that fails (within a flush interval) makes the heartbeats after it 503s.
            statuses = []
            for _ in range(20):
                status, headers, body = _http("POST", f"{r0.url}/v1/nodes/n2/heartbeat", {"ttl_s": 3.0})
                statuses.append(status)
                if status == 503:
                    assert headers.get("Retry-After") == "2", (headers, body)
                    break
                assert status == 200, body
                time.sleep(0.05)
            assert statuses[-1] == 503, statuses
            for _ in range(3):
                answer = _announce(r0.url, ih, 2)
                assert b"retry in" in answer[b"failure reason"], answer
                status, headers, body = _http("POST", f"{r0.url}/v1/nodes/n1/heartbeat", {"ttl_s": 3.0})
                assert status == 503 and headers.get("Retry-After") == "2", (status, headers, body)
            # Back, empty: the next announces rebuild the swarm; heartbeats answer again.
            redis_srv.start()
            answer = _announce(r0.url, ih, 2)
            assert b"failure reason" not in answer, answer
            assert _peer_ports(_announce(r0.url, ih, 3)) == {7002}
            status, _, body = _http("POST", f"{r0.url}/v1/nodes/n1/heartbeat", {"ttl_s": 3.0})
            assert status == 200 and body["entries"] == 0, body
            log = r0.log_path.read_text()
            assert log.count("is unreachable") == 1 and log.count("reachable again") == 1, log[-2000:]
            assert "Traceback" not in log
        finally:
            r0.stop()



def test_heartbeat_answers_tell_a_node_to_reannounce_after_redis_lost_its_data(tmp_path, redis_url):
    """Heartbeats are written behind; Redis loses its data without the replica seeing an outage (FLUSHALL,
    as a failover to an empty instance): within two heartbeats the answer says ``entries: 0``, and after
    the node announces again its heartbeats count the entry again."""
    import redis

    r0 = start_tracker(tmp_path / "r0", token=TOKEN, name="replica-0", extra=["--swarm-store", redis_url])
    try:
        model = make_model(tmp_path / "model", {"w.bin": 64 * 1024})
        digest = publish(r0.url, model, "lost/m:v1", (tmp_path / "origin").as_uri())
        ih = _info_hash(r0.url, digest)

        def beat() -> int:
            status, _, body = _http("POST", f"{r0.url}/v1/nodes/n1/heartbeat", {"zone": "z", "ttl_s": 3.0})
            assert status == 200, body
            return body["entries"]

        assert beat() == 0
        _announce(r0.url, ih, 1, node="n1", numwant="0")
        assert beat() == 1
        client = redis.Redis.from_url(redis_url)
        client.flushall()
        client.close()
        answers = []
        for _ in range(3):
            time.sleep(0.2)  # a node beats every second; a few flush intervals are enough here
            answers.append(beat())
        assert 0 in answers[:2], answers
        _announce(r0.url, ih, 1, node="n1", numwant="0")  # what the node does on entries: 0
        assert beat() == 1
        assert _peer_ports(_announce(r0.url, ih, 2, left="5")) == {7001}
        assert "Traceback" not in r0.log_path.read_text()
    finally:
        r0.stop()


def test_pull_through_replicas_on_redis_and_postgres_survives_redis_restarting_empty(tmp_path, postgres_db,
                                                                                    node_factory):
    """Three nodes pull through two replicas; Redis is killed and restarted empty mid-pull: every
    pull ends byte-identical, within one announce interval of Redis coming back."""
    with RedisServer(tmp_path / "redis") as redis_srv:
        r0, r1 = _replicas(tmp_path, redis_srv.url, postgres_db)
        try:
            model = make_model(tmp_path / "model", {f"w/{i}.bin": 8 * MiB for i in range(3)})
            publish(r0.url, model, "pull/m:v1", (tmp_path / "origin").as_uri())
            nodes = [node_factory(r.url, f"n{i}", "--download-limit", "4M", host=f"127.0.0.{i + 2}")
                     for i, r in enumerate((r0, r1, r0))]

            async def run() -> tuple[list[dict], float]:
                pulls = asyncio.ensure_future(pull_all(nodes, "pull/m:v1"))
                await asyncio.sleep(1.5)
                await asyncio.to_thread(redis_srv.stop)
                await asyncio.sleep(1.0)
                await asyncio.to_thread(redis_srv.start)
                back = time.monotonic()
                statuses = await asyncio.wait_for(pulls, 120)
                return statuses, time.monotonic() - back

            statuses, after = asyncio.run(run())
            source = tree_hashes(model)
            assert all(s["state"] == "ready" and tree_hashes(Path(s["path"])) == source for s in statuses), statuses
            print(f"every pull done {after:.1f} s after Redis came back (empty)")
            assert after <= 30.0  # the announce interval
        finally:
            for r in (r0, r1):
                r.stop()


async def test_udp_tracker_over_redis_answers_as_in_memory(redis_url):
    """BEP 15 through the Redis store: the answer comes later (a coroutine), the same as in memory."""
    from tracker.udp import (ACTION_ANNOUNCE, encode_announce_request, encode_connect_request, encode_scrape_request,
                             parse_reply)
    from tracker.udp_server import ConnectionIds, UdpTracker
    from tracker.announce import SwarmCounts

    ih = bytes(range(20))
    store = RedisSwarmStore(redis_url, rng=random.Random(1))
    await store.allow([ih])
    tracker = UdpTracker(store, interval=30, default_numwant=50, ids=ConnectionIds(b"k" * 32))

    async def ask(packet: bytes, addr, now: float):
        answer = tracker.handle(packet, addr, now)
        return parse_reply(await answer if not isinstance(answer, bytes) else answer)

    try:
        a_addr, b_addr = ("10.0.0.1", 40000), ("10.0.0.2", 40001)
        cid_a = (await ask(encode_connect_request(1), a_addr, 100.0)).connection_id
        cid_b = (await ask(encode_connect_request(1), b_addr, 100.0)).connection_id
        first = await ask(encode_announce_request(cid_a, 2, Announce(ih, b"A" * 20, 7001, 0, 0, 100, "started")),
                          a_addr, 101.0)
        assert (first.action, first.transaction_id, first.peers) == (ACTION_ANNOUNCE, 2, ())
        second = await ask(encode_announce_request(cid_b, 3, Announce(ih, b"B" * 20, 7002, 0, 0, 0, "started")),
                           b_addr, 102.0)
        assert second.peers == (("10.0.0.1", 7001),) and (second.seeders, second.leechers) == (1, 1)
        scrape = await ask(encode_scrape_request(cid_a, 4, [ih, b"\xee" * 20]), a_addr, 103.0)
        assert scrape.files == (SwarmCounts(1, 1, 0), SwarmCounts())
        assert tracker.stats.internal_errors == 0
    finally:
        await store.close()
