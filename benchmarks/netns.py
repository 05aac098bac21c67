"""A private network namespace with per-address bandwidth (HTB on its loopback).

Each shaped source address gets an HTB class capped at its upload rate; with zones,
traffic from an address to the other zone's prefix goes to a child class capped lower.
Kernel counters per class (``tc -s class show``) then tell exactly what crossed zones.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def available() -> str | None:
    """None if namespaces and HTB can be used here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "ip/tc (iproute2) not installed"
    name = f"mcprobe{os.getpid()}"
    try:
        run("ip", "netns", "add", name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb")
        return None
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a shaped namespace: {getattr(exc, 'stderr', '') or exc}".strip()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass(frozen=True)
class Shaped:
    address: str
    rate: int  # bytes/s upload
    zone_prefix: str | None = None  # e.g. "127.0.1.0/24": the address's own zone
    other_prefix: str | None = None
    cross_rate: int | None = None


class Namespace:
    """Create a namespace, shape its loopback, and remove it all at the end."""

    def __init__(self, name: str):
        self.name = name
        self.cross_classes: list[str] = []

    def __enter__(self) -> "Namespace":
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        run("ip", "netns", "add", self.name)
        run("ip", "-n", self.name, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def tc(self, *args: str) -> str:
        return run("ip", "netns", "exec", self.name, "tc", *args)

    def shape(self, shaped: list[Shaped]) -> None:
        self.tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "fffe", "r2q", "100")
        self.tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:fffe", "htb", "rate", "40gbit")
        prio = 1
        for k, s in enumerate(shaped, start=1):
            parent = f"1:{k * 16:x}"
            zoned = bool(s.other_prefix and s.cross_rate)
            self._class("1:", parent, s.rate, leaf=not zoned)
            if zoned:
                same, cross = f"1:{k * 16 + 1:x}", f"1:{k * 16 + 2:x}"
                self._class(parent, same, s.rate)
                self._class(parent, cross, s.cross_rate)
                self.cross_classes.append(cross)
                self._filter(prio, cross, "src", f"{s.address}/32", "dst", s.other_prefix)
                self._filter(prio + 1, same, "src", f"{s.address}/32")
            else:
                self._filter(prio + 1, parent, "src", f"{s.address}/32")

    def _class(self, parent: str, classid: str, rate: int, leaf: bool = True) -> None:
        bits = f"{rate * 8}bit"
        # Loopback packets are up to 64 KiB: burst and quantum must hold a few of them.
        self.tc("class", "add", "dev", "lo", "parent", parent, "classid", classid, "htb", "rate", bits, "ceil", bits,
                "burst", "512k", "cburst", "512k", "quantum", "131072")
        if leaf:
            # The default leaf queue is 1,000 packets of up to 64 KiB: seconds of delay at
            # 20 MiB/s, which no real network has (and HAVE/REQUEST messages would wait
            # behind it). A byte FIFO of ~50 ms at the class rate is a shallow switch
            # buffer; fq_codel would be better but this kernel lacks it.
            limit = max(256 * 1024, rate // 20)
            self.tc("qdisc", "add", "dev", "lo", "parent", classid, "bfifo", "limit", str(limit))

    def _filter(self, prio: int, flowid: str, *matches: str) -> None:
        args = []
        for i in range(0, len(matches), 2):
            args += ["match", "ip", matches[i], matches[i + 1]]
        self.tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", str(prio), "u32", *args,
                "flowid", flowid)

    def class_bytes(self) -> dict[str, int]:
        """Bytes sent through each HTB class so far (kernel counters)."""
        out = self.tc("-s", "class", "show", "dev", "lo")
        counts, current = {}, None
        for line in out.splitlines():
            m = re.match(r"class htb (\S+) ", line)
            if m:
                current = m.group(1)
            m = re.search(r"Sent (\d+) bytes", line)
            if m and current:
                counts[current] = int(m.group(1))
                current = None
        return counts
