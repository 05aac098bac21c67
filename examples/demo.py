"""`make demo`: publish a ~200 MB model and pull it onto 4 nodes at once, on one machine.

Starts a registry/tracker, publishes a generated model (a small ONNX graph plus weight
shards) to a file:// origin, starts 4 node daemons as separate processes on 127.0.0.2-5,
pulls on all of them at once with live progress, then reports per node the time and the
bytes that came from peers and from the origin, checks every copy and shuts down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_model import write_demo_model  # noqa: E402

from harness import ServiceProcess, modelcast_argv, start_node, start_tracker  # noqa: E402
from modelcast.units import human_bytes  # noqa: E402
from node_cache.client import NodeClient  # noqa: E402

TOKEN = "demo-token"


def tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h = xxhash.xxh3_128()
            with open(p, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
            out[p.relative_to(root).as_posix()] = h.hexdigest()
    return out


async def pull_all(nodes: list[tuple[str, str]], ref: str, live: bool) -> list[dict]:
    clients = [NodeClient(url) for _, url in nodes]
    try:
        started = await asyncio.gather(*(c.pull(ref, wait=False) for c in clients))
        digest = started[0]["digest"]
        statuses = list(started)
        t0 = time.monotonic()
        lines_drawn = 0
        while True:
            statuses = await asyncio.gather(*(c.status(digest) for c in clients))
            if live:
                if lines_drawn:
                    sys.stderr.write(f"\x1b[{lines_drawn}A")
                for (name, _), s in zip(nodes, statuses):
                    frac = s["done_bytes"] / max(1, s["total_bytes"])
                    bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
                    sys.stderr.write(f"\x1b[2K{name:8} [{bar}] {frac * 100:5.1f}%  {s['state']:11} "
                                     f"peers {s['peers']:2}  {human_bytes(s['download_rate'])}/s  "
                                     f"origin {human_bytes(s['bytes_from_origin'])}\n")
                lines_drawn = len(nodes)
            if all(s["state"] in ("ready", "failed") for s in statuses):
                break
            if time.monotonic() - t0 > 600:
                raise TimeoutError("pulls did not finish within 10 minutes")
            await asyncio.sleep(0.2)
        return statuses
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", type=Path, default=Path("demo-data"), help="work directory (wiped first)")
    ap.add_argument("--size", type=int, default=200, help="model size in MB")
    ap.add_argument("--nodes", type=int, default=4)
    args = ap.parse_args()
    live = sys.stderr.isatty()
    work = args.dir.resolve()
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logs = work / "logs"
    procs: list[ServiceProcess] = []
    try:
        print(f"1. generating a {args.size} MB model in {work / 'model'}")
        model = write_demo_model(work / "model", total_bytes=args.size << 20)

        tracker = start_tracker(work, token=TOKEN, log_path=logs / "tracker.log")
        registry = tracker.url
        procs.append(tracker)
        print(f"2. registry and tracker on {registry}")

        origin = (work / "origin").as_uri()
        print(f"3. publishing to origin {origin}")
        t0 = time.monotonic()
        out = subprocess.run(modelcast_argv("publish", str(model), "demo/model:v1", "--registry", registry,
                                            "--origin", origin, "--token", TOKEN),
                             stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            print("publish failed", file=sys.stderr)
            return 1
        digest = out.stdout.strip().splitlines()[-1]
        print(f"   published demo/model:v1 = {digest} in {time.monotonic() - t0:.1f}s")

        nodes = []
        for i in range(args.nodes):
            name = f"node-{i + 1}"
            svc = start_node(work, registry, name, host=f"127.0.0.{i + 2}", zone="demo", log_path=logs / f"{name}.log")
            procs.append(svc)
            nodes.append((name, svc.url))
        print(f"4. {len(nodes)} node daemons up on 127.0.0.2-{len(nodes) + 1}; pulling demo/model:v1 on all at once")

        t0 = time.monotonic()
        statuses = asyncio.run(pull_all(nodes, "demo/model:v1", live))
        wall = time.monotonic() - t0
        with urllib.request.urlopen(f"{registry}/v1/stats") as resp:
            stats = json.load(resp)

        print("5. results")
        size = statuses[0]["total_bytes"]
        source = tree_hashes(model)
        ok = True
        print(f"   {'node':8} {'state':7} {'time':>7} {'from peers':>12} {'from origin':>12}  copy")
        for (name, _), s in zip(nodes, statuses):
            good = s["state"] == "ready" and tree_hashes(Path(s["path"])) == source
            ok &= good
            print(f"   {name:8} {s['state']:7} {s['seconds'] or 0:6.2f}s {human_bytes(s['bytes_from_peers']):>12} "
                  f"{human_bytes(s['bytes_from_origin']):>12}  {'identical' if good else 'BAD'}")
        origin_bytes = stats.get("origin_bytes_served", 0)
        print(f"   all {len(nodes)} nodes warm in {wall:.2f}s; the origin served {human_bytes(origin_bytes)} "
              f"= {origin_bytes / size:.2f} copies of {human_bytes(size)}")
        print(json.dumps({"nodes": len(nodes), "size_bytes": size, "seconds": round(wall, 3),
                          "origin_bytes": origin_bytes, "origin_copies": round(origin_bytes / size, 3),
                          "all_identical": ok}))
        return 0 if ok else 1
    finally:
        for p in reversed(procs):
            p.stop()
        print("6. stopped every process")


if __name__ == "__main__":
    raise SystemExit(main())
