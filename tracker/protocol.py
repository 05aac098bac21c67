"""BitTorrent tracker protocol without sockets: parse requests, encode answers, choose peers.

Everything here takes bytes or records and returns results (the sans-I/O style of h11),
so the HTTP handlers in :mod:`tracker.server` stay thin and this module is tested with
plain unit tests.  Covered: BEP 3 announce, BEP 23 compact peers, BEP 7 ``peers6``,
BEP 48 scrape and the bencoded ``failure reason``.  Extensions: an announce may carry
``zone=`` (the node's zone, used by the peer handout policy), ``role=origin`` (the
origin's own seed, handed out last) and ``node=`` (the node daemon that owns the entry, whose
one heartbeat keeps all its entries alive; see :mod:`tracker.swarm`).
"""

from __future__ import annotations

import functools
import ipaddress
import random
import re
import socket
import struct
from typing import Any, Iterable, Mapping, NamedTuple, Sequence
from urllib.parse import unquote_to_bytes

from modelcast.errors import BadRequest

EVENTS = ("", "started", "completed", "stopped", "paused")
MAX_QUERY_LEN = 16 * 1024
MAX_SCRAPE_HASHES = 256
ZONE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
DEFAULT_ZONE = "default"
# Node ids travel in URLs and log lines; the node daemon makes 20 hex digits.
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_BDECODE_DEPTH = 64


class ProtocolError(BadRequest):
    """A tracker request is malformed; the server answers with a bencoded ``failure reason``."""

    code = "tracker_protocol"


# ---------------------------------------------------------------------------------------
# Records


# The records are NamedTuples rather than frozen dataclasses: just as immutable and
# comparable, but one is built per announce on the hot path, and a NamedTuple is built
# in a fifth of the time a frozen dataclass of this many fields takes.


class Announce(NamedTuple):
    """One parsed announce request (BEP 3), plus modelcast's ``zone`` and ``role`` extensions."""

    info_hash: bytes
    peer_id: bytes
    port: int
    uploaded: int
    downloaded: int
    left: int
    event: str = ""
    compact: bool = True
    numwant: int = 50
    ip: str | None = None
    zone: str = DEFAULT_ZONE
    key: str | None = None
    no_peer_id: bool = False
    origin_seed: bool = False
    node: str | None = None


def pack_addr(ip: str, port: int) -> bytes:
    """The compact form of a peer address: 6 bytes for IPv4 (BEP 23), 18 for IPv6 (BEP 7).

    ``ip`` must be a canonical IP literal (what :func:`normalize_ip` returns).
    """
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip) if ":" in ip else socket.inet_aton(ip)
    except OSError:
        raise ValueError(f"peer address {ip!r} is not an IP literal") from None
    return packed + port.to_bytes(2, "big")


class _PeerFields(NamedTuple):
    peer_id: bytes
    ip: str
    port: int
    left: int
    zone: str
    origin_seed: bool
    packed: bytes


class Peer(_PeerFields):
    """One peer of a swarm as the tracker knows it: ``Peer(peer_id, ip, port, left, zone, origin_seed)``.

    ``packed`` is not an argument: it is the address in compact form (:func:`pack_addr`),
    made once when the peer announces, so an answer that hands the peer out is a join of
    bytes rather than parsing its IP again, and the swarm keys the peer by it.
    """

    __slots__ = ()

    def __new__(cls, peer_id: bytes, ip: str, port: int, left: int, zone: str = DEFAULT_ZONE,
                origin_seed: bool = False) -> Peer:
        return tuple.__new__(cls, (peer_id, ip, port, left, zone, origin_seed, pack_addr(ip, port)))

    def _replace(self, **changes: Any) -> Peer:
        # NamedTuple's own _replace would copy ``packed`` unchanged when ip or port change.
        fields = {name: getattr(self, name) for name in _PeerFields._fields if name != "packed"}
        fields.update(changes)
        return Peer(**fields)

    def __getnewargs__(self) -> tuple:
        return tuple(self)[:6]  # for pickle and copy: ``packed`` is made again, not passed

    @property
    def complete(self) -> bool:
        return self.left == 0

    @property
    def addr(self) -> tuple[str, int]:
        return (self.ip, self.port)


class SwarmCounts(NamedTuple):
    """BEP 48 counters of one swarm: seeds, leechers and completed downloads."""

    complete: int = 0
    incomplete: int = 0
    downloaded: int = 0


# ---------------------------------------------------------------------------------------
# Bencoding


def bencode(obj: Any) -> bytes:
    """Encode ints, bytes, str (UTF-8), lists/tuples and dicts (keys sorted as bytes)."""
    out: list[bytes] = []
    _bencode_into(obj, out)
    return b"".join(out)


def _bencode_into(obj: Any, out: list[bytes]) -> None:
    if isinstance(obj, bool):
        # bool is an int subclass; refusing it catches a caller bug instead of sending i1e.
        raise TypeError("cannot bencode a bool")
    if isinstance(obj, int):
        out.append(b"i%de" % obj)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        out.append(b"%d:" % len(data))
        out.append(data)
    elif isinstance(obj, str):
        _bencode_into(obj.encode("utf-8"), out)
    elif isinstance(obj, (list, tuple)):
        out.append(b"l")
        for item in obj:
            _bencode_into(item, out)
        out.append(b"e")
    elif isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            kb = k.encode("utf-8") if isinstance(k, str) else bytes(k)
            items.append((kb, v))
        items.sort(key=lambda kv: kv[0])
        out.append(b"d")
        for i in range(1, len(items)):
            if items[i][0] == items[i - 1][0]:
                raise ValueError(f"duplicate bencode key {items[i][0]!r}")
        for kb, v in items:
            _bencode_into(kb, out)
            _bencode_into(v, out)
        out.append(b"e")
    else:
        raise TypeError(f"cannot bencode {type(obj).__name__}")


def _bdecode_at(data: bytes, i: int, depth: int, strict: bool = True) -> tuple[Any, int]:
    if depth > _MAX_BDECODE_DEPTH:
        raise ProtocolError("bencoded data nests too deeply")
    if i >= len(data):
        raise ProtocolError("bencoded data ends early")
    c = data[i : i + 1]
    if c == b"i":
        end = data.find(b"e", i)
        if end < 0 or not re.fullmatch(rb"-?(0|[1-9][0-9]*)", data[i + 1 : end]) or data[i + 1 : end] == b"-0":
            raise ProtocolError(f"bad bencoded integer at offset {i}")
        return int(data[i + 1 : end]), end + 1
    if c == b"l":
        i += 1
        items = []
        while data[i : i + 1] != b"e":
            item, i = _bdecode_at(data, i, depth + 1, strict)
            items.append(item)
        return items, i + 1
    if c == b"d":
        i += 1
        result: dict[bytes, Any] = {}
        last: bytes | None = None
        while data[i : i + 1] != b"e":
            key, i = _bdecode_at(data, i, depth + 1, strict)
            if not isinstance(key, bytes):
                raise ProtocolError(f"bencoded dict key at offset {i} is not a string")
            if strict and last is not None and key <= last:
                raise ProtocolError("bencoded dict keys are not sorted and unique")
            last = key
            result[key], i = _bdecode_at(data, i, depth + 1, strict)
        return result, i + 1
    if c.isdigit():
        colon = data.find(b":", i)
        if colon < 0 or not data[i:colon].isdigit():
            raise ProtocolError(f"bad bencoded string length at offset {i}")
        n = int(data[i:colon])
        start = colon + 1
        if start + n > len(data):
            raise ProtocolError("bencoded string runs past the end of the data")
        return data[start : start + n], start + n
    raise ProtocolError(f"unexpected byte {c!r} at offset {i} in bencoded data")


def bdecode(data: bytes, *, strict: bool = True) -> Any:
    """Decode one bencoded value that spans all of ``data``; raise ProtocolError otherwise.

    ``strict`` also requires dict keys sorted and unique, as BEP 3 does.
    """
    value, end = _bdecode_at(bytes(data), 0, 0, strict)
    if end != len(data):
        raise ProtocolError(f"{len(data) - end} trailing bytes after bencoded value")
    return value


def _top_level_spans(data: bytes) -> list[tuple[bytes, bytes]]:
    """The top-level dict of ``data`` as (key, raw encoded value) pairs, bytes untouched."""
    if data[:1] != b"d":
        raise ProtocolError("torrent is not a bencoded dictionary")
    i = 1
    spans = []
    while data[i : i + 1] != b"e":
        key, i = _bdecode_at(data, i, 1)
        if not isinstance(key, bytes):
            raise ProtocolError("torrent dictionary key is not a string")
        # Values are only skipped over, never re-encoded, so key order inside them is
        # not ours to judge (the info-hash covers whatever bytes the publisher wrote).
        _, end = _bdecode_at(data, i, 1, strict=False)
        spans.append((key, data[i:end]))
        i = end
    if i + 1 != len(data):
        raise ProtocolError("trailing bytes after the torrent dictionary")
    return spans


def set_announce(torrent: bytes, announce_url: str) -> bytes:
    """Return ``torrent`` with its tracker set to ``announce_url`` and nothing else changed.

    The ``info`` value is copied as raw bytes, never re-encoded, so the info-hash stays
    exactly what was published even if the publisher's encoder differs from ours.
    ``announce-list`` is dropped: clients prefer it over ``announce`` (BEP 12), and a
    stale list would send nodes to a tracker that does not know the swarm.
    """
    spans = {k: v for k, v in _top_level_spans(bytes(torrent)) if k != b"announce-list"}
    if b"info" not in spans:
        raise ProtocolError("torrent has no info dictionary")
    spans[b"announce"] = bencode(announce_url)
    out = [b"d"]
    for key in sorted(spans):
        out.append(bencode(key))
        out.append(spans[key])
    out.append(b"e")
    return b"".join(out)


def torrent_info_bytes(torrent: bytes) -> bytes:
    """The raw bencoded ``info`` value of a torrent (what the v1 info-hash is taken over)."""
    for key, raw in _top_level_spans(bytes(torrent)):
        if key == b"info":
            return raw
    raise ProtocolError("torrent has no info dictionary")


# ---------------------------------------------------------------------------------------
# Requests


# Bytes are searched for these as ints: ``b"%" in data`` first tries the needle as an
# int, fails with an exception and clears it, which costs five times the search itself.
_PERCENT = ord("%")
_PLUS = ord("+")


def _query_bytes(raw_query: str | bytes) -> bytes:
    if isinstance(raw_query, str):
        try:
            raw = raw_query.encode("ascii")
        except UnicodeEncodeError:
            raise ProtocolError("query string has raw non-ASCII characters; percent-encode them") from None
    else:
        raw = bytes(raw_query)
    if len(raw) > MAX_QUERY_LEN:
        raise ProtocolError(f"query string is {len(raw)} bytes, more than the {MAX_QUERY_LEN} allowed")
    return raw


def _unquote(value: bytes) -> bytes:
    """Percent-decode ``value`` exactly as ``unquote_to_bytes`` does, faster for what clients send.

    Clients escape a binary info_hash or peer_id byte by byte (``%12%AB...``); such a
    value is decoded by one ``bytes.fromhex`` instead of a Python loop over its escapes.
    """
    if _PERCENT not in value:
        return value
    n = len(value) // 3
    if len(value) == 3 * n and value[::3] == b"%" * n:
        try:
            decoded = bytes.fromhex(value.replace(b"%", b" ").decode("latin-1"))
        except ValueError:
            pass
        else:
            # fromhex skips whitespace, so "% 4" would decode to fewer bytes: then it was not a clean escape.
            if len(decoded) == n:
                return decoded
    return unquote_to_bytes(value)


def _param_name(name: bytes) -> str:
    try:
        if _PERCENT in name or _PLUS in name:
            return unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8")
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("query parameter name is not UTF-8") from None


def _split_query(raw_query: str | bytes) -> list[tuple[str, bytes]]:
    """Split a raw query string into (name, value bytes), percent-decoding each part alone.

    Decoding per parameter is the point: a binary info_hash may contain bytes that look
    like ``&`` or ``=`` once decoded, and it is not valid UTF-8, so a generic query
    parser (aiohttp's ``request.query``) would mangle it.
    """
    pairs = []
    for part in _query_bytes(raw_query).split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        pairs.append((_param_name(name), _unquote(value)))
    return pairs


def _query_params(raw_query: str | bytes) -> dict[str, bytes]:
    """:func:`_split_query` as a dict in which the first occurrence of a name wins.

    Repeats are legal in a query string but meaningless in an announce; a repeat's value
    is not even decoded.
    """
    params: dict[str, bytes] = {}
    for part in _query_bytes(raw_query).split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        # _param_name and _unquote inlined for the common case: this loop runs ~10 times per announce.
        if _PERCENT in name or _PLUS in name:
            key = _param_name(name)
        else:
            try:
                key = name.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("query parameter name is not UTF-8") from None
        if key not in params:
            params[key] = _unquote(value) if _PERCENT in value else value
    return params


def _text(params: dict[str, bytes], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"parameter {name} is not UTF-8 text") from None


def _int(params: dict[str, bytes], name: str, default: int | None, lo: int = 0, hi: int = 2**63 - 1) -> int:
    raw = params.get(name)
    if not raw:
        if default is None:
            raise ProtocolError(f"missing parameter {name}")
        return default
    if not raw.isdigit():  # bytes.isdigit: ASCII digits only
        text = _text(params, name)
        raise ProtocolError(f"parameter {name}={text[:40]!r} is not a non-negative integer")
    value = int(raw)
    if not lo <= value <= hi:
        raise ProtocolError(f"parameter {name}={value} is out of range {lo}..{hi}")
    return value


def _hash20(value: bytes | None, name: str) -> bytes:
    if value is None:
        raise ProtocolError(f"missing parameter {name}")
    if len(value) != 20:
        raise ProtocolError(f"{name} must be 20 bytes, got {len(value)}")
    return value


@functools.lru_cache(maxsize=4096)
def normalize_ip(text: str | None) -> str | None:
    """Return the canonical form of an IP literal (IPv4-mapped IPv6 as IPv4), or None.

    Cached: the server normalises every request's source address, and a fleet comes
    from the same few thousand addresses all day.
    """
    if not text:
        return None
    try:
        addr = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def validate_node_id(text: str) -> str:
    """Return ``text`` if it is a valid node id, else raise :class:`ProtocolError`."""
    # fullmatch, not match: "$" would let a trailing newline into log lines.
    if not NODE_ID_RE.fullmatch(text):
        raise ProtocolError(f"invalid node id {text[:80]!r}: up to 64 letters, digits and . _ -")
    return text


def parse_announce(raw_query: str | bytes, *, default_numwant: int = 50, max_numwant: int = 200) -> Announce:
    """Parse the raw query string of ``GET /announce`` into an :class:`Announce`.

    ``numwant`` is clamped to ``max_numwant``; an ``ip=`` that is not an IP literal is
    ignored (BEP 3 allows DNS names, which a private tracker has no reason to trust).
    Raises :class:`ProtocolError` for anything malformed.
    """
    params = _query_params(raw_query)
    info_hash = _hash20(params.get("info_hash"), "info_hash")
    peer_id = _hash20(params.get("peer_id"), "peer_id")
    port = _int(params, "port", None, 1, 65535)
    uploaded = _int(params, "uploaded", 0)
    downloaded = _int(params, "downloaded", 0)
    left = _int(params, "left", None)
    event = _text(params, "event") or ""
    if event not in EVENTS:
        raise ProtocolError(f"unknown event {event[:40]!r}; expected started, completed, stopped or none")
    compact = (_text(params, "compact") or "1") != "0"
    numwant = min(_int(params, "numwant", default_numwant), max_numwant)
    zone = _text(params, "zone") or DEFAULT_ZONE
    # fullmatch, not match: "$" would let a trailing newline in.
    if zone != DEFAULT_ZONE and not ZONE_RE.fullmatch(zone):
        raise ProtocolError(f"invalid zone {zone[:80]!r}: up to 64 letters, digits and . _ : -")
    # Opaque, not text: aria2 sends 8 raw bytes (the tail of its binary peer_id); latin-1 keeps every byte.
    key = params.get("key")
    if key is not None:
        key = key.decode("latin-1")
        if len(key) > 64:
            raise ProtocolError("parameter key is longer than 64 characters")
    ip = _text(params, "ip")
    node = _text(params, "node")
    # Positional: this runs on every announce, and keywords cost a third more.
    return Announce(info_hash, peer_id, port, uploaded, downloaded, left, "" if event == "paused" else event, compact,
                    numwant, normalize_ip(ip) if ip else None, zone, key,
                    (_text(params, "no_peer_id") or "0") != "0", _text(params, "role") == "origin",
                    validate_node_id(node) if node else None)


def parse_scrape(raw_query: str | bytes) -> list[bytes]:
    """Parse ``GET /scrape``: one or more ``info_hash`` parameters, each 20 raw bytes.

    A scrape without info_hash (a full scrape) is refused: it would list every swarm of
    a private registry to anyone who asks.
    """
    hashes = [_hash20(v, "info_hash") for k, v in _split_query(raw_query) if k == "info_hash"]
    if not hashes:
        raise ProtocolError("scrape needs at least one info_hash; full scrapes are not served")
    if len(hashes) > MAX_SCRAPE_HASHES:
        raise ProtocolError(f"scrape asks for {len(hashes)} info_hashes; at most {MAX_SCRAPE_HASHES} are served")
    return list(dict.fromkeys(hashes))


# ---------------------------------------------------------------------------------------
# Answers


def encode_failure(reason: str) -> bytes:
    """A bencoded tracker error; clients show ``failure reason`` to the user."""
    return bencode({"failure reason": reason})


def encode_announce(peers: Sequence[Peer], counts: SwarmCounts, *, interval: int, min_interval: int,
                    compact: bool = True, no_peer_id: bool = False) -> bytes:
    """Encode an announce answer.

    Compact answers pack IPv4 peers into ``peers`` (BEP 23, 6 bytes each) and IPv6 peers
    into ``peers6`` (BEP 7, 18 bytes each); otherwise ``peers`` is a list of dicts.
    """
    if not compact:
        items = []
        for p in peers:
            item: dict[str, Any] = {"ip": p.ip, "port": p.port}
            if not no_peer_id:
                item["peer id"] = p.peer_id
            items.append(item)
        return bencode({"interval": interval, "min interval": min_interval, "complete": counts.complete,
                        "incomplete": counts.incomplete, "peers": items})
    v4 = b"".join([p.packed for p in peers])
    v6 = b""
    if len(v4) != 6 * len(peers):  # some IPv6 peers: split the two families
        v4 = b"".join([p.packed for p in peers if len(p.packed) == 6])
        v6 = b"".join([p.packed for p in peers if len(p.packed) != 6])
    # The keys of the dict in bencode's sorted order, written out: this runs on every announce.
    body = b"d8:completei%de10:incompletei%de8:intervali%de12:min intervali%de5:peers%d:%b" % (
        counts.complete, counts.incomplete, interval, min_interval, len(v4), v4)
    if v6:
        body += b"6:peers6%d:%b" % (len(v6), v6)
    return body + b"e"


def encode_scrape(stats: dict[bytes, SwarmCounts]) -> bytes:
    """Encode a BEP 48 scrape answer keyed by raw 20-byte info-hash."""
    return bencode({
        "files": {
            ih: {"complete": c.complete, "downloaded": c.downloaded, "incomplete": c.incomplete}
            for ih, c in stats.items()
        }
    })


def decode_compact_peers(peers: bytes, peers6: bytes = b"") -> list[tuple[str, int]]:
    """Unpack BEP 23 / BEP 7 compact peer strings into (ip, port) pairs."""
    if len(peers) % 6 or len(peers6) % 18:
        raise ProtocolError("compact peer string has a length that is not a multiple of 6 (or 18)")
    out = []
    for i in range(0, len(peers), 6):
        out.append((str(ipaddress.IPv4Address(peers[i : i + 4])), struct.unpack("!H", peers[i + 4 : i + 6])[0]))
    for i in range(0, len(peers6), 18):
        out.append((str(ipaddress.IPv6Address(peers6[i : i + 16])), struct.unpack("!H", peers6[i + 16 : i + 18])[0]))
    return out


# ---------------------------------------------------------------------------------------
# Peer handout policy
#
# A swarm keeps its peers in buckets, one per (zone, complete, origin_seed), each an
# indexable sequence.  Handout walks the tiers in order and draws a random sample from
# each, so an announce costs O(numwant + number of buckets) whatever the swarm's size.

BucketKey = tuple[str, bool, bool]
"""(zone, complete, origin_seed): the peers of one bucket are interchangeable to the policy."""


def bucket_key(peer: Peer) -> BucketKey:
    """The bucket ``peer`` belongs in."""
    return (peer.zone, peer.complete, peer.origin_seed)


def peer_tier(peer: Peer, requester_zone: str) -> tuple[bool, bool, bool]:
    """Sort key of a peer's tier; lower is handed out first.

    The origin's seed comes last whatever its zone, because origin egress is what the
    swarm exists to save; then peers in the requester's zone before others (cheap,
    fast links); then complete peers before downloading ones (they have every piece).
    """
    return (peer.origin_seed, peer.zone != requester_zone, not peer.complete)


def _tier_of_key(key: BucketKey, requester_zone: str) -> int:
    """The tier of a bucket as an index 0..7, in :func:`peer_tier` order (bits: origin, other zone, incomplete)."""
    zone, complete, origin_seed = key
    return (4 if origin_seed else 0) + (2 if zone != requester_zone else 0) + (0 if complete else 1)


def _is_requester(p: Peer, requester: Peer) -> bool:
    # Same address or same peer id (a node that came back on another port).
    return p.packed == requester.packed or p.peer_id == requester.peer_id


def _sample_tier(parts: Sequence[Sequence[Peer]], need: int, requester: Peer, sole: bool, rng: random.Random,
                 out: list[Peer]) -> None:
    """Append up to ``need`` peers drawn uniformly without replacement from the union of ``parts``.

    The requester is never drawn (``sole``: it is excluded by identity alone, see
    :func:`sample_peers`).  The cost is O(need), never the tier's size: a tier that holds
    at most twice what is needed is read whole (and taken whole when it fits, which
    needs no random draws at all; the client receives a set), a bigger one is sampled by
    drawing positions and reading only those.
    """
    rp, rid = requester.packed, requester.peer_id
    lens = [len(part) for part in parts]
    total = sum(lens)
    if total <= 2 * need + 2:
        if sole:
            pool = [p for part in parts for p in part if p is not requester]
        else:
            pool = [p for part in parts for p in part if p.packed != rp and p.peer_id != rid]
        out.extend(pool if len(pool) <= need else rng.sample(pool, need))
        return
    # Sparse (need < total / 2): positions drawn in batches of what is still missing,
    # repeats and the requester dropped, until enough.  random() * total is uniform to
    # within total / 2**53, and one C call instead of randrange's several.
    rand = rng.random
    seen: dict[int, None] = {}
    got: list[Peer] = []
    while len(got) < need and len(seen) < total:
        fresh = [i for i in dict.fromkeys([int(rand() * total) for _ in range(need - len(got))])
                 if i not in seen]
        seen.update(dict.fromkeys(fresh))
        if len(parts) == 1:
            part = parts[0]
            drawn = [part[i] for i in fresh]
        else:
            drawn = [_at(parts, lens, i) for i in fresh]
        if sole:
            got += [p for p in drawn if p is not requester]
        else:
            got += [p for p in drawn if p.packed != rp and p.peer_id != rid]
    out += got


def _at(parts: Sequence[Sequence[Peer]], lens: list[int], i: int) -> Peer:
    """Position ``i`` of the virtual concatenation of ``parts``."""
    for part, n in zip(parts, lens):
        if i < n:
            return part[i]
        i -= n
    raise IndexError(i)


def sample_peers(buckets: Mapping[BucketKey, Sequence[Peer]], requester: Peer, numwant: int,
                 rng: random.Random, gateways: Mapping[str, Sequence[Peer]] | None = None, *,
                 sole: bool = False) -> list[Peer]:
    """Choose at most ``numwant`` peers for ``requester``: best tier first, random within a tier.

    ``buckets`` maps each :func:`bucket_key` to the peers in it; a bucket larger than
    twice ``numwant`` is only indexed at random positions, never iterated.  The
    requester itself (same address or same peer id, which catches a node that came back
    on another port) is never in its own list.  Buckets of every other zone share one
    tier: the policy prefers the requester's own zone but has no order among the rest;
    their keys are sorted within the tier, so that a given random generator makes the
    same choice whatever order the buckets were created in.

    ``gateways`` (each zone's first few peers in the swarm) bounds cross-zone traffic:
    when the requester's zone holds other peers, only a gateway is handed peers of other
    zones, and only their gateways.  Without it every node of a zone would pull across
    the (slower, dearer) inter-zone link, and most of those bytes would be pieces its own
    zone already has.  A requester alone in its zone gets other zones' peers freely.  An
    empty mapping means strict zones: nobody is handed other zones' peers, not even a
    requester alone in its zone (which then takes its own copy from the origin); zones
    exchange pieces only through the origin's relays (tracker/firstcopy.py).

    ``sole``: the caller vouches that no peer in ``buckets`` but ``requester`` itself
    (this very object, if it is there at all) has the requester's address or peer id,
    as the tracker's swarms do (keyed by address, counting peer ids).  The requester is
    then left out by identity, without reading the other peers' fields: in a swarm of
    cold records that saves a cache miss or two per peer handed out.
    """
    if numwant <= 0:
        return []
    zone = requester.zone
    tiers: list[list[BucketKey] | None] = [None] * 8
    for key in buckets:
        t = _tier_of_key(key, zone)
        keys = tiers[t]
        if keys is None:
            tiers[t] = [key]
        else:
            keys.append(key)
    restrict = gateways is not None and (not gateways or _zone_has_others(buckets, requester))
    is_gateway = restrict and any(p.packed == requester.packed for p in gateways.get(zone, ()))
    chosen: list[Peer] = []
    for t, keys in enumerate(tiers):
        if keys is None:
            continue
        need = numwant - len(chosen)
        if need <= 0:
            break
        if restrict and t in (2, 3):  # other zones, not the origin's seed
            if not is_gateway:
                continue
            complete = t == 2
            # A handful of peers at most: sampled from a plain list, no bucket is touched.
            parts = [[p for z, peers in gateways.items() if z != zone for p in peers if p.complete == complete]]
        else:
            if len(keys) > 1:
                keys.sort()
            parts = [buckets[k] for k in keys]
        _sample_tier(parts, need, requester, sole, rng, chosen)
    return chosen


def _zone_has_others(buckets: Mapping[BucketKey, Sequence[Peer]], requester: Peer) -> bool:
    """Whether the requester's zone holds a peer other than the requester (O(buckets))."""
    same = 0
    only: Peer | None = None
    for (zone, _, origin_seed), peers in buckets.items():
        if zone == requester.zone and not origin_seed and peers:
            same += len(peers)
            only = peers[0]
    return same > 1 or (same == 1 and not _is_requester(only, requester))


def bucket_peers(peers: Iterable[Peer]) -> dict[BucketKey, list[Peer]]:
    """Sort a flat list of peers into buckets (O(n); the tracker keeps its buckets up to date instead)."""
    buckets: dict[BucketKey, list[Peer]] = {}
    for p in peers:
        buckets.setdefault(bucket_key(p), []).append(p)
    return buckets


def choose_peers(peers: Iterable[Peer], requester: Peer, numwant: int, rng: random.Random) -> list[Peer]:
    """:func:`sample_peers` over a flat list of peers, for callers that hold no buckets (tools, tests).

    This one is O(len(peers)); the tracker's announce path calls :func:`sample_peers`.
    """
    return sample_peers(bucket_peers(peers), requester, numwant, rng)
