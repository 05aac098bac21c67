"""The tracker load benchmark runs end to end at a small scale and prints its JSON line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "tracker_load.py"


def test_tracker_load_benchmark_smoke():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--peers", "2000", "--torrents", "20", "--duration", "2", "--requests", "4000",
         "--concurrency", "32", "--big-swarm", "500", "--big-duration", "1", "--close-duration", "1",
         "--udp-duration", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("announces_per_s", "p99_ms", "opentracker_announces_per_s", "ratio", "peers", "torrents",
                "requests", "seconds", "udp_announces_per_s"):
        assert key in result, key
    assert result["announces_per_s"] > 0 and result["p99_ms"] > 0
    assert (result["peers"], result["torrents"]) == (2000, 20)
    ours = result["phases"]["modelcast"]
    # Every peer got into its swarm, and every answer was a peer list, not a failure.
    assert ours["fill"]["requests"] == 2000 and ours["steady"]["swarm_size_seen"] == 100
    for phase in ours.values():
        assert phase["failures"] == 0 and phase.get("errors", 0) == 0, phase
    assert ours["steady"]["peers_returned_avg"] == 50
    if shutil.which("opentracker"):
        assert result["opentracker_announces_per_s"] > 0 and result["ratio"] > 0
        assert all(p["failures"] == 0 for p in result["phases"]["opentracker"].values())
    else:
        assert result["ratio"] is None
