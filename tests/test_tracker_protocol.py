"""Unit tests of the sans-I/O tracker protocol and the in-memory swarm state (no server)."""

from __future__ import annotations

import random
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.protocol import (Announce, Peer, ProtocolError, SwarmCounts, bdecode, bencode, choose_peers,
                              decode_compact_peers, encode_announce, encode_failure, encode_scrape, parse_announce,
                              parse_scrape, set_announce, torrent_info_bytes)
from tracker.swarm import SwarmRegistry, UnknownInfoHash

# Bytes chosen to trip naive parsers: '&', '=', '%', '+', NUL, high bytes, not UTF-8.
NASTY_HASH = bytes([0x26, 0x3D, 0x25, 0x2B, 0x00, 0xFF, 0xFE, 0x80]) + bytes(range(12))
PEER_ID = b"-LT2100-abcdefghijkl"


def q(**params) -> str:
    parts = []
    for k, v in params.items():
        v = v if isinstance(v, bytes) else str(v).encode()
        parts.append(f"{k}={quote_from_bytes(v, safe='')}")
    return "&".join(parts)


def announce_qs(**over) -> str:
    params = {"info_hash": NASTY_HASH, "peer_id": PEER_ID, "port": 6881, "uploaded": 0, "downloaded": 0, "left": 100}
    params.update(over)
    return q(**{k: v for k, v in params.items() if v is not None})


# -- bencode -------------------------------------------------------------------------


def test_bencode_known_values():
    assert bencode(42) == b"i42e"
    assert bencode(-3) == b"i-3e"
    assert bencode(b"spam") == b"4:spam"
    assert bencode("é") == b"2:\xc3\xa9"
    assert bencode([1, b"a"]) == b"li1e1:ae"
    # Keys are sorted as raw bytes, whatever order they were given in.
    assert bencode({"b": 1, b"a": 2, "a b": 3}) == b"d1:ai2e3:a bi3e1:bi1ee"
    with pytest.raises(TypeError):
        bencode(True)
    with pytest.raises(TypeError):
        bencode(1.5)


def test_bdecode_round_trip_and_rejects_garbage():
    value = {b"info": {b"name": b"model", b"length": 7}, b"list": [1, b"x", []]}
    assert bdecode(bencode(value)) == value
    for bad in (b"", b"i01e", b"i-0e", b"5:ab", b"d1:ai1e1:ai2ee", b"li1e", b"x", b"i1ei2e", b"d1:bi1e1:ai2ee"):
        with pytest.raises(ProtocolError):
            bdecode(bad)


def test_set_announce_keeps_info_bytes_and_drops_announce_list():
    # An info dict encoded with unsorted keys: re-encoding would change its hash.
    info_raw = b"d4:name5:model6:lengthi7ee"
    torrent = b"d8:announce14:http://old/ann13:announce-listll14:http://old/annee4:info" + info_raw + b"e"
    out = set_announce(torrent, "http://new:7070/announce")
    assert torrent_info_bytes(out) == info_raw
    decoded = bdecode(out, strict=False)
    assert decoded[b"announce"] == b"http://new:7070/announce"
    assert b"announce-list" not in decoded
    with pytest.raises(ProtocolError):
        set_announce(b"d8:announce1:xe", "http://x/announce")


# -- announce parsing ----------------------------------------------------------------


def test_parse_announce_binary_info_hash_with_escapes():
    a = parse_announce(announce_qs(event="started", numwant=10, key="abc", zone="eu-1"))
    assert a.info_hash == NASTY_HASH
    assert a.peer_id == PEER_ID
    assert (a.port, a.left, a.event, a.numwant, a.key, a.zone) == (6881, 100, "started", 10, "abc", "eu-1")
    assert a.compact is True and a.ip is None


def test_parse_announce_unescaped_safe_bytes():
    # Clients leave unreserved characters unescaped; those must decode to themselves.
    ih = b"abcdefghij0123456789"
    qs = f"info_hash={ih.decode()}&peer_id={PEER_ID.decode()}&port=1&left=0"
    a = parse_announce(qs)
    assert a.info_hash == ih and a.left == 0 and a.zone == "default"


@pytest.mark.parametrize("qs, needle", [
    (announce_qs(info_hash=None), "missing parameter info_hash"),
    (announce_qs(info_hash=b"short"), "info_hash must be 20 bytes, got 5"),
    (announce_qs(peer_id=b"x" * 21), "peer_id must be 20 bytes"),
    (announce_qs(port=0), "port"),
    (announce_qs(port=70000), "port"),
    (announce_qs(port="abc"), "port"),
    (announce_qs(left=None), "missing parameter left"),
    (announce_qs(left=-1), "left"),
    (announce_qs(event="exploded"), "unknown event"),
    (announce_qs(zone="bad zone!"), "invalid zone"),
    ("info_hash=é", "non-ASCII"),
])
def test_parse_announce_rejects_malformed(qs, needle):
    with pytest.raises(ProtocolError, match=needle):
        parse_announce(qs)


def test_parse_announce_numwant_and_ip():
    assert parse_announce(announce_qs(numwant=10_000), max_numwant=200).numwant == 200
    assert parse_announce(announce_qs(), default_numwant=33).numwant == 33
    assert parse_announce(announce_qs(ip="10.0.0.7")).ip == "10.0.0.7"
    assert parse_announce(announce_qs(ip="::ffff:10.0.0.7")).ip == "10.0.0.7"
    assert parse_announce(announce_qs(ip="fe80::1")).ip == "fe80::1"
    # A DNS name is not trusted as a peer address; the request's own address is used.
    assert parse_announce(announce_qs(ip="evil.example.com")).ip is None
    assert parse_announce(announce_qs(compact=0)).compact is False
    assert parse_announce(announce_qs(role="origin")).origin_seed is True


def test_parse_scrape_multiple_hashes():
    h2 = b"\x01" * 20
    qs = q(info_hash=NASTY_HASH) + "&" + q(info_hash=h2) + "&" + q(info_hash=NASTY_HASH)
    assert parse_scrape(qs) == [NASTY_HASH, h2]
    with pytest.raises(ProtocolError, match="at least one"):
        parse_scrape("")
    with pytest.raises(ProtocolError, match="20 bytes"):
        parse_scrape(q(info_hash=b"abc"))


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_parse_announce_never_fails_otherwise(raw):
    try:
        result = parse_announce(raw)
    except ProtocolError:
        return
    assert isinstance(result, Announce)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["info_hash", "peer_id", "port", "left", "event", "numwant", "ip", "zone",
                                        "compact", "uploaded"]),
                       st.binary(max_size=25), max_size=10))
def test_parse_announce_fuzzed_params(params):
    try:
        parse_announce(q(**params))
    except ProtocolError:
        pass


# -- encoding ------------------------------------------------------------------------


def test_encode_announce_compact_and_peers6():
    peers = [Peer(b"a" * 20, "10.1.2.3", 6881, 0), Peer(b"b" * 20, "2001:db8::1", 51413, 5)]
    body = bdecode(encode_announce(peers, SwarmCounts(1, 1, 0), interval=30, min_interval=5))
    assert body[b"interval"] == 30 and body[b"min interval"] == 5
    assert body[b"complete"] == 1 and body[b"incomplete"] == 1
    assert body[b"peers"] == bytes([10, 1, 2, 3]) + (6881).to_bytes(2, "big")
    assert len(body[b"peers6"]) == 18
    assert decode_compact_peers(body[b"peers"], body[b"peers6"]) == [("10.1.2.3", 6881), ("2001:db8::1", 51413)]


def test_encode_announce_dict_peers():
    peers = [Peer(b"a" * 20, "10.1.2.3", 6881, 0)]
    body = bdecode(encode_announce(peers, SwarmCounts(), interval=30, min_interval=5, compact=False))
    assert body[b"peers"] == [{b"ip": b"10.1.2.3", b"port": 6881, b"peer id": b"a" * 20}]
    body = bdecode(encode_announce(peers, SwarmCounts(), interval=30, min_interval=5, compact=False, no_peer_id=True))
    assert body[b"peers"] == [{b"ip": b"10.1.2.3", b"port": 6881}]


def test_encode_scrape_and_failure():
    body = bdecode(encode_scrape({NASTY_HASH: SwarmCounts(2, 3, 4)}))
    assert body == {b"files": {NASTY_HASH: {b"complete": 2, b"downloaded": 4, b"incomplete": 3}}}
    assert bdecode(encode_failure("nope")) == {b"failure reason": b"nope"}


# -- peer handout policy -------------------------------------------------------------


def _peer(n: int, *, zone="a", left=0, origin=False) -> Peer:
    return Peer(bytes([n]) * 20, f"10.0.0.{n}", 6881, left, zone, origin)


def test_choose_peers_excludes_requester_and_bounds_numwant():
    peers = [_peer(i) for i in range(1, 11)]
    me = peers[3]
    chosen = choose_peers(peers, me, 50, random.Random(1))
    assert me not in chosen and len(chosen) == 9
    assert len(choose_peers(peers, me, 4, random.Random(1))) == 4
    assert choose_peers(peers, me, 0, random.Random(1)) == []
    # Same peer id from another address (a restarted node) is the requester too.
    ghost = Peer(me.peer_id, "10.9.9.9", 1, 0, "a")
    assert ghost not in choose_peers(peers + [ghost], me, 50, random.Random(1))


def test_choose_peers_tiers():
    origin = _peer(1, zone="a", left=0, origin=True)
    same_seed = _peer(2, zone="a", left=0)
    same_leech = _peer(3, zone="a", left=10)
    other_seed = _peer(4, zone="b", left=0)
    other_leech = _peer(5, zone="b", left=10)
    me = _peer(9, zone="a", left=100)
    for seed in range(20):
        peers = [origin, other_leech, same_leech, other_seed, same_seed]
        random.Random(seed).shuffle(peers)
        chosen = choose_peers(peers, me, 10, random.Random(seed))
        assert chosen == [same_seed, same_leech, other_seed, other_leech, origin]
    assert choose_peers([origin, other_leech, same_seed], me, 1, random.Random(0)) == [same_seed]


def test_choose_peers_random_within_tier():
    peers = [_peer(i) for i in range(1, 30)]
    me = _peer(99)
    firsts = {choose_peers(peers, me, 1, random.Random(seed))[0] for seed in range(40)}
    assert len(firsts) > 5  # not always the same peer: load spreads across seeds


# -- swarm state ---------------------------------------------------------------------


def _ann(ih: bytes, n: int, *, event="", left=10, zone="default", numwant=50) -> Announce:
    return Announce(ih, bytes([n]) * 20, 6000 + n, 0, 0, left, event, True, numwant, None, zone, None)


def test_swarm_counters_and_stopped_removes_peer():
    ih = b"\x11" * 20
    reg = SwarmRegistry(random.Random(0))
    reg.allow([ih])
    reg.announce(_ann(ih, 1, event="started", left=10), "10.0.0.1", now=0)
    res = reg.announce(_ann(ih, 2, event="started", left=0), "10.0.0.2", now=0)
    assert (res.counts.complete, res.counts.incomplete) == (1, 1)
    assert [p.ip for p in res.peers] == ["10.0.0.1"]
    res = reg.announce(_ann(ih, 1, event="completed", left=0), "10.0.0.1", now=1)
    assert res.counts == SwarmCounts(2, 0, 1)
    # A repeated "completed" is not a second download.
    assert reg.announce(_ann(ih, 1, event="completed", left=0), "10.0.0.1", now=2).counts.downloaded == 1
    res = reg.announce(_ann(ih, 2, event="stopped", left=0), "10.0.0.2", now=2)
    assert res.counts == SwarmCounts(1, 0, 1)
    assert [p.ip for p in reg.peers_of(ih)] == ["10.0.0.1"]
    assert reg.scrape([ih, b"\x00" * 20]) == {ih: SwarmCounts(1, 0, 1)}


def test_swarm_expiry_removes_silent_peer():
    ih = b"\x22" * 20
    reg = SwarmRegistry(random.Random(0))
    reg.allow([ih])
    reg.announce(_ann(ih, 1), "10.0.0.1", now=0)
    reg.announce(_ann(ih, 2), "10.0.0.2", now=5)
    reg.announce(_ann(ih, 1), "10.0.0.1", now=8)  # peer 1 re-announces: it is fresh again
    assert reg.expire(now=12, ttl_s=5) == 1
    assert [p.ip for p in reg.peers_of(ih)] == ["10.0.0.1"]
    assert reg.scrape([ih])[ih].incomplete == 1
    assert reg.expire(now=100, ttl_s=5) == 1
    assert reg.peers_of(ih) == [] and reg.active_swarms() == 0


def test_swarm_unknown_hash_and_hybrid_aliases():
    v1, v2 = b"\x33" * 20, b"\x44" * 20
    reg = SwarmRegistry(random.Random(0))
    reg.allow([v1, v2])
    reg.allow([v1, v2])  # a re-publish keeps the same swarm
    reg.announce(_ann(v1, 1), "10.0.0.1", now=0)
    res = reg.announce(_ann(v2, 2), "10.0.0.2", now=0)
    # Both keys of a hybrid torrent are one swarm: a v2 announcer sees the v1 announcer.
    assert [p.ip for p in res.peers] == ["10.0.0.1"]
    assert len(reg.swarms()) == 1
    with pytest.raises(UnknownInfoHash, match="unknown info_hash 5555"):
        reg.announce(_ann(b"\x55" * 20, 1), "10.0.0.1", now=0)


# -- node= and the sampled handout policy (issue 4) --------------------------------


def test_parse_announce_node_id():
    assert parse_announce(announce_qs()).node is None
    assert parse_announce(announce_qs(node="")).node is None
    assert parse_announce(announce_qs(node="0123abcdef0123abcdef")).node == "0123abcdef0123abcdef"
    for bad in ("a b", "x" * 65, "../etc", "-lead", "é", "abc\n"):
        with pytest.raises(ProtocolError, match="invalid node id"):
            parse_announce(announce_qs(node=bad))


_ZONES = ("a", "b", "c")


@st.composite
def _handout_case(draw):
    """Distinct peers spread over zones, completion and the origin flag, one requester, numwant, seed."""
    n = draw(st.integers(0, 40))
    peers = [Peer(i.to_bytes(20, "big"), f"10.0.{i // 250}.{i % 250 + 1}", 6881, draw(st.sampled_from((0, 0, 7))),
                  draw(st.sampled_from(_ZONES)), draw(st.booleans()) and draw(st.booleans()))
             for i in range(n)]
    if peers and draw(st.booleans()):
        me = draw(st.sampled_from(peers))  # the requester is already in the swarm
    else:
        me = Peer(b"\xff" * 20, "10.9.9.9", 1, 5, draw(st.sampled_from(_ZONES)))
    return peers, me, draw(st.integers(0, 45)), draw(st.integers(0, 2**32))


@settings(max_examples=300, deadline=None)
@given(_handout_case())
def test_sample_peers_properties(case):
    from tracker.protocol import bucket_peers, peer_tier, sample_peers

    peers, me, numwant, seed = case
    chosen = sample_peers(bucket_peers(peers), me, numwant, random.Random(seed))
    eligible = [p for p in peers if p.addr != me.addr and p.peer_id != me.peer_id]
    assert len(chosen) == min(numwant, len(eligible))
    assert len(set(chosen)) == len(chosen) and set(chosen) <= set(eligible)  # never the requester
    tiers = [peer_tier(p, me.zone) for p in chosen]
    assert tiers == sorted(tiers)  # best tier first
    if chosen:
        # Nothing of a better tier than the worst one handed out was left behind.
        worst = tiers[-1]
        assert all(p in chosen for p in eligible if peer_tier(p, me.zone) < worst)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 30), st.data())
def test_sample_peers_is_random_within_a_tier(size, data):
    from tracker.protocol import bucket_peers, sample_peers

    numwant = data.draw(st.integers(1, size - 1))
    zone = data.draw(st.sampled_from(_ZONES))
    # One tier only (same zone, complete), of which numwant takes only a part.
    buckets = bucket_peers(_peer(i, zone=zone) for i in range(1, size + 1))
    me = _peer(200, zone=zone)
    picks = {frozenset(sample_peers(buckets, me, numwant, random.Random(seed))) for seed in range(32)}
    assert len(picks) > 1


def test_sample_peers_spreads_load_evenly():
    from tracker.protocol import bucket_peers, sample_peers

    buckets = bucket_peers([_peer(i, zone="a") for i in range(1, 31)] + [_peer(i, zone="b") for i in range(31, 41)])
    me = _peer(99, zone="c")  # both zones are "other zones": one tier of 40
    hits: dict[Peer, int] = {}
    for seed in range(2000):
        for p in sample_peers(buckets, me, 4, random.Random(seed)):
            hits[p] = hits.get(p, 0) + 1
    assert len(hits) == 40
    assert 120 < min(hits.values()) and max(hits.values()) < 280  # 200 expected for each


class _HugeBucket:
    """A read-only sequence of a million virtual peers that counts how many it had to build."""

    def __init__(self, n: int, zone: str, left: int, base: int):
        self.n, self.zone, self.left, self.base, self.reads = n, zone, left, base, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Peer:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.reads += 1
        k = self.base + i
        return Peer(k.to_bytes(20, "big"), f"10.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}", 6881, self.left, self.zone)

    def __iter__(self):
        raise AssertionError("the handout iterated a whole bucket")


def test_sample_peers_never_scans_a_swarm():
    from tracker.protocol import sample_peers

    buckets = {("a", True, False): _HugeBucket(10**6, "a", 0, 0),
               ("a", False, False): _HugeBucket(10**6, "a", 5, 10**6),
               ("b", True, False): _HugeBucket(10**6, "b", 0, 2 * 10**6)}
    me = Peer(b"\xff" * 20, "192.168.0.1", 1, 5, "a")
    chosen = sample_peers(buckets, me, 50, random.Random(3))
    assert len(chosen) == 50 and all(p.zone == "a" and p.complete for p in chosen)
    assert [b.reads for b in buckets.values()] == [50, 0, 0]
