"""A peer entry is what its own connection says (issue #15, "Anyone can edit peer lists").

Against a real tracker process, with announces from distinct loopback source addresses
(127.0.0.2 is the victim, 127.0.0.3 the attacker).  On the code of 2026-12-03 the
attacker injected 10.66.66.66 with ``ip=``, listed itself as the origin's seed with
``role=origin`` and removed the victim with a spoofed ``event=stopped``; each of the tests
below failed there.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from harness import start_tracker
from tracker.announce import decode_compact_peers

from ..helpers import TOKEN, announce_from, announce_query, make_model, publish

VICTIM, ATTACKER, PROXY, WATCHER = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"


announce = announce_from


def listed(tracker_url: str, info_hash: bytes) -> set[tuple[str, int]]:
    """The peers a fresh watcher is handed (the watcher itself is not among them)."""
    answer = announce(tracker_url, WATCHER, announce_query(info_hash, 99, numwant="200", left="1"))
    return set(decode_compact_peers(answer[b"peers"], answer.get(b"peers6", b"")))


@pytest.fixture
def swarm(tmp_path):
    """A tracker (trusting 127.0.0.4 as a proxy) with one published artifact; yields (tracker, v1 info-hash)."""
    svc = start_tracker(tmp_path, token=TOKEN, extra=["--trusted-proxy", PROXY])
    try:
        digest = publish(svc.url, make_model(tmp_path / "m", {"a.bin": 1000}), "sec/peers:v1", (tmp_path / "o").as_uri())
        req = urllib.request.Request(f"{svc.url}/v1/artifacts/{digest}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            yield svc, bytes.fromhex(json.load(resp)["info_hash"]["v1"])
    finally:
        svc.stop()


def test_ip_is_ignored_from_a_client_and_believed_from_a_trusted_proxy(swarm):
    tracker, ih = swarm
    announce(tracker.url, ATTACKER, announce_query(ih, 1, ip="10.66.66.66"))
    announce(tracker.url, PROXY, announce_query(ih, 2, ip="10.1.2.3"))
    assert listed(tracker.url, ih) == {(ATTACKER, 7001), ("10.1.2.3", 7002)}


def test_role_origin_cannot_be_claimed(swarm):
    tracker, ih = swarm
    answer = announce(tracker.url, ATTACKER, announce_query(ih, 1, role="origin"))
    assert b"role=origin" in answer[b"failure reason"]
    assert listed(tracker.url, ih) == set()


def test_only_the_owner_stops_an_entry(swarm):
    tracker, ih = swarm
    announce(tracker.url, VICTIM, announce_query(ih, 1, key="v1ctim"))
    # From another address, naming the victim's address: that is the attacker's own entry, not the victim's.
    announce(tracker.url, ATTACKER, announce_query(ih, 1, event="stopped", ip=VICTIM, key="guess"))
    # From the victim's own address but without its key (another program on that host).
    announce(tracker.url, VICTIM, announce_query(ih, 1, event="stopped", key="guess"))
    announce(tracker.url, VICTIM, announce_query(ih, 1, event="stopped"))
    assert listed(tracker.url, ih) == {(VICTIM, 7001)}
    # The owner's own stop works at once.
    announce(tracker.url, VICTIM, announce_query(ih, 1, event="stopped", key="v1ctim"))
    assert listed(tracker.url, ih) == set()
