"""BEP 15 UDP tracker packets without sockets: parsing and encoding, both sides.

:func:`parse_header` and :func:`parse_request` turn request bytes into records, the
``encode_*`` functions turn records into bytes; :func:`parse_reply` and the
``encode_*_request`` functions are the client's side, for tests and benchmarks.  The
server that answers them is :mod:`tracker.udp_server`.

The same :class:`~tracker.announce.Announce` record as the HTTP tracker is used, built and
checked by the same :func:`~tracker.announce.make_announce`, so both paths accept the same
announces and share one swarm registry and one peer handout policy.  modelcast's
``zone=``, ``node=`` and ``role=origin`` extensions travel in the BEP 41 URL data, which
is how libtorrent sends the path and query of a ``udp://host:port/announce?zone=eu-1`` URL.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Sequence

from .announce import Announce, Peer, ProtocolError, SwarmCounts, decode_compact_peers, make_announce, query_params

PROTOCOL_ID = 0x41727101980
ACTION_CONNECT = 0
ACTION_ANNOUNCE = 1
ACTION_SCRAPE = 2
ACTION_ERROR = 3
# BEP 15 event codes, mapped to the event names of the HTTP protocol.
EVENTS = {0: "", 1: "completed", 2: "started", 3: "stopped"}
EVENT_CODES = {name: code for code, name in EVENTS.items()}
# "Up to about 74 torrents can be scraped at once" (BEP 15): the request stays in one
# Ethernet frame.
MAX_SCRAPE_HASHES = 74
# Longer error texts are cut: an error answer must stay small, since it may go to a
# spoofed source address.
MAX_ERROR_BYTES = 200
# The largest valid request is a full scrape (16 + 74 * 20 = 1496 bytes) or an announce
# with BEP 41 options; anything longer is truncated by the kernel and then refused.
MAX_DATAGRAM = 2048

_HEADER = struct.Struct(">QII")  # connection_id (or protocol id), action, transaction_id
_ANNOUNCE = struct.Struct(">QII20s20sQQQIIIiH")  # 98 bytes
_CONNECT_REPLY = struct.Struct(">IIQ")
_ANNOUNCE_REPLY = struct.Struct(">IIIII")
_SCRAPE_ITEM = struct.Struct(">III")
_ERROR_HEAD = struct.Struct(">II")

# BEP 41 option types; every other type is followed by a one-byte length.
_OPT_END = 0
_OPT_NOP = 1
_OPT_URL_DATA = 2


class UdpProtocolError(ProtocolError):
    """A UDP tracker packet is malformed; answered with an error action when it has a transaction ID.

    ``transaction_id`` is None for a packet too short to carry one: such a packet is
    dropped without an answer.
    """

    code = "udp_tracker_protocol"

    def __init__(self, message: str, transaction_id: int | None = None):
        super().__init__(message)
        self.transaction_id = transaction_id


# ---------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class ConnectRequest:
    """A BEP 15 connect request."""

    transaction_id: int


@dataclass(frozen=True)
class AnnounceRequest:
    """A BEP 15 announce, carrying the same :class:`Announce` record as the HTTP path.

    ``announce.ip`` is the request's IPv4 address field (None when 0); ``url_data`` is
    the BEP 41 URL data (path and query of the tracker URL), empty when absent.
    """

    connection_id: int
    transaction_id: int
    announce: Announce
    url_data: bytes = b""


@dataclass(frozen=True)
class ScrapeRequest:
    """A BEP 15 scrape of up to :data:`MAX_SCRAPE_HASHES` info-hashes, in request order."""

    connection_id: int
    transaction_id: int
    info_hashes: tuple[bytes, ...]


Request = ConnectRequest | AnnounceRequest | ScrapeRequest


# ---------------------------------------------------------------------------------------
# Parsing


def parse_header(data: bytes) -> tuple[int, int, int]:
    """Return ``(connection_id, action, transaction_id)`` of any request packet.

    Raises :class:`UdpProtocolError` without a transaction ID for a packet shorter than
    the 16 bytes every request starts with.
    """
    if len(data) < _HEADER.size:
        raise UdpProtocolError(f"packet of {len(data)} bytes is shorter than the 16-byte BEP 15 header")
    return _HEADER.unpack_from(data)


def parse_options(data: bytes, offset: int = _ANNOUNCE.size) -> bytes:
    """Return the BEP 41 URL data in the options after an announce, concatenated.

    Parsing stops at EndOfOptions and at an option that runs past the end of the packet
    (what came before it is kept): options are hints, and a client that pads or
    truncates them must still be served.  Unknown option types are skipped by length.
    """
    url = bytearray()
    end = len(data)
    i = offset
    while i < end:
        kind = data[i]
        if kind == _OPT_END:
            break
        if kind == _OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            break
        length = data[i + 1]
        start = i + 2
        if start + length > end:
            break
        if kind == _OPT_URL_DATA:
            url += data[start : start + length]
        i = start + length
    return bytes(url)


def _extensions(url_data: bytes) -> dict[str, bytes]:
    """The query parameters of BEP 41 URL data (``/announce?zone=eu-1``), as the HTTP path reads its query."""
    _, sep, query = url_data.partition(b"?")
    return query_params(query) if sep else {}


def parse_request(data: bytes, *, default_numwant: int = 50, max_numwant: int = 200) -> Request:
    """Parse one request packet into a :class:`ConnectRequest`, :class:`AnnounceRequest` or :class:`ScrapeRequest`.

    An announce's fields are checked by :func:`~tracker.announce.make_announce`, as on the
    HTTP path: ``numwant`` below zero (BEP 15 uses -1) means ``default_numwant``, either
    is clamped to ``max_numwant``, and the URL data's ``zone=``, ``node=`` and
    ``role=`` are read as an HTTP query's.  Raises :class:`UdpProtocolError` for anything
    malformed, with the transaction ID set whenever the packet has one.
    """
    connection_id, action, tid = parse_header(data)
    if action == ACTION_CONNECT:
        if connection_id != PROTOCOL_ID:
            raise UdpProtocolError("connect without the BEP 15 protocol id", tid)
        return ConnectRequest(tid)
    if action == ACTION_ANNOUNCE:
        if len(data) < _ANNOUNCE.size:
            raise UdpProtocolError(f"announce of {len(data)} bytes; BEP 15 needs 98", tid)
        (_, _, _, info_hash, peer_id, downloaded, left, uploaded, event_code, ip, key, numwant,
         port) = _ANNOUNCE.unpack_from(data)
        event = EVENTS.get(event_code)
        if event is None:
            raise UdpProtocolError(f"unknown event {event_code}; expected 0 none, 1 completed, 2 started, 3 stopped",
                                   tid)
        if port == 0:
            raise UdpProtocolError("announce with port 0; send the port the client listens on", tid)
        url_data = parse_options(data) if len(data) > _ANNOUNCE.size else b""
        try:
            announce = make_announce(info_hash, peer_id, port, uploaded, downloaded, left, event, True, numwant,
                                     socket.inet_ntoa(data[84:88]) if ip else None, f"{key:08x}", False,
                                     _extensions(url_data) if url_data else {}, default_numwant, max_numwant)
        except ProtocolError as exc:
            raise UdpProtocolError(str(exc), tid) from None
        return AnnounceRequest(connection_id, tid, announce, url_data)
    if action == ACTION_SCRAPE:
        body = len(data) - _HEADER.size
        count = body // 20
        if body % 20 or not 1 <= count <= MAX_SCRAPE_HASHES:
            raise UdpProtocolError(
                f"scrape body of {body} bytes; expected 1 to {MAX_SCRAPE_HASHES} info-hashes of 20 bytes", tid)
        hashes = tuple(data[i : i + 20] for i in range(_HEADER.size, len(data), 20))
        return ScrapeRequest(connection_id, tid, hashes)
    raise UdpProtocolError(f"unknown action {action}", tid)


# ---------------------------------------------------------------------------------------
# Encoding


def encode_connect(transaction_id: int, connection_id: int) -> bytes:
    """A connect answer (action 0) handing out ``connection_id``."""
    return _CONNECT_REPLY.pack(ACTION_CONNECT, transaction_id, connection_id)


def pack_peers(peers: Sequence[Peer], ipv6: bool) -> bytes:
    """Pack peers of one address family: 6 bytes each for IPv4, 18 for IPv6 (BEP 15).

    Peers of the other family are left out: an IPv4 answer has no room for IPv6
    addresses, and a client reached over IPv6 asked for IPv6 peers.
    """
    size = 18 if ipv6 else 6
    out = b"".join([p.packed for p in peers])
    if len(out) == size * len(peers):
        return out
    return b"".join([p.packed for p in peers if len(p.packed) == size])


def encode_announce(transaction_id: int, interval: int, counts: SwarmCounts, peers: Sequence[Peer],
                    *, ipv6: bool = False) -> bytes:
    """An announce answer (action 1): interval, leechers, seeders and compact peers."""
    head = _ANNOUNCE_REPLY.pack(ACTION_ANNOUNCE, transaction_id, interval, counts.incomplete, counts.complete)
    return head + pack_peers(peers, ipv6) if peers else head


def encode_scrape(transaction_id: int, counts: Sequence[SwarmCounts]) -> bytes:
    """A scrape answer (action 2): seeders, completed and leechers per info-hash, in request order."""
    return _ERROR_HEAD.pack(ACTION_SCRAPE, transaction_id) + b"".join(
        _SCRAPE_ITEM.pack(c.complete, c.downloaded, c.incomplete) for c in counts)


def encode_error(transaction_id: int, message: str) -> bytes:
    """An error answer (action 3); clients show ``message`` as the tracker's error."""
    text = message.encode("utf-8")[:MAX_ERROR_BYTES]
    return _ERROR_HEAD.pack(ACTION_ERROR, transaction_id) + text


def encode_connect_request(transaction_id: int) -> bytes:
    """A client's connect request (for tests and benchmarks)."""
    return _HEADER.pack(PROTOCOL_ID, ACTION_CONNECT, transaction_id)


def encode_announce_request(connection_id: int, transaction_id: int, a: Announce, *, ip: str | None = None,
                            key: int = 0, numwant: int | None = None, url_data: bytes = b"") -> bytes:
    """A client's announce request for ``a`` (for tests and benchmarks).

    ``url_data`` goes into BEP 41 URLData options of at most 255 bytes each.
    """
    packet = _ANNOUNCE.pack(
        connection_id, ACTION_ANNOUNCE, transaction_id, a.info_hash, a.peer_id, a.downloaded, a.left, a.uploaded,
        EVENT_CODES[a.event], struct.unpack(">I", socket.inet_aton(ip))[0] if ip else 0, key,
        a.numwant if numwant is None else numwant, a.port,
    )
    if not url_data:
        return packet
    options = [packet]
    for i in range(0, len(url_data), 255):
        chunk = url_data[i : i + 255]
        options.append(bytes((_OPT_URL_DATA, len(chunk))) + chunk)
    options.append(bytes((_OPT_END,)))
    return b"".join(options)


def encode_scrape_request(connection_id: int, transaction_id: int, info_hashes: Sequence[bytes]) -> bytes:
    """A client's scrape request (for tests and benchmarks)."""
    return _HEADER.pack(connection_id, ACTION_SCRAPE, transaction_id) + b"".join(info_hashes)


@dataclass(frozen=True)
class Reply:
    """A tracker answer as a client reads it; only the fields of its ``action`` are set."""

    action: int
    transaction_id: int
    connection_id: int = 0
    interval: int = 0
    leechers: int = 0
    seeders: int = 0
    peers: tuple[tuple[str, int], ...] = ()
    files: tuple[SwarmCounts, ...] = ()
    message: str = ""


def parse_reply(data: bytes, *, ipv6: bool = False) -> Reply:
    """Parse a tracker answer (the client side, for tests and benchmarks).

    ``ipv6`` says the announce went over IPv6, so peers are 18 bytes each (BEP 15).
    """
    if len(data) < _ERROR_HEAD.size:
        raise UdpProtocolError(f"answer of {len(data)} bytes is shorter than 8")
    action, tid = _ERROR_HEAD.unpack_from(data)
    if action == ACTION_CONNECT and len(data) >= _CONNECT_REPLY.size:
        return Reply(action, tid, connection_id=_CONNECT_REPLY.unpack_from(data)[2])
    if action == ACTION_ANNOUNCE and len(data) >= _ANNOUNCE_REPLY.size:
        _, _, interval, leechers, seeders = _ANNOUNCE_REPLY.unpack_from(data)
        body = data[_ANNOUNCE_REPLY.size:]
        peers = decode_compact_peers(b"", body) if ipv6 else decode_compact_peers(body)
        return Reply(action, tid, interval=interval, leechers=leechers, seeders=seeders, peers=tuple(peers))
    if action == ACTION_SCRAPE and (len(data) - _ERROR_HEAD.size) % _SCRAPE_ITEM.size == 0:
        files = tuple(SwarmCounts(complete=s, downloaded=d, incomplete=l)
                      for s, d, l in _SCRAPE_ITEM.iter_unpack(data[_ERROR_HEAD.size:]))
        return Reply(action, tid, files=files)
    if action == ACTION_ERROR:
        return Reply(action, tid, message=data[_ERROR_HEAD.size:].decode("utf-8", "replace"))
    raise UdpProtocolError(f"malformed answer: action {action}, {len(data)} bytes", tid)
