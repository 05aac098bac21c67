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


def test_a_node_given_two_replicas_finishes_byte_identical_when_the_first_is_killed_mid_pull(
        postgres_db, tmp_path, node_factory, replicas):
    """SIGKILL the replica a node pulls from: origin fetches, heartbeats and announces move to the other
    replica; the pull ends byte-identical and its progress (the node's own status, sampled every
    0.1 s) never stands still for more than 3 s."""
    first, second = _replicas(tmp_path, postgres_db, 2)
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
