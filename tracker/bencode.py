"""Bencoding (BEP 3) without sockets, and the two torrent edits the registry makes.

:func:`bencode` and :func:`bdecode` cover the whole format; :func:`set_announce` and
:func:`torrent_info_bytes` work on a torrent's top-level dictionary as raw spans, so
the ``info`` bytes (what the info-hash is taken over) are never re-encoded.
"""

from __future__ import annotations

import re
from typing import Any

from modelcast.errors import BadRequest

_MAX_BDECODE_DEPTH = 64


class ProtocolError(BadRequest):
    """A tracker request or bencoded value is malformed; the server answers with a bencoded ``failure reason``."""

    code = "tracker_protocol"


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


def set_announce(torrent: bytes, announce_url: str, others: list[str] | tuple[str, ...] = ()) -> bytes:
    """Return ``torrent`` with its tracker set to ``announce_url`` and nothing else changed.

    The ``info`` value is copied as raw bytes, never re-encoded, so the info-hash stays
    exactly what was published even if the publisher's encoder differs from ours.  A
    published ``announce-list`` is dropped: clients prefer it over ``announce`` (BEP 12),
    and a stale list would send nodes to a tracker that does not know the swarm.  With
    ``others`` (the announce URLs of the registry's other replicas) the torrent gets an
    ``announce-list`` of one tier, ``announce_url`` first, then ``others`` in their order
    (BEP 12: a client tries them in turn when one fails).
    """
    spans = {k: v for k, v in _top_level_spans(bytes(torrent)) if k != b"announce-list"}
    if b"info" not in spans:
        raise ProtocolError("torrent has no info dictionary")
    spans[b"announce"] = bencode(announce_url)
    tier = [announce_url] + [url for url in dict.fromkeys(others) if url != announce_url]
    if len(tier) > 1:
        spans[b"announce-list"] = bencode([tier])
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

