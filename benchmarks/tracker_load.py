"""Tracker announce throughput: modelcast's tracker under 50,000 peers, beside opentracker.

Starts a ``modelcast tracker`` process and registers ``--torrents`` tiny artifacts through
the registry API (v1 torrents that libtorrent builds from a piece hash, no files), plus
one more for the big-swarm phase.  A load generator in a separate process (spawned;
non-blocking sockets on epoll, request bytes built before the clock starts) then sends
announces on loopback, one request in flight per connection, HTTP/1.1 keep-alive where
the server allows it (opentracker closes after each answer, so it gets a new connection
per announce, like libtorrent's HTTP announces).  Phases, each bounded in requests and time:

* fill: every peer announces ``event=started`` once, with ``numwant=0`` so it only
  fills the swarms (``--peers`` peers spread over ``--torrents`` swarms);
* steady (the headline): re-announces without event, ``numwant=50``, ``compact=1``,
  round robin over the peers, for ``--duration`` s or ``--requests`` requests;
* steady, close (modelcast only): the same re-announces on a new connection each, as
  libtorrent sends them (``Connection: close``), for ``--close-duration`` s;
* big: one swarm of ``--big-swarm`` peers, filled the same way, then re-announced into;
* udp: BEP 15 re-announces of the same peers (connect once per socket, then announces),
  when the tracker serves UDP (``--udp-listen``).

The same phases then run against ``opentracker`` (Debian package) when it is installed.
Every answer is checked for status 200 and no ``failure reason``; one in 16 is decoded
to check the peer list.  ``tracker_cpu`` is the tracker process's CPU time over the wall
time of the phase (1.0 = one core busy) and ``announces_per_cpu_s`` the announces per
second of that CPU time (steadier than the wall-clock rate on a shared machine);
``generator_cpu`` is the load generator's own: near 1.0, the figure is the generator's
limit, not the tracker's.

With ``--profile FILE`` py-spy samples the modelcast tracker through the steady HTTP
phase, writes the collapsed stacks to FILE and prints where the time goes (sampling
slows the tracker a little, so the JSON then says ``"profiled": true``).

Prints human lines, then a JSON last line with ``announces_per_s`` and ``p99_ms`` (steady
HTTP phase, keep-alive), ``opentracker_announces_per_s``, ``ratio`` (null without
opentracker), ``announces_per_cpu_s`` and ``opentracker_announces_per_cpu_s``,
``new_connection_announces_per_s`` (modelcast, one connection per announce),
``udp_announces_per_s`` (null without a UDP endpoint), ``peers``, ``torrents``,
``requests``, ``seconds`` and the details of every phase under ``phases``.

Usage: ``python benchmarks/tracker_load.py [--peers 50000] [--torrents 1000] [--duration 20]
[--requests 200000] [--concurrency 128] [--big-swarm 45000] [--no-opentracker] [--no-udp]
[--profile FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import errno
import hashlib
import json
import multiprocessing
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import ServiceProcess, free_port, modelcast_argv, start_tracker, wait_until  # noqa: E402

TOKEN = "bench"
SAMPLE_EVERY = 16  # answers decoded in full to check the peer list
MAX_PEERS = 55_000  # announced ports are 10000 + i, distinct within a swarm
PORT_BASE = 10_000
FILL_LIMIT_S = 120.0  # a fill phase that has not finished by then stops and says so
DRAIN_S = 3.0  # after the deadline, how long answers still in flight are waited for


# ---------------------------------------------------------------------------------------
# Load generator (runs in its own process; only the standard library and tracker.bencode)


def _pct(data: bytes) -> str:
    return "".join(f"%{b:02X}" for b in data)


def _peer_id(prefix: bytes, i: int) -> bytes:
    return prefix + b"%012d" % i


def _left(i: int) -> int:
    return 0 if i % 4 == 0 else 1 << 20  # a quarter seeds, the rest downloading


def _heartbeat_requests(spec: dict) -> list[bytes]:
    """One node heartbeat per simulated node (``spec['peers']`` nodes), as a node daemon sends it: with its
    node key (``X-Modelcast-Node-Key``; the first heartbeat of an id enrols it, binding the id to the key)."""
    body = b'{"zone": "z%d", "ttl_s": 600}'
    out = []
    for i in range(spec["peers"]):
        b = body % (i % 4)
        node = b"%s%06d" % (spec["peer_prefix"].encode(), i)
        out.append(b"POST /v1/nodes/%s/heartbeat HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                   b"X-Modelcast-Node-Key: key-of-%s\r\nContent-Length: %d\r\n\r\n%s"
                   % (node, spec["host"].encode(), spec["port"], node, len(b), b))
    return out


def _http_requests(spec: dict) -> list[bytes]:
    """One GET per peer: peer ``i`` is in swarm ``hashes[i % len(hashes)]``; with ``kind`` heartbeat, POSTs."""
    if spec.get("kind") == "heartbeat":
        return _heartbeat_requests(spec)
    hashes = [bytes.fromhex(h) for h in spec["hashes"]]
    quoted = [_pct(h) for h in hashes]
    event = f"&event={spec['event']}" if spec["event"] else ""
    tail = (f"&compact=1&numwant={spec['numwant']}{event} HTTP/1.1\r\nHost: {spec['host']}:{spec['port']}\r\n"
            + ("" if spec["keepalive"] else "Connection: close\r\n") + "\r\n")
    prefix = spec["peer_prefix"].encode()
    out = []
    for i in range(spec["peers"]):
        out.append((f"GET /announce?info_hash={quoted[i % len(hashes)]}"
                    f"&peer_id={_peer_id(prefix, i).decode()}&port={PORT_BASE + i}"
                    f"&uploaded=0&downloaded=0&left={_left(i)}{tail}").encode())
    return out


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
_CONN_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)


class _Summary:
    """Latencies and counters of one phase, summarised the same way for every protocol."""

    def __init__(self) -> None:
        self.latencies = array("d")
        self.failures = 0  # answers that are not a 200 with a bencoded peer list
        self.first_failure = ""
        self.peers_returned = 0
        self.sampled = 0
        self.swarm_max = 0

    def fail(self, what: str) -> None:
        self.failures += 1
        if not self.first_failure:
            self.first_failure = what[:300]

    def result(self, seconds: float, cpu: float, **extra) -> dict:
        lat = sorted(self.latencies)
        n = len(lat)

        def q(p: float) -> float | None:
            return round(lat[min(n - 1, int(p * n))] * 1000, 3) if n else None

        return {"requests": n, "seconds": round(seconds, 3), "announces_per_s": round(n / seconds, 1) if seconds else 0,
                "p50_ms": q(0.50), "p99_ms": q(0.99), "max_ms": round(lat[-1] * 1000, 3) if n else None,
                "failures": self.failures, "first_failure": self.first_failure or None,
                "peers_returned_avg": round(self.peers_returned / self.sampled, 1) if self.sampled else None,
                "swarm_size_seen": self.swarm_max, "generator_cpu": round(cpu / seconds, 2) if seconds else None,
                **extra}


def _check_http_body(body: bytes, summary: _Summary, sample: bool) -> None:
    if b"failure reason" in body:
        summary.fail(body.decode(errors="replace"))
        return
    if not sample:
        return
    from tracker.bencode import bdecode

    try:
        answer = bdecode(body, strict=False)
        peers = answer[b"peers"]
        summary.peers_returned += len(peers) // 6 if isinstance(peers, bytes) else len(peers)
        summary.sampled += 1
        summary.swarm_max = max(summary.swarm_max, answer.get(b"complete", 0) + answer.get(b"incomplete", 0))
    except Exception as exc:  # noqa: BLE001 - any malformed answer is a failure to report
        summary.fail(f"undecodable answer ({exc}): {body[:200]!r}")


def http_phase(spec: dict) -> dict:
    """Send ``spec['max_requests']`` announces (or until ``spec['max_s']``); return the figures.

    Each connection carries one request at a time.  A connection the server closes
    (after an answer, or idle) is replaced by a new one; a request whose connection
    closed before any answer byte is sent again on the new one (counted in ``resends``).
    """
    requests = _http_requests(spec)
    n = len(requests)
    addr = (spec["host"], spec["port"])
    keepalive = spec["keepalive"]
    limit = spec["max_requests"]
    summary = _Summary()
    ep = select.epoll()
    conns: dict[int, list] = {}  # fd -> [socket, connected, buffer, t0, request bytes]
    issued = errors = resends = 0
    next_peer = spec.get("start", 0)

    def take() -> bytes | None:
        nonlocal issued, next_peer
        if issued >= limit or time.perf_counter() >= deadline:
            return None
        issued += 1
        req = requests[next_peer % n]
        next_peer += 1
        return req

    def open_conn(req: bytes, t0: float) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            raise OSError(err, f"connect to {addr}: {os.strerror(err)}")
        conns[s.fileno()] = [s, False, bytearray(), t0, req]
        ep.register(s.fileno(), select.EPOLLOUT)

    def close(fd: int) -> None:
        ep.unregister(fd)
        conns.pop(fd)[0].close()

    def send(fd: int, c: list) -> None:
        nonlocal errors
        try:
            sent = c[0].send(c[4])
        except OSError:
            sent = -1
        if sent != len(c[4]):  # a few hundred bytes into an empty socket buffer: all or nothing
            errors += 1
            close(fd)
            if (req := take()) is not None:
                open_conn(req, time.perf_counter())

    cpu0 = time.process_time()
    t_start = time.perf_counter()
    deadline = t_start + spec["max_s"]
    for _ in range(min(spec["concurrency"], limit)):
        if (req := take()) is None:
            break
        open_conn(req, time.perf_counter())
    drain_deadline = None
    while conns:
        now = time.perf_counter()
        if now >= deadline and drain_deadline is None:
            drain_deadline = now + DRAIN_S
        if drain_deadline is not None and now >= drain_deadline:
            break
        for fd, ev in ep.poll(0.1):
            c = conns.get(fd)
            if c is None:
                continue
            if not c[1]:
                if c[0].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    errors += 1
                    close(fd)
                    if (req := take()) is not None:
                        open_conn(req, time.perf_counter())
                    continue
                c[1] = True
                ep.modify(fd, select.EPOLLIN)
                send(fd, c)
                continue
            try:
                data = c[0].recv(65536)
            except ConnectionError:
                data = b""
            buf = c[2]
            if not data:
                if buf:  # cut off in the middle of an answer
                    errors += 1
                    close(fd)
                    if (req := take()) is not None:
                        open_conn(req, time.perf_counter())
                else:  # closed while idle or before answering: same request, new connection
                    resends += 1
                    req, t0 = c[4], c[3]
                    close(fd)
                    open_conn(req, t0)
                continue
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                continue
            head = bytes(buf[:end])
            m = _CONTENT_LENGTH.search(head)
            if m is None:
                errors += 1
                summary.fail(f"answer without Content-Length: {head[:200]!r}")
                close(fd)
                if (req := take()) is not None:
                    open_conn(req, time.perf_counter())
                continue
            total = end + 4 + int(m.group(1))
            if len(buf) < total:
                continue
            t1 = time.perf_counter()
            summary.latencies.append(t1 - c[3])
            if head[9:12] != b"200":
                summary.fail(head[:200].decode(errors="replace"))
            elif spec.get("kind") == "heartbeat":
                if not buf[end + 4:total].startswith(b'{"ok": true'):
                    summary.fail(bytes(buf[end + 4:total][:200]).decode(errors="replace"))
            else:
                _check_http_body(bytes(buf[end + 4:total]), summary, len(summary.latencies) % SAMPLE_EVERY == 0)
            del buf[:total]
            req = take()
            if keepalive and not _CONN_CLOSE.search(head) and not buf:
                if req is None:
                    close(fd)
                else:
                    c[3], c[4] = t1, req
                    send(fd, c)
            else:
                close(fd)
                if req is not None:
                    open_conn(req, t1)
    seconds = time.perf_counter() - t_start
    cpu = time.process_time() - cpu0
    lost = len(conns)
    for fd in list(conns):
        close(fd)
    ep.close()
    return summary.result(seconds, cpu, errors=errors, resends=resends, unanswered=lost, next_peer=next_peer)


UDP_PROTOCOL_ID = 0x41727101980
UDP_TIMEOUT_S = 2.0


def _udp_connect(sock: socket.socket, addr: tuple[str, int]) -> bytes:
    """BEP 15 connect on a blocking socket; return the connection id."""
    sock.settimeout(1.0)
    for attempt in range(5):
        tid = os.urandom(4)
        sock.sendto(struct.pack("!QI", UDP_PROTOCOL_ID, 0) + tid, addr)
        try:
            while True:
                data = sock.recv(2048)
                if len(data) >= 16 and data[:4] == b"\0\0\0\0" and data[4:8] == tid:
                    sock.setblocking(False)
                    return data[8:16]
        except TimeoutError:
            continue
    raise TimeoutError(f"no BEP 15 connect answer from udp://{addr[0]}:{addr[1]} after 5 tries")


def udp_phase(spec: dict) -> dict:
    """BEP 15 announces with ``spec['concurrency']`` in flight over a few sockets."""
    addr = (spec["host"], spec["port"])
    hashes = [bytes.fromhex(h) for h in spec["hashes"]]
    prefix = spec["peer_prefix"].encode()
    event = {"": 0, "completed": 1, "started": 2, "stopped": 3}[spec["event"]]
    bodies = [hashes[i % len(hashes)] + _peer_id(prefix, i)
              + struct.pack("!qqqiIIiH", 0, _left(i), 0, event, 0, i, spec["numwant"], PORT_BASE + i)
              for i in range(spec["peers"])]
    n = len(bodies)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(spec.get("sockets", 8))]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    cids = [_udp_connect(s, addr) + b"\0\0\0\1" for s in socks]
    ep = select.epoll()
    for i, s in enumerate(socks):
        ep.register(s.fileno(), select.EPOLLIN)
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    summary = _Summary()
    inflight: dict[int, float] = {}
    limit, conc = spec["max_requests"], spec["concurrency"]
    issued = lost = reconnects = 0
    next_peer = spec.get("start", 0)
    tid = 0
    cpu0 = time.process_time()
    t_start = time.perf_counter()
    deadline = t_start + spec["max_s"]
    last_sweep = t_start
    while True:
        now = time.perf_counter()
        sending = issued < limit and now < deadline
        if not sending and (not inflight or now >= deadline + DRAIN_S):
            break
        while sending and len(inflight) < conc and issued < limit:
            tid = (tid + 1) & 0xFFFFFFFF
            k = tid % len(socks)
            try:
                socks[k].sendto(cids[k] + tid.to_bytes(4, "big") + bodies[next_peer % n], addr)
            except BlockingIOError:
                break
            inflight[tid] = time.perf_counter()
            issued += 1
            next_peer += 1
        for fd, _ in ep.poll(0.05):
            k = by_fd[fd]
            while True:
                try:
                    data = socks[k].recv(65536)
                except BlockingIOError:
                    break
                t1 = time.perf_counter()
                got = int.from_bytes(data[4:8], "big") if len(data) >= 8 else -1
                t0 = inflight.pop(got, None)
                if t0 is None:
                    continue  # an answer that came after its timeout
                summary.latencies.append(t1 - t0)
                action = data[:4]
                if action == b"\0\0\0\1" and len(data) >= 20 and (len(data) - 20) % 6 == 0:
                    if len(summary.latencies) % SAMPLE_EVERY == 0:
                        leechers, seeders = struct.unpack("!II", data[12:20])
                        summary.peers_returned += (len(data) - 20) // 6
                        summary.sampled += 1
                        summary.swarm_max = max(summary.swarm_max, leechers + seeders)
                else:
                    text = data[8:].decode(errors="replace")
                    summary.fail(text if action == b"\0\0\0\3" else f"bad answer {data[:40]!r}")
                    if action == b"\0\0\0\3" and "connection" in text.lower():
                        socks[k].setblocking(True)
                        cids[k] = _udp_connect(socks[k], addr) + b"\0\0\0\1"
                        reconnects += 1
        if now - last_sweep > 0.2:
            last_sweep = now
            for t, t0 in list(inflight.items()):
                if now - t0 > UDP_TIMEOUT_S:
                    del inflight[t]
                    lost += 1
    seconds = time.perf_counter() - t_start
    cpu = time.process_time() - cpu0
    lost += len(inflight)
    for s in socks:
        s.close()
    ep.close()
    return summary.result(seconds, cpu, lost=lost, reconnects=reconnects, next_peer=next_peer)


# ---------------------------------------------------------------------------------------
# Targets


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_artifact(i: int) -> tuple:
    """A tiny v1 artifact: (Manifest, torrent bytes).  libtorrent takes the piece hash as given."""
    import libtorrent as lt
    import xxhash

    from modelcast.manifest import FileEntry, InfoHashes, Manifest

    data = b"modelcast tracker benchmark %08d" % i
    name = f"t{i:05d}"
    ct = lt.create_torrent([lt.create_file_entry(f"{name}/blob.bin", len(data))], 16384, lt.create_torrent.v1_only)
    ct.set_priv(True)
    ct.set_creation_date(0)
    ct.set_hash(0, hashlib.sha1(data).digest())
    torrent = lt.bencode(ct.generate())
    v1 = str(lt.torrent_info(torrent).info_hashes().v1)
    manifest = Manifest(kind="model", name=f"bench/{name}", files=(FileEntry("blob.bin", len(data),
                        xxhash.xxh3_128_hexdigest(data)),), piece_length=16384, info_hash=InfoHashes(v1=v1),
                        torrent_name=name, created="2026-01-01T00:00:00Z")
    return manifest, torrent


async def register(url: str, artifacts: list[tuple], origin: str, parallel: int = 16) -> None:
    """POST every artifact to the registry, ``parallel`` at a time (the way publish registers)."""
    from tracker.client import RegistryClient

    sem = asyncio.Semaphore(parallel)
    async with RegistryClient(url, TOKEN, timeout_s=120) as client:
        async def one(manifest, torrent):
            async with sem:
                await client.publish(manifest, torrent, origin, None, "v1")

        await asyncio.gather(*(one(m, t) for m, t in artifacts))


class Target:
    """A tracker under test: its announce address, UDP address (or None) and process id."""

    def __init__(self, name: str, host: str, port: int, udp_port: int | None, pid: int):
        self.name, self.host, self.port, self.udp_port, self.pid = name, host, port, udp_port, pid


def start_modelcast(work: Path, udp: bool) -> tuple[ServiceProcess, Target]:
    # Peers re-announce less often than the default ttl here (50,000 peers, a few
    # thousand announces a second): keep them all listed for the whole run.
    extra = ["--peer-ttl", "3600", "--announce-interval", "1800"]
    udp_port = None
    if udp:
        udp_port = free_port()
        extra += ["--udp-listen", f"127.0.0.1:{udp_port}"]
    svc = start_tracker(work, token=TOKEN, extra=extra, log_path=work / "tracker.log", name="modelcast tracker")
    return svc, Target("modelcast", "127.0.0.1", svc.port, udp_port, svc.pid)


def modelcast_has_udp() -> bool:
    out = subprocess.run(modelcast_argv("tracker", "--help"), capture_output=True, text=True, timeout=60)
    return "--udp-listen" in out.stdout


def start_opentracker(binary: str, work: Path, hashes: list[str]) -> tuple[subprocess.Popen, Target]:
    """Start opentracker on loopback with the benchmark's info-hashes whitelisted (if it has a whitelist)."""
    root = work / "opentracker"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)  # it chroots here and drops to an unprivileged user
    port, udp_port = free_port(), free_port()
    argv = [binary, "-i", "127.0.0.1", "-p", str(port), "-P", str(udp_port), "-d", str(root)]
    usage = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10)
    if "-w file" in usage.stdout + usage.stderr:
        # Debian builds it with a whitelist: every other info-hash is refused.
        (root / "whitelist.txt").write_text("".join(h + "\n" for h in hashes))
        os.chmod(root / "whitelist.txt", 0o644)
        argv += ["-w", "/whitelist.txt"]  # a path inside the chroot
    log = open(work / "opentracker.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    target = Target("opentracker", "127.0.0.1", port, udp_port, proc.pid)
    # Ready once an announce for a whitelisted hash is answered without failure (the
    # whitelist is loaded by a thread after start).
    probe = _http_requests({"hashes": hashes[:1], "peers": 1, "event": "stopped", "numwant": 0, "host": "127.0.0.1",
                            "port": port, "keepalive": False, "peer_prefix": "-PROBE0-"})[0]

    def answering() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"opentracker exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(probe)
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
        except OSError:
            return False
        return answer.startswith(b"HTTP/1.1 200") and b"failure reason" not in answer

    try:
        wait_until(answering, 15, 0.1, "opentracker to answer")
    except (RuntimeError, TimeoutError):
        stop_process(proc)
        raise RuntimeError(f"opentracker did not come up; see {work / 'opentracker.log'}") from None
    return proc, target


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------
# Phases


def run_phase(pool, fn, target: Target, label: str, **spec) -> dict:
    """Run one load phase in the generator process, adding the tracker's CPU use."""
    port = target.udp_port if fn is udp_phase else target.port
    spec = {"host": target.host, "port": port, **spec}
    cpu0 = _proc_cpu_s(target.pid)
    result = pool.submit(fn, spec).result()
    busy = _proc_cpu_s(target.pid) - cpu0
    result["tracker_cpu"] = round(busy / result["seconds"], 2) if result["seconds"] else None
    # Announces per second of the tracker's own CPU time: steadier than the wall-clock rate
    # on a machine that other work shares.
    result["announces_per_cpu_s"] = round(result["requests"] / busy, 1) if busy > 0 else None
    bad = result["failures"] + result.get("errors", 0) + result.get("lost", 0) + result.get("unanswered", 0)
    print(f"  {target.name:11s} {label:13s} {result['requests']:>8,} announces in {result['seconds']:6.2f}s = "
          f"{result['announces_per_s']:>9,.0f}/s  p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms  "
          f"tracker cpu {result['tracker_cpu']} ({result['announces_per_cpu_s'] or 0:,.0f}/cpu-s)  "
          f"generator cpu {result['generator_cpu']}"
          + (f"  PROBLEMS {bad}: {result['first_failure']}" if bad else ""), flush=True)
    return result


def run_target(pool, target: Target, args, hashes: list[str], big_hash: str | None, http_keepalive: bool,
               profile: Path | None = None) -> dict:
    """All phases against one tracker; returns {phase: figures}."""
    phases: dict[str, dict] = {}
    common = {"concurrency": args.concurrency, "keepalive": http_keepalive}
    main = {"hashes": hashes, "peers": args.peers, "peer_prefix": "-MC0001-"}
    phases["fill"] = run_phase(pool, http_phase, target, "fill", **common, **main, event="started", numwant=0,
                               max_requests=args.peers, max_s=FILL_LIMIT_S)
    spy = None
    if profile is not None:
        spy = start_py_spy(target.pid, profile, args.duration)
    steady = run_phase(pool, http_phase, target, "steady", **common, **main, event="", numwant=50,
                       max_requests=args.requests, max_s=args.duration, start=phases["fill"]["next_peer"])
    phases["steady"] = steady
    if spy is not None:
        spy.wait(args.duration + 30)
    if http_keepalive and args.close_duration:
        # What clients that open a connection per announce (as opentracker makes everyone do) get.
        phases["steady_close"] = run_phase(pool, http_phase, target, "steady, close", **main,
                                           concurrency=args.concurrency, keepalive=False, event="", numwant=50,
                                           max_requests=args.requests, max_s=args.close_duration,
                                           start=steady["next_peer"])
    if big_hash and args.big_swarm:
        big = {"hashes": [big_hash], "peers": args.big_swarm, "peer_prefix": "-MCBIG1-"}
        phases["big_fill"] = run_phase(pool, http_phase, target, "big fill", **common, **big, event="started",
                                       numwant=0, max_requests=args.big_swarm, max_s=FILL_LIMIT_S)
        phases["big_steady"] = run_phase(pool, http_phase, target, "big steady", **common, **big, event="",
                                         numwant=50, max_requests=args.requests, max_s=args.big_duration,
                                         start=phases["big_fill"]["next_peer"])
    if target.udp_port is not None and args.udp:
        phases["udp"] = run_phase(pool, udp_phase, target, "udp steady", **main, concurrency=args.concurrency,
                                  event="", numwant=50, max_requests=args.requests, max_s=args.udp_duration)
    return phases


# ---------------------------------------------------------------------------------------
# Profile (py-spy)


def _py_spy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def start_py_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([_py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
                             "--nonblocking", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# What a frame belongs to, first match wins; checked innermost frame outwards for "self"
# time and over the whole stack for inclusive time.
PROFILE_GROUPS = [
    ("logging", ("logging/",)),
    ("bencode / encode_announce", ("encode_announce", "bencode", "_bencode_into")),
    ("peer handout (sample/choose peers)", ("sample_peers", "choose_peers", "peer_tier")),
    ("swarm bookkeeping (announce, add, drop)", ("swarm.py",)),
    ("parse_announce (query split, unquote, checks)", ("parse_announce", "_split_query", "unquote_to_bytes",
                                                      "normalize_ip", "_int (", "_text (", "_hash20")),
    ("announce handler (rest)", ("announce (tracker/endpoint.py", "announce (endpoint.py")),
    ("middlewares", ("_middleware", "middleware")),
    ("aiohttp response (headers, write)", ("web_response.py", "http_writer.py", "helpers.py")),
    ("aiohttp request object / routing", ("web_request.py", "web_urldispatcher.py", "web_app.py")),
    ("aiohttp HTTP parser / protocol", ("web_protocol.py", "http_parser.py", "_http_parser", "streams.py")),
    ("HTTP fast path (framing, answer, timers)", ("fastpath.py",)),
    ("asyncio event loop / transports", ("asyncio/",)),
]


def summarize_profile(path: Path, top: int = 15) -> dict:
    """Self and inclusive shares of the sampled stacks in py-spy's collapsed (raw) format."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    groups_self: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
        group = "other"
        for frame in reversed(frames):
            group = next((g for g, needles in PROFILE_GROUPS if any(n in frame for n in needles)), None)
            if group:
                break
        group = group or "other"
        groups_self[group] = groups_self.get(group, 0) + count
    if not total:
        return {"samples": 0}

    def pct(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "groups": pct(groups_self), "self": pct(self_t), "inclusive": pct(incl)}


# ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description="Tracker announce throughput under load, beside opentracker.")
    ap.add_argument("--peers", type=int, default=50_000, help=f"peers over all swarms (at most {MAX_PEERS:,})")
    ap.add_argument("--torrents", type=int, default=1_000, help="swarms the peers are spread over")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of the steady HTTP phase")
    ap.add_argument("--requests", type=int, default=200_000, help="most announces in one steady phase")
    ap.add_argument("--concurrency", type=int, default=128, help="connections (HTTP) or datagrams (UDP) in flight")
    ap.add_argument("--big-swarm", type=int, default=45_000, help="peers of the single big swarm (0: skip)")
    ap.add_argument("--big-duration", type=float, default=10.0, help="seconds of the big-swarm steady phase")
    ap.add_argument("--close-duration", type=float, default=5.0,
                    help="seconds of a steady HTTP phase with a new connection per announce (0: skip)")
    ap.add_argument("--udp-duration", type=float, default=10.0, help="seconds of the UDP phase")
    ap.add_argument("--no-opentracker", dest="opentracker", action="store_false", help="skip opentracker")
    ap.add_argument("--no-udp", dest="udp", action="store_false", help="skip the UDP phases")
    ap.add_argument("--profile", type=Path, help="py-spy the modelcast tracker in the steady HTTP phase, "
                                                 "collapsed stacks to this file")
    args = ap.parse_args()
    if not 1 <= args.peers <= MAX_PEERS or not 0 <= args.big_swarm <= MAX_PEERS:
        ap.error(f"--peers and --big-swarm must be at most {MAX_PEERS:,} (one port per peer of a swarm)")
    if not 1 <= args.torrents <= args.peers:
        ap.error("--torrents must be between 1 and --peers")
    if args.profile is not None and _py_spy() is None:
        ap.error("--profile needs py-spy (pip install py-spy)")

    work = Path(tempfile.mkdtemp(prefix="modelcast-bench-tracker-"))
    tracker = opentracker = None
    ctx = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            pool.submit(os.getpid).result()  # spawn the generator before any clock starts
            t0 = time.perf_counter()
            artifacts = [make_artifact(i) for i in range(args.torrents + (1 if args.big_swarm else 0))]
            hashes = [m.info_hash.v1 for m, _ in artifacts]
            big_hash = hashes.pop() if args.big_swarm else None
            build_s = time.perf_counter() - t0
            udp = args.udp and modelcast_has_udp()
            tracker, target = start_modelcast(work, udp)
            t0 = time.perf_counter()
            asyncio.run(register(target_url(target), artifacts, (work / "origin").as_uri()))
            register_s = time.perf_counter() - t0
            print(f"modelcast tracker pid {target.pid}: {len(artifacts):,} torrents built in {build_s:.2f}s, "
                  f"registered in {register_s:.2f}s ({len(artifacts) / register_s:,.0f}/s); "
                  f"{args.peers:,} peers over {args.torrents:,} swarms"
                  + (f", big swarm {args.big_swarm:,} peers" if big_hash else "")
                  + ("; no UDP endpoint (modelcast tracker has no --udp-listen)" if args.udp and not udp else ""),
                  flush=True)
            ours = run_target(pool, target, args, hashes, big_hash, http_keepalive=True, profile=args.profile)
            tracker.stop()
            tracker = None

            theirs: dict[str, dict] = {}
            binary = shutil.which("opentracker") if args.opentracker else None
            if binary:
                opentracker, ot = start_opentracker(binary, work, hashes + ([big_hash] if big_hash else []))
                # opentracker closes the connection after every answer: one connection per announce.
                theirs = run_target(pool, ot, args, hashes, big_hash, http_keepalive=False)
                stop_process(opentracker)
                opentracker = None
            elif args.opentracker:
                print("  opentracker is not installed (Debian package opentracker): no ratio", flush=True)

        steady = ours["steady"]
        ot_rate = theirs["steady"]["announces_per_s"] if theirs else None
        ratio = round(steady["announces_per_s"] / ot_rate, 3) if ot_rate else None
        udp_rate = ours["udp"]["announces_per_s"] if "udp" in ours else None
        ot_udp = theirs["udp"]["announces_per_s"] if "udp" in theirs else None
        print(f"modelcast HTTP {steady['announces_per_s']:,.0f} announces/s (p99 {steady['p99_ms']} ms)"
              + (f"; opentracker {ot_rate:,.0f}/s; ratio {ratio}" if ot_rate else "")
              + (f"; modelcast UDP {udp_rate:,.0f}/s" if udp_rate else "")
              + (f"; opentracker UDP {ot_udp:,.0f}/s" if ot_udp else ""))
        profile = None
        if args.profile is not None and args.profile.exists():
            profile = summarize_profile(args.profile)
            print(f"profile of the modelcast tracker, steady HTTP phase ({profile['samples']} samples, "
                  f"busy time only):")
            for name, share in profile.get("groups", []):
                print(f"  {share:5.1f}%  {name}")
            print("  top self time:")
            for name, share in profile.get("self", [])[:10]:
                print(f"  {share:5.1f}%  {name}")
        result = {
            "announces_per_s": steady["announces_per_s"], "p99_ms": steady["p99_ms"],
            "opentracker_announces_per_s": ot_rate, "ratio": ratio,
            "announces_per_cpu_s": steady["announces_per_cpu_s"],
            "opentracker_announces_per_cpu_s": theirs["steady"]["announces_per_cpu_s"] if theirs else None,
            "udp_announces_per_s": udp_rate, "udp_p99_ms": ours["udp"]["p99_ms"] if "udp" in ours else None,
            "opentracker_udp_announces_per_s": ot_udp,
            "new_connection_announces_per_s": (ours["steady_close"]["announces_per_s"]
                                               if "steady_close" in ours else None),
            "big_swarm_announces_per_s": ours["big_steady"]["announces_per_s"] if "big_steady" in ours else None,
            "big_swarm_p99_ms": ours["big_steady"]["p99_ms"] if "big_steady" in ours else None,
            "opentracker_big_swarm_announces_per_s": (theirs["big_steady"]["announces_per_s"]
                                                      if "big_steady" in theirs else None),
            "peers": args.peers, "torrents": args.torrents, "big_swarm": args.big_swarm if big_hash else 0,
            "requests": steady["requests"], "seconds": steady["seconds"], "concurrency": args.concurrency,
            "register_s": round(register_s, 3), "profiled": args.profile is not None,
            "phases": {"modelcast": ours, "opentracker": theirs or None},
        }
        if profile:
            result["profile_groups"] = dict(profile.get("groups", []))
        print(json.dumps(result))
        return 0
    finally:
        if tracker is not None:
            tracker.stop()
        if opentracker is not None:
            stop_process(opentracker)
        shutil.rmtree(work, ignore_errors=True)


def target_url(target: Target) -> str:
    return f"http://{target.host}:{target.port}"


if __name__ == "__main__":
    raise SystemExit(main())
