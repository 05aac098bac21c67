"""Node liveness at the tracker: one heartbeat per node, leave on SIGTERM, eviction after SIGKILL.

Three layers: the swarm registry with an injected clock (no sleeping), the HTTP routes in
process, and real tracker and node daemon processes on loopback, where the eviction
times of a killed and a stopped node are measured and printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
import urllib.request
from urllib.parse import quote_from_bytes

import pytest

from modelcast.config import TrackerConfig
from modelcast.manifest import Manifest
from node_cache.client import NodeClient
from tracker.announce import Announce, SwarmCounts, decode_compact_peers
from tracker.app import SWARMS, make_app
from tracker.bencode import bdecode
from tracker.swarm import SwarmRegistry

from .helpers import NodeProcess, TOKEN, make_model, publish, start_node, start_tracker, wait_until

IH1, IH2 = b"\x01" * 20, b"\x02" * 20


def _ann(ih: bytes, n: int, *, node: str | None = None, event: str = "", left: int = 0) -> Announce:
    return Announce(ih, bytes([n]) * 20, 6000 + n, 0, 0, left, event, numwant=200, node=node)


def _ips(reg: SwarmRegistry, ih: bytes) -> set[str]:
    return {p.ip for p in reg.peers_of(ih)}


# -- the swarm registry, with an injected clock -----------------------------------------


def test_one_heartbeat_keeps_every_entry_of_a_node_and_its_lapse_drops_them_all(make_swarms):
    reg = make_swarms(random.Random(0))
    reg.allow([IH1])
    reg.allow([IH2])
    reg.heartbeat("n1", now=0, ttl=3)
    reg.announce(_ann(IH1, 1, node="n1"), "10.0.0.1", now=0)
    reg.announce(_ann(IH2, 1, node="n1"), "10.0.0.1", now=0)
    reg.announce(_ann(IH1, 2), "10.0.0.2", now=0)  # no node=: an aria2-like client
    # Heartbeats every second for a minute, no announces: far past the per-peer TTL of 5 s.
    for t in range(1, 61):
        assert reg.heartbeat("n1", now=t, ttl=3) == 2
        reg.expire(now=t + 0.5, ttl_s=5)
    assert _ips(reg, IH1) == {"10.0.0.1"} and _ips(reg, IH2) == {"10.0.0.1"}
    # The heartbeats stop (the node was killed): all its entries go once the ttl lapses.
    assert reg.expire(now=62.9, ttl_s=5) == 0
    assert reg.expire(now=63.0, ttl_s=5) == 2
    assert reg.peers_of(IH1) == [] and reg.peers_of(IH2) == []
    assert not reg.is_live("n1") and reg.live_nodes() == 0
    assert reg.scrape([IH1, IH2]) == {IH1: SwarmCounts(0, 0, 0), IH2: SwarmCounts(0, 0, 0)}


def test_leave_removes_a_node_from_every_swarm_at_once(make_swarms):
    reg = make_swarms(random.Random(0))
    reg.allow([IH1])
    reg.allow([IH2])
    reg.heartbeat("n1", now=0, ttl=3)
    for ih in (IH1, IH2):
        reg.announce(_ann(ih, 1, node="n1"), "10.0.0.1", now=0)
        reg.announce(_ann(ih, 2, node="n2"), "10.0.0.2", now=0)
    assert reg.leave("n1") == 2
    assert _ips(reg, IH1) == {"10.0.0.2"} and _ips(reg, IH2) == {"10.0.0.2"}
    assert reg.scrape([IH1])[IH1].complete == 1
    assert reg.leave("n1") == 0  # twice is harmless
    # A late heartbeat after leaving does not bring entries back; the node has none.
    assert reg.heartbeat("n1", now=1, ttl=3) == 0
    assert reg.expire(now=10, ttl_s=100) == 0


def test_without_a_heartbeat_node_entries_keep_the_per_peer_ttl(make_swarms):
    reg = make_swarms(random.Random(0))
    reg.allow([IH1])
    reg.announce(_ann(IH1, 1, node="quiet"), "10.0.0.1", now=0)  # e.g. its heartbeats were refused
    reg.announce(_ann(IH1, 2), "10.0.0.2", now=4)
    assert reg.expire(now=4.9, ttl_s=5) == 0
    assert reg.expire(now=5.1, ttl_s=5) == 1
    assert _ips(reg, IH1) == {"10.0.0.2"}
    # A first heartbeat that comes after the announce takes over that node's entries.
    reg.announce(_ann(IH1, 1, node="quiet"), "10.0.0.1", now=6)
    reg.heartbeat("quiet", now=6, ttl=3)
    reg.heartbeat("quiet", now=8, ttl=3)
    assert reg.expire(now=10, ttl_s=1) == 1  # only the plain peer, silent since t=4
    assert _ips(reg, IH1) == {"10.0.0.1"}
    assert reg.expire(now=11, ttl_s=1) == 1  # the node's heartbeat lapsed at t=11
    assert reg.peers_of(IH1) == []


def test_a_shorter_ttl_takes_effect_at_once_and_a_restart_is_not_evicted_with_its_old_id(make_swarms):
    reg = make_swarms(random.Random(0))
    reg.allow([IH1])
    reg.heartbeat("old", now=0, ttl=30)
    reg.announce(_ann(IH1, 1, node="old"), "10.0.0.1", now=0)
    reg.heartbeat("old", now=1, ttl=1)
    assert reg.expire(now=2, ttl_s=100) == 1
    # The same address comes back under a new node id; the old id's leave must not touch it.
    reg.heartbeat("old", now=3, ttl=3)
    reg.announce(_ann(IH1, 1, node="old"), "10.0.0.1", now=3)
    reg.heartbeat("new", now=4, ttl=3)
    reg.announce(_ann(IH1, 1, node="new"), "10.0.0.1", now=4)
    assert reg.leave("old") == 0
    assert _ips(reg, IH1) == {"10.0.0.1"}
    assert reg.expire(now=6.9, ttl_s=100) == 0  # "old" lapses at 6 with nothing left
    assert reg.expire(now=7, ttl_s=100) == 1  # "new" lapses at 7
    with pytest.raises(ValueError):
        reg.heartbeat("x", now=0, ttl=0)


def test_stopped_announce_and_handout_of_node_entries(make_swarms):
    reg = make_swarms(random.Random(0))
    reg.allow([IH1])
    reg.heartbeat("n1", now=0, ttl=3)
    reg.announce(_ann(IH1, 1, node="n1"), "10.0.0.1", now=0)
    res = reg.announce(_ann(IH1, 2, left=5), "10.0.0.2", now=0)
    assert [p.ip for p in res.peers] == ["10.0.0.1"]
    reg.announce(_ann(IH1, 1, node="n1", event="stopped"), "10.0.0.1", now=1)
    assert reg.leave("n1") == 0  # the stopped announce already took it out of the node's index
    assert _ips(reg, IH1) == {"10.0.0.2"}


# -- the HTTP routes, in process ----------------------------------------------------------


async def test_heartbeat_and_leave_routes(aiohttp_client, tmp_path):
    # A heartbeat without a node key (an older client) needs the write token: the read
    # token does not speak for nodes (tests/security/test_token_scopes.py has the node scope).
    cfg = TrackerConfig(data_dir=tmp_path / "reg", token="writer", read_token=TOKEN, node_token="enrol",
                        heartbeat_ttl_max_s=5)
    client = await aiohttp_client(make_app(cfg))
    swarms = client.server.app[SWARMS]
    swarms.allow([IH1])
    auth = {"Authorization": "Bearer writer"}
    url = "/v1/nodes/abc123/heartbeat"
    assert (await client.post(url, json={"zone": "z", "ttl_s": 3})).status == 401
    assert (await client.delete("/v1/nodes/abc123")).status == 401
    read = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.post(url, json={"zone": "z", "ttl_s": 3}, headers=read)).status == 401
    for body in ({"ttl_s": 0}, {"ttl_s": "3"}, {"ttl_s": True}, {"ttl_s": float("inf")}, {"zone": "a b"}, [1]):
        resp = await client.post(url, data=json.dumps(body), headers=auth)
        assert resp.status == 400, body
    resp = await client.post("/v1/nodes/a%20b/heartbeat", json={}, headers=auth)
    assert resp.status == 400 and "invalid node id" in (await resp.json())["error"]["message"]
    resp = await client.post(url, json={"zone": "z", "ttl_s": 99}, headers=auth)
    assert resp.status == 200 and await resp.json() == {"ok": True, "ttl_s": 5.0, "entries": 0,  # capped
                                                         "reported": False}
    query = "&".join(f"{k}={quote_from_bytes(v) if isinstance(v, bytes) else v}" for k, v in {
        "info_hash": IH1, "peer_id": b"p" * 20, "port": 7001, "left": 0, "ip": "10.0.0.1", "node": "abc123"}.items())
    assert b"failure reason" not in bdecode(await (await client.get("/announce?" + query)).read())
    assert swarms.is_live("abc123") and len(swarms.peers_of(IH1)) == 1
    resp = await client.delete("/v1/nodes/abc123", headers=auth)
    assert resp.status == 200 and await resp.json() == {"ok": True, "removed": 1}
    assert swarms.peers_of(IH1) == []
    bad = query.replace("node=abc123", "node=..%2F")
    assert b"invalid node id" in bdecode(await (await client.get("/announce?" + bad)).read())[b"failure reason"]


# -- real tracker and node processes --------------------------------------------------------

PEER_TTL_S = 2.0


def _announce_ports(tracker_url: str, info_hash: bytes) -> set[int]:
    """The peer ports the tracker hands out to a fake peer (no node=, like aria2) that asks for all."""
    query = "&".join(f"{k}={quote_from_bytes(v) if isinstance(v, bytes) else v}" for k, v in {
        "info_hash": info_hash, "peer_id": b"-FAKE0-" + b"x" * 13, "port": 9, "left": 1, "numwant": 200,
        "compact": 1, "ip": "127.0.0.99"}.items())
    with urllib.request.urlopen(f"{tracker_url}/announce?{query}", timeout=2) as resp:
        answer = bdecode(resp.read())
    assert b"failure reason" not in answer, answer
    return {port for _, port in decode_compact_peers(answer[b"peers"], answer.get(b"peers6", b""))}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """A tracker with a short per-peer TTL and three nodes that hold one artifact, on loopback."""
    tmp = tmp_path_factory.mktemp("liveness")
    tracker = start_tracker(tmp, token=TOKEN, extra=["--peer-ttl", str(PEER_TTL_S), "--max-heartbeat-ttl", "10"])
    nodes: list[NodeProcess] = []
    try:
        model = make_model(tmp / "model", {"a.bin": 300_000, "b.bin": 5_000})
        digest = publish(tracker.url, model, "live/m:v1", (tmp / "origin").as_uri())
        with urllib.request.urlopen(f"{tracker.url}/v1/artifacts/{digest}", timeout=5) as resp:
            info_hash = Manifest.from_bytes(resp.read()).info_hash.tracker_keys()[0]
        for i in range(3):
            nodes.append(start_node(tmp, tracker.url, f"n{i}", host=f"127.0.0.{i + 2}", zone="default",
                                    extra=["--token", TOKEN, "--heartbeat-interval", "1", "--heartbeat-ttl", "3"]))

        async def pull_all():
            clients = [NodeClient(n.url) for n in nodes]
            try:
                return await asyncio.wait_for(asyncio.gather(*(c.pull("live/m:v1", wait=True) for c in clients)), 60)
            finally:
                await asyncio.gather(*(c.close() for c in clients))

        assert all(s["state"] == "ready" for s in asyncio.run(pull_all()))
        for n in nodes:
            with urllib.request.urlopen(f"{n.url}/v1/health", timeout=5) as resp:
                n.peer_port = int(json.load(resp)["peer_listen"].rsplit(":", 1)[1])
        want = {n.peer_port for n in nodes}
        wait_until(lambda: want <= _announce_ports(tracker.url, info_hash), 15,
                   message="all three nodes in the peer list")
        yield tracker, nodes, info_hash
    finally:
        for n in nodes:
            n.stop()
        tracker.stop()


def test_heartbeats_keep_nodes_listed_past_the_peer_ttl(swarm):
    tracker, nodes, info_hash = swarm
    # Nodes announce about every 30 s; only their heartbeats can keep them past a 2 s TTL.
    # Not a wait for something to happen: letting twice the TTL pass is what is tested.
    time.sleep(2 * PEER_TTL_S + 0.5)
    assert {n.peer_port for n in nodes} <= _announce_ports(tracker.url, info_hash)


def test_sigkilled_node_is_gone_from_peer_lists_within_4_seconds(swarm):
    tracker, nodes, info_hash = swarm
    victim = nodes[0]
    assert victim.peer_port in _announce_ports(tracker.url, info_hash)
    start = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    wait_until(lambda: victim.peer_port not in _announce_ports(tracker.url, info_hash), 10,
               message="SIGKILLed node evicted")
    took = time.monotonic() - start
    victim.proc.wait(5)
    print(f"\nSIGKILL: node gone from the peer list {took:.3f} s after the signal (bound 4 s)")
    assert took <= 4.0
    assert nodes[2].peer_port in _announce_ports(tracker.url, info_hash)


def test_sigtermed_node_leaves_every_peer_list_within_1_second(swarm):
    tracker, nodes, info_hash = swarm
    victim = nodes[1]
    assert victim.peer_port in _announce_ports(tracker.url, info_hash)
    start = time.monotonic()
    victim.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: victim.peer_port not in _announce_ports(tracker.url, info_hash), 10, 0.02,
               message="SIGTERMed node left")
    took = time.monotonic() - start
    victim.proc.wait(10)
    exited = time.monotonic() - start
    print(f"\nSIGTERM: node gone from the peer list {took:.3f} s after the signal "
          f"(bound 1 s); process exited after {exited:.2f} s, code {victim.proc.returncode}")
    assert took <= 1.0
    assert victim.proc.returncode == 0
    assert nodes[2].peer_port in _announce_ports(tracker.url, info_hash)
