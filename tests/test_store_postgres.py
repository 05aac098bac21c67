"""The registry on PostgreSQL: migrations, replicas sharing one database, and outages of the database.

The registry API's own tests (test_registry.py, test_registry_lifecycle.py) run on both
stores through the ``stores`` mark; these are what only a shared server database can show.
Every PostgreSQL here is a real server started by the tests (harness/postgres.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import psycopg
import pytest

from adapters.origin import FileOrigin
from modelcast.reference import Reference
from harness.postgres import PostgresServer, postgres_bin
from tracker.store import DB_NAME, MIGRATIONS, RegistryStore, StoreError

from .helpers import AUTH, TOKEN, build_artifact, run_cli, start_tracker, wait_until_async

NAME = "demo/model"


def _versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]


def _artifacts(tmp_path, n: int) -> list:
    """``n`` artifacts of one name, each with different bytes (so different digests)."""
    return [build_artifact(tmp_path / f"a{i}", NAME, files={"w.bin": i.to_bytes(4, "big") * 1000}) for i in range(n)]


# -- migrations ----------------------------------------------------------------------------


def test_migrations_run_once_however_often_and_however_many_start(postgres, postgres_db, tmp_path):
    """Starting twice keeps the data; eight stores opening a fresh database at once apply each migration once."""
    art = _artifacts(tmp_path, 1)[0]
    first = RegistryStore(tmp_path, db=postgres_db)
    assert (first.dialect, first.schema_version) == ("postgresql", len(MIGRATIONS))
    first.publish(art.manifest, art.torrent, "file:///origin", None, "v1")
    first.close()
    again = RegistryStore(tmp_path, db=postgres_db)
    assert again.get(art.digest).manifest == art.manifest.canonical_bytes()
    again.close()
    assert _versions(postgres_db) == list(range(1, len(MIGRATIONS) + 1))

    # A second fresh database, opened by eight stores released together.
    name = f"{postgres_db.rsplit('/', 1)[1]}_b"
    fresh = postgres.create_database(name)
    try:
        barrier = threading.Barrier(8)

        def open_store(_):
            barrier.wait()
            store = RegistryStore(tmp_path, db=fresh)
            store.close()
            return store.schema_version

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(open_store, range(8))) == [len(MIGRATIONS)] * 8
        assert _versions(fresh) == list(range(1, len(MIGRATIONS) + 1))
    finally:
        postgres.drop_database(name)


def test_a_database_newer_than_this_modelcast_is_refused(postgres_db, tmp_path):
    RegistryStore(tmp_path, db=postgres_db).close()
    with psycopg.connect(postgres_db) as conn:
        conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
    with pytest.raises(StoreError, match="schema version 99, newer than this modelcast knows"):
        RegistryStore(tmp_path, db=postgres_db)


def test_sqlite_registry_from_before_schema_versions_is_adopted(tmp_path):
    """A registry.sqlite3 made before versions were recorded keeps its artifacts and is migrated from version 1."""
    art = _artifacts(tmp_path, 1)[0]
    old = sqlite3.connect(tmp_path / DB_NAME)
    for statement in MIGRATIONS[0]:
        old.execute(statement.format(blob="BLOB", real="REAL", bigint="INTEGER", key="TEXT"))
    old.execute("INSERT INTO artifacts VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (art.digest, NAME, "model", art.manifest.content_key, art.manifest.canonical_bytes(), art.torrent,
                 "file:///origin", None, art.manifest.total_size, "2025-01-01T00:00:00Z", 0.0))
    old.execute("INSERT INTO tags VALUES (?,?,?)", (NAME, "v1", art.digest))
    old.commit()
    old.close()
    store = RegistryStore(tmp_path)
    assert (store.dialect, store.schema_version) == ("sqlite", len(MIGRATIONS))
    assert store.lookup(Reference.parse(f"{NAME}:v1")).digest == art.digest
    store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        assert [r[0] for r in db.execute("SELECT version FROM schema_version")] == list(range(1, len(MIGRATIONS) + 1))  # adopted as 1, then migrated on


def test_the_relay_secret_is_one_per_database_on_both_stores(postgres_db, tmp_path):
    """Replicas over one database derive the same relay secrets (tracker/relaytokens.py); reopening keeps it."""
    for db in (postgres_db, None):
        stores = [RegistryStore(tmp_path / "data", db=db) for _ in range(2)]
        try:
            secrets = {s.registry_secret("relay") for s in stores}
            assert len(secrets) == 1 and len(next(iter(secrets))) == 32
        finally:
            for s in stores:
                s.close()
        again = RegistryStore(tmp_path / "data", db=db)
        assert again.registry_secret("relay") in secrets
        again.close()


def test_tracker_refuses_a_database_url_it_cannot_use(tmp_path):
    out = run_cli("tracker", "--listen", "127.0.0.1:0", "--db", "mysql://db.example/registry", timeout=60)
    assert out.returncode == 1
    assert "expected a postgresql://USER@HOST:PORT/DBNAME URL" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("tracker", "--listen", "127.0.0.1:0", timeout=60)
    assert out.returncode == 1 and "needs --data DIR (SQLite) or --db postgresql://" in out.stderr


# -- the store's own semantics, on both engines ------------------------------------------------


@pytest.mark.stores("sqlite", "postgresql")
def test_pulled_tags_shared_torrents_and_search_behave_alike_on_both_stores(registry_db, tmp_path):
    """What the HTTP tests reach only through federation and the console, on each engine."""
    a, b = _artifacts(tmp_path, 2)
    twin = build_artifact(tmp_path / "twin", "other/model", files={"w.bin": (0).to_bytes(4, "big") * 1000})
    assert twin.manifest.info_hash == a.manifest.info_hash  # same files, same torrent
    store = RegistryStore(tmp_path / "reg", db=registry_db)
    try:
        v1 = Reference.parse(f"{NAME}:v1")
        store.pull_through(a.manifest, a.torrent, "http://parent:7070", "v1")
        found = store.lookup(v1)
        assert (found.digest, found.pulled_from) == (a.digest, "http://parent:7070") and found.checked_at > 0
        # A local publish makes the tag local for good: the upstream cannot move it back.
        store.publish(b.manifest, b.torrent, "file:///origin", None, "v1")
        store.pull_through(a.manifest, a.torrent, "http://parent:7070", "v1")
        found = store.lookup(v1)
        assert (found.digest, found.pulled_from) == (b.digest, None)
        assert not store.drop_pulled_tag(NAME, "v1", b.digest)
        # A pulled tag the parent dropped goes, unless it moved meanwhile.
        store.pull_through(a.manifest, a.torrent, "http://parent:7070", "v2")
        assert not store.drop_pulled_tag(NAME, "v2", b.digest)
        assert store.drop_pulled_tag(NAME, "v2", a.digest)
        assert store.lookup(Reference.parse(f"{NAME}:v2")) is None

        store.publish(twin.manifest, twin.torrent, "file:///origin", None, None)
        items, _ = store.list(name_contains="model")
        assert {i["name"] for i in items} == {NAME, "other/model"}
        assert [i["name"] for i in store.list(name_contains="ther/")[0]] == ["other/model"]
        assert store.list(name_contains="%")[0] == []  # a plain substring, no wildcard
        assert store.names([a.digest, twin.digest, "sha256:" + "0" * 64]) == {a.digest: NAME, twin.digest: "other/model"}
        assert store.tags_of(b.digest) == ["v1"]
        # A torrent another artifact still has stays tracked; the last one's goes.
        assert store.delete_artifact(a.digest).dropped_keys == []
        assert sorted(store.delete_artifact(twin.digest).dropped_keys) == sorted(a.manifest.info_hash.tracker_keys())
        assert len(store.all_info_hashes()) == 1
    finally:
        store.close()


# -- replicas on one database ----------------------------------------------------------------


def _manifest_digest(manifest: dict) -> str:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


async def test_concurrent_publishes_to_one_tag_through_two_registries(postgres_db, tmp_path):
    """20 publishes of different artifacts to one name:tag, alternating between two registry processes on
    one PostgreSQL: all succeed, both registries then resolve the tag to one of them, every manifest
    stays stored, and no resolve meanwhile returns a digest without its manifest."""
    arts = _artifacts(tmp_path, 20)
    origin = FileOrigin(tmp_path / "origin")
    registries = [start_tracker(tmp_path, token=TOKEN, name=f"registry-{i}", data_dir=tmp_path / f"data-{i}",
                                extra=["--db", postgres_db], start=False) for i in range(2)]
    try:
        # Both start at once on the fresh database: their migrations race too.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda r: r.start(), registries))
        published = {a.digest for a in arts}
        done = asyncio.Event()
        resolved: list[str] = []

        async with aiohttp.ClientSession() as http:
            async def publish(i: int) -> int:
                url = registries[i % 2].url
                async with http.post(f"{url}/v1/artifacts", json=arts[i].body(origin, tag="latest"),
                                     headers=AUTH) as resp:
                    return resp.status

            async def reader(url: str) -> None:
                while not done.is_set():
                    async with http.get(f"{url}/v1/resolve", params={"ref": f"{NAME}:latest"}) as resp:
                        if resp.status == 404:  # no publish has committed yet
                            continue
                        assert resp.status == 200, await resp.text()
                        body = await resp.json()
                    # The digest always comes with its manifest, and they match.
                    assert body["digest"] in published and _manifest_digest(body["manifest"]) == body["digest"]
                    resolved.append(body["digest"])

            readers = [asyncio.create_task(reader(r.url)) for r in registries]
            statuses = await asyncio.gather(*(publish(i) for i in range(20)))
            done.set()
            await asyncio.gather(*readers)
            assert statuses == [201] * 20

            winners = set()
            for r in registries:
                async with http.get(f"{r.url}/v1/resolve", params={"ref": f"{NAME}:latest"}) as resp:
                    winners.add((await resp.json())["digest"])
                for digest in published:
                    async with http.get(f"{r.url}/v1/artifacts/{digest}") as resp:
                        assert resp.status == 200, f"{digest} lost at {r.url}"
                        assert _manifest_digest(json.loads(await resp.read())) == digest
                async with http.get(f"{r.url}/v1/artifacts", params={"name": NAME, "limit": "100"}) as resp:
                    listed = (await resp.json())["artifacts"]
                assert {a["digest"] for a in listed} == published
                assert [a["digest"] for a in listed if "latest" in a["tags"]] == list(winners)
            assert len(winners) == 1 and winners <= published
        print(f"{len(resolved)} resolves during the publishes; winner {winners.pop()}")
    finally:
        for r in registries:
            r.stop()


# -- PostgreSQL down for a while --------------------------------------------------------------


@pytest.fixture
def own_postgres():
    """A PostgreSQL server for one test, which it may stop and start (the session's stays up)."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql; `make system-tools` installs it as root)")
    server = PostgresServer().start()
    yield server
    server.close()


OUTAGE_S = 5.0


async def test_postgres_stopped_for_5s_answers_503_then_recovers(own_postgres, tmp_path):
    """While PostgreSQL is stopped, reads and writes answer 503 with Retry-After (one log line for the
    outage); once it is back, they succeed by themselves and nothing published before is lost."""
    url = own_postgres.create_database("registry")
    before, during = _artifacts(tmp_path, 2)
    origin = FileOrigin(tmp_path / "origin")
    registry = start_tracker(tmp_path, token=TOKEN, extra=["--db", url])
    base = registry.url
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/artifacts", json=before.body(origin, tag="v1"), headers=AUTH) as resp:
                assert resp.status == 201, await resp.text()

            own_postgres.stop()
            requests = {
                "resolve": lambda: http.get(f"{base}/v1/resolve", params={"ref": f"{NAME}:v1"}),
                "manifest": lambda: http.get(f"{base}/v1/artifacts/{before.digest}"),
                "torrent": lambda: http.get(f"{base}/v1/artifacts/{before.digest}/torrent"),
                "list": lambda: http.get(f"{base}/v1/artifacts"),
                "publish": lambda: http.post(f"{base}/v1/artifacts", json=during.body(origin, tag="v2"),
                                             headers=AUTH),
                "delete tag": lambda: http.delete(f"{base}/v1/tags/{NAME}:v1", headers=AUTH),
            }
            answered = {what: 0 for what in requests}
            down_until = time.monotonic() + OUTAGE_S
            while time.monotonic() < down_until:
                for what, send in requests.items():
                    t0 = time.monotonic()
                    async with send() as resp:
                        body = await resp.json()
                        assert resp.status == 503, f"{what}: {resp.status} {body}"
                        assert resp.headers.get("Retry-After") == "1", what
                        assert body["error"]["code"] == "unavailable" and "unreachable" in body["error"]["message"]
                    assert time.monotonic() - t0 < 2, f"{what} took {time.monotonic() - t0:.1f} s to answer 503"
                    answered[what] += 1
                await asyncio.sleep(0.1)  # pacing between rounds, not a wait for a condition
            assert min(answered.values()) >= 3, answered

            own_postgres.start()

            async def resolves():
                async with http.get(f"{base}/v1/resolve", params={"ref": f"{NAME}:v1"}) as resp:
                    return resp.status == 200 and (await resp.json())["digest"] == before.digest

            await wait_until_async(resolves, 30, message="resolve to succeed after PostgreSQL came back")
            async with http.post(f"{base}/v1/artifacts", json=during.body(origin, tag="v2"), headers=AUTH) as resp:
                assert resp.status == 201, await resp.text()
            for tag, art in (("v1", before), ("v2", during)):
                async with http.get(f"{base}/v1/resolve", params={"ref": f"{NAME}:{tag}"}) as resp:
                    assert resp.status == 200 and (await resp.json())["digest"] == art.digest
            async with http.get(f"{base}/v1/artifacts") as resp:
                assert {a["digest"] for a in (await resp.json())["artifacts"]} == {before.digest, during.digest}

            # A restart between two requests: the pooled connections are dead, the next request still succeeds.
            own_postgres.stop()
            own_postgres.start()
            async with http.get(f"{base}/v1/resolve", params={"ref": f"{NAME}:v2"}) as resp:
                assert resp.status == 200, await resp.text()
        log = registry.log_text()
        assert log.count("is unreachable") == 1, log
        assert log.count("is reachable again") == 1, log
        assert "Traceback" not in log, log
    finally:
        registry.stop()
