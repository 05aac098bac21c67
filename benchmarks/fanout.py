"""Fan-out: N nodes pull one artifact at once; how close to the fluid limit, how much origin.

Starts a registry/tracker (which serves the origin's bytes as the web seed) and N node
daemons as separate processes, each on its own 127.0.x.y address, every one with upload
and download capacity U. With root and iproute2 the capacity is enforced by the kernel:
the benchmark creates a network namespace, caps each address's upload with an HTB class
on its loopback, and removes it at the end; download capacity is the node's own limit.
Without them it falls back to libtorrent limits (local peers in the global peer class).

It publishes an artifact of size S, pulls on all nodes at once, and times until every
node holds a verified copy; then runs the same nodes once more with peer-to-peer off
(every byte from the origin) as the baseline. The fluid bound (Kumar & Ross 2006) for one
source and N nodes is T* = max(S/u_s, S/min d_i, N*S/(u_s + sum u_i)).

Last stdout line: JSON with nodes, size_bytes, rate_bytes_per_s, seconds, p50_s, max_s,
fluid_bound_s, efficiency, origin_bytes, origin_copies, baseline_seconds, speedup,
shaping, and with --zones 2 cross_zone_copies.

Usage: python benchmarks/fanout.py [--nodes 8] [--size 256M] [--rate 20M] [--zones 1|2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import netns  # noqa: E402
from publish import add_torrent_arg, write_files  # noqa: E402

from distributor.publish import publish_sync  # noqa: E402
from modelcast.config import PublishConfig, parse_size  # noqa: E402
from harness import NodeProcess, start_node, start_tracker  # noqa: E402
from modelcast.reference import Reference  # noqa: E402
from node_cache.client import NodeClient  # noqa: E402

TRACKER_ADDR = "127.0.0.10"
NS_ENV = "MODELCAST_BENCH_NETNS"
# The HTB classes that carry cross-zone traffic, named by the outer process (which shaped
# the namespace) for the inner one (which reads their counters).
CROSS_ENV = "MODELCAST_BENCH_CROSS_CLASSES"


def node_addr(i: int, zones: int, nodes: int) -> tuple[str, str]:
    zone = i * zones // nodes
    return f"127.0.{zone + 1}.{i + 2}", f"zone-{zone}"


def fluid_bound(n: int, size: int, u_s: float, u: float, d: float) -> float:
    return max(size / u_s, size / d, n * size / (u_s + n * u))


async def pull_all(urls: list[str], ref: str, timeout_s: float) -> list[float]:
    """Start the pull everywhere at once; return each node's seconds until verified.

    Each request waits on the node until its copy is verified: no polling load.
    """
    clients = [NodeClient(u) for u in urls]

    async def one(client: NodeClient) -> float:
        status = await client.pull(ref, wait=True)
        if status["state"] != "ready":
            raise RuntimeError(f"{client.base_url}: {status}")
        return time.monotonic() - t0

    try:
        t0 = time.monotonic()
        return list(await asyncio.wait_for(asyncio.gather(*(one(c) for c in clients)), timeout_s))
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def registry_stats(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/stats", timeout=5) as resp:
        return json.load(resp)


def start_nodes(work: Path, tag: str, registry: str, args, shaping: str, p2p: bool) -> list[NodeProcess]:
    nodes = []
    for i in range(args.nodes):
        host, zone = node_addr(i, args.zones, args.nodes)
        extra = ["--download-limit", str(args.rate)]
        if shaping == "libtorrent":
            extra += ["--upload-limit", str(args.rate)]
        if not p2p:
            extra.append("--no-p2p")
        nodes.append(start_node(work, registry, f"{tag}-{i}", host=host, zone=zone, extra=extra))
    return nodes


def run_once(work: Path, tag: str, registry: str, ref: str, args, shaping: str, p2p: bool) -> tuple[list[float], int]:
    nodes = start_nodes(work, tag, registry, args, shaping, p2p)
    try:
        before = registry_stats(registry)["origin_bytes_served"]
        times = asyncio.run(pull_all([n.url for n in nodes], ref, args.timeout))
        return times, registry_stats(registry)["origin_bytes_served"] - before
    finally:
        for n in nodes:
            n.stop()


def inner(args, shaping: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="modelcast-fanout-"))
    ns = netns.Namespace(os.environ[NS_ENV]) if shaping == "htb" else None
    if ns is not None:
        ns.cross_classes = [c for c in os.environ.get(CROSS_ENV, "").split(",") if c]
    tracker = None
    try:
        write_files(work / "model", args.size, 4)
        tracker = start_tracker(work, host=TRACKER_ADDR, token="t", extra=["--zone-gateways", str(args.zone_gateways)])
        registry = tracker.url
        result = publish_sync(work / "model", Reference.parse("bench/fanout:v1"),
                              PublishConfig(registry=registry, origin=(work / "origin").as_uri(), token="t",
                                            torrent_format=args.torrent))
        size = result.manifest.total_size
        cross_before = sum(ns.class_bytes().get(c, 0) for c in ns.cross_classes) if ns else 0
        times, origin_bytes = run_once(work, "p2p", registry, "bench/fanout:v1", args, shaping, p2p=True)
        cross = (sum(ns.class_bytes().get(c, 0) for c in ns.cross_classes) - cross_before) if ns else None
        baseline = None
        if not args.no_baseline:
            base_times, _ = run_once(work, "base", registry, "bench/fanout:v1", args, shaping, p2p=False)
            baseline = max(base_times)
        seconds = max(times)
        bound = fluid_bound(args.nodes, size, args.rate, args.rate, args.rate)
        out = {
            "nodes": args.nodes, "size_bytes": size, "rate_bytes_per_s": args.rate, "seconds": round(seconds, 3),
            "p50_s": round(sorted(times)[len(times) // 2], 3), "max_s": round(seconds, 3),
            "fluid_bound_s": round(bound, 3), "efficiency": round(bound / seconds, 3),
            "origin_bytes": origin_bytes, "origin_copies": round(origin_bytes / size, 3),
            "baseline_seconds": round(baseline, 3) if baseline else None,
            "speedup": round(baseline / seconds, 2) if baseline else None, "shaping": shaping,
        }
        if args.zones > 1:
            out["zones"] = args.zones
            out["cross_zone_copies"] = round(cross / size, 3) if cross is not None else None
        return out
    finally:
        if tracker:
            tracker.stop()
        if not args.keep:
            subprocess.run(["chmod", "-R", "u+w", str(work)], capture_output=True)
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--size", type=parse_size, default=parse_size("256M"))
    ap.add_argument("--rate", type=parse_size, default=parse_size("20M"), help="per-node and origin bytes/s")
    ap.add_argument("--zones", type=int, default=1, choices=[1, 2])
    ap.add_argument("--cross-zone-rate", type=parse_size, default=None, help="default: rate / 4")
    ap.add_argument("--zone-gateways", type=int, default=0,
                    help="tracker: peers per zone and swarm handed other zones' peers (0: none, relays; -1: all)")
    ap.add_argument("--shaping", choices=["auto", "htb", "libtorrent"], default="auto")
    ap.add_argument("--no-baseline", action="store_true")
    add_torrent_arg(ap)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()

    if os.environ.get(NS_ENV):  # we are the process inside the namespace
        print(json.dumps(inner(args, "htb")))
        return 0
    reason = netns.available() if args.shaping in ("auto", "htb") else "libtorrent shaping asked for"
    if reason is None:
        name = f"mcfanout{os.getpid()}"
        cross = args.cross_zone_rate or args.rate // 4
        shaped = [netns.Shaped(TRACKER_ADDR, args.rate)]
        for i in range(args.nodes):
            addr, _ = node_addr(i, args.zones, args.nodes)
            zone = i * args.zones // args.nodes
            other = f"127.0.{2 - zone}.0/24" if args.zones == 2 else None
            shaped.append(netns.Shaped(addr, args.rate, other_prefix=other, cross_rate=cross if other else None))
        with netns.Namespace(name) as ns:
            ns.shape(shaped)
            env = {**os.environ, NS_ENV: name, CROSS_ENV: ",".join(ns.cross_classes)}
            proc = subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, *sys.argv[1:]], env=env,
                                  stdout=subprocess.PIPE, text=True)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode != 0 or not lines:
                print(proc.stdout, file=sys.stderr)
                return proc.returncode or 1
            result = json.loads(lines[-1])
    else:
        if args.shaping == "htb":
            raise SystemExit(f"HTB shaping unavailable: {reason}")
        print(f"kernel shaping unavailable ({reason}); using libtorrent limits", file=sys.stderr)
        result = inner(args, "libtorrent")
    print(f"{result['nodes']} nodes, {result['size_bytes'] / 2**20:.0f} MiB at {result['rate_bytes_per_s'] / 2**20:.0f} "
          f"MiB/s each ({result['shaping']}): all warm in {result['seconds']:.2f}s (p50 {result['p50_s']:.2f}s), "
          f"fluid bound {result['fluid_bound_s']:.2f}s, efficiency {result['efficiency']:.2f}; origin sent "
          f"{result['origin_copies']:.2f} copies; origin-only baseline {result['baseline_seconds']}s, "
          f"speedup {result['speedup']}" + (f"; cross-zone copies {result.get('cross_zone_copies')}"
                                            if args.zones > 1 else ""))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
