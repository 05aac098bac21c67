"""Unit tests of the sans-I/O tracker protocol and the in-memory swarm state (no server)."""

from __future__ import annotations

import random
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.announce import (Announce, Peer, SwarmCounts, decode_compact_peers, encode_announce, encode_failure,
                              encode_scrape, pack_addr, parse_announce, parse_scrape)
from tracker.bencode import ProtocolError, bdecode, bencode, set_announce, torrent_info_bytes
from tracker.handout import choose_peers
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


def test_swarm_counters_and_stopped_removes_peer(make_swarms):
    ih = b"\x11" * 20
    reg = make_swarms(random.Random(0))
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


def test_swarm_expiry_removes_silent_peer(make_swarms):
    ih = b"\x22" * 20
    reg = make_swarms(random.Random(0))
    reg.allow([ih])
    reg.announce(_ann(ih, 1), "10.0.0.1", now=0)
    reg.announce(_ann(ih, 2), "10.0.0.2", now=5)
    reg.announce(_ann(ih, 1), "10.0.0.1", now=8)  # peer 1 re-announces: it is fresh again
    assert reg.expire(now=12, ttl_s=5) == 1
    assert [p.ip for p in reg.peers_of(ih)] == ["10.0.0.1"]
    assert reg.scrape([ih])[ih].incomplete == 1
    assert reg.expire(now=100, ttl_s=5) == 1
    assert reg.peers_of(ih) == [] and reg.active_swarms() == 0


def test_swarm_unknown_hash_and_hybrid_aliases(make_swarms):
    v1, v2 = b"\x33" * 20, b"\x44" * 20
    reg = make_swarms(random.Random(0))
    reg.allow([v1, v2])
    reg.allow([v1, v2])  # a re-publish keeps the same swarm
    reg.announce(_ann(v1, 1), "10.0.0.1", now=0)
    res = reg.announce(_ann(v2, 2), "10.0.0.2", now=0)
    # Both keys of a hybrid torrent are one swarm: a v2 announcer sees the v1 announcer.
    assert [p.ip for p in res.peers] == ["10.0.0.1"]
    assert reg.swarm_totals()[0] == 1
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
    from tracker.handout import bucket_peers, peer_tier, sample_peers

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
    from tracker.handout import bucket_peers, sample_peers

    numwant = data.draw(st.integers(1, size - 1))
    zone = data.draw(st.sampled_from(_ZONES))
    # One tier only (same zone, complete), of which numwant takes only a part.
    buckets = bucket_peers(_peer(i, zone=zone) for i in range(1, size + 1))
    me = _peer(200, zone=zone)
    picks = {frozenset(sample_peers(buckets, me, numwant, random.Random(seed))) for seed in range(32)}
    assert len(picks) > 1


def test_sample_peers_spreads_load_evenly():
    from tracker.handout import bucket_peers, sample_peers

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
    from tracker.handout import sample_peers

    buckets = {("a", True, False): _HugeBucket(10**6, "a", 0, 0),
               ("a", False, False): _HugeBucket(10**6, "a", 5, 10**6),
               ("b", True, False): _HugeBucket(10**6, "b", 0, 2 * 10**6)}
    me = Peer(b"\xff" * 20, "192.168.0.1", 1, 5, "a")
    chosen = sample_peers(buckets, me, 50, random.Random(3))
    assert len(chosen) == 50 and all(p.zone == "a" and p.complete for p in chosen)
    assert [b.reads for b in buckets.values()] == [50, 0, 0]


@settings(max_examples=200, deadline=None)
@given(_handout_case())
def test_sample_peers_sole_is_the_same_choice(case):
    """``sole`` (exclusion by identity, as the swarm vouches) changes nothing where its promise holds."""
    from tracker.handout import bucket_peers, sample_peers

    peers, me, numwant, seed = case
    if not any(p is me for p in peers):
        me = Peer(b"\xfe" * 20, "10.9.9.8", 2, 5, me.zone)  # not in the swarm: no peer shares its address or id
    buckets = bucket_peers(peers)
    assert (sample_peers(buckets, me, numwant, random.Random(seed), sole=True)
            == sample_peers(buckets, me, numwant, random.Random(seed)))


@settings(max_examples=200, deadline=None)
@given(_handout_case())
def test_single_zone_gateways_change_nothing(case):
    """With one zone of ordinary peers, gateways limit nothing: the swarm skips building them."""
    from tracker.handout import bucket_peers, sample_peers

    peers, me, numwant, seed = case
    peers = [p if p.origin_seed else Peer(p.peer_id, p.ip, p.port, p.left, "a") for p in peers]
    if me.origin_seed or any(p.peer_id == me.peer_id for p in peers):
        me = next(p for p in peers if p.peer_id == me.peer_id) if not me.origin_seed else me
    else:
        me = Peer(me.peer_id, me.ip, me.port, me.left, "a")
        peers.append(me)  # the tracker adds the requester before choosing
    buckets = bucket_peers(peers)
    gateways = {"a": [p for p in peers if not p.origin_seed][:2]}
    assert (sample_peers(buckets, me, numwant, random.Random(seed), gateways)
            == sample_peers(buckets, me, numwant, random.Random(seed)))


def _zone_ann(ih: bytes, n: int, zone: str, *, event: str = "", numwant: int = 200) -> Announce:
    return Announce(ih, bytes([n]) * 20, 6000 + n, 0, 0, 0, event, True, numwant, None, zone, None)


def test_zone_gateways_bound_cross_zone_handout(make_swarms):
    ih = b"\x66" * 20
    reg = make_swarms(random.Random(0), zone_gateways=2)
    reg.allow([ih])
    zone_of = {**{n: "a" for n in range(1, 6)}, **{n: "b" for n in range(11, 16)}}
    for n, zone in zone_of.items():
        reg.announce(_zone_ann(ih, n, zone, event="started", numwant=0), f"10.0.0.{n}", now=0)

    def handout(n: int) -> set[int]:
        res = reg.announce(_zone_ann(ih, n, zone_of[n]), f"10.0.0.{n}", now=1)
        return {p.port - 6000 for p in res.peers}

    # Each zone's first two peers are its gateways: only they get other zones, and only their gateways.
    assert handout(3) == {1, 2, 4, 5}
    assert handout(1) == {2, 3, 4, 5, 11, 12}
    assert handout(14) == {11, 12, 13, 15}
    # A peer alone in its zone gets every other zone's peers; it is its zone's gateway.
    zone_of[21] = "c"
    assert handout(21) == set(range(1, 6)) | set(range(11, 16))
    assert handout(12) == {11, 13, 14, 15, 1, 2, 21}
    # A gateway that leaves hands its role to another peer of its zone.
    reg.announce(_zone_ann(ih, 1, "a", event="stopped"), "10.0.0.1", now=2)
    del zone_of[1]
    seeing_b = [n for n in (2, 3, 4, 5) if 11 in handout(n)]
    assert len(seeing_b) == 2 and 2 in seeing_b
    # A gateway that turns into the origin's seed hands its role on: the origin's seed is never one.
    origin = Announce(ih, bytes([2]) * 20, 6002, 0, 0, 0, "", True, 0, None, "a", None, False, True, None)
    reg.announce(origin, "10.0.0.2", now=3)
    # (Seen through the handout, on either store: two of the others are zone a's gateways now.)
    assert len([n for n in (3, 4, 5) if 11 in handout(n)]) == 2


def test_strict_zones_hand_out_only_the_own_zone_while_it_has_peers(make_swarms):
    """zone_gateways=0 (the tracker's default): no node links across zones; pieces cross
    through the origin's relays instead (tracker/firstcopy.py)."""
    ih = b"\x67" * 20
    reg = make_swarms(random.Random(0), zone_gateways=0)
    reg.allow([ih])
    zone_of = {**{n: "a" for n in range(1, 5)}, **{n: "b" for n in range(11, 15)}}

    def node_ann(n: int, zone: str, **kw) -> Announce:
        return _zone_ann(ih, n, zone, **kw)._replace(node=f"node{n}")  # a node daemon names itself

    for n, zone in zone_of.items():
        reg.announce(node_ann(n, zone, event="started", numwant=0), f"10.0.0.{n}", now=0)

    def handout(n: int) -> set[int]:
        res = reg.announce(node_ann(n, zone_of[n]), f"10.0.0.{n}", now=1)
        return {p.port - 6000 for p in res.peers}

    assert handout(1) == {2, 3, 4}
    assert handout(12) == {11, 13, 14}
    # Even alone in its zone: a link made then would stay open once its zone fills up.
    zone_of[21] = "c"
    assert handout(21) == set()
    assert handout(3) == {1, 2, 4}
    # The origin's seed is for everyone.
    origin = Announce(ih, bytes([30]) * 20, 6030, 0, 0, 0, "", True, 0, None, "b", None, False, True, None)
    reg.announce(origin, "10.0.0.30", now=1)
    assert handout(21) == {30} and handout(2) == {1, 3, 4, 30}
    # A plain BitTorrent client (no node id) gets every zone, its own first.
    res = reg.announce(_zone_ann(ih, 40, "b"), "10.0.0.40", now=1)
    assert {p.port - 6000 for p in res.peers} == set(zone_of) | {30}
    assert [p.zone for p in res.peers][:4] == ["b"] * 4
    # Without a limit (-1) every peer sees every zone, its own first.
    # (Another torrent: a shared store, Redis, holds the first one's swarm for every store object.)
    ih2 = b"\x68" * 20
    reg2 = make_swarms(random.Random(0), zone_gateways=-1)
    reg2.allow([ih2])
    for n, zone in zone_of.items():
        reg2.announce(_zone_ann(ih2, n, zone, event="started", numwant=0), f"10.0.0.{n}", now=0)
    res = reg2.announce(_zone_ann(ih2, 1, "a"), "10.0.0.1", now=1)
    assert [p.zone for p in res.peers][:3] == ["a"] * 3 and len(res.peers) == len(zone_of) - 1


def _check_swarm_invariants(reg: SwarmRegistry) -> None:
    """The indexes of every swarm agree with its entries (what the O(1) bookkeeping must keep true)."""
    from tracker.handout import bucket_key

    live = set()
    for swarm in reg.swarms():
        entries = list(swarm.peers.values())
        live.update(map(id, entries))
        assert sum(len(b) for b in swarm.buckets.values()) == len(entries) and all(swarm.buckets.values())
        for key, entry in swarm.peers.items():
            assert entry.swarm is swarm and entry.peer.packed == key
            assert swarm.buckets[bucket_key(entry.peer)][entry.slot] is entry.peer
        assert swarm.complete == sum(e.peer.complete for e in entries)
        assert swarm.incomplete == len(entries) - swarm.complete
        ids: dict[bytes, int] = {}
        for e in entries:
            ids[e.peer.peer_id] = ids.get(e.peer.peer_id, 0) + 1
        assert swarm.ids == ids
        zones = {e.peer.zone for e in entries if not e.peer.origin_seed}
        # Every zone of ordinary peers has a gateway, no other zone does (none at all without the limit).
        assert set(swarm.gateways) == (zones if swarm.zone_gateways > 0 else set())
        for zone, gw in swarm.gateways.items():
            assert 1 <= len(gw) <= swarm.zone_gateways and len(set(gw)) == len(gw)
            assert all(swarm.peers[k].peer.zone == zone and not swarm.peers[k].peer.origin_seed for k in gw)
    assert all(id(e) in live for e in reg._last_seen)
    for node_id, node in reg._nodes.items():
        assert all(id(e) in live and e.node == node_id for e in node.entries)
    for swarm in reg.swarms():
        for e in swarm.peers.values():
            # An entry outside the last-seen index must be kept by a live node, or it would never expire.
            assert e in reg._last_seen or (e.node is not None and reg.is_live(e.node))
            if e.node is not None:
                assert e in reg._nodes[e.node].entries


_op = st.one_of(
    st.tuples(st.just("announce"), st.integers(0, 1), st.integers(1, 6), st.integers(1, 3), st.sampled_from("ab"),
              st.sampled_from((0, 5)), st.booleans(), st.sampled_from(("", "started", "completed", "stopped")),
              st.sampled_from((None, "n1", "n2"))),
    st.tuples(st.just("heartbeat"), st.sampled_from(("n1", "n2"))),
    st.tuples(st.just("leave"), st.sampled_from(("n1", "n2"))),
    st.tuples(st.just("expire")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=60), st.integers(-1, 2))
def test_swarm_indexes_stay_consistent(ops, gateways):
    """Random announces (re-announces in place, moves between buckets and zones, new peer ids
    on an old address), heartbeats, leaves and expiry keep every index in agreement."""
    hashes = [b"\x71" * 20, b"\x72" * 20]
    reg = SwarmRegistry(random.Random(0), zone_gateways=gateways)
    for ih in hashes:
        reg.allow([ih])
    now = 0.0
    for op in ops:
        now += 1.0
        if op[0] == "announce":
            _, swarm_i, host, pid, zone, left, origin, event, node = op
            a = Announce(hashes[swarm_i], bytes([pid]) * 20, 6000 + host % 2, 0, 0, left, event, True, 50, None, zone,
                         None, False, origin, node)
            res = reg.announce(a, f"10.0.0.{host}", now)
            assert all(p.packed != pack_addr(f"10.0.0.{host}", 6000 + host % 2) for p in res.peers)
            assert all(p.peer_id != a.peer_id for p in res.peers)
        elif op[0] == "heartbeat":
            reg.heartbeat(op[1], now, 3.0)
        elif op[0] == "leave":
            reg.leave(op[1])
        else:
            reg.expire(now, 5.0)
        _check_swarm_invariants(reg)
    reg.expire(now + 100, 5.0)
    _check_swarm_invariants(reg)
    assert all(not s.peers for s in reg.swarms())
