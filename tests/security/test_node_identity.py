"""Only a node speaks for its node id (issue #15, "Node liveness is guarded like reads").

A real node daemon binds its id with its first heartbeat (its key stays in its cache);
then, from the same machine and with the registry's read access (none is set), nobody
else can make it leave, heartbeat as it, or tie their own swarm entries to it.  On the
code of 2026-12-03 all three worked.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from harness import wait_until
from tracker.announce import decode_compact_peers

from ..helpers import TOKEN, announce_from, announce_query, make_model, publish


def call(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def alive(registry: str, node_id: str) -> bool:
    _, listing = call("GET", f"{registry}/v1/nodes")
    return any(n["node"] == node_id and n["alive"] for n in listing["nodes"])


def test_nobody_else_can_leave_heartbeat_or_announce_as_a_node(tmp_path, tracker, node_factory):
    node = node_factory(tracker.url, "victim", "--token", TOKEN, host="127.0.0.2")
    node_id = (node.cache / "state" / "node_id").read_text().strip()
    wait_until(lambda: alive(tracker.url, node_id), 15, 0.1, "the node's first heartbeat")

    # Leave and heartbeat without the key, and with a wrong one: refused; the node stays.
    for headers in ({}, {"X-Modelcast-Node-Key": "f" * 64}):
        status, answer = call("DELETE", f"{tracker.url}/v1/nodes/{node_id}", headers=headers)
        assert status == 401 and "held by another node" in answer["error"]["message"], answer
        status, _ = call("POST", f"{tracker.url}/v1/nodes/{node_id}/heartbeat", b'{"ttl_s": 30}',
                         {**headers, "Content-Type": "application/json"})
        assert status == 401
    assert alive(tracker.url, node_id)

    # An announce naming the node's id without its token is a plain peer: the node's
    # clean stop (which takes every entry of the node) leaves it listed.
    digest = publish(tracker.url, make_model(tmp_path / "m", {"a.bin": 1000}), "sec/ident:v1",
                     (tmp_path / "o").as_uri())
    _, manifest = call("GET", f"{tracker.url}/v1/artifacts/{digest}")
    ih = bytes.fromhex(manifest["info_hash"]["v1"])
    announce_from(tracker.url, "127.0.0.3", announce_query(ih, 1, node=node_id))
    node.stop()
    wait_until(lambda: not alive(tracker.url, node_id), 10, 0.1, "the node's leave")
    answer = announce_from(tracker.url, "127.0.0.4", announce_query(ih, 2, left="1"))
    assert ("127.0.0.3", 7001) in decode_compact_peers(answer[b"peers"])
