"""The registry's durable state in SQL: artifacts (manifest + torrent + origin) and tags.

SQLite in the data directory is the embedded default; a ``postgresql://`` URL (``modelcast
tracker --db``) keeps it in PostgreSQL, where any number of registry replicas share it.
The engines sit behind :mod:`adapters.sql`; the queries here are written once for both.
The schema is versioned: :data:`MIGRATIONS` run at start-up, each once, whoever starts first.

The API is synchronous; the server calls it through ``asyncio.to_thread``.

Every method is one statement or one transaction, so a reader never sees a tag pointing
at an artifact that is not (yet, or any more) stored: a publish inserts the artifact and
moves the tag together, and a delete removes the tags before the artifact they point at.
Writers of one ``name:tag`` take turns (on PostgreSQL under an advisory lock, across
replicas), so among concurrent publishes to one tag exactly one is last, and every
artifact published stays stored.

Tags pulled through from an upstream registry (:mod:`tracker.federation`) are ordinary
tags plus a row in ``pulled_tags`` saying where they came from and when they were last
checked there; a local publish of the same ``name:tag`` deletes that row, making the tag
local for good.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from dataclasses import dataclass
from typing import Iterable
from pathlib import Path
from typing import Callable, TypeVar

from adapters.sql import Database, DatabaseError, Transaction, open_database
from modelcast.errors import BadRequest, Conflict
from modelcast.manifest import Manifest
from modelcast.reference import Reference, validate_digest, validate_name

DB_NAME = "registry.sqlite3"
MAX_LIST_LIMIT = 500

# The schema, one entry per version ({blob}, {real}, {bigint}, {key}: adapters.sql types).
# Never edit a released version: add one.  Version 1 is the schema SQLite registries had
# before versions were recorded; its IF NOT EXISTS lets it adopt such a database.
MIGRATIONS = [
    [
        """CREATE TABLE IF NOT EXISTS artifacts (
            digest       {key} PRIMARY KEY,
            name         {key} NOT NULL,
            kind         TEXT NOT NULL,
            content_key  TEXT NOT NULL,
            manifest     {blob} NOT NULL,
            torrent      {blob} NOT NULL,
            origin_url   TEXT NOT NULL,
            s3_endpoint  TEXT,
            total_size   {bigint} NOT NULL,
            created      TEXT NOT NULL,  -- the manifest's legacy created, else the publish time (UTC)
            published_at {real} NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS artifacts_name_digest ON artifacts(name, digest)",
        "CREATE INDEX IF NOT EXISTS artifacts_content_key ON artifacts(content_key)",
        """CREATE TABLE IF NOT EXISTS tags (
            name   {key} NOT NULL,
            tag    {key} NOT NULL,
            digest {key} NOT NULL REFERENCES artifacts(digest),
            PRIMARY KEY (name, tag)
        )""",
        "CREATE INDEX IF NOT EXISTS tags_digest ON tags(digest)",
        """CREATE TABLE IF NOT EXISTS pulled_tags (
            name       {key} NOT NULL,
            tag        {key} NOT NULL,
            upstream   TEXT NOT NULL,
            checked_at {real} NOT NULL,
            PRIMARY KEY (name, tag),
            FOREIGN KEY (name, tag) REFERENCES tags(name, tag) ON DELETE CASCADE
        )""",
    ],
    # 2: node identity bindings (tracker/nodekeys.py): node id -> hash of its key and its
    # announce token, kept so a restarted registry, and every replica, refuse the same keys.
    [
        """CREATE TABLE IF NOT EXISTS node_keys (
            node_id   {key} PRIMARY KEY,
            key_hash  TEXT NOT NULL,
            announce  TEXT NOT NULL,
            bound_at  {real} NOT NULL
        )""",
    ],
    # 3 (relay secret): secrets the registry keeps, by name.  One row,
    # "relay", holds the random secret each node's relay secret is derived from
    # (modelcast/relay_auth.py); in the database so that replicas over one database agree.
    [
        """CREATE TABLE IF NOT EXISTS registry_secrets (
            name   {key} PRIMARY KEY,
            secret {blob} NOT NULL
        )""",
    ],
]

# The registry database failed (disk full, corrupt file, locked by another process); its
# subclass adapters.sql.DatabaseUnavailable (503) while PostgreSQL cannot be reached.
StoreError = DatabaseError


@dataclass(frozen=True)
class PublishResult:
    """The outcome of :meth:`RegistryStore.publish`."""

    digest: str
    name: str
    tag: str | None
    created: bool


@dataclass(frozen=True)
class ArtifactRecord:
    """One stored artifact, as the web seed and torrent endpoints need it."""

    digest: str
    name: str
    kind: str
    manifest: bytes
    torrent: bytes
    origin_url: str
    s3_endpoint: str | None
    total_size: int
    created: str


@dataclass(frozen=True)
class Found:
    """What a reference resolves to, read in one statement: digest, name and manifest together.

    ``pulled_from`` and ``checked_at`` are set when a tag was pulled through from an
    upstream registry: its URL, and when (``time.time()``) the tag was last checked there.
    """

    digest: str
    name: str
    manifest: bytes
    pulled_from: str | None = None
    checked_at: float | None = None


@dataclass(frozen=True)
class Deleted:
    """The outcome of :meth:`RegistryStore.delete_artifact`.

    ``dropped_keys`` are the tracker keys (20-byte info-hashes) that no stored artifact
    has any more; artifacts with the same files share a torrent, so a delete may drop none.
    """

    digest: str
    name: str
    tags: list[str]
    dropped_keys: list[bytes]


def encode_cursor(name: str, digest: str) -> str:
    """A list cursor; it reads as a reference (``name@sha256:…``), since '@' is not in names."""
    return f"{name}@{digest}"


def decode_cursor(cursor: str) -> tuple[str, str]:
    name, sep, digest = cursor.rpartition("@")
    if not sep:
        raise BadRequest(f"invalid list cursor {cursor!r}: pass back the 'next' value of the previous page")
    try:
        return validate_name(name), validate_digest(digest)
    except ValueError:
        raise BadRequest(f"invalid list cursor {cursor!r}: pass back the 'next' value of the previous page") from None


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _insert_artifact(db: Transaction, manifest: Manifest, data: bytes, torrent: bytes, origin_url: str,
                     s3_endpoint: str | None) -> bool:
    """Store the artifact in the open transaction unless it is there; True if it was new."""
    digest = manifest.digest
    now = time.time()  # the publish time lives here, beside the manifest, not in its digested bytes
    # One statement, not a look then an insert: two replicas publishing one digest at once
    # both succeed, one of them inserting it.
    cur = db.execute(
        "INSERT INTO artifacts (digest, name, kind, content_key, manifest, torrent, origin_url,"
        " s3_endpoint, total_size, created, published_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT(digest) DO NOTHING",
        (digest, manifest.name, manifest.kind, manifest.content_key, data, bytes(torrent),
         origin_url, s3_endpoint, manifest.total_size, manifest.created or _rfc3339(now), now),
    )
    if cur.rowcount > 0:
        return True
    row = db.execute("SELECT manifest FROM artifacts WHERE digest = ?", (digest,)).fetchone()
    if row is not None and bytes(row[0]) != data:
        # Unreachable short of a SHA-256 collision; refusing beats overwriting.
        raise Conflict(f"artifact {digest} is stored with different manifest bytes")
    return False


def _tag_key(name: str, tag: str) -> str:
    return f"tag {name}:{tag}"


# Told of every operation: its name, its seconds (waiting for the lock included), whether it failed.
Observer = Callable[[str, float, bool], None]
F = TypeVar("F", bound=Callable)


def _timed(method: F) -> F:
    """Report the operation's time and failure (a :class:`StoreError`) to the store's observer."""
    name = method.__name__

    @functools.wraps(method)
    def timed(self: RegistryStore, *args, **kwargs):
        if self._observe is None:
            return method(self, *args, **kwargs)
        start = time.perf_counter()
        failed = False
        try:
            return method(self, *args, **kwargs)
        except StoreError:
            failed = True
            raise
        finally:
            self._observe(name, time.perf_counter() - start, failed)

    return timed  # type: ignore[return-value]


class RegistryStore:
    """The registry's SQL store: immutable artifacts by digest, mutable tags by name.

    ``db`` is a ``postgresql://`` URL, or None for SQLite in ``data_dir``.  ``observe``,
    if given, is called after every operation (on the calling thread) with its name, its
    duration and whether it failed: the registry's metrics.
    """

    def __init__(self, data_dir: Path, observe: Observer | None = None, *, db: str | None = None):
        self._observe = observe
        # The SQLite file, or None on PostgreSQL; ``location`` names either in messages.
        self.path: Path | None = None if db else Path(data_dir) / DB_NAME
        self._db: Database = open_database(db or self.path)
        self.location = self._db.location
        try:
            self.schema_version = self._db.migrate(MIGRATIONS)
        except BaseException:
            self._db.close()
            raise

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._db.dialect

    def close(self) -> None:
        self._db.close()

    def _run(self, fn, *, write: bool = False):
        return self._db.write(fn) if write else self._db.read(fn)

    # -- writes ---------------------------------------------------------------------

    @_timed
    def registry_secret(self, name: str) -> bytes:
        """The registry's random secret ``name`` (32 bytes), made by whichever replica asks first."""
        fresh = secrets.token_bytes(32)

        def tx(db: Transaction) -> bytes:
            db.execute("INSERT INTO registry_secrets (name, secret) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                       (name, fresh))
            return bytes(db.execute("SELECT secret FROM registry_secrets WHERE name = ?", (name,)).fetchone()[0])

        return self._run(tx, write=True)

    @_timed
    def publish(self, manifest: Manifest, torrent: bytes, origin_url: str, s3_endpoint: str | None,
                tag: str | None) -> PublishResult:
        """Store an artifact and point ``name:tag`` at it, in one transaction.

        Publishing a digest that is already stored is idempotent: the first torrent and
        origin are kept (the artifact is immutable) and only the tag moves.
        """
        data = manifest.canonical_bytes()
        digest = manifest.digest

        def tx(db: Transaction) -> PublishResult:
            if tag is not None:
                self._db.lock_key(db, _tag_key(manifest.name, tag))
            created = _insert_artifact(db, manifest, data, torrent, origin_url, s3_endpoint)
            if tag is not None:
                db.execute(
                    "INSERT INTO tags (name, tag, digest) VALUES (?,?,?)"
                    " ON CONFLICT(name, tag) DO UPDATE SET digest = excluded.digest",
                    (manifest.name, tag, digest),
                )
                # A tag published here is this registry's own from now on: an upstream
                # refresh must never move it back.
                db.execute("DELETE FROM pulled_tags WHERE name = ? AND tag = ?", (manifest.name, tag))
            return PublishResult(digest, manifest.name, tag, created)

        return self._run(tx, write=True)

    @_timed
    def pull_through(self, manifest: Manifest, torrent: bytes, upstream: str, tag: str | None) -> PublishResult:
        """Keep an artifact fetched from the upstream registry ``upstream``; with ``tag``, record it as pulled.

        The artifact's origin is the upstream registry itself (its web seed serves the
        bytes).  A tag that was published here meanwhile is left alone: a local tag
        always wins over the upstream's.  Calling it again only refreshes ``checked_at``.
        """
        data = manifest.canonical_bytes()
        digest = manifest.digest

        def tx(db: Transaction) -> PublishResult:
            if tag is not None:
                self._db.lock_key(db, _tag_key(manifest.name, tag))
            created = _insert_artifact(db, manifest, data, torrent, upstream, None)
            if tag is not None:
                local = db.execute(
                    "SELECT 1 FROM tags t WHERE name = ? AND tag = ? AND NOT EXISTS"
                    " (SELECT 1 FROM pulled_tags p WHERE p.name = t.name AND p.tag = t.tag)",
                    (manifest.name, tag)).fetchone()
                if local is None:
                    db.execute(
                        "INSERT INTO tags (name, tag, digest) VALUES (?,?,?)"
                        " ON CONFLICT(name, tag) DO UPDATE SET digest = excluded.digest",
                        (manifest.name, tag, digest),
                    )
                    db.execute(
                        "INSERT INTO pulled_tags (name, tag, upstream, checked_at) VALUES (?,?,?,?)"
                        " ON CONFLICT(name, tag) DO UPDATE SET upstream = excluded.upstream,"
                        " checked_at = excluded.checked_at",
                        (manifest.name, tag, upstream, time.time()),
                    )
            return PublishResult(digest, manifest.name, tag, created)

        return self._run(tx, write=True)

    @_timed
    def drop_pulled_tag(self, name: str, tag: str, digest: str) -> bool:
        """Remove ``name:tag`` if it is still the pulled-through tag pointing at ``digest``.

        Used when the upstream no longer has the tag.  A tag published here, or moved
        since the caller looked, is kept.  True if it was removed.
        """
        def tx(db: Transaction) -> bool:
            self._db.lock_key(db, _tag_key(name, tag))
            cur = db.execute(
                "DELETE FROM tags WHERE name = ? AND tag = ? AND digest = ? AND EXISTS"
                " (SELECT 1 FROM pulled_tags p WHERE p.name = tags.name AND p.tag = tags.tag)",
                (name, tag, digest))
            return cur.rowcount > 0

        return self._run(tx, write=True)

    @_timed
    def delete_tag(self, name: str, tag: str) -> str | None:
        """Remove ``name:tag``; the digest it pointed at, or None if there was no such tag.

        The artifact stays: it is still reachable by digest, and other tags may point at it.
        """
        def tx(db: Transaction) -> str | None:
            self._db.lock_key(db, _tag_key(name, tag))
            row = db.execute("SELECT digest FROM tags WHERE name = ? AND tag = ?", (name, tag)).fetchone()
            if row is not None:
                db.execute("DELETE FROM tags WHERE name = ? AND tag = ?", (name, tag))
            return row[0] if row else None

        return self._run(tx, write=True)

    @_timed
    def delete_artifact(self, digest: str, *, force: bool = False, name: str | None = None) -> Deleted | None:
        """Remove the artifact ``digest``; None if it is not stored (under ``name``, when given).

        While tags point at it, the delete is refused with Conflict unless ``force``, which
        removes those tags first (pointers before data, in the same transaction).  The
        origin's blobs are not touched: other artifacts may share them.
        """
        def tx(db: Transaction) -> Deleted | None:
            row = db.execute("SELECT name, manifest FROM artifacts WHERE digest = ?", (digest,)).fetchone()
            if row is None or (name is not None and row[0] != name):
                return None
            tags = [r[0] for r in db.execute("SELECT tag FROM tags WHERE digest = ? ORDER BY tag", (digest,))]
            if tags and not force:
                shown = ", ".join(f"{row[0]}:{t}" for t in tags[:5]) + (", ..." if len(tags) > 5 else "")
                raise Conflict(
                    f"artifact {digest} is still tagged {shown}; delete those tags first "
                    f"(modelcast rm {row[0]}:{tags[0]}) or force the delete (modelcast rm --force {digest})"
                )
            db.execute("DELETE FROM tags WHERE digest = ?", (digest,))
            db.execute("DELETE FROM artifacts WHERE digest = ?", (digest,))
            info_hash = Manifest.from_bytes(bytes(row[1])).info_hash
            # Artifacts of identical files share one torrent: keep a key another artifact
            # still has, or its peers' announces would start failing.  The hex hash as a
            # substring selects the few candidate manifests without parsing every one.
            dropped = []
            for hex_hash, key in zip([h for h in (info_hash.v1, info_hash.v2) if h], info_hash.tracker_keys()):
                others = db.execute(f"SELECT manifest FROM artifacts WHERE {self._db.contains('manifest')}",
                                    (hex_hash.encode(),)).fetchall()
                if not any(key in Manifest.from_bytes(bytes(o[0])).info_hash.tracker_keys() for o in others):
                    dropped.append(key)
            return Deleted(digest, row[0], tags, dropped)

        return self._run(tx, write=True)

    # -- reads ----------------------------------------------------------------------

    @_timed
    def lookup(self, ref: Reference) -> Found | None:
        """The artifact ``ref`` names, read in one statement, or None.

        For ``name@digest`` the stored artifact is returned whatever its name; the caller
        compares names, so that it can say under which name the digest is published.
        """
        if ref.tag is not None:
            row = self._run(lambda db: db.execute(
                "SELECT a.digest, a.name, a.manifest, p.upstream, p.checked_at FROM tags t"
                " JOIN artifacts a ON a.digest = t.digest"
                " LEFT JOIN pulled_tags p ON p.name = t.name AND p.tag = t.tag"
                " WHERE t.name = ? AND t.tag = ?", (ref.name, ref.tag)).fetchone())
        else:
            row = self._run(lambda db: db.execute(
                "SELECT digest, name, manifest, NULL, NULL FROM artifacts WHERE digest = ?", (ref.digest,)).fetchone())
        if row is None:
            return None
        return Found(row[0], row[1], bytes(row[2]), row[3], row[4])

    @_timed
    def get(self, digest: str) -> ArtifactRecord | None:
        """The whole stored artifact ``digest``, or None."""
        row = self._run(lambda db: db.execute(
            "SELECT digest, name, kind, manifest, torrent, origin_url, s3_endpoint, total_size, created"
            " FROM artifacts WHERE digest = ?", (digest,)).fetchone())
        if row is None:
            return None
        return ArtifactRecord(row[0], row[1], row[2], bytes(row[3]), bytes(row[4]), row[5], row[6], row[7], row[8])

    @_timed
    def list(self, *, name: str | None = None, content_key: str | None = None, limit: int = 100,
             after: str | None = None, name_contains: str | None = None) -> tuple[list[dict], str | None]:
        """One page of artifacts ordered by (name, digest), with their tags, and the next cursor.

        ``name`` matches whole names; ``name_contains`` any name holding that text (the
        console's search).
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")
        where, args = [], []
        if name is not None:
            where.append("name = ?")
            args.append(name)
        if name_contains:
            where.append(self._db.contains("name"))  # not LIKE: '%' and '_' in the text match themselves
            args.append(name_contains)
        if content_key is not None:
            where.append("content_key = ?")
            args.append(content_key)
        if after is not None:
            where.append("(name, digest) > (?, ?)")
            args.extend(decode_cursor(after))
        sql = "SELECT digest, name, kind, total_size, created FROM artifacts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY name, digest LIMIT ?"
        args.append(limit + 1)

        def read(db: Transaction):
            rows = db.execute(sql, args).fetchall()
            page = rows[:limit]
            tags: dict[str, list[str]] = {r[0]: [] for r in page}
            if page:
                marks = ",".join("?" * len(page))
                for digest, tag in db.execute(
                    f"SELECT digest, tag FROM tags WHERE digest IN ({marks}) ORDER BY tag", [r[0] for r in page]
                ):
                    tags[digest].append(tag)
            return rows, page, tags

        rows, page, tags = self._run(read)
        items = [
            {"digest": d, "name": n, "kind": k, "total_size": s, "created": c, "tags": tags[d]}
            for d, n, k, s, c in page
        ]
        nxt = encode_cursor(page[-1][1], page[-1][0]) if len(rows) > limit else None
        return items, nxt

    @_timed
    def names(self, digests: Iterable[str]) -> dict[str, str]:
        """The name of each of ``digests`` that is stored (for showing what nodes report)."""
        digests = list(dict.fromkeys(digests))
        out: dict[str, str] = {}
        for i in range(0, len(digests), 500):  # SQLite bounds the parameters of one statement
            chunk = digests[i:i + 500]
            rows = self._run(lambda db: db.execute(
                f"SELECT digest, name FROM artifacts WHERE digest IN ({','.join('?' * len(chunk))})", chunk).fetchall())
            out.update(rows)
        return out

    @_timed
    def tags_of(self, digest: str) -> list[str]:
        """The tags that point at ``digest``, in order."""
        rows = self._run(lambda db: db.execute(
            "SELECT tag FROM tags WHERE digest = ? ORDER BY tag", (digest,)).fetchall())
        return [r[0] for r in rows]

    @_timed
    def all_info_hashes(self) -> list[dict]:
        """The ``info_hash`` object of every stored manifest (to rebuild the tracker allow-list)."""
        rows = self._run(lambda db: db.execute("SELECT manifest FROM artifacts").fetchall())
        return [json.loads(bytes(r[0]))["info_hash"] for r in rows]

    # -- node identity (tracker/nodekeys.py) ---------------------------------------------

    @_timed
    def bind_node_key(self, node_id: str, key_hash: str, announce: str) -> tuple[str, str]:
        """Bind ``node_id`` to a key unless it is bound already; the binding that holds: (key_hash, announce).

        Two replicas binding the same id at once agree: the first insert wins, both read it.
        """
        def tx(db: Transaction) -> tuple[str, str]:
            db.execute("INSERT INTO node_keys (node_id, key_hash, announce, bound_at) VALUES (?, ?, ?, ?)"
                       " ON CONFLICT (node_id) DO NOTHING", (node_id, key_hash, announce, time.time()))
            row = db.execute("SELECT key_hash, announce FROM node_keys WHERE node_id = ?", (node_id,)).fetchone()
            return row[0], row[1]

        return self._run(tx, write=True)

    @_timed
    def node_key_of(self, node_id: str) -> tuple[str, str] | None:
        """The binding of ``node_id``: (key_hash, announce), or None if it is not bound."""
        row = self._run(lambda db: db.execute("SELECT key_hash, announce FROM node_keys WHERE node_id = ?",
                                              (node_id,)).fetchone())
        return (row[0], row[1]) if row else None

    @_timed
    def node_keys(self, limit: int) -> list[tuple[str, str, str]]:
        """Up to ``limit`` bindings, the most recently bound last: (node_id, key_hash, announce)."""
        rows = self._run(lambda db: db.execute(
            "SELECT node_id, key_hash, announce FROM node_keys ORDER BY bound_at DESC LIMIT ?", (limit,)).fetchall())
        return [(r[0], r[1], r[2]) for r in reversed(rows)]
