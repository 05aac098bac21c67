"""Relay targets come from node registration, and relay traffic needs a registry-issued token (issue #15).

* A relay URL is handed to nodes of other zones only if a node registered it with an
  authenticated heartbeat from the URL's own address (tracker/relaytokens.py): a web-seed
  request naming another node's URL, or an unregistered one, changes nothing.
* A node's relay listener takes a PUT or answers a GET only with an unexpired token for
  exactly that node, artifact, piece and method (modelcast/relay_auth.py); anything else is
  refused (401/403) before a byte of the body is read, logged once a minute per cause.
* With both, a two-zone pull still ends byte-identical, with pieces relayed between zones.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
import urllib.request

from harness import start_node, wait_until
from modelcast.relay_auth import RELAY_TOKEN_HEADER
from modelcast.wire import (FIRST_COPY_HEADER, NODE_ID_HEADER, NODE_KEY_HEADER, RELAY_FROM_HEADER,
                            RELAY_FROM_TOKEN_HEADER, RELAY_HEADER, RELAY_TO_HEADER, ZONE_HEADER, heartbeat_path)
from node_cache.client import NodeClient

from ..helpers import TOKEN, make_model, metric, publish, registry_stats, relay_token, request_from, tree_hashes

MiB = 1 << 20
PIECE = 256 * 1024
ATTACKER, OTHER = "127.0.0.3", "127.0.0.2"


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)




def heartbeat(tracker_url: str, source: str, node_id: str, key: str, relay: str) -> dict:
    status, _, body = request_from(tracker_url + heartbeat_path(node_id), "POST", source,
                              {NODE_KEY_HEADER: key, "Authorization": f"Bearer {TOKEN}",
                               "Content-Type": "application/json"},
                              json.dumps({"zone": "evil", "ttl_s": 5, "relay": relay}).encode())
    assert status == 200, body
    return json.loads(body)


def test_only_registered_relay_urls_at_the_requesters_address_are_handed_out(tracker, tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 8 * MiB})
    digest = publish(tracker.url, model, "sec/reg:v1", (tmp_path / "o").as_uri())
    name = get_json(f"{tracker.url}/v1/artifacts/{digest}")["torrent_name"]
    path = f"{tracker.url}/v1/webseed/{digest}/{name}/a.bin"
    node = start_node(tmp_path, tracker.url, "n", host="127.0.1.5", zone="a", token=TOKEN)
    try:
        url = get_json(f"{node.url}/v1/health")["relay"]
        assert url.startswith("http://127.0.1.5:")

        # An attacker's heartbeat naming a URL at another address registers nothing.
        answer = heartbeat(tracker.url, ATTACKER, "attacker-node-1", secrets.token_hex(16), "http://127.0.1.5:9")
        assert answer["relay"] is None
        # (A URL at its own address is its own business: it is registered, for it only.)
        attacker_key = secrets.token_hex(16)
        assert heartbeat(tracker.url, ATTACKER, "attacker-node-2", attacker_key,
                         f"http://{ATTACKER}:9")["relay"] == f"http://{ATTACKER}:9"

        # The first-copy gate counts only proven nodes (a bound node id and its key): every
        # asker here proves one, the attacker's included, so only relay registration is tested.
        other_key = secrets.token_hex(16)
        heartbeat(tracker.url, OTHER, "other-node-c", other_key, f"http://{OTHER}:9")
        own = (get_json(f"{node.url}/v1/health")["node_id"],
               (node.cache / "state" / "node_key").read_text().strip())
        creds = {ATTACKER: ("attacker-node-2", attacker_key), OTHER: ("other-node-c", other_key), "127.0.1.5": own}

        def ask(source: str, rng: int, zone: str, relay: str | None) -> tuple[int, dict[str, str]]:
            node_id, key = creds[source]
            headers = {"Range": f"bytes={rng * PIECE}-{(rng + 1) * PIECE - 1}", FIRST_COPY_HEADER: "1",
                       ZONE_HEADER: zone, "Authorization": f"Bearer {TOKEN}", NODE_ID_HEADER: node_id,
                       NODE_KEY_HEADER: key, **({RELAY_HEADER: relay} if relay else {})}
            status, headers, _ = request_from(path, "GET", source, headers)
            return status, headers

        # The attacker names the node's registered URL (not at its address) and an unregistered
        # one: a node of zone c asking for the same bytes is never sent to either.
        for rng, forged in ((0, url), (1, "http://127.0.0.9:9"), (2, f"http://{ATTACKER}:8")):
            ask(ATTACKER, rng, "b", forged)
            status, headers = ask(OTHER, rng, "c", None)
            assert status == 206 and RELAY_FROM_HEADER not in headers, (forged, headers)
        # Nor is a node served bytes told to push them there.
        ask(ATTACKER, 3, "d", url)
        ask(ATTACKER, 3, "e", "http://127.0.0.9:9")
        status, headers = ask("127.0.1.5", 4, "a", url)
        assert status == 206 and RELAY_TO_HEADER not in headers, headers

        # The node's own requests name its registered URL: handed out, with a token, to zone c.
        def relayed(rng=[10]) -> bool:  # a fresh range each try, once the node's heartbeat registered it
            rng[0] += 1
            ask("127.0.1.5", rng[0], "a", url)
            status, headers = ask(OTHER, rng[0], "c", None)
            return status == 409 and headers.get(RELAY_FROM_HEADER) == url and bool(headers.get(RELAY_FROM_TOKEN_HEADER))

        wait_until(relayed, 10, 0.2, "the node's registered relay URL to be handed out")
        assert "Traceback" not in tracker.log_text()
    finally:
        node.stop()


def send_head_only(url: str, method: str, token: str | None, length: int) -> int:
    """Send a request's headers (``length`` announced, no body): the status, if the node answers without the body."""
    host, port = url.removeprefix("http://").split("/", 1)[0].rsplit(":", 1)
    head = (f"{method} /{url.split('/', 3)[3]} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\n"
            + (f"{RELAY_TOKEN_HEADER}: {token}\r\n" if token else "") + "\r\n")
    with socket.create_connection((host, int(port)), timeout=10, source_address=(ATTACKER, 0)) as s:
        s.sendall(head.encode())
        data = s.recv(4096)  # times out (an error) if the node waited for the body
    return int(data.split(b" ", 2)[1])


def test_the_relay_listener_refuses_requests_without_a_valid_token_before_reading_them(tracker, tmp_path):
    model = make_model(tmp_path / "m", {"w.bin": 4 * MiB}, seed=7)
    digest = publish(tracker.url, model, "sec/tok:v1", (tmp_path / "o").as_uri())
    other = publish(tracker.url, make_model(tmp_path / "m2", {"w.bin": 4 * MiB}, seed=8), "sec/tok2:v1",
                    (tmp_path / "o").as_uri())
    name = get_json(f"{tracker.url}/v1/artifacts/{digest}")["torrent_name"]
    # 16 KiB/s: the pull is far from its last pieces while the test runs.
    node = start_node(tmp_path, tracker.url, "n", host="127.0.1.9", zone="z1", token=TOKEN,
                      extra=["--download-limit", "16K"])
    try:
        health = get_json(f"{node.url}/v1/health")
        relay, node_id = health["relay"], health["node_id"]
        req = urllib.request.Request(f"{node.url}/v1/pull", data=json.dumps({"ref": "sec/tok:v1", "wait": False})
                                     .encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).close()
        wait_until(lambda: get_json(f"{node.url}/v1/pulls/{digest}")["state"] == "downloading", 30, 0.1,
                   "the pull to download")
        piece = 15  # the last of 16 pieces
        url = f"{relay}/v1/artifacts/{digest}/pieces/{piece}"
        file_path, first, last = f"{name}/w.bin", piece * PIECE, 16 * PIECE - 1

        def token(method: str = "PUT", **kw) -> str:
            args = {"digest": digest, "first": first, "last": last, "node_id": node_id, **kw}
            return relay_token(tracker, args["node_id"], method, args["digest"], file_path, args["first"],
                               args["last"], kw.get("now"))

        # The node learns its relay secret from its first heartbeats' answers.
        wait_until(lambda: request_from(url, "PUT", ATTACKER, {RELAY_TOKEN_HEADER: token()}, b"x")[0] == 400, 10, 0.2,
                   "the node to accept registry tokens")
        refused = {
            "no token": (None, 401),
            "expired": (token(now=time.time() - 120), 403),
            "another artifact": (token(digest=other), 403),
            "another piece": (token(first=0, last=PIECE - 1), 403),
            "another node": (token(node_id="someone-else"), 403),
            "a GET's": (token("GET"), 403),
            "garbled": ("1.2.3", 403),
        }
        for what, (tok, status) in refused.items():
            assert send_head_only(url, "PUT", tok, PIECE) == status, what
        # A second request without a token is refused, and not logged again.
        assert send_head_only(url, "PUT", None, PIECE) == 401
        assert send_head_only(url, "GET", None, 0) == 401
        assert send_head_only(url, "GET", token(), 0) == 403  # a PUT's token does not read
        assert metric(node.url, "modelcast_node_piece_hash_failures_total") == 0
        assert metric(node.url, "modelcast_node_bytes_from_relay_total") == 0
        # The registry's token takes the right bytes.
        good = (model / "w.bin").read_bytes()[first:]
        status, _, body = request_from(url, "PUT", ATTACKER, {RELAY_TOKEN_HEADER: token()}, good)
        assert status == 204, body
        assert metric(node.url, "modelcast_node_bytes_from_relay_total") == len(good)
        log = node.log_text()
        assert log.count("refused: token missing") == 1, log
        assert "Traceback" not in log
    finally:
        node.stop()


def test_a_two_zone_pull_ends_byte_identical_with_pieces_relayed(tracker, node_factory, tmp_path):
    sizes = {f"shard-{i}.bin": 8 * MiB for i in range(2)}
    model = make_model(tmp_path / "model", sizes, seed=11)
    publish(tracker.url, model, "sec/zones:v1", (tmp_path / "origin").as_uri())
    nodes = [node_factory(tracker.url, f"n{z}", "--download-limit", "8M", host=f"127.0.{z + 1}.7", zone=f"zone-{z}")
             for z in range(2)]

    async def pull_all() -> list[dict]:
        clients = [NodeClient(n.url) for n in nodes]
        try:
            return await asyncio.wait_for(asyncio.gather(*(c.pull("sec/zones:v1", wait=True) for c in clients)), 120)
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    statuses = asyncio.run(pull_all())
    for status in statuses:
        assert status["state"] == "ready" and tree_hashes(status["path"]) == tree_hashes(model), status
    assert sum(s["bytes_from_relay"] for s in statuses) > 0, statuses
    served = registry_stats(tracker.url)
    assert served["origin_pushed_across_zones"] + served["origin_relayed_across_zones"] > 0, served
    for n in nodes:
        log = n.log_text()
        assert "refused: token" not in log and "did not register" not in log and "Traceback" not in log, log[-3000:]
        assert metric(n.url, "modelcast_node_piece_hash_failures_total") == 0
