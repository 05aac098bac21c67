"""Publish throughput for a 1 GiB artifact (hash + torrent + upload to a file:// origin).

Prints human lines, then a JSON last line with ``size_bytes``, ``publish_mb_per_s`` and
``read_mb_per_s`` (plain sequential read of the same bytes, page cache warm for both),
plus the phase times.  Usage: ``python benchmarks/publish.py [--size 1G] [--files 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distributor.publish import publish_sync  # noqa: E402
from modelcast.config import PublishConfig, parse_size  # noqa: E402
from modelcast.procs import ServiceProcess, free_port, modelcast_argv  # noqa: E402
from modelcast.reference import Reference  # noqa: E402


def write_files(root: Path, size: int, count: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    block = os.urandom(64 << 20)
    paths = []
    for i in range(count):
        path = root / f"shard-{i:03d}.bin"
        left = size // count
        with open(path, "wb") as f:
            n = 0
            while left:
                chunk = block[: min(left, len(block))]
                # A distinct prefix per block keeps every piece (and every file) different.
                f.write(f"{i}:{n}:".encode().ljust(32, b"-") + chunk[32:])
                left -= len(chunk)
                n += 1
        paths.append(path)
    return paths


def read_all(paths: list[Path]) -> float:
    buf = bytearray(8 << 20)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--files", type=int, default=4)
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="modelcast-bench-publish-"))
    tracker = None
    try:
        paths = write_files(work / "model", size, args.files)
        size = sum(p.stat().st_size for p in paths)
        read_all(paths)  # warm the page cache so both figures measure the same thing
        read_s = min(read_all(paths) for _ in range(2))
        port = free_port()
        tracker = ServiceProcess(modelcast_argv("tracker", "--listen", f"127.0.0.1:{port}", "--data",
                                                str(work / "registry"), "--token", "t"),
                                 f"http://127.0.0.1:{port}/v1/health", work / "tracker.log", name="tracker").start()
        cfg = PublishConfig(registry=f"http://127.0.0.1:{port}", origin=(work / "origin").as_uri(), token="t")
        result = publish_sync(work / "model", Reference.parse("bench/publish:v1"), cfg, progress=sys.stderr.isatty())
        mb = size / 1e6
        print(f"published {mb:.0f} MB in {result.seconds:.2f}s ({mb / result.seconds:.0f} MB/s): "
              f"hash+torrent {result.hash_s:.2f}s, upload {result.upload_s:.2f}s; plain read {mb / read_s:.0f} MB/s")
        print(json.dumps({"size_bytes": size, "publish_mb_per_s": round(mb / result.seconds, 1),
                          "read_mb_per_s": round(mb / read_s, 1), "seconds": round(result.seconds, 3),
                          "hash_s": round(result.hash_s, 3), "upload_s": round(result.upload_s, 3)}))
        return 0
    finally:
        if tracker:
            tracker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
