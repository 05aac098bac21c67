"""Three token scopes (issue #15): write (admin), read, node; and the zero-config default.

Real registry processes (and node daemons) on loopback.  On the code of 2026-12-04 before
this module: the read token heartbeated and removed any node id without a key and enrolled
any new one, there was no node token, bindings were lost on a restart, and a web seed
request that merely named a zone was recorded by the first-copy gate (so an anonymous
client made a node of that zone be refused bytes).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import stat
import urllib.error
import urllib.request

import pytest

from harness import start_node, start_tracker, wait_until
from modelcast.wire import FIRST_COPY_HEADER, NODE_ID_HEADER, NODE_KEY_HEADER, ZONE_HEADER
from node_cache.client import NodeClient

from ..helpers import TOKEN, make_model, publish, tree_hashes

READ, NODE = "read-" + "r" * 20, "node-" + "n" * 20


def call(method: str, url: str, headers: dict | None = None, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body if body is not None else {"ttl_s": 30}).encode() if method == "POST" else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw[:1] in (b"{", b"[") else {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def heartbeat(registry: str, node_id: str, key: str | None, token: str | None = None) -> int:
    headers = {**({NODE_KEY_HEADER: key} if key else {}), **(bearer(token) if token else {})}
    return call("POST", f"{registry}/v1/nodes/{node_id}/heartbeat", headers)[0]


def alive(registry: str, node_id: str, token: str) -> bool:
    _, listing = call("GET", f"{registry}/v1/nodes", bearer(token))
    return any(n["node"] == node_id and n["alive"] for n in listing["nodes"])


@pytest.fixture
def scoped(tmp_path):
    """A registry with all three tokens set, the documented way (environment)."""
    svc = start_tracker(tmp_path, token=TOKEN, read_token=READ, env={"MODELCAST_NODE_TOKEN": NODE})
    yield svc
    svc.stop()


def test_read_token_cannot_speak_for_nodes_and_node_token_cannot_write(tmp_path, scoped):
    node = start_node(tmp_path, scoped.url, "n1", env={"MODELCAST_NODE_TOKEN": NODE})
    try:
        node_id = (node.cache / "state" / "node_id").read_text().strip()
        wait_until(lambda: alive(scoped.url, node_id, READ), 15, 0.1, "the node's enrolment")
        # The read token: no heartbeat, no leave (DELETE) of the node, no enrolment of a new id.
        assert heartbeat(scoped.url, node_id, None, READ) == 401
        assert call("DELETE", f"{scoped.url}/v1/nodes/{node_id}", bearer(READ))[0] == 401
        assert heartbeat(scoped.url, "squatter", secrets.token_hex(16), READ) == 401
        assert heartbeat(scoped.url, "squatter", secrets.token_hex(16)) == 401  # no token: not enrolled either
        assert alive(scoped.url, node_id, READ)
        # The node token enrols a new id (then its key alone proves it), and reads, but never writes.
        key = secrets.token_hex(16)
        assert heartbeat(scoped.url, "enrolled", key, NODE) == 200
        assert heartbeat(scoped.url, "enrolled", key) == 200
        assert heartbeat(scoped.url, "enrolled", secrets.token_hex(16), NODE) == 401  # the id is held
        assert call("GET", f"{scoped.url}/v1/artifacts", bearer(NODE))[0] == 200
        assert call("POST", f"{scoped.url}/v1/auth/check", bearer(NODE))[0] == 401
        assert call("POST", f"{scoped.url}/v1/artifacts", bearer(NODE), {"manifest": {}})[0] == 401
        # Documented way: no token is visible in either process's command line.
        for pid in (scoped.pid, node.pid):
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            for token in (TOKEN, READ, NODE):
                assert token.encode() not in cmdline
    finally:
        node.stop()


def test_node_bindings_survive_a_restart(tmp_path):
    svc = start_tracker(tmp_path, env={"MODELCAST_NODE_TOKEN": NODE})
    try:
        key = secrets.token_hex(16)
        assert heartbeat(svc.url, "n1", key, NODE) == 200
        svc.stop()
        svc.start()
        # Another key, even with the node token, cannot take the id after the restart.
        assert heartbeat(svc.url, "n1", secrets.token_hex(16), NODE) == 401
        assert heartbeat(svc.url, "n1", key) == 200
    finally:
        svc.stop()


def test_node_bindings_are_shared_by_replicas_on_postgresql(tmp_path, postgres_db):
    env = {"MODELCAST_NODE_TOKEN": NODE, "MODELCAST_DB": postgres_db}
    a = start_tracker(tmp_path / "a", env=env)
    b = start_tracker(tmp_path / "b", env=env)
    try:
        key = secrets.token_hex(16)
        assert heartbeat(a.url, "n1", key, NODE) == 200
        assert heartbeat(b.url, "n1", secrets.token_hex(16), NODE) == 401  # bound at the other replica
        assert heartbeat(b.url, "n1", key) == 200
        a.stop()
        a.start()
        assert heartbeat(a.url, "n1", secrets.token_hex(16), NODE) == 401
    finally:
        a.stop()
        b.stop()


def test_the_gate_counts_only_proven_nodes(tmp_path):
    svc = start_tracker(tmp_path, token=TOKEN, env={"MODELCAST_NODE_TOKEN": NODE})
    try:
        model = make_model(tmp_path / "m", {"a.bin": 1 << 20})
        digest = publish(svc.url, model, "sec/scopes:v1", (tmp_path / "o").as_uri())
        keys = {n: secrets.token_hex(16) for n in ("p1", "p2")}
        for n, key in keys.items():
            assert heartbeat(svc.url, n, key, NODE) == 200
        url = f"{svc.url}/v1/webseed/{digest}/scopes/a.bin"
        piece = {"Range": "bytes=0-65535", FIRST_COPY_HEADER: "1", ZONE_HEADER: "z1"}

        def get(headers: dict) -> int:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
                    resp.read()
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        # Anonymous, and with a node id but a wrong key: served, never recorded.
        assert get(piece) == 206
        assert get({**piece, NODE_ID_HEADER: "p1", NODE_KEY_HEADER: secrets.token_hex(16)}) == 206
        # So the first proven node of zone z1 is served, and the gate refuses the second.
        assert get({**piece, NODE_ID_HEADER: "p1", NODE_KEY_HEADER: keys["p1"]}) == 206
        assert get({**piece, NODE_ID_HEADER: "p2", NODE_KEY_HEADER: keys["p2"]}) == 409
    finally:
        svc.stop()


def test_zero_config_tracker_and_node_pull_with_no_tokens(tmp_path):
    svc = start_tracker(tmp_path)
    node = None
    try:
        token_file = svc.data_dir / "node-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert "nodes on this machine enrol without a token" in svc.log_text()
        model = make_model(tmp_path / "m", {"w.bin": 3 << 20})
        publish(svc.url, model, "sec/zero:v1", (tmp_path / "o").as_uri())
        node = start_node(tmp_path, svc.url, "n1")
        status = asyncio.run(asyncio.wait_for(NodeClient(node.url).pull("sec/zero:v1", wait=True), 60))
        assert status["state"] == "ready", status
        assert tree_hashes(status["path"]) == tree_hashes(model)
        node_id = (node.cache / "state" / "node_id").read_text().strip()
        assert alive(svc.url, node_id, "none")  # enrolled over loopback without a token
        assert token_file.read_text().strip().encode() not in open(f"/proc/{svc.pid}/cmdline", "rb").read()
    finally:
        if node is not None:
            node.stop()
        svc.stop()
