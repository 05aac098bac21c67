"""The SQL engines behind one interface: SQLite (embedded, the default) and PostgreSQL (psycopg 3).

The registry's store (tracker/store.py) writes each query once, with ``?`` placeholders,
and runs it through :meth:`Database.read` or :meth:`Database.write`; the few spots where
the dialects differ go through :class:`Database` helpers (:meth:`~Database.contains`,
:meth:`~Database.lock_key`, :attr:`~Database.types`).  Nothing else imports ``sqlite3``
or ``psycopg``.

Errors are translated here: :class:`DatabaseError` for a failed statement, and
:class:`DatabaseUnavailable` (503, with ``Retry-After``) while PostgreSQL cannot be
reached.  An outage is logged once, when it starts, and once when it ends; every request
meanwhile tries to connect again, so the first one after PostgreSQL is back succeeds.

Schema migrations (:meth:`Database.migrate`) run at start-up, each in the transaction that
records it in ``schema_version``; on PostgreSQL under an advisory lock, so replicas that
start together apply each one once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar
from urllib.parse import urlsplit

from modelcast.errors import ModelcastError, Unavailable

log = logging.getLogger("modelcast.sql")

T = TypeVar("T")

# Connections PostgreSQL gives one registry process: store calls run on asyncio's worker
# threads (at most min(32, CPUs + 4)), so more would sit idle.
POOL_SIZE = 8
CONNECT_TIMEOUT_S = 3  # an unreachable host (not a refused port) fails a request after this
RETRY_AFTER_S = 1
# A write that lost a race (deadlock, serialization failure, a row deleted under it) is run
# again from the start, at most this many times.
MAX_TX_ATTEMPTS = 5
# Held (pg_advisory_xact_lock) while migrations run, so replicas starting together apply each once.
MIGRATION_LOCK_KEY = 0x6D6F64656C63  # "modelc"


class DatabaseError(ModelcastError):
    """The registry database failed (disk full, corrupt file, a statement refused)."""

    code = "store_error"
    http_status = 500


class DatabaseUnavailable(Unavailable, DatabaseError):
    """The registry database cannot be reached now (PostgreSQL down or restarting); retry shortly."""

    retry_after_s = RETRY_AFTER_S


# One schema version: DDL statements, with {blob}, {real}, {bigint} and {key} for the types that differ.
Migration = Sequence[str]


class Transaction:
    """What a store function gets: ``execute`` with ``?`` placeholders, on one connection, in one transaction."""

    def __init__(self, conn: Any, dialect: str):
        self._conn = conn
        self._pg = dialect == "postgresql"
        self.statements = 0  # that succeeded: 0 means nothing reached the server on this connection yet

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; the DB-API cursor (fetchone, fetchall, rowcount, iteration)."""
        cur = self._conn.execute(_pg_sql(sql) if self._pg else sql, params)
        self.statements += 1
        return cur


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    # Our statements hold no '?' or '%' in literals, so placeholders translate by text.
    return sql.replace("%", "%%").replace("?", "%s")


class Database:
    """One registry database: what both engines offer the store."""

    dialect: str
    #: Column types that differ by engine, for the schema's DDL: ``{blob}``, ``{real}``, ``{bigint}``,
    #: and ``{key}``, text compared byte by byte (as SQLite does), so lists page in one order anywhere.
    types: dict[str, str]
    #: Where it is, for messages (never a password).
    location: str

    def read(self, fn: Callable[[Transaction], T]) -> T:
        raise NotImplementedError

    def write(self, fn: Callable[[Transaction], T]) -> T:
        """Run ``fn`` in one transaction: all of it commits, or none."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def contains(self, column: str) -> str:
        """A condition: ``column`` holds the next parameter as a plain substring (no LIKE wildcards)."""
        raise NotImplementedError

    def lock_key(self, tx: Transaction, key: str) -> None:
        """Hold a lock on ``key`` until ``tx`` ends, so writers of one key across processes take turns."""

    def migrate(self, migrations: Sequence[Migration]) -> int:
        """Apply ``migrations[i]`` (schema version i + 1) where the database is older; the version now.

        Safe to run again and from several processes at once: each migration runs in the
        transaction that records it, under the engine's lock.
        """
        def tx(t: Transaction) -> int:
            self._lock_migrations(t)
            t.execute(f"CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                      f" applied_at {self.types['real']} NOT NULL)")
            current = t.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            if current > len(migrations):
                raise DatabaseError(f"registry database {self.location} has schema version {current}, newer than "
                                    f"this modelcast knows ({len(migrations)}); run a newer modelcast")
            for version in range(current + 1, len(migrations) + 1):
                for statement in migrations[version - 1]:
                    t.execute(statement.format(**self.types))
                t.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, time.time()))
                log.info("registry database %s: schema version %d applied", self.location, version)
            return len(migrations)

        return self.write(tx)

    def _lock_migrations(self, tx: Transaction) -> None:
        pass


def open_database(target: str | Path) -> Database:
    """A ``postgresql://`` (or ``postgres://``) URL opens PostgreSQL; a :class:`~pathlib.Path`, that SQLite file."""
    if isinstance(target, Path):
        return SqliteDatabase(target)
    if target.split("://", 1)[0] in ("postgresql", "postgres"):
        return PostgresDatabase(target)
    shown = f"{target.split('://', 1)[0]}://…" if "://" in target else repr(target)  # no password in messages
    raise DatabaseError(f"registry database {shown}: expected a postgresql://USER@HOST:PORT/DBNAME URL "
                        "(or no --db, for SQLite in the --data directory)")


# ---------------------------------------------------------------------------------------
# SQLite


class SqliteDatabase(Database):
    """One SQLite file, one connection behind a lock.

    The lock serialises writers the way SQLite does anyway and keeps every transaction on
    one connection.  WAL mode lets a reader run while a writer commits, and makes a crash
    mid-transaction leave all of it or none.  ``BEGIN IMMEDIATE`` takes the file's write
    lock first, so two processes on one file take turns (busy_timeout: 5 s).
    """

    dialect = "sqlite"
    types = {"blob": "BLOB", "real": "REAL", "bigint": "INTEGER", "key": "TEXT"}

    def __init__(self, path: Path):
        self.path = path
        self.location = str(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False: calls arrive on asyncio's worker threads; the lock
            # below is what keeps them from interleaving.
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"cannot open the registry database {path}: {exc}") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def contains(self, column: str) -> str:
        return f"instr({column}, ?) > 0"

    def read(self, fn: Callable[[Transaction], T]) -> T:
        with self._lock:
            try:
                return fn(Transaction(self._db, self.dialect))
            except sqlite3.Error as exc:
                raise DatabaseError(f"registry database {self.path} failed: {exc}") from exc

    def write(self, fn: Callable[[Transaction], T]) -> T:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(Transaction(self._db, self.dialect))
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise DatabaseError(f"registry database {self.path} failed: {exc}") from exc


# ---------------------------------------------------------------------------------------
# PostgreSQL


def _display(url: str) -> str:
    """``postgresql://user@host:port/db`` without the password."""
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        return f"{parts.scheme}://{netloc}{parts.path}"
    except ValueError:
        return "postgresql://…"


class PostgresDatabase(Database):
    """PostgreSQL through psycopg 3: a small pool of autocommit connections, writes in explicit transactions.

    Reads are single statements in autocommit.  Writes run in READ COMMITTED
    transactions; the store serialises writers of one ``name:tag`` with an advisory
    lock (:meth:`lock_key`), and a transaction that loses a race PostgreSQL detects
    (deadlock, serialization failure, a referenced row deleted meanwhile) runs again.

    The pool is ours, a list of idle connections, rather than psycopg_pool's: that pool
    reconnects in the background with a growing back-off (1, 2, 4 s …) while requests wait
    for it, so an outage would answer slowly and end seconds late.  Here a request during
    an outage fails at once (the connection is refused) and the first one after it
    reconnects; a connection found dead is dropped with every idle one (after a restart
    they all are) and the request runs once more on a fresh one.
    """

    dialect = "postgresql"
    types = {"blob": "BYTEA", "real": "DOUBLE PRECISION", "bigint": "BIGINT", "key": 'TEXT COLLATE "C"'}

    def __init__(self, url: str):
        import psycopg  # only a PostgreSQL registry needs the driver loaded

        self._psycopg = psycopg
        self.url = url
        self.location = _display(url)
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(POOL_SIZE)
        self._down_since: float | None = None
        self._closed = False
        # Fail at start on a URL libpq cannot parse, not on the first request.
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise DatabaseError(f"registry database URL {self.location} is not valid: {exc}") from None

    # -- the pool -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self) -> Iterator[tuple[Any, bool]]:
        """A connection and whether it was just opened; returned to the pool if still healthy."""
        pq = self._psycopg.pq
        self._slots.acquire()
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            fresh = conn is None
            if conn is None:
                conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                             application_name="modelcast-registry")
            try:
                yield conn, fresh
            finally:
                # After a refused statement the connection is idle again (rolled back) and kept.
                if not conn.closed and conn.info.transaction_status == pq.TransactionStatus.IDLE:
                    with self._lock:
                        if not self._closed:
                            self._idle.append(conn)
                            conn = None
                if conn is not None:
                    conn.close()
        finally:
            self._slots.release()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._drop_idle()

    # -- running statements ---------------------------------------------------------------

    def contains(self, column: str) -> str:
        return f"position(? in {column}) > 0"

    def lock_key(self, tx: Transaction, key: str) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (key,))

    def _lock_migrations(self, tx: Transaction) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))

    def read(self, fn: Callable[[Transaction], T]) -> T:
        return self._run(fn, write=False)

    def write(self, fn: Callable[[Transaction], T]) -> T:
        return self._run(fn, write=True)

    def _run(self, fn: Callable[[Transaction], T], *, write: bool) -> T:
        errors = self._psycopg.errors
        stale_retried = False
        attempt = 0
        while True:
            attempt += 1
            tx = None
            try:
                with self._connection() as (conn, fresh):
                    tx = Transaction(conn, self.dialect)
                    try:
                        if write:
                            with conn.transaction():
                                result = fn(tx)
                        else:
                            result = fn(tx)
                    except self._psycopg.Error:
                        if not fresh and tx.statements == 0 and _connection_lost(conn) and not stale_retried:
                            # A pooled connection that died while idle (PostgreSQL restarted):
                            # nothing reached the server, so running it again is safe.
                            stale_retried = True
                            self._drop_idle()
                            conn.close()
                            attempt -= 1
                            continue
                        raise
                self._reachable()
                return result
            except (errors.DeadlockDetected, errors.SerializationFailure, errors.ForeignKeyViolation) as exc:
                if not write or attempt >= MAX_TX_ATTEMPTS:
                    raise DatabaseError(f"registry database {self.location}: {_first_line(exc)}") from exc
            except self._psycopg.Error as exc:
                if _is_outage(exc, tx):
                    self._unreachable(exc)
                    raise DatabaseUnavailable(
                        f"registry database {self.location} is unreachable ({_first_line(exc)}); "
                        f"retry in {RETRY_AFTER_S} s") from None
                raise DatabaseError(f"registry database {self.location} failed: {_first_line(exc)}") from exc

    # -- outages: one line when one starts, one when it ends --------------------------------

    def _unreachable(self, exc: Exception) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        self._drop_idle()
        log.warning("registry database %s is unreachable (%s); answering 503 with Retry-After until it is back",
                    self.location, _first_line(exc))

    def _reachable(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.info("registry database %s is reachable again after %.1f s", self.location, time.monotonic() - since)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]


def _connection_lost(conn: Any) -> bool:
    return conn.closed or conn.broken


def _is_outage(exc: Exception, tx: Transaction | None) -> bool:
    """Whether ``exc`` says the server cannot be reached (as opposed to a statement it refused)."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if tx is None:  # connecting failed
        return True
    # 08: connection exception; 57P0x: shutting down, starting up, crashed (class 57 also
    # holds 57014, a cancelled statement, which is not an outage).
    if sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03", "57P04", "57P05"):
        return True
    return _connection_lost(tx._conn)
