"""Issue #13 prototype: would libtorrent's own URL seed (BEP 19) ingest the origin for less CPU?

Starts a registry (``file://`` origin) on loopback, publishes S bytes (4 files), then, in one
run, alternating (``--rounds`` times each, page cache dropped before each pull where root
allows):

* ``urlseed``: a separate process with one libtorrent session (the node's session settings,
  adapters/torrent.py) adds the registry's torrent with no tracker and one URL seed, the
  registry's web seed ``/v1/webseed/<digest>/`` with ``Authorization: Bearer <token>``
  (``torrent_info.add_url_seed(url, "", headers)``), downloads it, then checks every file's
  xxh3 the way a node ends a pull; its CPU (utime + stime from ``wait4``) is the figure;
* ``daemon``: a fresh node daemon (alone in the swarm) pulls the same reference through
  today's path (http.client runs in worker threads, each piece handed to ``add_piece``);
  its CPU over the pull (``/proc/<pid>/stat``) is the figure.

The registry's CPU and the bytes it counts as served come with each.  Last stdout line:
JSON with the per-GiB figures of every round and their means.

The first pull after the publish costs more whoever makes it (4.0-5.3 CPU-s/GiB, twice the
sys time: the publish's 2 GiB still being written back and reclaimed), so compare the pairs
after it, and alternate (``--daemon-first``).

Figures (2026-12-04, main at 57628a0, 2 shared cores, 2 GiB = 2 MiB pieces, 16 MiB
requests, pipeline 5, one connection; four runs, the 7 pairs after each run's first):
url seed puller 2.10-2.44 CPU-s/GiB (user ~3.4, sys ~1.1 s per 2 GiB), 694-841 MB/s; the
node daemon from the origin 3.50-4.66 CPU-s/GiB (user ~5.4, sys ~2.1 s), 321-429 MB/s;
url seed / daemon per pair 0.52, 0.53, 0.59, 0.65, 0.57, 0.61 and 0.67 (that one under
perf); the registry 0.30-0.40 CPU-s/GiB serving the url seed against 0.24-0.35 serving the
daemon.  perf by DSO, one pull each: url seed puller libtorrent 52%, kernel 31%, libc 10%,
Python 5%, xxh3 2%; daemon libtorrent 40%, kernel 34%, libc 11%, Python 9%, xxh3 5%
(``copy_folio_from_iter_atomic`` 10.5% / 13.2%, ``memmove`` 6.4% / 6.7%).

Usage: python benchmarks/urlseed.py [--size 1G] [--rounds 2] [--request-bytes 16M] [--pipeline 5]
       [--connections 1] [--daemon-first] [--perf DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from dataplane import REF, PerfRecord, Step, drop_page_cache, origin_bytes_served, pull, same_bytes  # noqa: E402
from publish import write_files  # noqa: E402

from distributor.publish import publish_sync  # noqa: E402
from harness import start_node, start_tracker  # noqa: E402
from modelcast.config import PublishConfig, parse_size  # noqa: E402
from modelcast.reference import Reference  # noqa: E402

GIB = 1 << 30


def urlseed_child(registry: str, digest: str, token: str, dest: str, request_bytes: int, pipeline: int,
                  connections: int) -> int:
    """Child process: download ``digest`` from the registry's web seed alone, then xxh3 every file."""
    import urllib.request

    import libtorrent as lt

    from adapters.torrent import aio_threads, tune_malloc
    from adapters.xxh3 import xxh3_file

    req = urllib.request.Request(f"{registry}/v1/artifacts/{digest}/torrent",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        torrent = resp.read()
    req = urllib.request.Request(f"{registry}/v1/artifacts/{digest}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        manifest = json.load(resp)
    tune_malloc()
    # The node's session settings (adapters/torrent.py TorrentEngine), plus the URL seed's.
    ses = lt.session({
        "listen_interfaces": "127.0.0.1:0", "enable_dht": False, "enable_lsd": False, "enable_upnp": False,
        "enable_natpmp": False, "enable_outgoing_utp": False, "enable_incoming_utp": False,
        "rate_limit_ip_overhead": False, "aio_threads": aio_threads(), "hashing_threads": 2,
        "alert_mask": lt.alert_category.error | lt.alert_category.status | lt.alert_category.storage,
        "urlseed_max_request_bytes": request_bytes, "urlseed_pipeline_size": pipeline,
        "max_web_seed_connections": connections,
    })
    ti = lt.torrent_info(lt.bdecode(torrent))
    ti.add_url_seed(f"{registry}/v1/webseed/{digest}/", "", [("Authorization", f"Bearer {token}")])
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = dest
    atp.trackers = []
    atp.flags = ((atp.flags | lt.torrent_flags.override_trackers | lt.torrent_flags.disable_dht
                  | lt.torrent_flags.disable_lsd | lt.torrent_flags.disable_pex)
                 & ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused)
    import resource
    setup = resource.getrusage(resource.RUSAGE_SELF)  # start-up and imports: not the ingest's
    t0 = time.perf_counter()
    h = ses.add_torrent(atp)
    errors = []
    while True:  # bounded by the parent's timeout; 0.5 s waits cost nothing measurable
        if ses.wait_for_alert(500) is not None:
            for a in ses.pop_alerts():
                if a.category() & lt.alert_category.error:
                    errors.append(a.message())
        st = h.status()
        if st.is_finished or st.is_seeding:
            break
        if st.errc.value():
            print(f"torrent error: {st.errc.message()}", file=sys.stderr)
            return 1
    # A piece counts as finished once its hash passed; its write may still be queued.
    h.flush_cache()
    while not any(isinstance(a, lt.cache_flushed_alert) for a in ses.pop_alerts()):
        ses.wait_for_alert(500)
    seconds = time.perf_counter() - t0
    root = Path(dest) / ti.name()
    for f in manifest["files"]:
        actual, _ = xxh3_file(root / f["path"])
        if actual != f["xxh3_128"]:
            print(f"{f['path']}: xxh3 mismatch", file=sys.stderr)
            return 1
    print(json.dumps({"seconds": seconds, "setup_cpu_s": setup.ru_utime + setup.ru_stime,
                      "setup_user_s": setup.ru_utime, "setup_sys_s": setup.ru_stime, "errors": errors[:5]}),
          flush=True)
    ses.pause()
    del h
    return 0


def urlseed_pull(args, registry: str, digest: str, dest: Path, tracker_pid: int) -> tuple[Step, float]:
    with Step(registry=tracker_pid) as step:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_child", registry, digest, "t", str(dest),
               str(args.request_bytes), str(args.pipeline), str(args.connections)]
        if args.perf is not None:  # the whole child, start-up included; perf's own CPU counts too
            args.perf.mkdir(parents=True, exist_ok=True)
            cmd = ["perf", "record", "-g", "-q", "-o", str(args.perf / f"{dest.name}.perf.data"), "--", *cmd]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(child.pid, 0)
    out = child.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"url seed child failed: {out}")
    info = json.loads(out.strip().splitlines()[-1])
    # The child's own start-up (interpreter, imports, session) is left out: the daemon's is too.
    step.user["puller"] = usage.ru_utime - info["setup_user_s"]
    step.sys["puller"] = usage.ru_stime - info["setup_sys_s"]
    step.cpu["puller"] = step.user["puller"] + step.sys["puller"]
    return step, info["seconds"]


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="modelcast-urlseed-", dir=args.dir))
    tracker = None
    nodes = []
    rounds: list[dict] = []
    try:
        paths = write_files(work / "model", args.size, 4)
        size = sum(p.stat().st_size for p in paths)
        gib, mb = size / GIB, size / 1e6
        tracker = start_tracker(work, token="t")
        registry = tracker.url
        result = publish_sync(work / "model", Reference.parse(REF),
                              PublishConfig(registry=registry, origin=(work / "origin").as_uri(), token="t"))
        digest = result.digest
        hexd = digest.split(":", 1)[1]
        print(f"published {mb:.0f} MB, piece length {result.manifest.piece_length >> 10} KiB; "
              f"url seed requests {args.request_bytes >> 20} MiB, pipeline {args.pipeline}, "
              f"{args.connections} connection(s)")
        for r in range(args.rounds):
            order = ("urlseed", "daemon") if (r + args.daemon_first) % 2 == 0 else ("daemon", "urlseed")
            fig: dict = {}
            for kind in order:
                served0 = origin_bytes_served(registry)
                if kind == "urlseed":
                    dest = work / f"lt-{r}"
                    drop_page_cache()
                    step, secs = urlseed_pull(args, registry, digest, dest, tracker.pid)
                    cpu = step.cpu["puller"]
                    split = step.split("puller")
                    ok = all(same_bytes(p, dest / result.manifest.torrent_name / p.name) for p in paths)
                    shutil.rmtree(dest)
                else:
                    node = start_node(work, registry, f"node-{r}", token="t")
                    nodes.append(node)
                    drop_page_cache()
                    with PerfRecord(args.perf, node.pid, f"daemon-{r}"), \
                            Step(daemon=node.pid, registry=tracker.pid) as step:
                        pull(node.url, REF, args.timeout)
                    secs = step.seconds
                    cpu = step.cpu["daemon"]
                    split = step.split("daemon")
                    ok = all(same_bytes(p, node.cache / "artifacts" / "sha256" / hexd / p.name) for p in paths)
                    node.stop()
                served = origin_bytes_served(registry) - served0
                print(f"round {r} {kind}: {secs:.2f}s ({mb / secs:.0f} MB/s); {cpu:.2f} CPU-s ({split}) = "
                      f"{cpu / gib:.2f}/GiB; registry {step.cpu['registry'] / gib:.2f}/GiB; origin sent "
                      f"{served / size:.2f} copies; identical {ok}", flush=True)
                fig[kind] = {"cpu_s_per_gib": round(cpu / gib, 3), "mb_per_s": round(mb / secs, 1),
                             "registry_cpu_s_per_gib": round(step.cpu["registry"] / gib, 3),
                             "copies_served": round(served / size, 2), "identical": ok}
            fig["ratio"] = round(fig["urlseed"]["cpu_s_per_gib"] / fig["daemon"]["cpu_s_per_gib"], 3)
            rounds.append(fig)

        def mean(kind: str, key: str) -> float:
            return round(sum(f[kind][key] for f in rounds) / len(rounds), 3)

        return {"size_bytes": size, "request_bytes": args.request_bytes, "pipeline": args.pipeline,
                "connections": args.connections, "rounds": rounds,
                "urlseed_cpu_s_per_gib": mean("urlseed", "cpu_s_per_gib"),
                "daemon_cpu_s_per_gib": mean("daemon", "cpu_s_per_gib"),
                "urlseed_mb_per_s": mean("urlseed", "mb_per_s"), "daemon_mb_per_s": mean("daemon", "mb_per_s"),
                "urlseed_registry_cpu_s_per_gib": mean("urlseed", "registry_cpu_s_per_gib"),
                "daemon_registry_cpu_s_per_gib": mean("daemon", "registry_cpu_s_per_gib"),
                "ratio_each": [f["ratio"] for f in rounds]}
    finally:
        for svc in (*nodes, tracker):
            if svc is not None:
                svc.stop()
        subprocess.run(["chmod", "-R", "u+w", str(work)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        reg, digest, token, dest, rb, pipe, conns = sys.argv[2:9]
        return urlseed_child(reg, digest, token, dest, int(rb), int(pipe), int(conns))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--request-bytes", type=parse_size, default=parse_size("16M"),
                    help="urlseed_max_request_bytes (default 16M, the Python path's run)")
    ap.add_argument("--pipeline", type=int, default=5, help="urlseed_pipeline_size")
    ap.add_argument("--connections", type=int, default=1, help="max_web_seed_connections")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--daemon-first", action="store_true",
                    help="the daemon pulls first in even rounds (default: the url seed puller)")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--perf", type=Path, default=None, metavar="DIR",
                    help="run each url seed puller under perf record -g into DIR/lt-<round>.perf.data, and "
                         "record each daemon's pull into DIR/daemon-<round>.perf.data (the figures are then "
                         "not the benchmark's)")
    args = ap.parse_args()
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
