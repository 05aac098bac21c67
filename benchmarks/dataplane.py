"""Data plane: what a node's ingest costs per byte, beside receiving and hashing the same bytes.

Starts a registry/tracker (which serves a ``file://`` origin's bytes as the web seed) and
two node daemons as separate processes on loopback, with no shaping, and in one run:

1. publishes an artifact of S bytes (4 files of random bytes);
2. node A pulls it from the origin (the registry's web seed);
3. node B, started only once A holds a verified copy, pulls it from A (its origin grace
   is long, so its bytes come from A; the registry's byte counter says if any did not);
4. the same files go over one plain TCP socket from disk to disk: a sender process
   (``sendfile``) to a receiver process that writes them into another directory and
   fsyncs each file, the way a node ends a download.  It runs twice, once before step 2
   and once after step 3, and its figures are the mean of both (``copy_cpu_s_per_gib_each``
   gives each receiver's): one copy's cost moved with what the steps before it left behind;
5. the same files are hashed in this process the way the torrent kind in use needs (v1,
   the default: SHA-1 over every piece; ``--torrent hybrid``: that and SHA-256 over every
   16 KiB block and the merkle tree above them), on one core.

The page cache is dropped before each step where root allows (the output says when it
could not). CPU is read from ``/proc/<pid>/stat`` (utime + stime of all threads) before
and after each step: the receiving daemon, the seeder (node A while B pulls), the
registry while it serves the origin's bytes, the plain copy's receiver. The floor is what
receiving, writing and checking a byte must cost: hash + copy CPU per GiB.

Last stdout line: JSON with size_bytes, origin_mb_per_s, p2p_mb_per_s, copy_mb_per_s,
copy_cpu_s_per_gib, hash_cpu_s_per_gib, origin_cpu_s_per_gib, p2p_cpu_s_per_gib,
seeder_cpu_s_per_gib, registry_cpu_s_per_gib, copy_sender_cpu_s_per_gib (the plain copy's
sendfile sender: what serving a byte from disk must cost, beside the registry's figure),
publish_mb_per_s, publish_hash_ratio
(publish rate / (cores x single-core hashing rate)), floor_cpu_s_per_gib, p2p_cpu_ratio,
origin_cpu_ratio, page_cache_dropped and identical (both nodes hold the source's bytes).
MB = 10^6 bytes.

With ``--perf DIR`` node A's origin ingest, the registry serving it, node B's p2p ingest, node A
seeding it and the plain copy's receiver are recorded by ``perf record -g`` (Debian's
linux-perf) into ``DIR/{origin,registry,p2p,seeder,copy}.perf.data``, each with its
``perf report --stdio`` beside it;
the recording costs CPU itself, so the figures of such a run are not the benchmark's.

Usage: python benchmarks/dataplane.py [--size 2G] [--keep] [--perf DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from publish import add_torrent_arg, hybrid_hash_cpu, write_files  # noqa: E402

from distributor.publish import publish_sync  # noqa: E402
from harness import start_node, start_tracker, wait_until  # noqa: E402
from modelcast.config import PublishConfig, parse_size  # noqa: E402
from modelcast.reference import Reference  # noqa: E402
from node_cache.client import NodeClient  # noqa: E402

GIB = 1 << 30
REF = "bench/dataplane:v1"
# The plain copy's receive buffer. A buffer that outgrows the CPU caches makes both kernel
# copies (socket to buffer, buffer to page cache) go through memory: 4 MiB cost this machine
# twice the CPU per GiB of 128 KiB, which would inflate the floor the nodes are held to.
COPY_BUF = 128 << 10
HEADER = struct.Struct("!HQ")  # name length, file size


# -- measuring -----------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of every thread of ``pid`` so far, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def drop_page_cache() -> bool:
    """Write back and drop the page cache so the next step reads from disk; False where not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class Step:
    """Wall time and CPU of some processes over one step."""

    def __init__(self, **pids: int):
        self.pids = pids

    def __enter__(self) -> "Step":
        self.times0 = {k: cpu_times(p) for k, p in self.pids.items()}
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.user, self.sys = {}, {}
        for k, p in self.pids.items():
            user, sys_ = cpu_times(p)
            self.user[k], self.sys[k] = user - self.times0[k][0], sys_ - self.times0[k][1]
        self.cpu = {k: self.user[k] + self.sys[k] for k in self.pids}

    def split(self, name: str) -> str:
        """``user U, sys S`` of one process: how much of its cost is the kernel's."""
        return f"user {self.user[name]:.2f}, sys {self.sys[name]:.2f}"


# -- the node steps --------------------------------------------------------------------------


def pull(url: str, ref: str, timeout_s: float) -> dict:
    """Pull ``ref`` on the node at ``url`` and wait until it is verified and in place."""

    async def go() -> dict:
        async with NodeClient(url) as node:
            status = await asyncio.wait_for(node.pull(ref, wait=True), timeout_s)
        if status["state"] != "ready":
            raise RuntimeError(f"pull of {ref} on {url} ended {status['state']}: {status.get('error')}")
        return status

    return asyncio.run(go())


def origin_bytes_served(registry: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{registry}/v1/stats", timeout=5) as resp:
        return json.load(resp)["origin_bytes_served"]


class PerfRecord:
    """``perf record -g -p PID`` for the duration of a ``with`` block (``None`` dir: nothing)."""

    def __init__(self, out_dir: Path | None, pid: int, name: str):
        self.out_dir, self.pid, self.name = out_dir, pid, name
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "PerfRecord":
        if self.out_dir is None:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.data = self.out_dir / f"{self.name}.perf.data"
        self.proc = subprocess.Popen(["perf", "record", "-g", "-o", str(self.data), "-p", str(self.pid)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # perf writes its header once it is attached: wait for the file, not for a fixed time.
        wait_until(lambda: self.data.exists() or self.proc.poll() is not None, 10, 0.02, "perf record to attach")
        if self.proc.poll() is not None:
            raise RuntimeError(f"perf record failed: {self.proc.stderr.read().decode(errors='replace')[-500:]}")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        report = subprocess.run(["perf", "report", "--stdio", "-i", str(self.data)], capture_output=True, text=True)
        (self.out_dir / f"{self.name}.perf.txt").write_text(report.stdout)


# -- the plain copy: one TCP socket, disk to disk ---------------------------------------------


def copy_receiver(dest: Path) -> int:
    """Child process: accept one connection, write each file it brings into ``dest`` and fsync it.

    Prints the port it listens on, then ``done`` once every file is durable, and stays alive
    until stdin closes so that its CPU counters can be read.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        print(srv.getsockname()[1], flush=True)
        conn, _ = srv.accept()
    buf = bytearray(COPY_BUF)
    view = memoryview(buf)
    with conn:
        while True:
            head = conn.recv(HEADER.size, socket.MSG_WAITALL)
            if not head:
                break
            name_len, size = HEADER.unpack(head)
            name = conn.recv(name_len, socket.MSG_WAITALL).decode()
            with open(dest / name, "wb", buffering=0) as out:
                left = size
                while left:
                    n = conn.recv_into(view[: min(left, COPY_BUF)])
                    if not n:
                        raise SystemExit(f"connection closed with {left} bytes of {name} to come")
                    out.write(view[:n])
                    left -= n
                os.fsync(out.fileno())
    print("done", flush=True)
    sys.stdin.read()
    return 0


def copy_sender(port: int, paths: list[Path]) -> int:
    """Child process: send every file over one connection (``sendfile``: the kernel reads them)."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        for p in paths:
            name = p.name.encode()
            conn.sendall(HEADER.pack(len(name), p.stat().st_size) + name)
            with open(p, "rb") as f:
                conn.sendfile(f)
    return 0


def plain_copy(paths: list[Path], dest: Path, perf_dir: Path | None = None) -> Step:
    """Time the plain copy and measure its receiver's CPU (recorded by perf into ``perf_dir`` if given)."""
    recv = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_recv", str(dest)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(recv.stdout.readline())
        with PerfRecord(perf_dir, recv.pid, "copy"), Step(receiver=recv.pid) as step:
            send = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_send", str(port), *map(str, paths)])
            if recv.stdout.readline().strip() != "done":
                raise RuntimeError("the plain copy's receiver ended early")
        # The sender is our child: wait4 gives its CPU (what serving the bytes with sendfile costs).
        _, status, usage = os.wait4(send.pid, 0)
        send.returncode = os.waitstatus_to_exitcode(status)
        step.cpu["sender"] = usage.ru_utime + usage.ru_stime
        step.user["sender"], step.sys["sender"] = usage.ru_utime, usage.ru_stime
        if send.returncode != 0:
            raise RuntimeError(f"the plain copy's sender exited {send.returncode}")
    finally:
        if recv.poll() is None:
            recv.stdin.close()
            recv.wait(30)
    return step


def same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x, y = fa.read(8 << 20), fb.read(8 << 20)
            if x != y:
                return False
            if not x:
                return True


# -- the run -------------------------------------------------------------------------------


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="modelcast-dataplane-", dir=args.dir))
    tracker = node_a = node_b = None
    dropped: list[bool] = []

    def drop() -> None:
        dropped.append(drop_page_cache())

    try:
        paths = write_files(work / "model", args.size, 4)
        size = sum(p.stat().st_size for p in paths)
        gib = size / GIB
        mb = size / 1e6
        tracker = start_tracker(work, token="t")
        registry = tracker.url

        drop()
        result = publish_sync(work / "model", Reference.parse(REF),
                              PublishConfig(registry=registry, origin=(work / "origin").as_uri(), token="t",
                                            torrent_format=args.torrent))
        publish_mb_s = mb / result.seconds
        hexd = result.digest.split(":", 1)[1]
        print(f"published {mb:.0f} MB in {len(paths)} files in {result.seconds:.2f}s ({publish_mb_s:.0f} MB/s), "
              f"piece length {result.manifest.piece_length >> 10} KiB")

        # The plain copy runs twice, before the nodes and after them, and its figures are the
        # mean of both: its receiver's CPU per GiB moved by 1.5x between runs here with the
        # state the steps before it left (page cache, free memory), more than anything compared.
        drop()
        copies = [plain_copy(paths, work / "copy", args.perf)]
        shutil.rmtree(work / "copy")

        node_a = start_node(work, registry, "node-a", token="t")
        drop()
        served0 = origin_bytes_served(registry)
        with PerfRecord(args.perf, node_a.pid, "origin"), PerfRecord(args.perf, tracker.pid, "registry"), \
                Step(daemon=node_a.pid, registry=tracker.pid) as origin:
            pull(node_a.url, REF, args.timeout)
        origin_served = origin_bytes_served(registry) - served0
        print(f"node A from the origin: {origin.seconds:.2f}s ({mb / origin.seconds:.0f} MB/s); daemon "
              f"{origin.cpu['daemon']:.2f} CPU-s ({origin.split('daemon')}), registry {origin.cpu['registry']:.2f} "
              f"CPU-s; origin sent {origin_served / size:.2f} copies")

        # B starts only now that A holds a verified copy, and waits long before asking the
        # origin, so that its bytes come from A.
        node_b = start_node(work, registry, "node-b", token="t", extra=["--webseed-grace", "60"])
        drop()
        served0 = origin_bytes_served(registry)
        with PerfRecord(args.perf, node_b.pid, "p2p"), PerfRecord(args.perf, node_a.pid, "seeder"), \
                Step(daemon=node_b.pid, seeder=node_a.pid, registry=tracker.pid) as p2p:
            pull(node_b.url, REF, args.timeout)
        p2p_origin = origin_bytes_served(registry) - served0
        print(f"node B from node A: {p2p.seconds:.2f}s ({mb / p2p.seconds:.0f} MB/s); daemon "
              f"{p2p.cpu['daemon']:.2f} CPU-s ({p2p.split('daemon')}), seeder {p2p.cpu['seeder']:.2f} CPU-s "
              f"({p2p.split('seeder')}); "
              f"{p2p_origin} bytes from the origin")
        # Idle daemons would only blur the plain copy's figures.
        for svc in (node_b, node_a, tracker):
            svc.stop()

        drop()
        copies.append(plain_copy(paths, work / "copy", args.perf))
        for when, c in zip(("before the nodes", "after them"), copies):
            print(f"plain TCP copy disk to disk, {when}: {c.seconds:.2f}s ({mb / c.seconds:.0f} MB/s); receiver "
                  f"{c.cpu['receiver']:.2f} CPU-s ({c.split('receiver')}); sender (sendfile) "
                  f"{c.cpu['sender']:.2f} CPU-s ({c.split('sender')})")
        copy_s = sum(c.seconds for c in copies) / len(copies)
        copy_cpu = {k: sum(c.cpu[k] for c in copies) / len(copies) for k in ("receiver", "sender")}

        drop()
        hash_cpu, hash_wall = hybrid_hash_cpu(paths, result.manifest.piece_length, args.torrent == "v1")
        cores = len(os.sched_getaffinity(0))
        hash_mb_s = mb / hash_cpu
        kind = "v1 torrent hashes (SHA-1)" if args.torrent == "v1" else "hybrid torrent hashes (SHA-1 + SHA-256)"
        print(f"{kind} on one core: {hash_cpu:.2f} CPU-s ({hash_mb_s:.0f} MB/s "
              f"per core; {hash_wall:.2f}s with the reads)")

        identical = all(same_bytes(p, node.cache / "artifacts" / "sha256" / hexd / p.name)
                        for node in (node_a, node_b) for p in paths)
        print(f"both nodes hold the source's bytes: {identical}")
        if not all(dropped):
            print("page cache NOT dropped (needs root and a writable /proc/sys/vm/drop_caches): "
                  "reads may come from memory")

        def per_gib(cpu: float) -> float:
            return round(cpu / gib, 3)

        floor = hash_cpu / gib + copy_cpu["receiver"] / gib
        return {
            "size_bytes": size,
            "origin_mb_per_s": round(mb / origin.seconds, 1),
            "p2p_mb_per_s": round(mb / p2p.seconds, 1),
            "copy_mb_per_s": round(mb / copy_s, 1),
            "copy_cpu_s_per_gib": per_gib(copy_cpu["receiver"]),
            "copy_cpu_s_per_gib_each": [per_gib(c.cpu["receiver"]) for c in copies],
            "hash_cpu_s_per_gib": per_gib(hash_cpu),
            "origin_cpu_s_per_gib": per_gib(origin.cpu["daemon"]),
            "p2p_cpu_s_per_gib": per_gib(p2p.cpu["daemon"]),
            "seeder_cpu_s_per_gib": per_gib(p2p.cpu["seeder"]),
            "registry_cpu_s_per_gib": per_gib(origin.cpu["registry"]),
            "copy_sender_cpu_s_per_gib": per_gib(copy_cpu["sender"]),
            "publish_mb_per_s": round(publish_mb_s, 1),
            "publish_hash_ratio": round(publish_mb_s / (cores * hash_mb_s), 3),
            "floor_cpu_s_per_gib": round(floor, 3),
            "p2p_cpu_ratio": round(p2p.cpu["daemon"] / gib / floor, 2),
            "origin_cpu_ratio": round(origin.cpu["daemon"] / gib / floor, 2),
            "page_cache_dropped": all(dropped),
            "identical": identical,
        }
    finally:
        for svc in (node_b, node_a, tracker):
            if svc is not None:
                svc.stop()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            # The node caches are read-only by design.
            subprocess.run(["chmod", "-R", "u+w", str(work)], capture_output=True)
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_recv":
        return copy_receiver(Path(sys.argv[2]))
    if len(sys.argv) > 1 and sys.argv[1] == "_send":
        return copy_sender(int(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"), help="artifact size (default 2G)")
    add_torrent_arg(ap)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds each pull may take")
    ap.add_argument("--dir", type=Path, default=None, help="where the work directory goes (default: the temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--perf", type=Path, default=None, metavar="DIR",
                    help="record node A's origin ingest and the copy's receiver with perf record -g into DIR")
    args = ap.parse_args()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
