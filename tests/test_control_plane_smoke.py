"""The control-plane benchmark runs end to end at a small scale and prints its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "control_plane.py"


def test_control_plane_benchmark_smoke():
    out = subprocess.run([sys.executable, str(BENCH), "--nodes", "500", "--peers", "500", "--torrents", "10",
                          "--duration", "0.5", "--concurrency", "8", "--no-redis"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heartbeats_per_s"] > 0 and result["announces_per_s"] > 0 and result["p99_ms"] > 0
    # Every heartbeat answered {"ok": true ...}, every announce a peer list.
    assert result["problems"] == 0, result["phases"]
    assert result["phases"]["in_process"]["fill"]["requests"] == 500
    assert result["redis_heartbeats_per_s"] is None and result["redis_skipped"] == "--no-redis"
    assert result["two_replicas_heartbeats_per_s"] is None
