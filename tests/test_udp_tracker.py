"""The BEP 15 UDP tracker: byte layouts, property tests, and a live server on loopback.

Unit tests build packets by hand with :mod:`struct` from the field tables of BEP 15 and
BEP 41, so a mistake shared by our encoder and parser cannot hide.  The live tests run
the real aiohttp application with its UDP endpoint on 127.0.0.1 and talk to it over a
real UDP socket and, at the end, with a real libtorrent session.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from urllib.parse import quote_from_bytes

import libtorrent as lt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelcast.config import TrackerConfig
from adapters.origin import FileOrigin
from tracker.announce import Announce, Peer, SwarmCounts, parse_announce
from tracker.app import SWARMS, UDP_TRACKER, make_app
from tracker.bencode import ProtocolError
from tracker.peer_policy import PeerPolicy
from tracker.swarm import SwarmRegistry
from tracker.udp import (ACTION_ANNOUNCE, ACTION_CONNECT, ACTION_ERROR, ACTION_SCRAPE, MAX_ERROR_BYTES,
                         MAX_SCRAPE_HASHES, PROTOCOL_ID, AnnounceRequest, ConnectRequest, ScrapeRequest,
                         UdpProtocolError, encode_announce, encode_announce_request, encode_connect,
                         encode_connect_request, encode_error, encode_scrape, encode_scrape_request, parse_options,
                         parse_reply, parse_request)
from tracker.udp_server import ConnectionIds, UdpTracker, start_udp_tracker

from .helpers import AUTH, TOKEN, build_artifact, wait_until_async

IH = bytes(range(20))
PEER_ID = b"-LT2110-abcdefghijkl"
CLIENT = ("10.0.0.1", 40000)


def announce_packet(cid: int = 7, tid: int = 0x01020304, info_hash: bytes = IH, peer_id: bytes = PEER_ID,
                    downloaded: int = 1, left: int = 2, uploaded: int = 3, event: int = 2, ip: int = 0,
                    key: int = 0xCAFEBABE, numwant: int = -1, port: int = 6881) -> bytes:
    """An announce laid out field by field as the table in BEP 15 gives it."""
    return (struct.pack(">q", cid) + struct.pack(">i", 1) + struct.pack(">i", tid) + info_hash + peer_id
            + struct.pack(">q", downloaded) + struct.pack(">q", left) + struct.pack(">q", uploaded)
            + struct.pack(">i", event) + struct.pack(">I", ip) + struct.pack(">I", key) + struct.pack(">i", numwant)
            + struct.pack(">H", port))


def an(**over) -> Announce:
    fields = dict(info_hash=IH, peer_id=PEER_ID, port=6881, uploaded=0, downloaded=0, left=100, event="started")
    fields.update(over)
    return Announce(**fields)


# -- parsing known layouts -------------------------------------------------------------


def test_connect_request_layout():
    packet = struct.pack(">qii", 0x41727101980, 0, 0x7EADBEEF)
    assert packet == encode_connect_request(0x7EADBEEF)
    assert parse_request(packet) == ConnectRequest(0x7EADBEEF)
    with pytest.raises(UdpProtocolError, match="protocol id") as err:
        parse_request(struct.pack(">qii", 0x41727101981, 0, 99))
    assert err.value.transaction_id == 99


def test_announce_request_layout():
    packet = announce_packet(cid=0x1122334455667788, ip=0x0A000002, numwant=30, event=1)
    assert len(packet) == 98
    req = parse_request(packet)
    assert isinstance(req, AnnounceRequest)
    assert (req.connection_id, req.transaction_id) == (0x1122334455667788, 0x01020304)
    a = req.announce
    assert (a.info_hash, a.peer_id, a.port) == (IH, PEER_ID, 6881)
    assert (a.downloaded, a.left, a.uploaded) == (1, 2, 3)
    assert (a.event, a.ip, a.key, a.numwant, a.compact) == ("completed", "10.0.0.2", "cafebabe", 30, True)
    assert (a.zone, a.origin_seed, req.url_data) == ("default", False, b"")


@pytest.mark.parametrize("code,event", [(0, ""), (1, "completed"), (2, "started"), (3, "stopped")])
def test_event_codes(code, event):
    assert parse_request(announce_packet(event=code)).announce.event == event


def test_bad_event_and_port_zero_are_errors_with_the_transaction_id():
    with pytest.raises(UdpProtocolError, match="unknown event 4") as err:
        parse_request(announce_packet(event=4, tid=5))
    assert err.value.transaction_id == 5
    with pytest.raises(UdpProtocolError, match="port 0"):
        parse_request(announce_packet(port=0))
    with pytest.raises(UdpProtocolError, match="97 bytes") as err:
        parse_request(announce_packet(tid=6)[:97])
    assert err.value.transaction_id == 6


def test_numwant_default_and_clamp():
    assert parse_request(announce_packet(numwant=-1), default_numwant=33).announce.numwant == 33
    assert parse_request(announce_packet(numwant=-7), default_numwant=33).announce.numwant == 33
    assert parse_request(announce_packet(numwant=0)).announce.numwant == 0
    assert parse_request(announce_packet(numwant=10_000), max_numwant=80).announce.numwant == 80


def url(data: bytes) -> bytes:
    """A BEP 41 URLData option: type 2, a length byte, the bytes."""
    return bytes((2, len(data))) + data


def test_bep41_options():
    # NOP, URLData split in two (BEP 41 concatenates them), an unknown option skipped by
    # its length, EndOfOptions, then bytes that must be ignored.
    opts = b"\x01" + url(b"/announce?") + b"\x7f\x03xyz" + url(b"zone=eu-1&role=origin") + b"\x00" + url(b"junk!")
    req = parse_request(announce_packet() + opts)
    assert req.url_data == b"/announce?zone=eu-1&role=origin"
    assert (req.announce.zone, req.announce.origin_seed) == ("eu-1", True)
    # An option running past the end keeps what came before it.
    assert parse_options(announce_packet() + b"\x02\x03/an" + b"\x02\x50/short") == b"/an"
    assert parse_options(announce_packet() + b"\x02") == b""
    # Percent-encoding in the URL data is decoded; the first zone wins.
    req = parse_request(announce_packet() + url(b"/announce?zone=z%2D1&zone=z2"))
    assert req.announce.zone == "z-1"
    with pytest.raises(UdpProtocolError, match="invalid zone") as err:
        parse_request(announce_packet(tid=8) + url(b"/a?zone=bad zone"))
    assert err.value.transaction_id == 8



def _http_and_udp(extensions: bytes):
    """The same announce with the same extension query, over HTTP and over UDP: (result or error text) of each."""
    http_query = (f"info_hash={quote_from_bytes(IH, safe='')}&peer_id={quote_from_bytes(PEER_ID, safe='')}"
                  "&port=6881&left=2&").encode() + extensions
    url_data = b"/announce?" + extensions
    packet = announce_packet() + b"".join(url(url_data[i : i + 255]) for i in range(0, len(url_data), 255))
    answers = []
    for parse, data in ((parse_announce, http_query), (parse_request, packet)):
        try:
            a = parse(data)
        except ProtocolError as exc:
            answers.append(("refused", str(exc)))
        else:
            a = getattr(a, "announce", a)
            answers.append(("accepted", a.zone, a.node, a.origin_seed))
    return answers


@pytest.mark.parametrize("extensions", [
    b"zone=eu-1", b"zone=" + b"z" * 64, b"zone=" + b"z" * 65, b"zone=bad%20zone", b"zone=z%0A", b"zone=-z",
    b"zone=z%FF", b"zone=", b"zone=default", b"zone=eu.1%3Arack_2", b"node=n1", b"node=abc%0A", b"node=" + b"n" * 65,
    b"node=a%2Fb", b"node=node.x_y-z", b"node=%FF", b"node=", b"zone=eu-1&node=n%2F1", b"zone=eu-1&node=n-1&role=origin",
    b"role=origin", b"role=%FF", b"zone=z1&zone=bad%20zone", b"zon%65=z2", b"%FF=1",
])
def test_http_and_udp_accept_and_refuse_the_same_zones_and_nodes(extensions):
    http, udp = _http_and_udp(extensions)
    assert http == udp


@settings(max_examples=300, deadline=None)
@given(zone=st.one_of(st.none(), st.binary(max_size=70)), node=st.one_of(st.none(), st.binary(max_size=70)),
       role=st.one_of(st.none(), st.sampled_from([b"origin", b"seed", b"\xff"])))
def test_http_and_udp_agree_on_any_zone_and_node(zone, node, role):
    parts = [name + b"=" + quote_from_bytes(value, safe="").encode()
             for name, value in ((b"zone", zone), (b"node", node), (b"role", role)) if value is not None]
    http, udp = _http_and_udp(b"&".join(parts))
    assert http == udp


def test_scrape_request_layout():
    hashes = [bytes([i]) * 20 for i in range(3)]
    packet = struct.pack(">qii", 42, 2, 9) + b"".join(hashes)
    assert packet == encode_scrape_request(42, 9, hashes)
    assert parse_request(packet) == ScrapeRequest(42, 9, tuple(hashes))
    with pytest.raises(UdpProtocolError, match="scrape body of 0 bytes"):
        parse_request(struct.pack(">qii", 42, 2, 9))
    with pytest.raises(UdpProtocolError, match="scrape body of 39 bytes"):
        parse_request(packet[:-21])
    assert len(parse_request(encode_scrape_request(1, 2, [IH] * MAX_SCRAPE_HASHES)).info_hashes) == 74
    with pytest.raises(UdpProtocolError, match="1 to 74"):
        parse_request(encode_scrape_request(1, 2, [IH] * (MAX_SCRAPE_HASHES + 1)))


def test_short_and_unknown_packets():
    for n in range(16):
        with pytest.raises(UdpProtocolError) as err:
            parse_request(b"\x00" * n)
        assert err.value.transaction_id is None
    with pytest.raises(UdpProtocolError, match="unknown action 3") as err:
        parse_request(struct.pack(">qii", 1, 3, 77))
    assert err.value.transaction_id == 77


# -- encoding known layouts ------------------------------------------------------------


def test_encode_connect_and_error():
    assert encode_connect(5, 0x0102030405060708) == struct.pack(">iiq", 0, 5, 0x0102030405060708)
    assert encode_error(6, "nope") == struct.pack(">ii", 3, 6) + b"nope"
    assert len(encode_error(6, "x" * 5000)) == 8 + MAX_ERROR_BYTES


def test_encode_announce_ipv4_and_ipv6():
    peers = [Peer(b"a" * 20, "10.1.2.3", 6881, 0), Peer(b"b" * 20, "2001:db8::1", 51413, 5),
             Peer(b"c" * 20, "192.168.0.9", 1, 7)]
    counts = SwarmCounts(complete=4, incomplete=9, downloaded=11)
    v4 = encode_announce(0x11, 30, counts, peers)
    assert v4 == (struct.pack(">iiiii", 1, 0x11, 30, 9, 4) + bytes([10, 1, 2, 3]) + struct.pack(">H", 6881)
                  + bytes([192, 168, 0, 9]) + struct.pack(">H", 1))
    v6 = encode_announce(0x11, 30, counts, peers, ipv6=True)
    assert v6 == (struct.pack(">iiiii", 1, 0x11, 30, 9, 4) + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
                  + struct.pack(">H", 51413))
    assert parse_reply(v6, ipv6=True).peers == (("2001:db8::1", 51413),)


def test_encode_scrape():
    counts = [SwarmCounts(1, 2, 3), SwarmCounts()]
    assert encode_scrape(4, counts) == struct.pack(">ii", 2, 4) + struct.pack(">iii", 1, 3, 2) + bytes(12)


# -- connection ids --------------------------------------------------------------------


def test_connection_ids_are_stateless_and_expire():
    ids = ConnectionIds(b"s" * 32)
    cid = ids.issue("10.0.0.1", 4000, now=1000.0)
    assert 0 <= cid < 2**64
    assert cid == ConnectionIds(b"s" * 32).issue("10.0.0.1", 4000, now=1001.0)  # no state: same secret, same id
    # Valid for at least two minutes (BEP 15), whatever the position in the time bucket.
    for issued in (960.0, 1019.9):
        cid = ids.issue("10.0.0.1", 4000, issued)
        assert ids.valid(cid, "10.0.0.1", 4000, issued + 120.0)
        assert not ids.valid(cid, "10.0.0.1", 4000, issued + 181.0)
    cid = ids.issue("10.0.0.1", 4000, 1000.0)
    assert not ids.valid(cid, "10.0.0.1", 4001, 1000.0)
    assert not ids.valid(cid, "10.0.0.2", 4000, 1000.0)
    assert not ConnectionIds(b"t" * 32).valid(cid, "10.0.0.1", 4000, 1000.0)
    assert not ids.valid(PROTOCOL_ID, "10.0.0.1", 4000, 1000.0)


# -- the request path without sockets --------------------------------------------------


def make_tracker(max_numwant: int = 200, policy: PeerPolicy | None = None) -> UdpTracker:
    swarms = SwarmRegistry(random.Random(1))
    swarms.allow([IH])
    return UdpTracker(swarms, interval=30, default_numwant=50, max_numwant=max_numwant,
                      ids=ConnectionIds(b"k" * 32), policy=policy)


def connect(tracker: UdpTracker, addr, now: float = 100.0) -> int:
    reply = parse_reply(tracker.handle(encode_connect_request(1), addr, now))
    assert (reply.action, reply.transaction_id) == (ACTION_CONNECT, 1)
    return reply.connection_id


def test_tracker_flow_in_memory():
    tracker = make_tracker()
    a_addr, b_addr = ("10.0.0.1", 40000), ("10.0.0.2", 40001)
    cid_a, cid_b = connect(tracker, a_addr), connect(tracker, b_addr)
    first = parse_reply(tracker.handle(encode_announce_request(cid_a, 2, an(port=7001)), a_addr, 101.0))
    assert (first.action, first.transaction_id, first.interval, first.peers) == (ACTION_ANNOUNCE, 2, 30, ())
    second = parse_reply(tracker.handle(encode_announce_request(cid_b, 3, an(port=7002, left=0,
                                                                              peer_id=b"B" * 20)), b_addr, 102.0))
    assert second.peers == (("10.0.0.1", 7001),)
    assert (second.seeders, second.leechers) == (1, 1)
    scrape = parse_reply(tracker.handle(encode_scrape_request(cid_a, 4, [IH, b"\xee" * 20]), a_addr, 103.0))
    assert scrape.files == (SwarmCounts(1, 1, 0), SwarmCounts())  # unknown hash: zeros, positionally
    stopped = parse_reply(tracker.handle(encode_announce_request(cid_a, 5, an(port=7001, event="stopped")),
                                         a_addr, 104.0))
    assert stopped.peers == ()
    assert [p.port for p in tracker.swarms.peers_of(IH)] == [7002]
    assert tracker.stats.internal_errors == 0


def test_tracker_errors_in_memory():
    tracker = make_tracker()
    cid = connect(tracker, CLIENT)
    bad = parse_reply(tracker.handle(encode_announce_request(cid ^ 1, 9, an()), CLIENT, 101.0))
    assert (bad.action, bad.transaction_id) == (ACTION_ERROR, 9) and "connection id" in bad.message
    # An ID issued to one address is refused from another (a spoofer cannot borrow it).
    other = parse_reply(tracker.handle(encode_announce_request(cid, 9, an()), ("10.0.0.1", 40001), 101.0))
    assert other.action == ACTION_ERROR
    expired = parse_reply(tracker.handle(encode_announce_request(cid, 9, an()), CLIENT, 100.0 + 200))
    assert expired.action == ACTION_ERROR and "expired" in expired.message
    unknown = parse_reply(tracker.handle(encode_announce_request(cid, 10, an(info_hash=b"\x01" * 20)), CLIENT, 101.0))
    assert unknown.action == ACTION_ERROR and unknown.message.startswith("unknown info_hash 0101")
    assert not tracker.swarms.is_allowed(b"\x01" * 20)
    assert tracker.handle(b"\x00" * 15, CLIENT, 101.0) is None
    assert tracker.stats.dropped == 1 and tracker.stats.internal_errors == 0


def test_ipv6_clients_get_ipv6_peers_and_mapped_addresses_count_as_ipv4():
    tracker = make_tracker()
    v6a, v6b = ("2001:db8::1", 5000, 0, 0), ("2001:db8::2", 5001, 0, 0)
    mapped = ("::ffff:10.0.0.9", 5002, 0, 0)
    # The 32-bit address field cannot name an IPv6 peer: it is ignored for IPv6 clients.
    # An IPv4 client seen through a dual-stack socket is an IPv4 client.
    for addr, port, ip in ((v6a, 7001, "10.9.9.9"), (mapped, 7003, None)):
        cid = connect(tracker, addr)
        tracker.handle(encode_announce_request(cid, 1, an(port=port, peer_id=bytes([port % 256]) * 20), ip=ip),
                       addr, 101.0)
    assert {p.ip for p in tracker.swarms.peers_of(IH)} == {"2001:db8::1", "10.0.0.9"}
    cid = connect(tracker, v6b)
    reply = parse_reply(tracker.handle(encode_announce_request(cid, 2, an(port=7002)), v6b, 102.0), ipv6=True)
    assert reply.peers == (("2001:db8::1", 7001),)


def test_ip_field_is_honoured_only_from_trusted_proxies():
    # From anyone else the peer is listed where its packet came from (issue #15: the field
    # let one client list any address, or reach another peer's entry).
    tracker = make_tracker()
    cid = connect(tracker, CLIENT)
    tracker.handle(encode_announce_request(cid, 1, an(), ip="10.7.7.7"), CLIENT, 101.0)
    assert [p.addr for p in tracker.swarms.peers_of(IH)] == [("10.0.0.1", 6881)]
    tracker = make_tracker(policy=PeerPolicy(trusted_proxies=["10.0.0.0/24"]))
    cid = connect(tracker, CLIENT)
    tracker.handle(encode_announce_request(cid, 1, an(), ip="10.7.7.7"), CLIENT, 101.0)
    assert [p.addr for p in tracker.swarms.peers_of(IH)] == [("10.7.7.7", 6881)]


def test_role_origin_is_refused_unless_granted():
    tracker = make_tracker()
    cid = connect(tracker, CLIENT)
    reply = parse_reply(tracker.handle(encode_announce_request(cid, 1, an(), url_data=b"/announce?role=origin"),
                                       CLIENT, 101.0))
    assert reply.action == ACTION_ERROR and "role=origin" in reply.message
    assert list(tracker.swarms.peers_of(IH)) == []
    tracker = make_tracker(policy=PeerPolicy(origin_seeds=["10.0.0.1"]))
    cid = connect(tracker, CLIENT)
    tracker.handle(encode_announce_request(cid, 1, an(), url_data=b"/announce?role=origin"), CLIENT, 101.0)
    assert [p.origin_seed for p in tracker.swarms.peers_of(IH)] == [True]


def test_numwant_is_clamped_in_the_answer():
    tracker = make_tracker(max_numwant=3)
    for i in range(6):
        addr = (f"10.0.1.{i}", 6000)
        cid = connect(tracker, addr)
        reply = parse_reply(tracker.handle(encode_announce_request(cid, i, an(peer_id=bytes([i]) * 20), numwant=-1),
                                           addr, 101.0))
    assert len(reply.peers) == 3


# -- properties ------------------------------------------------------------------------

hashes20 = st.binary(min_size=20, max_size=20)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
zones = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,20}\Z")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_protocol_error(data):
    try:
        req = parse_request(data)
    except UdpProtocolError as exc:
        assert (exc.transaction_id is None) == (len(data) < 16)
    else:
        assert isinstance(req, (ConnectRequest, AnnounceRequest, ScrapeRequest))


@st.composite
def structured_packets(draw):
    """Mostly-valid packets: a real header (often with a valid connection id) and a fuzzed body."""
    action = draw(st.integers(0, 4))
    cid = draw(st.sampled_from(["valid", "protocol", "random"]))
    tid = draw(u32)
    body = draw(st.one_of(
        st.binary(max_size=200),
        st.builds(lambda ih, pid, rest, opts: ih + pid + rest + opts, hashes20, hashes20,
                  st.binary(min_size=42, max_size=42), st.binary(max_size=40)),
        st.lists(st.sampled_from([IH, b"\x00" * 20]), max_size=80).map(b"".join),
    ))
    return cid, action, tid, body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300).map(lambda b: ("raw", b)), structured_packets()))
def test_tracker_answers_every_packet_sanely(packet):
    tracker = make_tracker()
    if packet[0] == "raw":
        data = packet[1]
    else:
        how, action, tid, body = packet
        cid = {"valid": tracker.ids.issue(*CLIENT, 100.0), "protocol": PROTOCOL_ID,
               "random": 12345}[how]
        data = struct.pack(">QII", cid, action, tid) + body
    answer = tracker.handle(data, CLIENT, 100.0)
    assert tracker.stats.internal_errors == 0
    if len(data) < 16:
        assert answer is None
        return
    reply = parse_reply(answer)
    assert reply.transaction_id == struct.unpack_from(">I", data, 12)[0]
    assert reply.action in (ACTION_CONNECT, ACTION_ANNOUNCE, ACTION_SCRAPE, ACTION_ERROR)
    assert len(answer) <= 8 + MAX_ERROR_BYTES or reply.action != ACTION_ERROR


@settings(max_examples=300, deadline=None)
@given(ih=hashes20, pid=hashes20, port=st.integers(1, 65535), up=u64, down=u64, left=u64,
       event=st.sampled_from(["", "completed", "started", "stopped"]), numwant=st.integers(0, 200),
       cid=u64, tid=u32, key=u32, ip=st.one_of(st.none(), st.ip_addresses(v=4).map(str)),
       zone=st.one_of(st.none(), zones), origin=st.booleans())
def test_announce_request_round_trip(ih, pid, port, up, down, left, event, numwant, cid, tid, key, ip, zone, origin):
    query = "&".join(([f"zone={zone}"] if zone else []) + (["role=origin"] if origin else []))
    url = f"/announce?{query}".encode() if query else b"/announce"
    a = Announce(info_hash=ih, peer_id=pid, port=port, uploaded=up, downloaded=down, left=left, event=event,
                 numwant=numwant, ip=None if ip == "0.0.0.0" else ip, zone=zone or "default", key=f"{key:08x}",
                 origin_seed=origin)
    req = parse_request(encode_announce_request(cid, tid, a, ip=ip, key=key, url_data=url))
    assert req == AnnounceRequest(cid, tid, a, url)


@given(tid=u32, hashes=st.lists(hashes20, min_size=1, max_size=MAX_SCRAPE_HASHES), cid=u64)
def test_connect_and_scrape_request_round_trip(tid, hashes, cid):
    assert parse_request(encode_connect_request(tid)) == ConnectRequest(tid)
    assert parse_request(encode_scrape_request(cid, tid, hashes)) == ScrapeRequest(cid, tid, tuple(hashes))


counts_st = st.builds(SwarmCounts, u32, u32, u32)


@given(tid=u32, cid=u64, interval=u32, counts=counts_st,
       peers=st.lists(st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)), max_size=30),
       files=st.lists(counts_st, max_size=74), message=st.text(max_size=100))
def test_answers_round_trip(tid, cid, interval, counts, peers, files, message):
    assert parse_reply(encode_connect(tid, cid)).connection_id == cid
    records = [Peer(b"p" * 20, ip, port, 0) for ip, port in peers]
    reply = parse_reply(encode_announce(tid, interval, counts, records))
    assert (reply.interval, reply.seeders, reply.leechers, reply.peers) == (
        interval, counts.complete, counts.incomplete, tuple(peers))
    assert parse_reply(encode_scrape(tid, files)).files == tuple(files)
    assert parse_reply(encode_error(tid, message)).message == message.encode()[:MAX_ERROR_BYTES].decode(
        "utf-8", "replace")


# -- live server -----------------------------------------------------------------------


@pytest.fixture
async def live(aiohttp_client, tmp_path):
    """The real application with its UDP endpoint on 127.0.0.1 and one published artifact."""
    cfg = TrackerConfig(data_dir=tmp_path / "registry", token=TOKEN, peer_ttl_s=60, udp_port=0,
                        udp_host="127.0.0.1")
    client = await aiohttp_client(make_app(cfg))
    art = build_artifact(tmp_path)
    origin = FileOrigin(tmp_path / "origin")
    resp = await client.post("/v1/artifacts", json=art.body(origin), headers=AUTH)
    assert resp.status == 201, await resp.text()
    return client, art


class UdpClient:
    """A client socket on 127.0.0.1 that sends one packet and awaits its answer, with a timeout."""

    def __init__(self, server: tuple[str, int]):
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(("127.0.0.1", 0))
        self.tid = 0

    async def request(self, packet: bytes, timeout: float = 2.0) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(self.sock, packet, self.server)
        data, _ = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 4096), timeout)
        return data

    async def connect(self) -> int:
        self.tid += 1
        reply = parse_reply(await self.request(encode_connect_request(self.tid)))
        assert (reply.action, reply.transaction_id) == (ACTION_CONNECT, self.tid), reply
        return reply.connection_id

    async def announce(self, cid: int, a: Announce, **kw):
        self.tid += 1
        reply = parse_reply(await self.request(encode_announce_request(cid, self.tid, a, **kw)))
        assert reply.transaction_id == self.tid
        return reply

    def close(self) -> None:
        self.sock.close()


async def test_live_connect_announce_scrape(live):
    client, art = live
    swarms = client.app[SWARMS]
    server = ("127.0.0.1", client.app[UDP_TRACKER].port)
    v1 = bytes.fromhex(art.manifest.info_hash.v1)
    v2 = bytes.fromhex(art.manifest.info_hash.v2)[:20]
    a, b = UdpClient(server), UdpClient(server)
    try:
        cid_a, cid_b = await a.connect(), await b.connect()
        zone_z1 = b"/announce?zone=z1"  # libtorrent sends its URL's path and query in every announce
        ra = await a.announce(cid_a, an(info_hash=v1, port=7001, left=0, peer_id=b"A" * 20), url_data=zone_z1)
        assert ra.action == ACTION_ANNOUNCE and ra.interval == 30 and ra.peers == ()
        # The other key of the hybrid torrent names the same swarm.
        rb = await b.announce(cid_b, an(info_hash=v2, port=7002, peer_id=b"B" * 20))
        assert rb.peers == (("127.0.0.1", 7001),) and (rb.seeders, rb.leechers) == (1, 1)
        ra = await a.announce(cid_a, an(info_hash=v1, port=7001, left=0, peer_id=b"A" * 20, event=""),
                              url_data=zone_z1)
        assert ra.peers == (("127.0.0.1", 7002),)
        assert {p.zone for p in swarms.peers_of(v1)} == {"z1", "default"}

        a.tid += 1
        scrape = parse_reply(await a.request(encode_scrape_request(cid_a, a.tid, [v1, v2, b"\x09" * 20])))
        assert scrape.files == (SwarmCounts(1, 1, 0), SwarmCounts(1, 1, 0), SwarmCounts())

        rb = await b.announce(cid_b, an(info_hash=v1, port=7002, peer_id=b"B" * 20, event="stopped"))
        assert rb.action == ACTION_ANNOUNCE and rb.peers == ()
        assert [p.port for p in swarms.peers_of(v1)] == [7001]

        bad = await b.announce(cid_a, an(info_hash=v1))  # a's id, b's address
        assert bad.action == ACTION_ERROR and "connection id" in bad.message
        unknown = await a.announce(cid_a, an(info_hash=b"\x09" * 20))
        assert unknown.action == ACTION_ERROR and "unknown info_hash" in unknown.message
        assert not swarms.is_allowed(b"\x09" * 20)
    finally:
        a.close()
        b.close()


async def test_live_fuzz_then_still_serves(live):
    client, art = live
    endpoint = client.app[UDP_TRACKER]
    server = ("127.0.0.1", endpoint.port)
    v1 = bytes.fromhex(art.manifest.info_hash.v1)
    loop = asyncio.get_running_loop()
    fuzzer = UdpClient(server)
    rng = random.Random(15)
    try:
        cid = await fuzzer.connect()
        answers = 0
        for i in range(2000):
            kind = i % 4
            if kind == 0:
                packet = rng.randbytes(rng.randrange(0, 200))
            elif kind == 1:  # a valid header, so the body parser is what gets fuzzed
                packet = struct.pack(">QII", cid, rng.randrange(0, 4), i) + rng.randbytes(rng.randrange(0, 200))
            elif kind == 2:  # a real announce with fields and options mutated
                packet = bytearray(encode_announce_request(cid, i, an(info_hash=v1, port=1 + i),
                                                           url_data=b"/announce?zone=z"))
                for _ in range(rng.randrange(1, 6)):
                    packet[rng.randrange(16, len(packet))] = rng.randrange(256)
                packet = bytes(packet) + rng.randbytes(rng.randrange(0, 8))
            else:
                packet = struct.pack(">QII", PROTOCOL_ID, 0, i) + rng.randbytes(rng.randrange(0, 4))
            await loop.sock_sendto(fuzzer.sock, packet, server)
            await asyncio.sleep(0)  # a yield, not a timed wait: the server (same loop) reads it
            while True:
                try:
                    data = fuzzer.sock.recv(4096)
                except BlockingIOError:
                    break
                reply = parse_reply(data)
                assert reply.action in (ACTION_CONNECT, ACTION_ANNOUNCE, ACTION_SCRAPE, ACTION_ERROR)
                answers += 1
        stats = endpoint.tracker.stats
        assert stats.internal_errors == 0, stats
        assert stats.packets > 1000 and answers > 500, (stats, answers)
    finally:
        fuzzer.close()
    checker = UdpClient(server)
    try:
        cid = await checker.connect()
        reply = await checker.announce(cid, an(info_hash=v1, port=9999, peer_id=b"C" * 20))
        assert reply.action == ACTION_ANNOUNCE, reply
        assert ("127.0.0.1", 9999) in {p.addr for p in client.app[SWARMS].peers_of(v1)}
    finally:
        checker.close()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")
async def test_live_ipv6_answers_carry_18_byte_peers():
    tracker = make_tracker()
    endpoint = await start_udp_tracker(tracker, "::1", 0)
    loop = asyncio.get_running_loop()
    socks = []
    try:
        replies = []
        for port in (7001, 7002):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setblocking(False)
            sock.bind(("::1", 0))

            async def ask(packet: bytes) -> bytes:
                await loop.sock_sendto(sock, packet, ("::1", endpoint.port))
                return (await asyncio.wait_for(loop.sock_recvfrom(sock, 4096), 2.0))[0]

            cid = parse_reply(await ask(encode_connect_request(1))).connection_id
            packet = encode_announce_request(cid, 2, an(port=port, peer_id=bytes([port % 256]) * 20))
            replies.append(parse_reply(await ask(packet), ipv6=True))
        assert replies[1].peers == (("::1", 7001),)
        assert tracker.stats.internal_errors == 0
    finally:
        for sock in socks:
            sock.close()
        endpoint.close()


async def test_libtorrent_announces_over_udp(live):
    """A real libtorrent client announces to udp://127.0.0.1:PORT and leaves on removal."""
    client, art = live
    swarms = client.app[SWARMS]
    port = client.app[UDP_TRACKER].port
    v1 = bytes.fromhex(art.manifest.info_hash.v1)
    ses = lt.session({
        "listen_interfaces": "127.0.0.1:0", "enable_dht": False, "enable_lsd": False, "enable_upnp": False,
        "enable_natpmp": False, "enable_outgoing_utp": False, "enable_incoming_utp": False,
        "stop_tracker_timeout": 1, "alert_mask": lt.alert_category.tracker | lt.alert_category.error,
    })
    holder = [ses]
    try:
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(art.torrent)
        params.trackers = [f"udp://127.0.0.1:{port}/announce?zone=lt-zone"]
        params.save_path = str(art.root)  # the files are there: it announces as a seed
        handle = ses.add_torrent(params)
        listen = ses.listen_port()
        messages: list[str] = []

        async def wait_for(cond, what: str, timeout: float = 10.0) -> None:
            def check():
                if cond():
                    return True
                messages.extend(a.message() for a in ses.pop_alerts())
                return False

            # libtorrent runs in its own threads; between checks the loop keeps serving the tracker.
            await wait_until_async(check, timeout, 0.05, lambda: f"libtorrent: {what}; alerts: {messages[-10:]}")

        def ours():
            return [p for p in swarms.peers_of(v1) if p.port == listen]

        await wait_for(lambda: ours() and ours()[0].left == 0, "no seed announce reached the tracker")
        assert ours()[0].zone == "lt-zone" and ours()[0].ip == "127.0.0.1"
        assert client.app[UDP_TRACKER].tracker.stats.announces >= 1
        ses.remove_torrent(handle)
        await wait_for(lambda: not ours(), "the stopped announce did not remove the peer")
    finally:
        del ses
        # The session's destructor may wait for tracker answers from this very loop.
        await asyncio.to_thread(holder.clear)
