"""The artifact manifest: pure data, canonical bytes and digest.  No I/O here.

A manifest is canonical JSON (sorted keys, no insignificant whitespace, UTF-8); the
artifact digest is ``sha256:`` + the SHA-256 of those bytes and never changes meaning.
Nothing in those bytes depends on the wall clock or the registry: the same files give the
same digest anywhere.  When an artifact was published is the registry's record, kept
beside the manifest (``published_at``), not in it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .errors import InvalidManifest, UnsafePath
from .reference import validate_digest, validate_name

SCHEMA_VERSION = 1
KINDS = ("model", "runtime", "runtime-index")
XXH3_RE = re.compile(r"^[0-9a-f]{32}$")
V1_RE = re.compile(r"^[0-9a-f]{40}$")
V2_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_PATH_LEN = 4096


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` the one way modelcast hashes it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def validate_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside an artifact.

    Rejects absolute paths, ``..`` and ``.`` components, empty components, backslashes
    and control characters: any of them could make a node write outside the artifact.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePath("empty file path in artifact")
    if len(path) > MAX_PATH_LEN:
        raise UnsafePath(f"file path longer than {MAX_PATH_LEN} characters: {path[:80]!r}...")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise UnsafePath(f"absolute path {path!r} is not allowed in an artifact")
    if "\\" in path or any(ord(c) < 32 for c in path):
        raise UnsafePath(f"file path {path!r} contains a backslash or control character")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"file path {path!r} has an empty, '.' or '..' component")
    return path


@dataclass(frozen=True)
class FileEntry:
    """One regular file of an artifact."""

    path: str
    size: int
    xxh3_128: str

    def __post_init__(self) -> None:
        validate_path(self.path)
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise InvalidManifest(f"file {self.path!r}: size must be a non-negative integer")
        if not isinstance(self.xxh3_128, str) or not XXH3_RE.match(self.xxh3_128):
            raise InvalidManifest(f"file {self.path!r}: xxh3_128 must be 32 lowercase hex digits")

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "xxh3_128": self.xxh3_128}


@dataclass(frozen=True)
class InfoHashes:
    """The torrent's info-hashes: v1 (SHA-1, 40 hex) and/or v2 (SHA-256, 64 hex)."""

    v1: str | None = None
    v2: str | None = None

    def __post_init__(self) -> None:
        if self.v1 is None and self.v2 is None:
            raise InvalidManifest("manifest needs at least one info-hash (v1 or v2)")
        if self.v1 is not None and not V1_RE.match(self.v1):
            raise InvalidManifest("info_hash.v1 must be 40 lowercase hex digits")
        if self.v2 is not None and not V2_RE.match(self.v2):
            raise InvalidManifest("info_hash.v2 must be 64 lowercase hex digits")

    def tracker_keys(self) -> list[bytes]:
        """The 20-byte keys clients announce with: the v1 hash and the truncated v2 hash."""
        keys = []
        if self.v1:
            keys.append(bytes.fromhex(self.v1))
        if self.v2:
            keys.append(bytes.fromhex(self.v2)[:20])
        return keys

    def to_json(self) -> dict:
        out = {}
        if self.v1:
            out["v1"] = self.v1
        if self.v2:
            out["v2"] = self.v2
        return out


@dataclass(frozen=True)
class Manifest:
    """An immutable description of an artifact's files and how to fetch them."""

    kind: str
    name: str
    files: tuple[FileEntry, ...]
    piece_length: int
    info_hash: InfoHashes
    torrent_name: str
    annotations: Mapping[str, str] = field(default_factory=dict)
    # Manifests written before digests were made clock-free carry their publish time here,
    # inside the digested bytes; it is kept so that their digests still verify.  Publishers
    # leave it None (and so out of the bytes).
    created: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise InvalidManifest(f"unsupported manifest schema version {self.schema_version!r}")
        if self.kind not in KINDS:
            raise InvalidManifest(f"manifest kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        validate_name(self.name)
        if not self.files and self.kind != "runtime-index":
            raise InvalidManifest(f"artifact {self.name!r} has no files")
        paths = [f.path for f in self.files]
        if paths != sorted(paths):
            raise InvalidManifest("manifest files must be sorted by path")
        if len(set(paths)) != len(paths):
            raise InvalidManifest("manifest lists a file path twice")
        # A file may not also be a directory of another file ("a" and "a/b").
        as_set = set(paths)
        for p in paths:
            parts = p.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in as_set:
                    raise InvalidManifest(f"path {p!r} lies under file {'/'.join(parts[:i])!r}")
        if not isinstance(self.piece_length, int) or self.piece_length < 16384 or self.piece_length & (self.piece_length - 1):
            raise InvalidManifest("piece_length must be a power of two of at least 16 KiB")
        validate_path(self.torrent_name)
        if "/" in self.torrent_name:
            raise InvalidManifest("torrent_name must be a single path component")
        if self.created is not None and (not isinstance(self.created, str) or not self.created):
            raise InvalidManifest("manifest created, when present, must be a non-empty string")
        for k, v in self.annotations.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InvalidManifest("annotations must map strings to strings")

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def body(self, *, with_created: bool = True) -> dict:
        body = {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "name": self.name,
            "files": [f.to_json() for f in self.files],
            "total_size": self.total_size,
            "piece_length": self.piece_length,
            "info_hash": self.info_hash.to_json(),
            "torrent_name": self.torrent_name,
            "annotations": dict(self.annotations),
        }
        if with_created and self.created is not None:
            body["created"] = self.created
        return body

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.body())

    @property
    def digest(self) -> str:
        return sha256_digest(self.canonical_bytes())

    @property
    def content_key(self) -> str:
        """Digest of everything but a legacy creation time: identical content, identical key.

        For a manifest without ``created`` it equals the digest.  The publisher uses it to
        find an earlier (possibly legacy) manifest of the same content and reuse its digest.
        """
        return sha256_digest(canonical_json(self.body(with_created=False)))

    @classmethod
    def from_json(cls, obj: Any) -> "Manifest":
        if not isinstance(obj, dict):
            raise InvalidManifest("manifest must be a JSON object")
        try:
            files = tuple(
                FileEntry(path=f["path"], size=f["size"], xxh3_128=f["xxh3_128"]) for f in obj["files"]
            )
            ih = obj["info_hash"]
            if not isinstance(ih, dict):
                raise InvalidManifest("info_hash must be an object")
            manifest = cls(
                kind=obj["kind"],
                name=obj["name"],
                files=files,
                piece_length=obj["piece_length"],
                info_hash=InfoHashes(v1=ih.get("v1"), v2=ih.get("v2")),
                torrent_name=obj["torrent_name"],
                created=_created_of(obj),
                annotations=dict(obj.get("annotations") or {}),
                schema_version=obj["schema_version"],
            )
        except (KeyError, TypeError) as exc:
            raise InvalidManifest(f"manifest is missing or mistypes a field: {exc}") from exc
        if obj.get("total_size") != manifest.total_size:
            raise InvalidManifest("manifest total_size does not equal the sum of its file sizes")
        return manifest

    @classmethod
    def from_bytes(cls, data: bytes, expected_digest: str | None = None) -> "Manifest":
        """Parse manifest bytes; with ``expected_digest``, refuse bytes that hash otherwise."""
        if expected_digest is not None:
            validate_digest(expected_digest)
            actual = sha256_digest(data)
            if actual != expected_digest:
                raise InvalidManifest(f"manifest bytes hash to {actual}, expected {expected_digest}")
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidManifest(f"manifest is not valid UTF-8 JSON: {exc}") from exc
        manifest = cls.from_json(obj)
        if manifest.canonical_bytes() != data and expected_digest is not None:
            raise InvalidManifest("manifest bytes are not in canonical form")
        return manifest


def _created_of(obj: dict) -> str | None:
    if "created" not in obj:
        return None
    if not isinstance(obj["created"], str) or not obj["created"]:
        raise InvalidManifest("manifest created, when present, must be a non-empty string")
    return obj["created"]


def choose_piece_length(total_size: int, *, target_pieces: int = 1500) -> int:
    """A power-of-two piece length giving about ``target_pieces`` pieces, 256 KiB to 16 MiB.

    Small pieces spread through a swarm sooner; too many make the torrent and the
    piece bitfields large.  About 1,500 pieces keeps the .torrent under ~100 KB.
    """
    length = 256 * 1024
    while length < 16 * 1024 * 1024 and total_size / length > target_pieces:
        length *= 2
    return length


def files_from_iter(entries: Iterable[FileEntry]) -> tuple[FileEntry, ...]:
    return tuple(sorted(entries, key=lambda f: f.path))
