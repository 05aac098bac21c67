"""A small run of benchmarks/dataplane.py: both nodes end with the source's bytes, and every figure is there."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

KEYS = {"size_bytes", "origin_mb_per_s", "p2p_mb_per_s", "copy_mb_per_s", "copy_cpu_s_per_gib",
        "copy_cpu_s_per_gib_each", "hash_cpu_s_per_gib", "origin_cpu_s_per_gib", "p2p_cpu_s_per_gib",
        "seeder_cpu_s_per_gib", "registry_cpu_s_per_gib", "copy_sender_cpu_s_per_gib", "publish_mb_per_s",
        "publish_hash_ratio", "floor_cpu_s_per_gib", "p2p_cpu_ratio", "origin_cpu_ratio", "page_cache_dropped",
        "identical"}


def test_dataplane_smoke_both_nodes_byte_identical():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dataplane.py"), "--size", "64M", "--timeout", "120"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(out.stdout)  # the figures, for the log
    assert set(result) == KEYS
    assert result["size_bytes"] == 64 << 20
    # Node A pulled from the origin, node B from node A; both copies compared byte for byte.
    assert result["identical"] is True
