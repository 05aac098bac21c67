"""A small run of benchmarks/fanout.py: every node ends with a verified copy."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fanout_smoke_three_nodes_all_verified():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fanout.py"), "--nodes", "3", "--size", "16M",
                          "--rate", "8M", "--no-baseline", "--timeout", "120"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)  # the figures, for the log
    assert result["nodes"] == 3 and result["size_bytes"] == 16 << 20
    # fanout.py returns only once every node answered "ready" (verified, renamed into place).
    assert result["max_s"] > 0 and result["origin_copies"] <= 1.5
    assert result["shaping"] in ("htb", "libtorrent")


def test_fanout_smoke_two_zones_one_copy_crosses():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fanout.py"), "--nodes", "4", "--zones", "2",
                          "--size", "16M", "--rate", "8M", "--no-baseline", "--timeout", "120"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["zones"] == 2 and result["origin_copies"] <= 1.5
    if result["shaping"] == "htb":  # cross-zone bytes are counted by the kernel's classes
        assert 0.5 <= result["cross_zone_copies"] <= 1.5
