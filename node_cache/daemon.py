"""The node daemon: pulls artifacts over the swarm, verifies, promotes, seeds, and serves a local API.

Origin policy: a node fetches a piece from the origin (the registry's BEP 19 web-seed
endpoint) only when no connected peer has it and nobody is sending it to us, choosing at
random among such pieces.  Nodes that pull together thus split the first copy between
them instead of each taking a whole copy from the origin.

Zones: the tracker hands a node only peers of its own zone, and pieces cross zones as the
origin's first-copy gate directs (tracker/firstcopy.py): a node the origin serves pushes
the piece to the node of each other zone the gate names (``PUT
/v1/artifacts/{digest}/pieces/{n}`` on that node's relay listener, by default on its peer
address, apart from the local API), and a node asking for a piece
already served to another zone is told which node holds it and fetches it from there
(``GET`` of the same path).  Each zone's swarm spreads what enters it; about one copy
crosses between zones.

Trust: an artifact is complete only once every file matched its xxh3 and it was renamed
into place (LAYOUT.md).  After a crash, partial downloads are re-checked piece by piece
(resume data may be stale); after a clean stop, the resume data written at stop is used.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from modelcast.config import NodeConfig, is_wildcard
from modelcast.errors import (ArtifactNotFound, BadRequest, Conflict, DiskFull, IntegrityError, InvalidManifest,
                              ModelcastError, PullFailed, QuotaExceeded, Unreachable, error_body)
from modelcast.wire import bearer
from modelcast.manifest import Manifest
from modelcast.units import human_bytes
from modelcast.reference import Reference
from tracker.client import RegistryClient
from modelcast.wire import FIRST_COPY_HEADER, RELAY_FROM_HEADER, RELAY_HEADER, RELAY_TO_HEADER, ZONE_HEADER

from adapters.torrent import PieceSpan, TorrentEngine, check_torrent, piece_spans
from .runtime import add_runtime_routes
from .store import Store

log = logging.getLogger("modelcast.node")

ORIGIN_PARALLEL = 4  # origin requests in flight at once per node with no peers
ORIGIN_PARALLEL_SWARM = 2  # ... and with peers
ORIGIN_RUN_BYTES = 8 << 20  # a node with no peers asks the origin for up to this much per request
RELAY_PARALLEL = 8  # pieces fetched at once from nodes of other zones
RELAY_WAIT_S = 10.0  # a relay request waits this long for the holder to have the piece
PUSH_PARALLEL = 8  # pieces pushed at once to nodes of other zones, as the origin directs
STALL_S = 5.0  # without progress for this long, fetch from the origin even what peers claim to have
REMOVE_TIMEOUT_S = 10.0
PERSIST_INTERVAL_S = 1.0  # resume data and LRU order are saved this often
CLEAN_STOP_MARKER = "clean_stop"
PULL_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800)


class ServedElsewhere(Exception):
    """The origin served this piece to another node moments ago; take it from peers."""


class RelayFrom(Exception):
    """The origin served this piece to a node of another zone moments ago: fetch it from that node."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def advertised_relay_url(cfg: NodeConfig, host: str, port: int) -> str | None:
    """The base URL nodes of other zones use to reach this node's relay listener at ``host:port``.

    ``cfg.relay_url`` if set (for an address others see, e.g. behind NAT); none for a
    wildcard listener, whose address for others this node cannot know.
    """
    if cfg.relay_url:
        return cfg.relay_url.rstrip("/")
    if is_wildcard(host):
        return None
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class TokenBucket:
    """Bytes-per-second limit for origin fetches (libtorrent limits peer traffic itself)."""

    def __init__(self, rate: int):
        self.rate = rate
        self.tokens = float(rate) / 10
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.rate / 4, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n or self.tokens >= self.rate / 4:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


@dataclass
class PullJob:
    """One artifact on this node: being pulled, verified, repaired, or ready."""

    digest: str
    manifest: Manifest
    state: str = "queued"  # queued | downloading | verifying | ready | failed
    path: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    bytes_from_origin: int = 0
    bytes_from_peers: int = 0
    bytes_from_relay: int = 0  # pieces fetched from a node of another zone (tracker/firstcopy.py)
    done_bytes: int = 0
    download_rate: int = 0
    upload_rate: int = 0
    peers: int = 0
    error: ModelcastError | None = None
    task: asyncio.Task | None = None
    repairing: bool = False

    @property
    def busy(self) -> bool:
        """Being pulled, verified or repaired: "in use", never evicted."""
        return self.task is not None and not self.task.done()

    def to_json(self, pins: dict[str, set[str]] | None = None, last_used: float | None = None) -> dict:
        total = self.manifest.total_size
        return {
            "digest": self.digest, "name": self.manifest.name, "kind": self.manifest.kind, "state": self.state,
            "path": self.path, "total_bytes": total,
            "done_bytes": total if self.state == "ready" else self.done_bytes,
            "bytes_from_peers": self.bytes_from_peers, "bytes_from_origin": self.bytes_from_origin,
            "bytes_from_relay": self.bytes_from_relay,
            "download_rate": self.download_rate, "upload_rate": self.upload_rate, "peers": self.peers,
            "started": self.started, "finished": self.finished,
            "seconds": (self.finished - self.started) if self.finished else None,
            "pinned_by": sorted((pins or {}).get(self.digest, ())), "last_used": last_used,
            "repairing": self.repairing,
            "error": None if self.error is None else {"code": self.error.code, "message": str(self.error)},
        }


class Metrics:
    def __init__(self) -> None:
        self.bytes_from_peers = 0
        self.bytes_from_origin = 0
        self.bytes_from_relay = 0
        self.bytes_relayed = 0  # pieces this node served to nodes of other zones
        self.pulls = {"ready": 0, "failed": 0}
        self.pull_seconds_sum = 0.0
        self.pull_buckets = [0] * len(PULL_BUCKETS)
        self.verify_failures = 0
        self.verified_bytes = 0  # bytes re-hashed with xxh3 (full verification only)
        self.evictions = 0
        self.evicted_bytes = 0
        self.repairs = 0

    def observe_pull(self, seconds: float, ok: bool) -> None:
        self.pulls["ready" if ok else "failed"] += 1
        self.pull_seconds_sum += seconds
        for i, bound in enumerate(PULL_BUCKETS):
            if seconds <= bound:
                self.pull_buckets[i] += 1


class NodeDaemon:
    """Owns the store, the libtorrent engine and the pull jobs of one node."""

    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.store = Store(cfg.cache_dir)
        self.engine: TorrentEngine | None = None
        self.jobs: dict[str, PullJob] = {}
        self.tags: dict[str, str] = {}  # last resolution of each name:tag, for when the registry is down
        self.metrics = Metrics()
        self.registry = RegistryClient(cfg.registry, cfg.token)
        self.pins: dict[str, set[str]] = {d: set(h) for d, h in self.store.load_pins().items()}
        self.last_used: dict[str, float] = self.store.load_last_used()
        self._last_used_dirty = False
        self._http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self._origin_bucket = TokenBucket(cfg.download_limit) if cfg.download_limit else None
        # About a second's worth per request under a rate limit: a crash wastes what is in flight.
        self._run_bytes = (min(ORIGIN_RUN_BYTES, max(1, cfg.download_limit // ORIGIN_PARALLEL))
                           if cfg.download_limit else ORIGIN_RUN_BYTES)
        self._space_lock = asyncio.Lock()
        self.node_id = self.store.node_id()
        self.relay_url: str | None = None  # set by start_relay()
        self._origin_headers = {ZONE_HEADER: cfg.zone}
        self._relay_slots = asyncio.Semaphore(RELAY_PARALLEL)
        self._push_slots = asyncio.Semaphore(PUSH_PARALLEL)
        self._pushes: set[asyncio.Task] = set()
        self._relay_failures: dict[str, float] = {}  # node -> when its failures were last logged

    # ---- lifecycle -------------------------------------------------------------------
    async def start_relay(self) -> web.AppRunner | None:
        """Serve pieces to nodes of other zones on the relay address (the peer address by default).

        A listener of its own, apart from the local API: nodes of other zones reach it at
        the address they reach this node's peers on, and reach nothing else.  Its URL goes
        with every origin request (tracker/firstcopy.py).
        """
        if not self.cfg.p2p or self.cfg.relay_url == "":
            return None
        host = self.cfg.peer_host if self.cfg.relay_host is None else self.cfg.relay_host
        app = web.Application(middlewares=[errors_middleware])
        app[DAEMON] = self
        add_relay_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, self.cfg.relay_port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ModelcastError(f"cannot serve relays on {host}:{self.cfg.relay_port}: {exc.strerror or exc}; "
                                 "pick another --relay-listen") from None
        port = runner.addresses[0][1]
        self.relay_url = advertised_relay_url(self.cfg, host, port)
        if self.relay_url:
            self._origin_headers[RELAY_HEADER] = self.relay_url
        log.info("relay for other zones on %s:%d (advertised as %s)", host, port, self.relay_url or "nothing")
        return runner

    async def start(self) -> None:
        marker = self.store.state_dir / CLEAN_STOP_MARKER
        clean = marker.exists()
        marker.unlink(missing_ok=True)
        self.engine = TorrentEngine(self.cfg.peer_host, self.cfg.peer_port, upload_limit=self.cfg.upload_limit,
                                    download_limit=self.cfg.download_limit, connections=self.cfg.peer_connections)
        # Origin and relay fetches leave from the node's peer address, like its peer
        # connections: other nodes and the network see one address per node.
        connector = (None if is_wildcard(self.cfg.peer_host)
                     else aiohttp.TCPConnector(local_addr=(self.cfg.peer_host, 0)))
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300, sock_read=30), connector=connector)
        self._tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._heartbeat()),
                       asyncio.create_task(self._persist())]
        await asyncio.to_thread(self.store.empty_trash)
        for digest in self.store.complete_digests():
            await self._adopt_complete(digest)
        resumed = 0
        for digest in self.store.partial_digests():
            if digest in self.jobs:
                continue
            try:
                manifest, _ = await asyncio.to_thread(self.store.load_meta, digest)
            except (OSError, ModelcastError):
                log.warning("dropping partial download %s: its manifest is missing or bad", digest)
                await asyncio.to_thread(self.store.remove_tree, self.store.partial_path(digest))
                continue
            if not clean:
                # Resume data may be older than what is on disk: re-check the pieces instead,
                # which keeps every verified piece and fetches nothing twice.
                await asyncio.to_thread(self.store.drop_resume, digest)
            self._start_job(PullJob(digest, manifest))
            resumed += 1
        log.info("node %s ready: zone %s, peers on %s:%s, %d artifacts in cache, %d downloads resumed (%s stop)",
                 self.node_id, self.cfg.zone, self.cfg.peer_host, self.engine.listen_port,
                 sum(j.state == "ready" for j in self.jobs.values()), resumed, "clean" if clean else "unclean")

    async def stop(self) -> None:
        """Save resume data, leave every swarm, stop; within a few seconds."""
        active = [d for d, j in self.jobs.items() if j.busy and self.engine.has(d)]
        if active:
            for d in active:
                self.engine.request_resume_data(d)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and not all(d in self.engine.resume_data for d in active):
                self.engine.pump()
                await asyncio.sleep(0.02)
            self._save_resume_data()
        for job in self.jobs.values():
            if job.task and not job.task.done():
                job.task.cancel()
        for task in self._tasks:
            task.cancel()
        try:
            # Leave every swarm at once, before libtorrent's per-torrent "stopped" announces.
            await self.registry.leave(self.node_id)
        except ModelcastError as exc:
            log.warning("could not tell the tracker this node leaves: %s", exc)
        if self.engine:
            await asyncio.to_thread(self.engine.close)
            self.engine = None
        if self._http:
            await self._http.close()
        await self.registry.close()
        try:
            await asyncio.to_thread(self.store.save_last_used, self.last_used)
            # Written last: its presence tells the next start that resume data is current.
            (self.store.state_dir / CLEAN_STOP_MARKER).write_text(str(time.time()))
        except OSError as exc:
            log.warning("could not record a clean stop (%s); the next start re-checks partial downloads", exc)

    async def _pump(self) -> None:
        while True:
            try:
                self.engine.pump()
            except Exception:  # a bad alert must not stop the daemon
                log.exception("alert pump")
            await asyncio.sleep(0.05)

    async def _persist(self) -> None:
        """Save resume data of active downloads and the LRU order, every second."""
        while True:
            await asyncio.sleep(PERSIST_INTERVAL_S)
            try:
                for digest, job in list(self.jobs.items()):
                    if job.busy and job.state == "downloading":
                        self.engine.request_resume_data(digest)
                self._save_resume_data()
                if self._last_used_dirty:
                    self._last_used_dirty = False
                    await asyncio.to_thread(self.store.save_last_used, dict(self.last_used))
            except Exception:
                log.exception("saving state")

    def _save_resume_data(self) -> None:
        for digest, data in list(self.engine.resume_data.items()):
            self.engine.resume_data.pop(digest, None)
            job = self.jobs.get(digest)
            if job is not None and job.state == "downloading":
                try:
                    self.store.save_resume(digest, data)
                except OSError as exc:
                    # A full disk must not stop the daemon.  Older resume data would now
                    # understate what is on disk: drop it, so the next attempt re-checks.
                    log.warning("could not save resume data of %s: %s", digest, exc)
                    self.store.drop_resume(digest)

    async def _heartbeat(self) -> None:
        """One heartbeat per node (not per torrent) keeps all its swarm entries alive."""
        warned = False
        while True:
            try:
                await self.registry.heartbeat(self.node_id, self.cfg.zone, self.cfg.heartbeat_ttl_s)
                warned = False
            except ModelcastError as exc:
                if not warned:
                    log.warning("heartbeat failed (will keep trying): %s", exc)
                    warned = True
            await asyncio.sleep(self.cfg.heartbeat_interval_s)

    def _trackers(self) -> list[str]:
        if not self.cfg.p2p:
            return []
        return [self.registry.announce_url(self.cfg.zone, self.node_id)]

    async def _adopt_complete(self, digest: str) -> None:
        """Seed an artifact found complete at start-up after a cheap check (sizes, mtimes).

        A file whose size or mtime changed since it was verified gets a full xxh3 check
        and, if it fails, a repair from the swarm; nothing is re-hashed otherwise.
        """
        try:
            manifest, torrent = await asyncio.to_thread(self.store.load_meta, digest)
            ti = check_torrent(torrent, manifest)
        except (OSError, ModelcastError) as exc:
            log.warning("cached artifact %s has no usable meta (%s); removing it", digest, exc)
            await asyncio.to_thread(self.store.evict, digest)
            return
        path = self.store.artifact_path(digest)
        job = PullJob(digest, manifest, state="ready", path=str(path), finished=time.time())
        self.jobs[digest] = job
        if await asyncio.to_thread(self.store.stamps_match, digest, manifest):
            self.engine.add(digest, ti, manifest, str(path), trackers=self._trackers(), seed=True)
            return
        log.warning("%s (%s) changed on disk since it was verified; checking every file", manifest.name, digest)
        await self.verify(digest)

    # ---- pulls -----------------------------------------------------------------------
    async def resolve(self, ref_text: str) -> tuple[str, Manifest]:
        """Resolve a reference to a digest; a digest this node holds needs no registry."""
        ref = Reference.parse(ref_text)
        if ref.digest:
            job = self.jobs.get(ref.digest)
            if job and (ref.name is None or job.manifest.name == ref.name):
                return ref.digest, job.manifest
        try:
            digest, manifest = await self.registry.resolve(ref_text)
        except InvalidManifest as exc:
            raise type(exc)(f"registry sent an unusable manifest for {ref_text}: {exc}") from exc
        except Unreachable:
            cached = self.tags.get(ref_text)
            if cached and cached in self.jobs and self.jobs[cached].state == "ready":
                log.warning("registry unreachable; using the last resolution of %s", ref_text)
                return cached, self.jobs[cached].manifest
            raise
        if ref.tag:
            self.tags[ref_text] = digest
        return digest, manifest

    def touch(self, digest: str) -> None:
        self.last_used[digest] = time.time()
        self._last_used_dirty = True

    async def pull(self, ref_text: str, pin: str | None = None) -> PullJob:
        """Start (or join) the pull of ``ref_text``; concurrent pulls share one download."""
        digest, manifest = await self.resolve(ref_text)
        if pin:
            self.pin(digest, pin)
        self.touch(digest)
        job = self.jobs.get(digest)
        if job is not None and job.state == "ready" and not os.path.isdir(job.path or ""):
            # Deleted behind the daemon's back: never hand out a path that is not there.
            await self._repair(job, f"{job.path} is missing")
            return self.jobs[digest]
        if job is not None and job.state != "failed":
            return job
        return self._start_job(PullJob(digest, manifest))

    def _start_job(self, job: PullJob) -> PullJob:
        self.jobs[job.digest] = job
        job.task = asyncio.create_task(self._run_pull(job))
        return job

    async def _run_pull(self, job: PullJob) -> None:
        ok = False
        try:
            await self._download(job)
            job.state, job.error, ok = "ready", None, True
        except asyncio.CancelledError:
            job.state, job.error = "failed", PullFailed(f"pull of {job.manifest.name} ({job.digest}) was cancelled")
            raise
        except ModelcastError as exc:
            job.state, job.error = "failed", exc
            log.error("pull of %s failed: %s", job.digest, exc)
        except Exception as exc:  # keep the daemon alive; report the failure to the caller
            log.exception("pull of %s failed", job.digest)
            job.state, job.error = "failed", PullFailed(f"pull of {job.digest} failed: {exc}")
        finally:
            job.repairing = False
            job.finished = time.time()
            self.metrics.observe_pull(job.finished - job.started, ok)

    def used_bytes(self, exclude: str | None = None) -> int:
        """Bytes held or promised: complete artifacts plus downloads under way."""
        return sum(j.manifest.total_size for d, j in self.jobs.items()
                   if d != exclude and (j.state == "ready" or j.busy))

    def eviction_plan(self, need: int, exclude: str) -> list[str]:
        """Least recently used artifacts to delete to free ``need`` bytes; never pinned or busy ones."""
        candidates = sorted((d for d, j in self.jobs.items()
                             if d != exclude and j.state == "ready" and not j.busy and not self.pins.get(d)),
                            key=lambda d: self.last_used.get(d, 0.0))
        plan, freed = [], 0
        for d in candidates:
            if freed >= need:
                break
            plan.append(d)
            freed += self.jobs[d].manifest.total_size
        return plan if freed >= need else []

    async def _make_room(self, job: PullJob) -> None:
        """Fit ``job`` in the quota, evicting LRU artifacts if needed, or fail at once with the sizes."""
        size = job.manifest.total_size
        async with self._space_lock:
            if self.cfg.quota:
                used = self.used_bytes(exclude=job.digest)
                need = used + size - self.cfg.quota
                if need > 0:
                    plan = self.eviction_plan(need, job.digest)
                    if not plan:
                        pinned = sum(self.jobs[d].manifest.total_size for d in self.pins if d in self.jobs
                                     and self.jobs[d].state == "ready")
                        evictable = sum(j.manifest.total_size for d, j in self.jobs.items() if d != job.digest
                                        and j.state == "ready" and not j.busy and not self.pins.get(d))
                        raise QuotaExceeded(
                            f"{job.manifest.name} needs {human_bytes(size)} but the cache quota of "
                            f"{human_bytes(self.cfg.quota)} leaves {human_bytes(self.cfg.quota - used + evictable)} "
                            f"even after evicting everything not pinned or in use ({human_bytes(pinned)} pinned); "
                            "raise --quota or unpin something (modelcast node ls)")
                    for d in plan:
                        await self._evict(d)
            on_disk = sum(f.size for f in job.manifest.files
                          if (self.store.partial_path(job.digest) / f.path).exists())
            free = await asyncio.to_thread(self.store.disk_free)
            if size - on_disk > free:
                raise DiskFull(f"{job.manifest.name} needs {human_bytes(size - on_disk)} more but the filesystem of "
                               f"{self.store.root} has {human_bytes(free)} free; free space or lower the quota")

    async def _evict(self, digest: str) -> None:
        job = self.jobs.pop(digest)
        if self.engine.has(digest):
            self.engine.remove(digest)
            await self._wait_removed(digest)
        await asyncio.to_thread(self.store.evict, digest)
        self.last_used.pop(digest, None)
        self.metrics.evictions += 1
        self.metrics.evicted_bytes += job.manifest.total_size
        log.info("evicted %s (%s, %s) to make room", job.manifest.name, digest, human_bytes(job.manifest.total_size))

    async def _wait_removed(self, digest: str) -> None:
        deadline = time.monotonic() + REMOVE_TIMEOUT_S
        while not self.engine.removed(digest) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _download(self, job: PullJob) -> None:
        digest, manifest, engine = job.digest, job.manifest, self.engine
        if self.store.is_complete(digest):
            job.path, job.state = str(self.store.artifact_path(digest)), "ready"
            return
        meta = self.store.meta_path(digest) / "torrent"
        torrent = meta.read_bytes() if meta.exists() else await self.registry.torrent(digest)
        ti = check_torrent(torrent, manifest)
        spans = piece_spans(ti)
        await self._make_room(job)
        await asyncio.to_thread(self.store.save_meta, digest, manifest, torrent)
        partial = self.store.partial_path(digest)
        partial.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.store.ensure_partial_files, digest, manifest)
        job.state = "downloading"
        resume = await asyncio.to_thread(self.store.load_resume, digest)
        engine.add(digest, ti, manifest, str(partial), trackers=self._trackers(), seed=False, resume=resume)
        origin = asyncio.create_task(self._origin_fill(job, spans))
        try:
            while True:
                # Errors first: libtorrent may call a torrent finished whose writes failed.
                err = engine.error(digest)
                if err:
                    await self._abort_download(job)
                    raise self._download_error(job, err)
                if engine.finished(digest):
                    await asyncio.sleep(0.1)  # let a late write error arrive
                    engine.pump()
                    if not engine.error(digest):
                        break
                    continue
                if origin.done() and origin.exception():
                    exc = origin.exception()
                    await self._abort_download(job)
                    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                        raise self._download_error(job, str(exc)) from exc
                    raise exc
                self._sample(job)
                await asyncio.sleep(0.1 if job.done_bytes < job.manifest.total_size else 0.02)
        finally:
            origin.cancel()
        self._sample(job)
        engine.remove(digest)
        await self._wait_removed(digest)
        job.state = "verifying"
        try:
            await asyncio.to_thread(self.store.verify_tree, partial, manifest, full=True)
            self.metrics.verified_bytes += manifest.total_size
        except IntegrityError:
            self.metrics.verify_failures += 1
            raise
        path = await asyncio.to_thread(self.store.promote, digest)
        await asyncio.to_thread(self.store.stamp, digest, manifest)
        await asyncio.to_thread(self.store.drop_resume, digest)
        job.path = str(path)
        # Seed from the final place; the files were just verified, so no re-check.
        engine.add(digest, ti, manifest, str(path), trackers=self._trackers(), seed=True)
        log.info("%s ready at %s: %d bytes from peers, %d from the origin",
                 manifest.name, path, job.bytes_from_peers, job.bytes_from_origin)

    async def _abort_download(self, job: PullJob) -> None:
        """Stop a failed download but keep its verified pieces (and resume data) for the next pull."""
        self._sample(job)
        if self.engine.has(job.digest):
            self.engine.request_resume_data(job.digest)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and job.digest not in self.engine.resume_data:
                self.engine.pump()
                await asyncio.sleep(0.02)
            self._save_resume_data()
            self.engine.remove(job.digest)
            await self._wait_removed(job.digest)

    def _download_error(self, job: PullJob, err: str) -> PullFailed:
        if "space" in err.lower() or "ENOSPC" in err:
            return DiskFull(f"pull of {job.manifest.name} ({job.digest}) stopped: the disk of {self.store.root} is "
                            f"full ({err}); the {human_bytes(job.done_bytes)} already verified are kept, so free "
                            "space and pull again to resume")
        return PullFailed(f"download of {job.manifest.name} ({job.digest}) failed: {err}")

    def _sample(self, job: PullJob) -> None:
        p = self.engine.progress(job.digest) if self.engine else None
        if p is None:
            return
        self.metrics.bytes_from_peers += max(0, p.payload_download - job.bytes_from_peers)
        job.bytes_from_peers = p.payload_download
        job.done_bytes = p.done_bytes
        job.download_rate, job.upload_rate, job.peers = p.download_rate, p.upload_rate, p.peers

    async def _origin_fill(self, job: PullJob, spans: list[PieceSpan]) -> None:
        """Fetch from the origin the pieces that no connected peer can give us.

        Alone (no peer connected) a node asks for runs of consecutive pieces in one range
        request, which is what makes a cold pull fast; in a swarm it asks one piece at a
        time, at random among those nobody has, so nodes rarely fetch the same piece.
        """
        # Give peers a moment to connect and show what they have, unless the tracker
        # already said nobody else is in the swarm.
        grace_end = time.monotonic() + (self.cfg.webseed_grace_s if self.cfg.p2p else 0)
        while (time.monotonic() < grace_end and self.engine.tracker_peers(job.digest) != 0
               and not ((p := self.engine.progress(job.digest)) and p.peers > 0)):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05 if self.cfg.p2p else 0)  # the first peers' bitfields
        # While libtorrent re-checks files already on disk, every piece looks missing.
        while (p := self.engine.progress(job.digest)) is not None and p.state.startswith("checking"):
            await asyncio.sleep(0.05)
        base = self.registry.webseed_url(job.digest)
        claimed: dict[int, asyncio.Task] = {}  # piece -> the fetch that covers it
        relays: set[asyncio.Task] = set()  # fetches from nodes of other zones, among claimed's
        fetched_at: dict[int, float] = {}
        last_done, last_change = -1, time.monotonic()
        rng = random.Random()
        while not self.engine.finished(job.digest):
            now = time.monotonic()
            p = self.engine.progress(job.digest)
            if p and p.done_bytes != last_done:
                last_done, last_change = p.done_bytes, now
            stalled = now - last_change > STALL_S
            alone = p is not None and p.peers == 0
            missing, avail, queued = self.engine.missing_pieces(job.digest)
            # A fetched piece is hash-checked by libtorrent before it counts as ours;
            # don't fetch it again in that window (unless the check failed long ago).
            # With nobody connected, a half-downloaded piece can only be finished from here.
            wanted = {i for i in missing if i not in claimed and now - fetched_at.get(i, -1e9) > 5
                      and (stalled or alone or (avail[i] == 0 and i not in queued))}
            candidates = sorted(wanted)
            run_limit = self._run_bytes if alone else 1
            # Alone, several runs at once fill the pipe; in a swarm the origin is shared, and
            # fewer requests in flight each finish sooner, so new pieces reach peers sooner.
            parallel = ORIGIN_PARALLEL if alone else ORIGIN_PARALLEL_SWARM
            while candidates and len(set(claimed.values()) - relays) < parallel:
                first = candidates[rng.randrange(len(candidates))]
                run = [spans[first]]
                size = spans[first].size
                while size < run_limit:
                    nxt = run[-1].piece + 1
                    if (nxt not in wanted or nxt >= len(spans) or spans[nxt].path != run[-1].path
                            or spans[nxt].file_offset != run[-1].file_offset + run[-1].length):
                        break
                    run.append(spans[nxt])
                    size += spans[nxt].size
                task = asyncio.create_task(self._fetch_run(job, base, run, first_copy=not (alone or stalled)))
                for span in run:
                    claimed[span.piece] = task
                    wanted.discard(span.piece)
                candidates = sorted(wanted)
            tasks = set(claimed.values())
            if not tasks and not wanted and not candidates:
                # Peers are delivering everything still missing: look again less often.
                await asyncio.sleep(0.25)
                continue
            if tasks:
                await asyncio.wait(tasks, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
                failed = False
                for piece, task in list(claimed.items()):
                    if task.done():
                        del claimed[piece]
                        relays.discard(task)
                        fetched_at[piece] = time.monotonic()
                        if isinstance(task.exception(), RelayFrom):
                            relay = asyncio.create_task(self._relay_fetch(job, base, task.exception().holder,
                                                                          spans[piece]))
                            claimed[piece] = relay
                            relays.add(relay)
                            continue
                        failed |= task.exception() is not None and not isinstance(task.exception(),
                                                                                  (ServedElsewhere, RelayFrom))
                if failed:
                    log.warning("origin fetch failed: %s", next(t.exception() for t in tasks if t.done() and t.exception()
                                                                 and not isinstance(t.exception(),
                                                                                    (ServedElsewhere, RelayFrom))))
                    await asyncio.sleep(0.5)
            else:
                await asyncio.sleep(0.05)
        for task in set(claimed.values()):
            task.cancel()

    async def _fetch_run(self, job: PullJob, base: str, run: list[PieceSpan], first_copy: bool = False) -> None:
        """Fetch consecutive pieces of one file with one range request and hand them to libtorrent.

        With ``first_copy`` the origin may answer 409: another node just took this piece,
        and it will reach us through the swarm, or, if that node is in another zone, from
        that node (:class:`RelayFrom`; tracker/firstcopy.py).
        """
        first, last = run[0], run[-1]
        start, end = first.file_offset, last.file_offset + last.length - 1
        url = base + "/".join(aiohttp.helpers.quote(part, safe="") for part in first.path.split("/"))
        headers = {"Range": f"bytes={start}-{end}", **self._origin_headers, **bearer(self.cfg.token)}
        if first_copy:
            headers[FIRST_COPY_HEADER] = "1"
        try:
            async with self._http.get(url, headers=headers) as resp:
                if resp.status == 409 and first_copy:
                    holder = resp.headers.get(RELAY_FROM_HEADER)
                    if holder and len(run) == 1:
                        raise RelayFrom(holder)
                    raise ServedElsewhere(first.piece)
                if resp.status not in (200, 206):
                    raise Unreachable(f"origin answered HTTP {resp.status} for {first.path}")
                if self._origin_bucket is None:
                    data = await resp.read()
                else:
                    parts = []
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        await self._origin_bucket.take(len(chunk))
                        parts.append(chunk)
                    data = b"".join(parts)
        except aiohttp.ClientError as exc:
            raise Unreachable(f"origin fetch of {first.path} failed: {exc}") from exc
        if resp.status == 200:
            data = data[start:end + 1]
        if len(data) != end - start + 1:
            raise Unreachable(f"origin sent {len(data)} bytes of {first.path}, expected {end - start + 1}")
        job.bytes_from_origin += len(data)
        self.metrics.bytes_from_origin += len(data)
        targets = resp.headers.get(RELAY_TO_HEADER, "").split()
        view = memoryview(data)
        for span in run:
            piece = bytes(view[span.file_offset - start: span.file_offset - start + span.length])
            if len(piece) < span.size:
                piece += bytes(span.size - len(piece))  # the pad file's zeros
            self.engine.add_piece(job.digest, span.piece, piece)
            for target in targets:
                task = asyncio.create_task(self._push(job.digest, target, span.piece, piece))
                self._pushes.add(task)
                task.add_done_callback(self._pushes.discard)

    async def _push(self, digest: str, target: str, piece: int, data: bytes) -> None:
        """Hand a piece the origin just served us to a node of another zone (tracker/firstcopy.py)."""
        url = f"{target}/v1/artifacts/{digest}/pieces/{piece}"
        try:
            async with self._push_slots, self._http.put(url, data=data,
                                                        timeout=aiohttp.ClientTimeout(total=60)) as resp:
                if resp.status == 204:
                    self.metrics.bytes_relayed += len(data)
                    return
                if resp.status == 409:  # it has the piece, or no longer pulls
                    return
                problem = f"HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            problem = str(exc) or type(exc).__name__
        # Its zone makes the piece up from the origin once it stops progressing (STALL_S).
        self._relay_warning(target, f"pushing piece {piece} of {digest} to {target} failed ({problem})")

    def _relay_warning(self, node: str, message: str) -> None:
        """Log a failed exchange with a node of another zone, once a minute per node (a dead one fails them all)."""
        now = time.monotonic()
        if now - self._relay_failures.get(node, -1e9) > 60:
            self._relay_failures[node] = now
            log.warning("%s; further failures with %s are not logged for a minute", message, node)

    def accept_piece(self, digest: str, piece: int, size: int | None) -> int:
        """The size a pushed piece must have, if this node wants it (else Conflict)."""
        job = self.jobs.get(digest)
        if job is None or job.state != "downloading" or self.engine is None or not self.engine.has(digest):
            raise Conflict(f"{digest} is not being pulled on this node")
        want = self.engine.piece_size(digest, piece)
        if want is None:
            raise BadRequest(f"{digest} has no piece {piece}")
        if size != want:
            raise BadRequest(f"piece {piece} of {digest} is {want} bytes; Content-Length says {size}")
        if self.engine.have_piece(digest, piece):
            raise Conflict(f"piece {piece} of {digest} is already here")
        return want

    def pushed_piece(self, digest: str, piece: int, data: bytes) -> None:
        """A piece pushed by a node of another zone: libtorrent checks its hash like any other."""
        job = self.jobs.get(digest)
        if job is None or self.engine is None or not self.engine.has(digest):
            raise Conflict(f"{digest} is not being pulled on this node")
        self._add_relayed(job, piece, data)

    def _add_relayed(self, job: PullJob, piece: int, data: bytes) -> None:
        """Hand libtorrent a piece from a node of another zone (it checks the hash) and count it."""
        job.bytes_from_relay += len(data)
        self.metrics.bytes_from_relay += len(data)
        self.engine.add_piece(job.digest, piece, data)

    async def _relay_fetch(self, job: PullJob, base: str, holder: str, span: PieceSpan) -> None:
        """Fetch one piece from ``holder``, a node of another zone; from the origin if that fails.

        The bytes are checked like any others: libtorrent hash-checks the piece.
        """
        url = f"{holder}/v1/artifacts/{job.digest}/pieces/{span.piece}?wait={RELAY_WAIT_S:g}"
        try:
            async with self._relay_slots, self._http.get(
                    url, timeout=aiohttp.ClientTimeout(total=RELAY_WAIT_S + 30)) as resp:
                if resp.status != 200:
                    raise Unreachable(f"HTTP {resp.status}")
                data = await resp.read()
            if len(data) != span.size:
                raise Unreachable(f"{len(data)} bytes, expected {span.size}")
        except (aiohttp.ClientError, asyncio.TimeoutError, Unreachable) as exc:
            self._relay_warning(holder, f"piece {span.piece} of {job.digest} from {holder} failed ({exc}); "
                                        "fetching it from the origin")
            await self._fetch_run(job, base, [span])
            return
        if self._origin_bucket is not None:
            await self._origin_bucket.take(len(data))
        self._add_relayed(job, span.piece, data)

    async def read_piece(self, digest: str, piece: int, wait_s: float) -> bytes:
        """``piece`` of ``digest`` (padding included), waiting up to ``wait_s`` for it to arrive here."""
        deadline = time.monotonic() + wait_s
        while self.engine is None or not self.engine.have_piece(digest, piece):
            if time.monotonic() >= deadline:
                raise ArtifactNotFound(f"piece {piece} of {digest} is not on this node (waited {wait_s:g}s)")
            await asyncio.sleep(0.01)
        fut = self.engine.read_piece(digest, piece)
        while not fut.done():  # the read is answered by an alert: look for it more often than _pump
            self.engine.pump()
            await asyncio.sleep(0.002)
        data = fut.result()
        self.metrics.bytes_relayed += len(data)
        return data

    # ---- pins, verification, repair ---------------------------------------------------
    def pin(self, digest: str, holder: str) -> None:
        holders = self.pins.setdefault(digest, set())
        if holder not in holders:
            holders.add(holder)
            self.store.save_pins({d: sorted(h) for d, h in self.pins.items() if h})

    def unpin(self, digest: str, holder: str | None) -> None:
        holders = self.pins.get(digest, set())
        if holder is None:
            holders.clear()
        else:
            holders.discard(holder)
        if not holders:
            self.pins.pop(digest, None)
        self.store.save_pins({d: sorted(h) for d, h in self.pins.items() if h})

    async def verify(self, digest: str) -> dict:
        """Re-hash every file of a complete artifact; repair it from the swarm if any differs."""
        job = self.jobs.get(digest)
        if job is None or (job.state != "ready" and not self.store.is_complete(digest)):
            raise ArtifactNotFound(f"{digest} is not complete on this node")
        if job.busy:
            return {"digest": digest, "ok": None, "state": job.state, "repairing": job.repairing}
        path = self.store.artifact_path(digest)
        try:
            await asyncio.to_thread(self.store.verify_tree, path, job.manifest, full=True)
            self.metrics.verified_bytes += job.manifest.total_size
        except (IntegrityError, InvalidManifest, OSError) as exc:
            self.metrics.verify_failures += 1
            await self._repair(job, str(exc))
            return {"digest": digest, "ok": False, "problem": str(exc), "repairing": True}
        try:
            await asyncio.to_thread(self.store.stamp, digest, job.manifest)
        except OSError as exc:  # e.g. a full disk: the artifact is fine, only the stamp is stale
            log.warning("could not record file stamps of %s: %s", digest, exc)
        if not self.engine.has(digest):
            _, torrent = await asyncio.to_thread(self.store.load_meta, digest)
            self.engine.add(digest, check_torrent(torrent, job.manifest), job.manifest, str(path),
                            trackers=self._trackers(), seed=True)
        return {"digest": digest, "ok": True}

    async def _repair(self, job: PullJob, problem: str) -> None:
        """Take a corrupt artifact out of service and fetch only its bad pieces again."""
        self.metrics.repairs += 1
        log.error("%s (%s) failed verification: %s; repairing it from the swarm", job.manifest.name, job.digest,
                  problem)
        if self.engine.has(job.digest):
            self.engine.remove(job.digest)
            await self._wait_removed(job.digest)
        await asyncio.to_thread(self.store.demote, job.digest)
        await asyncio.to_thread(self.store.drop_resume, job.digest)
        fresh = PullJob(job.digest, job.manifest, repairing=True)
        self._start_job(fresh)

    # ---- views -------------------------------------------------------------------------
    def listing(self) -> list[dict]:
        return [j.to_json(self.pins, self.last_used.get(d)) for d, j in sorted(self.jobs.items(),
                                                                                key=lambda kv: kv[1].started)]

    def metrics_text(self) -> str:
        m = self.metrics
        ready = [j for j in self.jobs.values() if j.state == "ready"]
        peers = sum(j.peers for j in self.jobs.values() if j.busy)
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, value, labels: str = "") -> None:
            out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"])

        metric("modelcast_node_bytes_from_peers_total", "counter", "Payload bytes received from peers.",
               m.bytes_from_peers)
        metric("modelcast_node_bytes_from_origin_total", "counter", "Bytes fetched from the origin web seed.",
               m.bytes_from_origin)
        metric("modelcast_node_bytes_from_relay_total", "counter",
               "Bytes fetched from nodes of other zones, as the origin directed.", m.bytes_from_relay)
        metric("modelcast_node_bytes_relayed_total", "counter", "Bytes served to nodes of other zones.",
               m.bytes_relayed)
        out += ["# HELP modelcast_node_pulls_total Pulls that ended, by result.",
                "# TYPE modelcast_node_pulls_total counter",
                *(f'modelcast_node_pulls_total{{result="{k}"}} {v}' for k, v in m.pulls.items())]
        out += ["# HELP modelcast_node_pull_duration_seconds Time from pull request to a verified artifact.",
                "# TYPE modelcast_node_pull_duration_seconds histogram",
                *(f'modelcast_node_pull_duration_seconds_bucket{{le="{b}"}} {c}'
                  for b, c in zip(PULL_BUCKETS, m.pull_buckets)),
                f'modelcast_node_pull_duration_seconds_bucket{{le="+Inf"}} {sum(m.pulls.values())}',
                f"modelcast_node_pull_duration_seconds_sum {m.pull_seconds_sum:.3f}",
                f"modelcast_node_pull_duration_seconds_count {sum(m.pulls.values())}"]
        metric("modelcast_node_cache_bytes", "gauge", "Bytes of complete artifacts in the cache.",
               sum(j.manifest.total_size for j in ready))
        metric("modelcast_node_cache_artifacts", "gauge", "Complete artifacts in the cache.", len(ready))
        metric("modelcast_node_cache_quota_bytes", "gauge", "Cache quota (0 = none).", self.cfg.quota)
        metric("modelcast_node_pinned_artifacts", "gauge", "Artifacts with at least one pin.", len(self.pins))
        metric("modelcast_node_evictions_total", "counter", "Artifacts evicted to stay within the quota.",
               m.evictions)
        metric("modelcast_node_evicted_bytes_total", "counter", "Bytes evicted to stay within the quota.",
               m.evicted_bytes)
        metric("modelcast_node_verification_failures_total", "counter", "Artifacts that failed verification.",
               m.verify_failures)
        metric("modelcast_node_repairs_total", "counter", "Corrupt artifacts repaired from the swarm.", m.repairs)
        metric("modelcast_node_verified_bytes_total", "counter", "Bytes re-hashed with xxh3 to verify artifacts.",
               m.verified_bytes)
        metric("modelcast_node_piece_hash_failures_total", "counter", "Pieces received that failed their hash.",
               self.engine.hash_failures if self.engine else 0)
        metric("modelcast_node_peers_banned_total", "counter", "Peers banned for sending bad data.",
               self.engine.peers_banned if self.engine else 0)
        metric("modelcast_node_peers_connected", "gauge", "Peers connected across active downloads.", peers)
        return "\n".join(out) + "\n"


# ---- HTTP API ---------------------------------------------------------------------------
DAEMON = web.AppKey("daemon", NodeDaemon)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ModelcastError as exc:
        return web.json_response(error_body(exc), status=exc.http_status)
    except web.HTTPException:
        raise
    except Exception as exc:  # never let a bad request take the daemon down
        log.exception("unhandled error on %s", request.path)
        return web.json_response(error_body(PullFailed(f"internal error: {exc}")), status=500)


async def _json_body(request: web.Request, example: str) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest(f"body must be JSON: {example}") from None
    if not isinstance(body, dict) or not isinstance(body.get("ref"), str):
        raise BadRequest(f"body needs a string field \"ref\": {example}")
    return body


async def handle_pull(request: web.Request) -> web.Response:
    body = await _json_body(request, '{"ref": "name:tag", "wait": true, "pin": "holder"}')
    pin = body.get("pin")
    if pin is not None and not isinstance(pin, str):
        raise BadRequest("\"pin\" must be a string naming who holds the pin")
    daemon = request.app[DAEMON]
    job = await daemon.pull(body["ref"], pin=pin)
    if body.get("wait", True) and job.busy:
        await asyncio.shield(job.task)
    if job.state == "failed" and body.get("wait", True):
        raise job.error
    return web.json_response(job.to_json(daemon.pins, daemon.last_used.get(job.digest)),
                             status=200 if job.state == "ready" else 202)


def _job(request: web.Request) -> PullJob:
    digest = "sha256:" + request.match_info["hex"]
    job = request.app[DAEMON].jobs.get(digest)
    if job is None:
        raise ArtifactNotFound(f"{digest} is not on this node")
    return job


async def handle_pull_status(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    job = _job(request)
    return web.json_response(job.to_json(d.pins, d.last_used.get(job.digest)))


async def handle_list(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    return web.json_response({"artifacts": d.listing(), "quota_bytes": d.cfg.quota, "used_bytes": d.used_bytes(),
                              "node_id": d.node_id, "zone": d.cfg.zone})


async def handle_pin(request: web.Request) -> web.Response:
    body = await _json_body(request, '{"ref": "name:tag", "holder": "cli"}')
    d = request.app[DAEMON]
    digest, _ = await d.resolve(body["ref"])
    d.pin(digest, str(body.get("holder") or "user"))
    return web.json_response({"digest": digest, "pinned_by": sorted(d.pins.get(digest, ()))})


async def handle_unpin(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    digest = "sha256:" + request.match_info["hex"]
    d.unpin(digest, request.query.get("holder"))
    return web.json_response({"digest": digest, "pinned_by": sorted(d.pins.get(digest, ()))})


async def handle_resolve(request: web.Request) -> web.Response:
    ref = request.query.get("ref")
    if not ref:
        raise BadRequest("resolve needs ?ref=NAME:TAG")
    digest, manifest = await request.app[DAEMON].resolve(ref)
    return web.json_response({"digest": digest, "name": manifest.name})


async def handle_pins(request: web.Request) -> web.Response:
    return web.json_response({"pins": {d: sorted(h) for d, h in request.app[DAEMON].pins.items()}})


async def handle_verify(request: web.Request) -> web.Response:
    """Full re-check of one artifact; a reader that saw a problem calls this too."""
    return web.json_response(await request.app[DAEMON].verify("sha256:" + request.match_info["hex"]))


async def handle_verify_all(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    results = [await d.verify(dg) for dg, j in list(d.jobs.items()) if j.state == "ready" and not j.busy]
    return web.json_response({"results": results})


async def handle_piece(request: web.Request) -> web.Response:
    """``GET /v1/artifacts/{digest}/pieces/{n}?wait=S``: one piece, for a node of another zone."""
    digest = "sha256:" + request.match_info["hex"]
    piece = int(request.match_info["piece"])  # the route admits digits only
    try:
        wait_s = float(request.query.get("wait", "0"))
    except ValueError:
        raise BadRequest("?wait= must be a number of seconds") from None
    if not 0 <= wait_s <= 60:
        raise BadRequest(f"?wait={wait_s:g} must be between 0 and 60 seconds")
    data = await request.app[DAEMON].read_piece(digest, piece, wait_s)
    return web.Response(body=data, content_type="application/octet-stream")


async def handle_piece_put(request: web.Request) -> web.Response:
    """``PUT /v1/artifacts/{digest}/pieces/{n}``: a piece pushed by a node of another zone."""
    digest = "sha256:" + request.match_info["hex"]
    piece = int(request.match_info["piece"])
    daemon = request.app[DAEMON]
    size = daemon.accept_piece(digest, piece, request.content_length)
    try:
        data = await request.content.readexactly(size)
    except asyncio.IncompleteReadError:
        raise BadRequest(f"piece {piece} of {digest}: the body ended early") from None
    daemon.pushed_piece(digest, piece, data)
    return web.Response(status=204)


async def handle_health(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    return web.json_response({"ok": True, "node_id": d.node_id, "zone": d.cfg.zone,
                              "peer_listen": f"{d.cfg.peer_host}:{d.engine.listen_port}", "relay": d.relay_url,
                              "cache": str(d.store.root), "registry": d.cfg.registry})


async def handle_metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[DAEMON].metrics_text(), content_type="text/plain")


def make_app(cfg: NodeConfig) -> web.Application:
    app = web.Application(middlewares=[errors_middleware])

    async def lifecycle(app: web.Application):
        daemon = NodeDaemon(cfg)
        relay = await daemon.start_relay()
        try:
            await daemon.start()
            app[DAEMON] = daemon
            yield
            await daemon.stop()
        finally:
            if relay is not None:
                await relay.cleanup()

    app.cleanup_ctx.append(lifecycle)
    digest = "sha256:{hex:[0-9a-f]{64}}"
    app.router.add_post("/v1/pull", handle_pull)
    app.router.add_get(f"/v1/pulls/{digest}", handle_pull_status)
    app.router.add_get("/v1/artifacts", handle_list)
    app.router.add_post(f"/v1/artifacts/{digest}/verify", handle_verify)
    app.router.add_post("/v1/verify", handle_verify_all)
    app.router.add_get("/v1/resolve", handle_resolve)
    app.router.add_get("/v1/pins", handle_pins)
    app.router.add_post("/v1/pins", handle_pin)
    app.router.add_delete(f"/v1/pins/{digest}", handle_unpin)
    app.router.add_get("/v1/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    add_runtime_routes(app, DAEMON)
    return app


def add_relay_routes(app: web.Application) -> None:
    """The routes of the relay listener (NodeDaemon.start_relay): pieces for nodes of other zones."""
    piece = "/v1/artifacts/sha256:{hex:[0-9a-f]{64}}/pieces/{piece:[0-9]{1,9}}"
    app.router.add_get(piece, handle_piece)
    app.router.add_put(piece, handle_piece_put)


def serve(cfg: NodeConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # No access log: clients poll pull status several times a second.
    web.run_app(make_app(cfg), host=cfg.api_host, port=cfg.api_port, print=None, shutdown_timeout=2,
                access_log=None)
