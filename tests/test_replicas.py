"""Replicas of the registry over one PostgreSQL: clients and nodes fail over, torrents list every replica.

Every process here is real: ``modelcast tracker`` replicas sharing a PostgreSQL server the
tests start (harness/postgres.py) and one file origin, node daemons given every replica
(``--registry URL1,URL2``), libtorrent and aria2 as BitTorrent clients.  Without a shared
swarm store (Redis) each replica keeps its own swarms, which is what lets these tests see
which replica a client talks to.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness.procs import free_port
from modelcast.manifest import Manifest
from tracker.bencode import bdecode, torrent_info_bytes
from tracker.client import RegistryClient

from .helpers import TOKEN, make_model, publish, registry_stats, run_cli, start_tracker, tree_hashes, wait_until

MiB = 1 << 20
ARIA2C = shutil.which("aria2c")


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"}),
                                timeout=timeout) as resp:
        return resp.read()


def _pull_status(node_url: str, digest: str) -> dict | None:
    listing = json.loads(_get(f"{node_url}/v1/artifacts", timeout=2))
    return next((a for a in listing["artifacts"] if a["digest"] == digest), None)


def _scrape_counts(registry: str, info_hash_hex: str) -> tuple[int, int]:
    """(complete, incomplete) of one swarm at ``registry`` (BEP 48 scrape)."""
    from urllib.parse import quote_from_bytes

    ih = bytes.fromhex(info_hash_hex)
    answer = bdecode(_get(f"{registry}/scrape?info_hash={quote_from_bytes(ih, safe='')}"))
    counts = answer[b"files"].get(ih, {})
    return counts.get(b"complete", 0), counts.get(b"incomplete", 0)


def _scrape_complete(registry: str, info_hash_hex: str) -> int:
    return _scrape_counts(registry, info_hash_hex)[0]


def _replicas(tmp_path, db: str, n: int, *extra: str, replica_flags: bool = False) -> list:
    """``n`` registry processes over the database ``db``, one data directory each (not started)."""
    ports = [free_port() for _ in range(n)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    flags = [f for u in urls for f in ("--replica", u)] if replica_flags else []
    return [start_tracker(tmp_path, token=TOKEN, name=f"replica-{i}", port=ports[i], data_dir=tmp_path / f"data-{i}",
                          extra=["--db", db, "--announce-interval", "5", *flags, *extra], start=False)
            for i in range(n)]


@pytest.fixture
def replicas(request):
    started: list = []
    yield started
    for r in started:
        r.stop()


# -- the client ------------------------------------------------------------------------------


def test_a_client_given_every_replica_fails_over_on_refused_connections_and_503s(postgres_db, tmp_path, replicas):
    """The CLI and every RegistryClient: a replica that refuses connections, then one whose database is
    down (503 with Retry-After), are skipped for the next; the one that answered stays current."""
    from harness.postgres import PostgresServer

    own = PostgresServer().start()  # stopped below; the session's server stays up for the healthy replica
    try:
        healthy = _replicas(tmp_path, postgres_db, 1)[0]
        sick = start_tracker(tmp_path, token=TOKEN, name="sick", data_dir=tmp_path / "data-sick",
                             extra=["--db", own.create_database("registry")], start=False)
        replicas.extend([healthy, sick])
        healthy.start()
        sick.start()
        model = make_model(tmp_path / "m", {"w.bin": 4096})
        digest = publish(healthy.url, model, "rep/m:v1", (tmp_path / "origin").as_uri())
        assert publish(sick.url, model, "rep/m:v1", (tmp_path / "origin").as_uri()) == digest
        dead = f"http://127.0.0.1:{free_port()}"  # nobody listens there

        # Through the CLI: the registry flag repeated, the first replica refuses connections.
        out = run_cli("inspect", "rep/m:v1", "--registry", dead, "--registry", healthy.url, "--token", TOKEN)
        assert out.returncode == 0 and digest in out.stdout, out.stderr

        own.stop()
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(f"{sick.url}/v1/resolve?ref=rep/m:v1")
        assert err.value.code == 503 and err.value.headers.get("Retry-After")

        async def through(urls: list[str]) -> tuple[str, str, int]:
            async with RegistryClient(",".join(urls), TOKEN) as client:
                got, _ = await client.resolve("rep/m:v1")
                current = client.base_url
                await client.torrent(got)  # the replica that answered stays current: no failover more
                return got, current, client.failovers

        assert asyncio.run(through([dead, sick.url, healthy.url])) == (digest, healthy.url, 2)
        # Every replica down: the last one's error, saying which replica and why.
        healthy.stop()
        out = run_cli("inspect", "rep/m:v1", "--registry", f"{sick.url},{healthy.url}", "--token", TOKEN)
        assert out.returncode != 0 and healthy.url in out.stderr and "Traceback" not in out.stderr
    finally:
        own.close()


# -- a node, when the replica it talks to dies ----------------------------------------------


STALL_LIMIT_S = 3.0


@pytest.fixture(params=["memory", "redis"])
def swarm_store(request, tmp_path):
    """The replicas' swarm store: each its own (``memory``), or one Redis server they share."""
    if request.param == "memory":
        yield []
        return
    from harness.redis import RedisServer, redis_server_bin

    if redis_server_bin() is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; make system-tools installs it)")
    with RedisServer(tmp_path / "redis") as redis:
        yield ["--swarm-store", redis.url]


def test_a_node_given_two_replicas_finishes_byte_identical_when_the_first_is_killed_mid_pull(
        postgres_db, tmp_path, node_factory, replicas, swarm_store):
    """SIGKILL the replica a node pulls from: origin fetches, heartbeats and announces move to the other
    replica; the pull ends byte-identical and its progress (the node's own status, sampled every
    0.1 s) never stands still for more than 3 s.  Over a shared Redis swarm store the node is in the
    second replica's swarm before it ever announces there."""
    first, second = _replicas(tmp_path, postgres_db, 2, *swarm_store)
    replicas.extend([first, second])
    first.start()
    size = 24 * MiB
    model = make_model(tmp_path / "m", {"weights.bin": size - 5000, "config.json": 5000})
    digest = publish(first.url, model, "rep/big:v1", (tmp_path / "origin").as_uri())
    second.start()
    # 6 MiB/s: about 4 s of pulling, so the kill lands in the middle.
    node = node_factory(f"{first.url},{second.url}", "n", "--download-limit", "6M")

    samples: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                job = _pull_status(node.url, digest)
            except OSError:
                job = None
            if job is not None:
                samples.append((time.monotonic(), job["done_bytes"], job["state"]))
                if job["state"] in ("ready", "failed"):
                    return
            time.sleep(0.1)  # the sampling period, not a wait for a condition

    out = run_cli("pull", "rep/big:v1", "--no-wait", "--node", node.url)
    assert out.returncode == 0, out.stderr
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        wait_until(lambda: samples and samples[-1][1] >= size // 4, 60, message="a quarter pulled")
        served_by_first = registry_stats(first.url)["origin_bytes_served"]
        info_hash = Manifest.from_bytes(_get(f"{first.url}/v1/artifacts/{digest}"), expected_digest=digest).info_hash.v1
        if swarm_store:
            assert _scrape_counts(second.url, info_hash) == (0, 1)  # the node, downloading
        first.kill()
        killed_at = time.monotonic()
        sampler.join(120)
    finally:
        stop.set()
    assert samples and samples[-1][2] == "ready", samples[-5:]
    path = _pull_status(node.url, digest)["path"]
    assert tree_hashes(Path(path)) == tree_hashes(model)
    # Progress never stood still for longer than the limit, the failover included.
    last_t, last_done = samples[0][0], samples[0][1]
    longest = 0.0
    for t, done, _ in samples[1:]:
        if done > last_done:
            longest = max(longest, t - last_t)
            last_t, last_done = t, done
    assert longest <= STALL_LIMIT_S, f"progress stood still for {longest:.1f} s"
    print(f"longest stand-still {longest:.2f} s; ready {samples[-1][0] - killed_at:.1f} s after the kill")
    # The second replica served the rest, and knows the node from its heartbeats.
    stats = registry_stats(second.url)
    assert stats["origin_bytes_served"] >= size - served_by_first - 8 * MiB, (stats, served_by_first)
    nodes = json.loads(_get(f"{second.url}/v1/nodes"))["nodes"]
    assert [n["alive"] for n in nodes] == [True], nodes
    assert "failed; using" in node.log_text() and samples[-1][0] > killed_at


# -- torrents list every replica (BEP 12) ----------------------------------------------------




@pytest.mark.skipif(ARIA2C is None, reason="aria2c is not installed (Debian package aria2; make system-tools "
                                            "installs it)")
def test_torrents_list_every_replica_and_aria2_fails_over_to_the_second_when_the_first_is_killed(
        postgres_db, tmp_path, node_factory, replicas):
    first, second = _replicas(tmp_path, postgres_db, 2, replica_flags=True)
    replicas.extend([first, second])
    first.start()
    second.start()
    model = make_model(tmp_path / "m", {"model.onnx": 5000, "weights/a.bin": 700 * 1024 + 3})
    # v1 only: aria2 before 1.37 hashes hybrid torrents wrong (see test_interop_aria2.py).
    digest = publish(first.url, model, "rep/aria:v1", (tmp_path / "origin").as_uri(), "--torrent", "v1")
    manifest = Manifest.from_bytes(_get(f"{first.url}/v1/artifacts/{digest}"), expected_digest=digest)

    # Each replica serves the torrent with itself first and every other replica after it, in one
    # tier; the info dict (so the info-hash) is the published one.
    published_info = None
    for me, other in ((first, second), (second, first)):
        torrent = _get(f"{me.url}/v1/artifacts/{digest}/torrent")
        meta = bdecode(torrent)
        assert meta[b"announce"] == f"{me.url}/announce".encode()
        assert meta[b"announce-list"] == [[f"{me.url}/announce".encode(), f"{other.url}/announce".encode()]]
        published_info = published_info or torrent_info_bytes(torrent)
        assert torrent_info_bytes(torrent) == published_info
    torrent_path = tmp_path / "artifact.torrent"
    torrent_path.write_bytes(_get(f"{first.url}/v1/artifacts/{digest}/torrent"))

    # A node holding the artifact, given both replicas: it announces to the first (its first tier).
    node = node_factory(f"{first.url},{second.url}", "seed")
    out = run_cli("pull", "rep/aria:v1", "--node", node.url)
    assert out.returncode == 0, out.stderr
    v1 = manifest.info_hash.v1
    wait_until(lambda: _scrape_complete(first.url, v1) == 1, 15, message="the node seeding at the first replica")
    assert _scrape_complete(second.url, v1) == 0
    first.kill()
    # The node's heartbeats move to the second replica, which knows none of its swarm entries: the
    # node announces there at once (not at its next interval), its libtorrent skipping the dead tier.
    wait_until(lambda: _scrape_complete(second.url, v1) == 1, 30, message="the node announcing to the second")
    assert "knows none of this node's swarm entries" in node.log_text()

    before = registry_stats(second.url)
    dest = tmp_path / "aria2"
    dest.mkdir()
    log_path = tmp_path / "aria2c.log"
    argv = [ARIA2C, "--dir", str(dest), "--listen-port", str(free_port()), "--seed-time=0",
            "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false", "--enable-peer-exchange=false",
            "--bt-tracker-connect-timeout=5", "--bt-tracker-timeout=5", "--bt-stop-timeout=25",
            "--file-allocation=none", "--console-log-level=warn", "--summary-interval=0",
            "--log", str(log_path), "--log-level=info", str(torrent_path)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=40)
    except subprocess.TimeoutExpired:
        pytest.fail("aria2c did not finish within 40 s; its log ends:\n" + log_path.read_text(errors="replace")[-3000:])
    assert proc.returncode == 0, f"aria2c exited {proc.returncode}; its log ends:\n" + \
        log_path.read_text(errors="replace")[-3000:]
    got = {p: h for p, h in tree_hashes(dest / meta[b"info"][b"name"].decode()).items() if not p.startswith(".pad/")}
    assert got == tree_hashes(model)
    # aria2 found the peer through the second replica (the first refused its connection).
    assert registry_stats(second.url)["announces"] > before["announces"]


def test_registry_lists_are_normalised_and_bad_replica_urls_refused(tmp_path):
    from modelcast.config import ClientConfig

    cfg = ClientConfig.from_env(registry=["http://a:1/", " http://b:2,http://c:3/ "])
    assert cfg.registry == "http://a:1,http://b:2,http://c:3"
    assert RegistryClient(cfg.registry).replicas() == ["http://a:1", "http://b:2", "http://c:3"]
    out = run_cli("tracker", "--data", str(tmp_path / "d"), "--listen", f"127.0.0.1:{free_port()}",
                  "--replica", "reg-a:7070")
    assert out.returncode != 0 and "--replica 'reg-a:7070' is not an http(s)://HOST:PORT URL" in out.stderr
    assert "Traceback" not in out.stderr


def test_while_postgresql_is_down_nodes_keep_serving_what_they_hold_and_every_replica_resumes(tmp_path,
                                                                                            node_factory, replicas):
    """PostgreSQL stopped under two replicas: publishes through either answer 503 (the CLI tries both and
    says so in one line); a node pulls a tag it holds from its last resolution and stays alive at the
    replica it heartbeats; once PostgreSQL is back both replicas serve what was published before and
    after."""
    from harness.postgres import PostgresServer

    pg = PostgresServer().start()
    try:
        first, second = _replicas(tmp_path, pg.create_database("registry"), 2)
        replicas.extend([first, second])
        first.start()
        second.start()
        both = f"{first.url},{second.url}"
        origin = (tmp_path / "origin").as_uri()
        held = publish(both, make_model(tmp_path / "m1", {"w.bin": 300_000}), "rep/pg:v1", origin)
        node = node_factory(both, "n")
        out = run_cli("pull", "rep/pg:v1", "--node", node.url)
        assert out.returncode == 0, out.stderr
        path = out.stdout.strip().splitlines()[-1]
        info_hash = Manifest.from_bytes(_get(f"{first.url}/v1/artifacts/{held}"), expected_digest=held).info_hash.v1
        wait_until(lambda: _scrape_complete(first.url, info_hash) == 1, 15, message="the node seeding")

        pg.stop()
        later = make_model(tmp_path / "m2", {"w.bin": 200_000}, seed=2)
        out = run_cli("publish", str(later), "rep/pg:v2", "--registry", both, "--origin", origin, "--token", TOKEN)
        # One line: the last replica's 503, which says the database is unreachable and when to retry.
        assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "database" in out.stderr and "unreachable" in out.stderr and "retry in" in out.stderr, out.stderr
        out = run_cli("pull", "rep/pg:v1", "--node", node.url)
        assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == path, out.stderr
        # Its heartbeats go on (they never touch the database): its seeding entry stays listed.
        assert _scrape_complete(first.url, info_hash) == 1

        pg.start()
        after = wait_until(lambda: (o := run_cli("publish", str(later), "rep/pg:v2", "--registry", both, "--origin",
                                                 origin, "--token", TOKEN)).returncode == 0 and o,
                           30, 0.5, "a publish once PostgreSQL is back")
        digest = after.stdout.strip().splitlines()[-1]
        for r in (first, second):
            for tag, want in (("v1", held), ("v2", digest)):
                assert json.loads(_get(f"{r.url}/v1/resolve?ref=rep/pg:{tag}"))["digest"] == want
        assert "heartbeat failed" not in node.log_text()
    finally:
        pg.close()


# -- a fleet, three replicas over PostgreSQL and Redis ----------------------------------------


def test_three_replicas_over_postgresql_and_redis_lose_one_mid_pull_and_six_nodes_finish(
        postgres_db, tmp_path, node_factory, replicas):
    """Six nodes pull one artifact through three replicas sharing PostgreSQL and Redis; the replica they
    talk to (the one that served the first origin bytes) is SIGKILLed a quarter of the way: every node
    ends byte-identical, none stands still for more than 3 s, and the origin sends at most 1.5 copies."""
    from harness.redis import RedisServer, redis_server_bin

    if redis_server_bin() is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; make system-tools installs it)")
    redis = RedisServer(tmp_path / "redis").start()
    try:
        three = _replicas(tmp_path, postgres_db, 3, "--swarm-store", redis.url, replica_flags=True)
        replicas.extend(three)
        for r in three:
            r.start()
        size = 32 * MiB
        model = make_model(tmp_path / "m", {"weights.bin": size - 5000, "config.json": 5000})
        digest = publish(three[0].url, model, "rep/fleet:v1", (tmp_path / "origin").as_uri())
        urls = ",".join(r.url for r in three)
        nodes = [node_factory(urls, f"n{i}", "--download-limit", "8M") for i in range(6)]

        samples: dict[str, list[tuple[float, int, str]]] = {n.url: [] for n in nodes}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set() and not all(s and s[-1][2] in ("ready", "failed") for s in samples.values()):
                for n in nodes:
                    if samples[n.url] and samples[n.url][-1][2] in ("ready", "failed"):
                        continue
                    try:
                        job = _pull_status(n.url, digest)
                    except OSError:
                        continue
                    if job is not None:
                        samples[n.url].append((time.monotonic(), job["done_bytes"], job["state"]))
                time.sleep(0.1)  # the sampling period, not a wait for a condition

        for n in nodes:
            out = run_cli("pull", "rep/fleet:v1", "--no-wait", "--node", n.url)
            assert out.returncode == 0, out.stderr
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            wait_until(lambda: sum(s[-1][1] for s in samples.values() if s) >= 6 * size // 4, 90,
                       message="a quarter of the fleet's bytes")
            served = [registry_stats(r.url)["origin_bytes_served"] for r in three]
            victim = three[served.index(max(served))]
            assert victim is three[0] and served[0] > 0  # the nodes' first replica served the origin bytes
            victim.kill()
            sampler.join(120)
        finally:
            stop.set()
        source = tree_hashes(model)
        worst = 0.0
        from_origin = 0
        for n in nodes:
            runs = samples[n.url]
            assert runs and runs[-1][2] == "ready", (n.name, runs[-3:], n.log_text()[-2000:])
            job = _pull_status(n.url, digest)
            assert tree_hashes(Path(job["path"])) == source
            from_origin += job["bytes_from_origin"]
            last_t, last_done = runs[0][0], runs[0][1]
            for t, done, _ in runs[1:]:
                if done > last_done:
                    worst = max(worst, t - last_t)
                    last_t, last_done = t, done
        print(f"longest stand-still {worst:.2f} s; origin {from_origin / size:.2f} copies")
        assert worst <= STALL_LIMIT_S, f"a node's progress stood still for {worst:.1f} s"
        assert from_origin <= 1.5 * size, f"origin sent {from_origin / size:.2f} copies"
    finally:
        redis.close()


def test_artifacts_published_through_another_replica_keep_their_own_swarms(postgres_db, tmp_path, replicas):
    """A replica with its own swarms learns artifacts published elsewhere from the database, one swarm each."""
    from .helpers import announce_from, announce_query

    first, second = _replicas(tmp_path, postgres_db, 2)
    for r in (first, second):
        r.start()
        replicas.append(r)
    digests = [publish(first.url, make_model(tmp_path / f"m{i}", {"w.bin": 4096 + i}, seed=i), f"sep/m{i}:v1",
                       (tmp_path / "origin").as_uri()) for i in range(2)]
    hashes = []
    for digest in digests:
        manifest = Manifest.from_bytes(_get(f"{first.url}/v1/artifacts/{digest}"))
        hashes.append(bytes.fromhex(manifest.info_hash.v1))
    # The second replica hears of both through its allow-list refresh (every 2 s).
    wait_until(lambda: all(b"failure reason" not in announce_from(second.url, "127.0.0.2", announce_query(h, 1, numwant="0"))
                           for h in hashes), timeout=15, message="the second replica allows both torrents")
    announce_from(second.url, "127.0.0.3", announce_query(hashes[0], 2))  # a seed of the first artifact
    answer = announce_from(second.url, "127.0.0.4", announce_query(hashes[1], 3, left="10"))
    assert answer.get(b"peers") in (b"", None) or b"\x7f\x00\x00\x03" not in answer[b"peers"], \
        "a peer of another artifact was handed out"
    assert _scrape_counts(second.url, hashes[0].hex()) == (2, 0)
    assert _scrape_counts(second.url, hashes[1].hex()) == (1, 1)
