"""What a node's progress report costs the registry: JSON decode, check and record, per heartbeat.

Nodes report what they pull and hold with their heartbeat (modelcast/progress.py); the
registry checks every field and keeps the latest report per node (tracker/nodebook.py).
This times that work, in process, for a bare heartbeat (an unchanged report is not sent
again: node_cache/report.py) and for reports of 1, 10 and 128 artifacts (the cap), over
500 nodes.  The HTTP handling around it is the same for every heartbeat and not counted.

Prints human lines, then a JSON last line: ``{"artifacts": {"0": {"body_bytes", "us"}, ...}}``.

Usage: ``python benchmarks/heartbeat_reports.py [--reps 2000]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelcast.progress import MAX_REPORTED_ARTIFACTS, parse_report  # noqa: E402
from tracker.nodebook import NodeBook  # noqa: E402

GIB7 = 7 * (1 << 30)


def body(n: int) -> bytes:
    """A heartbeat as a node sends it: one 7 GiB pull under way and n - 1 held artifacts."""
    if n == 0:
        return json.dumps({"zone": "eu-west", "ttl_s": 3.0}).encode()
    entries = [{"digest": f"sha256:{i:064x}", "state": "ready" if i else "downloading", "done_bytes": GIB7 - i,
                "total_bytes": GIB7, "rate": 0 if i else 125_000_000, "bytes_from_peers": 6_000_000_000,
                "bytes_from_origin": 1_000_000_000, "bytes_from_other_zones": GIB7 - 7_000_000_000 - i}
               for i in range(n)]
    return json.dumps({"zone": "eu-west", "ttl_s": 3.0, "artifacts": entries, "more_artifacts": 0}).encode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    book = NodeBook()
    out = {}
    for n in (0, 1, 10, MAX_REPORTED_ARTIFACTS):
        raw = body(n)
        t0 = time.perf_counter()
        for k in range(args.reps):
            decoded = json.loads(raw)
            book.heartbeat(f"node{k % 500}", decoded["zone"], parse_report(decoded), now=k, wall=k, ttl=3.0)
        us = (time.perf_counter() - t0) / args.reps * 1e6
        out[str(n)] = {"body_bytes": len(raw), "us": round(us, 1)}
        print(f"{n:4d} artifacts: body {len(raw):6d} bytes, decode + check + record {us:7.1f} us per heartbeat")
    print(json.dumps({"artifacts": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
