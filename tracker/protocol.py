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

import bisect
import ipaddress
import random
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence
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


@dataclass(frozen=True)
class Announce:
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


@dataclass(frozen=True)
class Peer:
    """One peer of a swarm as the tracker knows it."""

    peer_id: bytes
    ip: str
    port: int
    left: int
    zone: str = DEFAULT_ZONE
    origin_seed: bool = False

    @property
    def complete(self) -> bool:
        return self.left == 0

    @property
    def addr(self) -> tuple[str, int]:
        return (self.ip, self.port)


@dataclass(frozen=True)
class SwarmCounts:
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


def _split_query(raw_query: str | bytes) -> list[tuple[str, bytes]]:
    """Split a raw query string into (name, value bytes), percent-decoding each part alone.

    Decoding per parameter is the point: a binary info_hash may contain bytes that look
    like ``&`` or ``=`` once decoded, and it is not valid UTF-8, so a generic query
    parser (aiohttp's ``request.query``) would mangle it.
    """
    if isinstance(raw_query, str):
        try:
            raw = raw_query.encode("ascii")
        except UnicodeEncodeError:
            raise ProtocolError("query string has raw non-ASCII characters; percent-encode them") from None
    else:
        raw = bytes(raw_query)
    if len(raw) > MAX_QUERY_LEN:
        raise ProtocolError(f"query string is {len(raw)} bytes, more than the {MAX_QUERY_LEN} allowed")
    pairs = []
    for part in raw.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        try:
            key = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("query parameter name is not UTF-8") from None
        pairs.append((key, unquote_to_bytes(value)))
    return pairs


def _text(params: dict[str, bytes], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"parameter {name} is not UTF-8 text") from None


def _int(params: dict[str, bytes], name: str, default: int | None, lo: int = 0, hi: int = 2**63 - 1) -> int:
    text = _text(params, name)
    if text is None or text == "":
        if default is None:
            raise ProtocolError(f"missing parameter {name}")
        return default
    if not text.isascii() or not text.isdigit():
        raise ProtocolError(f"parameter {name}={text[:40]!r} is not a non-negative integer")
    value = int(text)
    if not lo <= value <= hi:
        raise ProtocolError(f"parameter {name}={value} is out of range {lo}..{hi}")
    return value


def _hash20(value: bytes | None, name: str) -> bytes:
    if value is None:
        raise ProtocolError(f"missing parameter {name}")
    if len(value) != 20:
        raise ProtocolError(f"{name} must be 20 bytes, got {len(value)}")
    return value


def normalize_ip(text: str | None) -> str | None:
    """Return the canonical form of an IP literal (IPv4-mapped IPv6 as IPv4), or None."""
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
    params: dict[str, bytes] = {}
    for name, value in _split_query(raw_query):
        # The first occurrence wins; repeats are legal in a query string but meaningless here.
        params.setdefault(name, value)
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
    if not ZONE_RE.match(zone):
        raise ProtocolError(f"invalid zone {zone[:80]!r}: up to 64 letters, digits and . _ : -")
    # Opaque, not text: aria2 sends 8 raw bytes (the tail of its binary peer_id); latin-1 keeps every byte.
    key = None if params.get("key") is None else params["key"].decode("latin-1")
    if key is not None and len(key) > 64:
        raise ProtocolError("parameter key is longer than 64 characters")
    return Announce(
        info_hash=info_hash,
        peer_id=peer_id,
        port=port,
        uploaded=uploaded,
        downloaded=downloaded,
        left=left,
        event="" if event == "paused" else event,
        compact=compact,
        numwant=numwant,
        ip=normalize_ip(_text(params, "ip")),
        zone=zone,
        key=key,
        no_peer_id=(_text(params, "no_peer_id") or "0") != "0",
        origin_seed=_text(params, "role") == "origin",
        node=validate_node_id(node) if (node := _text(params, "node")) else None,
    )


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
    answer: dict[str, Any] = {
        "interval": interval,
        "min interval": min_interval,
        "complete": counts.complete,
        "incomplete": counts.incomplete,
    }
    if compact:
        v4, v6 = [], []
        for p in peers:
            addr = ipaddress.ip_address(p.ip)
            if addr.version == 4:
                v4.append(addr.packed + struct.pack("!H", p.port))
            else:
                v6.append(addr.packed + struct.pack("!H", p.port))
        answer["peers"] = b"".join(v4)
        if v6:
            answer["peers6"] = b"".join(v6)
    else:
        items = []
        for p in peers:
            item: dict[str, Any] = {"ip": p.ip, "port": p.port}
            if not no_peer_id:
                item["peer id"] = p.peer_id
            items.append(item)
        answer["peers"] = items
    return bencode(answer)


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


def handout_tiers(keys: Iterable[BucketKey], requester_zone: str) -> list[list[BucketKey]]:
    """Group bucket keys into tiers, best first (the order of :func:`peer_tier`).

    Buckets of every other zone share one tier: the policy prefers the requester's own
    zone but has no order among the rest.  Keys are sorted within a tier so that a given
    random generator makes the same choice whatever order the buckets were created in.
    """
    tiers: dict[tuple[bool, bool, bool], list[BucketKey]] = {}
    for key in keys:
        zone, complete, origin_seed = key
        tiers.setdefault((origin_seed, zone != requester_zone, not complete), []).append(key)
    return [sorted(tiers[t]) for t in sorted(tiers)]


def _sample_tier(parts: Sequence[Sequence[Peer]], need: int, excluded: Callable[[Peer], bool],
                 rng: random.Random) -> list[Peer]:
    """Up to ``need`` peers drawn uniformly without replacement from the union of ``parts``.

    A lazy Fisher-Yates shuffle over the virtual concatenation: only the positions drawn
    are touched, so the cost is O(need + excluded peers met), never the tier's size.
    """
    starts = [0]
    for part in parts:
        starts.append(starts[-1] + len(part))
    total = starts.pop()
    swapped: dict[int, int] = {}
    picked: list[Peer] = []
    i = 0
    while len(picked) < need and i < total:
        j = rng.randrange(i, total)
        pos = swapped.get(j, j)
        swapped[j] = swapped.get(i, i)
        i += 1
        b = bisect.bisect_right(starts, pos) - 1
        peer = parts[b][pos - starts[b]]
        if not excluded(peer):
            picked.append(peer)
    return picked


def sample_peers(buckets: Mapping[BucketKey, Sequence[Peer]], requester: Peer, numwant: int,
                 rng: random.Random, gateways: Mapping[str, Sequence[Peer]] | None = None) -> list[Peer]:
    """Choose at most ``numwant`` peers for ``requester``: best tier first, random within a tier.

    ``buckets`` maps each :func:`bucket_key` to the peers in it; the sequences are only
    indexed at random positions, never iterated.  The requester itself (same address or
    same peer id, which catches a node that came back on another port) is never in its
    own list.

    ``gateways`` (each zone's first few peers in the swarm) bounds cross-zone traffic:
    when the requester's zone holds other peers, only a gateway is handed peers of other
    zones, and only their gateways.  Without it every node of a zone would pull across
    the (slower, dearer) inter-zone link, and most of those bytes would be pieces its own
    zone already has.  A requester alone in its zone gets other zones' peers freely.
    """
    if numwant <= 0:
        return []

    def excluded(p: Peer) -> bool:
        return p.addr == requester.addr or p.peer_id == requester.peer_id

    restrict = gateways is not None and _zone_has_others(buckets, requester)
    is_gateway = restrict and any(p.addr == requester.addr for p in gateways.get(requester.zone, ()))
    chosen: list[Peer] = []
    for tier in handout_tiers(buckets.keys(), requester.zone):
        if len(chosen) >= numwant:
            break
        zone, complete, origin_seed = tier[0]
        if restrict and zone != requester.zone and not origin_seed:
            if not is_gateway:
                continue
            # A handful of peers at most: sampled from a plain list, no bucket is touched.
            parts = [[p for z, peers in gateways.items() if z != requester.zone for p in peers
                      if p.complete == complete]]
        else:
            parts = [buckets[k] for k in tier]
        chosen.extend(_sample_tier(parts, numwant - len(chosen), excluded, rng))
    return chosen


def _zone_has_others(buckets: Mapping[BucketKey, Sequence[Peer]], requester: Peer) -> bool:
    """Whether the requester's zone holds a peer other than the requester (O(buckets))."""
    same = sum(len(peers) for (zone, _, origin_seed), peers in buckets.items()
               if zone == requester.zone and not origin_seed)
    return same > 1 or (same == 1 and not any(
        peers and peers[0].addr == requester.addr for (zone, _, o), peers in buckets.items()
        if zone == requester.zone and not o))


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
