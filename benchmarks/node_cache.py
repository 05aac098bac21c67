"""Node cache: warm-hit latency of the local pull API and re-verification speed.

Publishes a ~1 GiB artifact, pulls it onto one node daemon, then
- sends 1,000 pull requests for the (now warm) artifact by name:tag and by digest over
  one keep-alive connection and reports p50/p99 latency;
- asks the node to re-verify the artifact (full xxh3 of every file, data in the page
  cache) and reports GB/s.
JSON last line: ``warm_hit_p50_ms``, ``warm_hit_p99_ms``, ``verify_gb_per_s`` (+ details).
Usage: ``python benchmarks/node_cache.py [--size 1G] [--requests 1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from publish import write_files  # noqa: E402

from distributor.publish import publish_sync  # noqa: E402
from modelcast.config import PublishConfig, parse_size  # noqa: E402
from harness import ServiceProcess, start_node, start_tracker  # noqa: E402
from modelcast.reference import Reference  # noqa: E402
from node_cache.client import NodeClient  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(node_url: str, refs: list[str], requests: int, digest: str) -> dict:
    async with NodeClient(node_url) as node:
        await node.pull(refs[0])  # cold pull: the artifact arrives and is verified
        for ref in refs:
            await node.pull(ref)  # warm the connection and the tag resolution
        timings: dict[str, list[float]] = {ref: [] for ref in refs}
        for i in range(requests):
            ref = refs[i % len(refs)]
            t0 = time.perf_counter()
            status = await node.pull(ref)
            timings[ref].append(time.perf_counter() - t0)
            assert status["state"] == "ready"
        verify_s = []
        for _ in range(3):
            t0 = time.perf_counter()
            answer = await node.verify(digest)
            verify_s.append(time.perf_counter() - t0)
            assert answer["ok"] is True, answer
        return {"timings": timings, "verify_s": min(verify_s)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="modelcast-bench-node-"))
    procs: list[ServiceProcess] = []
    try:
        write_files(work / "model", size, 4)
        procs.append(start_tracker(work, token="t", log_path=work / "tracker.log"))
        registry = procs[-1].url
        result = publish_sync(work / "model", Reference.parse("bench/node:v1"),
                              PublishConfig(registry=registry, origin=(work / "origin").as_uri(), token="t"))
        node = start_node(work, registry, "node", cache=work / "cache", log_path=work / "node.log")
        procs.append(node)
        refs = ["bench/node:v1", result.digest]
        out = asyncio.run(measure(node.url, refs, args.requests, result.digest))
        all_ms = [t * 1000 for ts in out["timings"].values() for t in ts]
        by_ref = {("tag" if ":" in r.split("@")[0] and not r.startswith("sha256") else "digest"):
                  {"p50_ms": round(percentile([t * 1000 for t in ts], 0.5), 3),
                   "p99_ms": round(percentile([t * 1000 for t in ts], 0.99), 3)} for r, ts in out["timings"].items()}
        verify_gbps = result.manifest.total_size / out["verify_s"] / 1e9
        print(f"warm hits over {len(all_ms)} requests: p50 {percentile(all_ms, 0.5):.2f} ms, "
              f"p99 {percentile(all_ms, 0.99):.2f} ms (by tag {by_ref['tag']}, by digest {by_ref['digest']})")
        print(f"re-verified {result.manifest.total_size / 1e9:.2f} GB in {out['verify_s']:.3f}s = {verify_gbps:.2f} GB/s")
        print(json.dumps({"warm_hit_p50_ms": round(percentile(all_ms, 0.5), 3),
                          "warm_hit_p99_ms": round(percentile(all_ms, 0.99), 3),
                          "verify_gb_per_s": round(verify_gbps, 2), "requests": len(all_ms),
                          "size_bytes": result.manifest.total_size, "by_reference": by_ref}))
        return 0
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
