"""Control-plane throughput: node heartbeats and announces on one replica in process, over Redis, and two replicas.

A ``modelcast tracker`` process (or two) answers; a load generator in separate processes
(spawned; non-blocking sockets on epoll, HTTP/1.1 keep-alive, one request in flight per
connection, request bytes built before the clock starts: benchmarks/tracker_load.py's)
plays ``--nodes`` simulated node daemons, each sending heartbeats (``POST
/v1/nodes/ID/heartbeat``, the body and node key a node sends, through the fast path; every
node's first heartbeat, which enrols it, is a phase of its own before the measured one), and ``--peers``
peers over ``--torrents`` swarms, announcing (first ``event=started`` with ``numwant=0``
to fill the swarms, then the steady re-announces that are measured, ``numwant=50``).
Each phase runs for ``--duration`` seconds.  Every answer is checked (status 200, a
heartbeat's ``{"ok": true``, no ``failure reason`` in an announce).

Set-ups, each measured with the same phases:

* in process (the embedded default: SQLite, swarms in the tracker's memory): the headline;
* one replica over Redis (``--swarm-store redis://``), SQLite for the registry;
* two replicas over Redis and one PostgreSQL, the load split evenly between them (one
  generator process per replica, at once); the artifacts are registered through the first
  before the second starts, so both know every swarm.

The Redis set-ups run only where ``modelcast tracker`` has ``--swarm-store`` and
``redis-server`` (and, for two replicas, PostgreSQL: harness/postgres.py) is installed;
otherwise their figures are null and ``redis_skipped`` says why.

On a machine of few cores the generator and the tracker share them: ``tracker_cpu`` (the
tracker's CPU time over the phase's wall time; 1.0 = one core busy) and ``generator_cpu``
say who was the limit, and ``*_per_cpu_s`` is the rate per second of tracker CPU time,
steadier than the wall-clock rate on a shared machine.

Prints human lines, then a JSON last line: ``heartbeats_per_s``, ``announces_per_s``,
``p99_ms`` (the larger of the two phases' p99, in process), ``heartbeat_p99_ms``,
``announce_p99_ms``, ``heartbeats_per_cpu_s``, ``announces_per_cpu_s``;
``redis_heartbeats_per_s``, ``redis_announces_per_s``, ``redis_p99_ms`` (one replica over
Redis); ``redis_heartbeats_per_redis_cpu_s``, ``redis_announces_per_redis_cpu_s`` (requests per
second of redis-server CPU: what a Redis shard can carry) and ``redis_*_per_tracker_cpu_s`` (per
second of the replica's CPU); ``two_replicas_heartbeats_per_s``, ``two_replicas_announces_per_s`` (summed over
both), ``redis_skipped`` (null, or why the Redis set-ups did not run), and every phase under
``phases``.

Usage: ``python benchmarks/control_plane.py [--nodes 20000] [--peers 20000] [--torrents 200]
[--duration 8] [--concurrency 64] [--no-redis]``
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.tracker_load import TOKEN, _proc_cpu_s, http_phase, make_artifact, register  # noqa: E402
from harness import ServiceProcess, modelcast_argv, start_tracker  # noqa: E402
from harness.redis import RedisServer, redis_server_bin  # noqa: E402

# Peers re-announce and nodes heartbeat less often than in real life here: keep every one listed all run.
TRACKER_FLAGS = ["--peer-ttl", "3600", "--announce-interval", "1800", "--max-heartbeat-ttl", "600"]


class Replica:
    def __init__(self, svc: ServiceProcess):
        self.svc = svc
        self.host, self.port, self.pid = "127.0.0.1", svc.port, svc.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def run_split(pools: list, replicas: list[Replica], label: str, redis_pid: int | None = None, **spec) -> dict:
    """One phase, its load split evenly over ``replicas`` (one generator process each, at once); summed figures.

    With ``redis_pid`` the Redis server's CPU over the phase is measured too: what one
    request costs the swarm store (the capacity model's shards per request rate).
    """
    n = len(replicas)
    cpu0 = [_proc_cpu_s(r.pid) for r in replicas]
    redis0 = _proc_cpu_s(redis_pid) if redis_pid else None
    futures = []
    for i, (pool, replica) in enumerate(zip(pools, replicas)):
        part = {**spec, "host": replica.host, "port": replica.port,
                "peers": spec["peers"] // n, "concurrency": max(1, spec["concurrency"] // n),
                "max_requests": spec["max_requests"] // n,
                # Disjoint node ids and peer ids per generator.
                "peer_prefix": spec["peer_prefix"][:-1] + chr(ord("A") + i), "start": 0}
        futures.append(pool.submit(http_phase, part))
    parts = [f.result() for f in futures]
    seconds = max(p["seconds"] for p in parts)
    busy = sum(_proc_cpu_s(r.pid) - c for r, c in zip(replicas, cpu0))
    redis_busy = _proc_cpu_s(redis_pid) - redis0 if redis_pid else None
    requests = sum(p["requests"] for p in parts)
    bad = sum(p["failures"] + p.get("errors", 0) + p.get("unanswered", 0) for p in parts)
    result = {"requests": requests, "seconds": round(seconds, 3),
              "per_s": round(requests / seconds, 1) if seconds else 0,
              "p50_ms": max((p["p50_ms"] or 0) for p in parts), "p99_ms": max((p["p99_ms"] or 0) for p in parts),
              "tracker_cpu": round(busy / seconds, 2) if seconds else None,
              "per_cpu_s": round(requests / busy, 1) if busy > 0 else None,
              "generator_cpu": max(p["generator_cpu"] or 0 for p in parts),
              "redis_cpu": round(redis_busy / seconds, 2) if redis_busy is not None and seconds else None,
              "per_redis_cpu_s": round(requests / redis_busy, 1) if redis_busy else None,
              "problems": bad, "first_failure": next((p["first_failure"] for p in parts if p["first_failure"]), None)}
    print(f"  {label:28s} {requests:>8,} in {seconds:5.2f}s = {result['per_s']:>9,.0f}/s  p50 {result['p50_ms']} ms  "
          f"p99 {result['p99_ms']} ms  tracker cpu {result['tracker_cpu']} ({result['per_cpu_s'] or 0:,.0f}/cpu-s)  "
          f"generator cpu {result['generator_cpu']}"
          + (f"  redis cpu {result['redis_cpu']} ({result['per_redis_cpu_s'] or 0:,.0f}/cpu-s)" if redis_pid else "")
          + (f"  PROBLEMS {bad}: {result['first_failure']}" if bad else ""), flush=True)
    return result


def measure(pools: list, replicas: list[Replica], name: str, args, hashes: list[str],
            redis_pid: int | None = None) -> dict:
    """Heartbeats (after every node's first one, which enrols it), then announces (after a fill), against ``replicas``."""
    common = {"keepalive": True, "concurrency": args.concurrency, "max_requests": 10_000_000, "redis_pid": redis_pid}
    enrol = run_split(pools, replicas, f"{name}: enrol", kind="heartbeat", peers=args.nodes,
                      peer_prefix="bench-node-", max_s=120.0, hashes=hashes, event="", numwant=0,
                      **{**common, "max_requests": args.nodes})
    heartbeats = run_split(pools, replicas, f"{name}: heartbeats", kind="heartbeat", peers=args.nodes,
                           peer_prefix="bench-node-", max_s=args.duration, hashes=hashes, event="", numwant=0,
                           **common)
    fill = run_split(pools, replicas, f"{name}: fill", peers=args.peers, peer_prefix="-CP0001-", hashes=hashes,
                     event="started", numwant=0, max_s=60.0, **{**common, "max_requests": args.peers})
    announces = run_split(pools, replicas, f"{name}: announces", peers=args.peers, peer_prefix="-CP0001-",
                          hashes=hashes, event="", numwant=50, max_s=args.duration, **common)
    return {"enrol": enrol, "heartbeats": heartbeats, "fill": fill, "announces": announces}


def redis_unavailable(no_redis: bool) -> str | None:
    """Why the Redis set-ups cannot run here, or None."""
    if no_redis:
        return "--no-redis"
    out = subprocess.run(modelcast_argv("tracker", "--help"), capture_output=True, text=True, timeout=60)
    if "--swarm-store" not in out.stdout:
        return "modelcast tracker has no --swarm-store (the Redis swarm store is not built in)"
    if redis_server_bin() is None:
        return "redis-server is not installed (Debian package redis-server)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description="Control-plane throughput: heartbeats and announces per replica.")
    ap.add_argument("--nodes", type=int, default=20_000, help="simulated node daemons sending heartbeats")
    ap.add_argument("--peers", type=int, default=20_000, help="peers announcing, over --torrents swarms (≤ 55,000)")
    ap.add_argument("--torrents", type=int, default=200, help="swarms")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of each measured phase")
    ap.add_argument("--concurrency", type=int, default=64, help="keep-alive connections, one request in flight each")
    ap.add_argument("--no-redis", action="store_true", help="only the in-process replica")
    args = ap.parse_args()
    if not 1 <= args.torrents <= args.peers <= 55_000 or args.nodes < 2:
        ap.error("need 1 <= --torrents <= --peers <= 55,000 and --nodes >= 2")

    work = Path(tempfile.mkdtemp(prefix="modelcast-bench-control-"))
    running: list = []  # services and processes to stop at the end
    pg = None
    ctx = multiprocessing.get_context("spawn")
    try:
        with (concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as gen_a,
              concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as gen_b):
            pools = [gen_a, gen_b]
            for pool in pools:
                pool.submit(os.getpid).result()  # spawned before any clock starts
            artifacts = [make_artifact(i) for i in range(args.torrents)]
            hashes = [m.info_hash.v1 for m, _ in artifacts]
            origin = (work / "origin").as_uri()

            svc = start_tracker(work / "inproc", token=TOKEN, extra=TRACKER_FLAGS, name="in-process")
            running.append(svc)
            one = Replica(svc)
            asyncio.run(register(one.url, artifacts, origin))
            print(f"in-process replica pid {one.pid}: {args.nodes:,} nodes, {args.peers:,} peers over "
                  f"{args.torrents:,} swarms, {args.concurrency} connections", flush=True)
            inproc = measure(pools[:1], [one], "in process", args, hashes)
            svc.stop()
            running.remove(svc)

            redis_figures = two_figures = None
            skipped = redis_unavailable(args.no_redis)
            if skipped is None:
                redis = RedisServer(work / "redis").start()
                running.append(redis)
                redis_url = redis.url
                store = ["--swarm-store", redis_url]
                svc = start_tracker(work / "redis1", token=TOKEN, extra=TRACKER_FLAGS + store, name="redis")
                running.append(svc)
                asyncio.run(register(Replica(svc).url, artifacts, origin))
                redis_figures = measure(pools[:1], [Replica(svc)], "one replica over Redis", args, hashes,
                                        redis_pid=redis.proc.pid)
                svc.stop()
                running.remove(svc)
                try:
                    from harness.postgres import PostgresServer

                    pg = PostgresServer().start()
                except RuntimeError as exc:
                    skipped = f"two replicas need PostgreSQL: {exc}"
                else:
                    # A fresh Redis namespace: the first set-up's swarms are not the second's.
                    store = ["--swarm-store", redis_url.rsplit("/", 1)[0] + "/1"]
                    db = pg.create_database("bench")
                    first = start_tracker(work / "r1", token=TOKEN, extra=TRACKER_FLAGS + store,
                                          env={"MODELCAST_DB": db}, name="replica-1")
                    running.append(first)
                    asyncio.run(register(Replica(first).url, artifacts, origin))
                    second = start_tracker(work / "r2", token=TOKEN, extra=TRACKER_FLAGS + store,
                                           env={"MODELCAST_DB": db}, name="replica-2")
                    running.append(second)
                    two_figures = measure(pools, [Replica(first), Replica(second)], "two replicas over Redis",
                                          args, hashes, redis_pid=redis.proc.pid)
            else:
                print(f"  Redis set-ups skipped: {skipped}", flush=True)

        def fig(figures: dict | None, phase: str, key: str):
            return figures[phase][key] if figures else None

        result = {
            "heartbeats_per_s": inproc["heartbeats"]["per_s"], "announces_per_s": inproc["announces"]["per_s"],
            "p99_ms": max(inproc["heartbeats"]["p99_ms"], inproc["announces"]["p99_ms"]),
            "heartbeat_p99_ms": inproc["heartbeats"]["p99_ms"], "announce_p99_ms": inproc["announces"]["p99_ms"],
            "heartbeats_per_cpu_s": inproc["heartbeats"]["per_cpu_s"],
            "announces_per_cpu_s": inproc["announces"]["per_cpu_s"],
            "redis_heartbeats_per_s": fig(redis_figures, "heartbeats", "per_s"),
            "redis_announces_per_s": fig(redis_figures, "announces", "per_s"),
            "redis_p99_ms": (max(redis_figures["heartbeats"]["p99_ms"], redis_figures["announces"]["p99_ms"])
                             if redis_figures else None),
            "redis_heartbeats_per_redis_cpu_s": fig(redis_figures, "heartbeats", "per_redis_cpu_s"),
            "redis_announces_per_redis_cpu_s": fig(redis_figures, "announces", "per_redis_cpu_s"),
            "redis_heartbeats_per_tracker_cpu_s": fig(redis_figures, "heartbeats", "per_cpu_s"),
            "redis_announces_per_tracker_cpu_s": fig(redis_figures, "announces", "per_cpu_s"),
            "two_replicas_heartbeats_per_s": fig(two_figures, "heartbeats", "per_s"),
            "two_replicas_announces_per_s": fig(two_figures, "announces", "per_s"),
            "redis_skipped": skipped,
            "nodes": args.nodes, "peers": args.peers, "torrents": args.torrents, "duration_s": args.duration,
            "concurrency": args.concurrency, "cpus": os.cpu_count(),
            "problems": sum(p["problems"] for f in (inproc, redis_figures, two_figures) if f for p in f.values()),
            "phases": {"in_process": inproc, "redis": redis_figures, "two_replicas": two_figures},
        }
        print(json.dumps(result))
        return 0
    finally:
        for item in reversed(running):
            item.stop()
        if pg is not None:
            pg.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
