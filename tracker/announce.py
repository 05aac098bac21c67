"""BitTorrent tracker requests and answers without sockets: records, query parsing, encoding.

Everything here takes bytes or records and returns results (the sans-I/O style of h11),
so the HTTP handlers stay thin and this module is tested with plain unit tests.
Covered: BEP 3 announce, BEP 23 compact peers, BEP 7 ``peers6``, BEP 48 scrape and the
bencoded ``failure reason``.  Extensions: an announce may carry ``zone=`` (the node's
zone, used by the peer handout policy, :mod:`tracker.handout`), ``role=origin`` (the
origin's own seed, handed out last) and ``node=`` (the node daemon that owns the entry,
whose one heartbeat keeps all its entries alive; see :mod:`tracker.swarm`).

Both transports build their :class:`Announce` through :func:`make_announce`: the HTTP
query path (:func:`parse_announce`) and the BEP 15 UDP path (:mod:`tracker.udp`, whose
extensions travel as a query string in the BEP 41 URL data).  What an announce may say
(zone, node id, numwant bounds, event names, key) is therefore checked in one place.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import struct
from typing import Any, Mapping, NamedTuple, Sequence
from urllib.parse import unquote_to_bytes

from .bencode import ProtocolError, bencode

EVENTS = ("", "started", "completed", "stopped", "paused")
MAX_QUERY_LEN = 16 * 1024
MAX_SCRAPE_HASHES = 256
ZONE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
DEFAULT_ZONE = "default"
# Node ids travel in URLs and log lines; the node daemon makes 20 hex digits.
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_KEY_LEN = 64

# ---------------------------------------------------------------------------------------
# Records


# The records are NamedTuples rather than frozen dataclasses: just as immutable and
# comparable, but one is built per announce on the hot path, and a NamedTuple is built
# in a fifth of the time a frozen dataclass of this many fields takes.


class Announce(NamedTuple):
    """One parsed announce request (BEP 3, or BEP 15 over UDP), plus modelcast's ``zone``, ``role`` and ``node``."""

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
    node_token: str | None = None  # nk=: proves node= (tracker/nodekeys.py)


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


def query_params(raw_query: str | bytes) -> dict[str, bytes]:
    """:func:`_split_query` as a dict in which the first occurrence of a name wins.

    Used for an HTTP announce's query string and for the query in a UDP announce's BEP 41
    URL data alike.  Repeats are legal in a query string but meaningless in an announce;
    a repeat's value is not even decoded.
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


def _text(params: Mapping[str, bytes], name: str) -> str | None:
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
    if len(raw) > 20:
        # int() of thousands of digits is slow and past 4,300 raises ValueError: refuse first.
        raise ProtocolError(f"parameter {name} has {len(raw)} digits: out of range {lo}..{hi}")
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


def make_announce(info_hash: bytes, peer_id: bytes, port: int, uploaded: int, downloaded: int, left: int, event: str,
                  compact: bool, numwant: int, ip: str | None, key: str | None, no_peer_id: bool,
                  extensions: Mapping[str, bytes], default_numwant: int, max_numwant: int) -> Announce:
    """Check what an announce says, whatever its transport, and build its :class:`Announce`.

    The transport has read the fields of its own wire format (BEP 3 query text, BEP 15
    binary); what they mean is checked here, once for both, so HTTP and UDP cannot come
    to accept different announces.  ``event`` must be a BEP 3 name (``paused``, BEP 21,
    counts as none); ``numwant`` below zero means ``default_numwant``, and either is
    clamped to ``max_numwant``; ``key`` has at most :data:`MAX_KEY_LEN` characters; an
    ``ip`` that is not an IP literal is ignored (BEP 3 allows DNS names, which a private
    tracker has no reason to trust).  ``extensions`` holds modelcast's parameters
    (``zone``, ``node``, ``role``) as :func:`query_params` returns them.  Raises
    :class:`ProtocolError` for anything malformed.
    """
    if event not in EVENTS:
        raise ProtocolError(f"unknown event {event[:40]!r}; expected started, completed, stopped or none")
    zone = _text(extensions, "zone") or DEFAULT_ZONE
    # fullmatch, not match: "$" would let a trailing newline in.
    if zone != DEFAULT_ZONE and not ZONE_RE.fullmatch(zone):
        raise ProtocolError(f"invalid zone {zone[:80]!r}: up to 64 letters, digits and . _ : -")
    if key is not None and len(key) > MAX_KEY_LEN:
        raise ProtocolError(f"parameter key is longer than {MAX_KEY_LEN} characters")
    node = _text(extensions, "node")
    # Positional: this runs on every announce, and keywords cost a third more.
    return Announce(info_hash, peer_id, port, uploaded, downloaded, left, "" if event == "paused" else event, compact,
                    min(default_numwant if numwant < 0 else numwant, max_numwant), normalize_ip(ip) if ip else None,
                    zone, key, no_peer_id, _text(extensions, "role") == "origin",
                    validate_node_id(node) if node else None, _node_token(extensions))


def _node_token(extensions: Mapping[str, bytes]) -> str | None:
    token = extensions.get("nk")
    if token is None:
        return None
    if len(token) > 64:
        raise ProtocolError("parameter nk is longer than 64 characters")
    return token.decode("latin-1")


def parse_announce(raw_query: str | bytes, *, default_numwant: int = 50, max_numwant: int = 200) -> Announce:
    """Parse the raw query string of ``GET /announce`` into an :class:`Announce`.

    The fields are read here and checked by :func:`make_announce`.  Raises
    :class:`ProtocolError` for anything malformed.
    """
    params = query_params(raw_query)
    # Opaque, not text: aria2 sends 8 raw bytes (the tail of its binary peer_id); latin-1 keeps every byte.
    key = params.get("key")
    # Arguments are evaluated in order, so the first malformed field is the one reported.
    return make_announce(
        _hash20(params.get("info_hash"), "info_hash"), _hash20(params.get("peer_id"), "peer_id"),
        _int(params, "port", None, 1, 65535), _int(params, "uploaded", 0), _int(params, "downloaded", 0),
        _int(params, "left", None), _text(params, "event") or "", (_text(params, "compact") or "1") != "0",
        _int(params, "numwant", -1), _text(params, "ip"), None if key is None else key.decode("latin-1"),
        (_text(params, "no_peer_id") or "0") != "0", params, default_numwant, max_numwant)

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

