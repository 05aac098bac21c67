"""The node daemon: lifecycle, and the one reconcile loop that moves every pull job to ready.

A pull job (:mod:`node_cache.jobs`) goes queued -> downloading -> verifying -> ready, or
to failed.  :meth:`NodeDaemon.update` looks at every job and starts the step its state
calls for, unless one is running: *prepare* (torrent, room in the quota, meta, add to the
swarm), *complete* (leave the swarm, verify every file, rename into place, seed) or
*abort* (keep verified pieces and resume data, leave the swarm).  It is safe to call at
any time and any number of times; the loop calls it when something happens (a job is
added, a torrent finished or failed, a step ended) and every :data:`SAMPLE_S` to sample
progress.  While a job downloads, its origin fill (:mod:`node_cache.origin_fill`) fetches
what no peer can give.

Trust: an artifact is complete only once every file matched its xxh3 and it was renamed
into place (LAYOUT.md).  After a crash, partial downloads are re-checked piece by piece
(resume data may be stale); after a clean stop, the resume data written at stop is used.
Every disk access runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from adapters.tls import connector_ssl
from adapters.torrent import TorrentEngine, TorrentInfo, check_torrent, piece_spans, swarm_key
from modelcast.config import NodeConfig, is_wildcard
from modelcast.errors import (ArtifactNotFound, BadRequest, Conflict, DiskFull, IntegrityError, InvalidManifest,
                              ModelcastError, PullFailed, Unavailable, Unreachable)
from modelcast.hf import HfName, resolve_target
from modelcast.manifest import Manifest
from modelcast.reference import Reference
from modelcast.units import human_bytes
from tracker.client import RegistryClient

from .hf import STATE_FILE as HF_STATE_FILE, HfLayouts, layout_for
from .jobs import PullJob, PullState
from .metrics import NodeGauges, NodeMetrics
from .origin_fill import OriginFetcher, OriginFill
from .pins import PinsAndUse
from .relay import Relay
from .report import ProgressReporter
from .store import Store
from .upkeep import CacheUpkeep

log = logging.getLogger("modelcast.node")

SAMPLE_S = 0.25  # download progress (status, rates, bytes from peers) is sampled this often
LATE_ERROR_S = 0.1  # a finished torrent with no write error after this long is finished for good
REMOVE_TIMEOUT_S = 10.0
RESUME_TIMEOUT_S = 2.0
PERSIST_INTERVAL_S = 1.0  # resume data and LRU order are saved this often
REJOIN_MIN_S = 5.0  # a node the registry does not know re-announces every torrent at most this often

READY, FAILED = PullState.READY, PullState.FAILED


@dataclass
class Download:
    """What a job holds while it is in the swarm."""

    ti: TorrentInfo
    fill: OriginFill
    fill_task: asyncio.Task


class NodeDaemon:
    """Owns the store, the libtorrent engine and the pull jobs of one node."""

    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.store: Store | None = None  # made at start
        self.node_id: str | None = None
        self.node_key: str | None = None  # proves node_id to the registry (tracker/nodekeys.py)
        self.pins: PinsAndUse | None = None
        self.hf: HfLayouts | None = None  # made at start
        self.engine: TorrentEngine | None = None
        self._rejoined_at = -REJOIN_MIN_S
        self.jobs: dict[str, PullJob] = {}
        self.tags: dict[str, str] = {}  # last resolution of each name:tag, for when the registry is down
        self.metrics = NodeMetrics(self._gauges)
        self.counters = self.metrics.counters
        # Reads with the read (or write) token if it has one, else with the node token, which reads too.
        # Registry requests leave from the relay listener's address: the registry registers the
        # relay URL a heartbeat names only at the address the heartbeat comes from (tracker/relaytokens.py).
        relay_host = cfg.peer_host if cfg.relay_host is None else cfg.relay_host
        self.registry = RegistryClient(cfg.registry, cfg.token or cfg.node_token, ca=cfg.ca,
                                       local_host=None if is_wildcard(relay_host) else relay_host)
        self.relay = Relay(cfg, self.counters, self.jobs)
        self.fetcher = OriginFetcher(cfg, self.counters, self.relay)
        self._downloads: dict[str, Download] = {}
        self._http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.upkeep = CacheUpkeep(self)
        self.reporter = ProgressReporter()
        self._resume_lock = asyncio.Lock()  # one writer of resume/ at a time: a save never follows a drop

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self.store = await asyncio.to_thread(Store, self.cfg.cache_dir)
        self.node_id = await asyncio.to_thread(self.store.node_id)
        self.node_key = await asyncio.to_thread(self.store.node_key)
        self.fetcher.identity = (self.node_id, self.node_key)  # origin requests prove the node (first-copy gate)
        self.pins = await PinsAndUse.load(self.store)
        store = self.store
        self.hf = await asyncio.to_thread(HfLayouts, lambda: store.load_state(HF_STATE_FILE, []),
                                          lambda obj: store.save_state(HF_STATE_FILE, obj), store.artifact_path)
        clean = await asyncio.to_thread(self.store.take_clean_stop)
        self.engine = TorrentEngine(self.cfg.peer_host, self.cfg.peer_port, upload_limit=self.cfg.upload_limit,
                                    download_limit=self.cfg.download_limit, connections=self.cfg.peer_connections,
                                    on_event=self._on_engine_event, ca=self.cfg.ca)
        # Origin and relay fetches leave from the node's peer address, like its peer
        # connections: other nodes and the network see one address per node.
        # https:// registries and relays are checked against the system's roots and --ca.
        local_addr = None if is_wildcard(self.cfg.peer_host) else (self.cfg.peer_host, 0)
        connector = aiohttp.TCPConnector(ssl=connector_ssl(self.cfg.ca), local_addr=local_addr)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300, sock_read=30), connector=connector)
        self.relay.attach(self.engine, self._http)
        self.fetcher.attach(self.engine, self._http)
        self._tasks = [asyncio.create_task(self._reconcile()), asyncio.create_task(self._heartbeat()),
                       asyncio.create_task(self._persist())]
        await asyncio.to_thread(self.store.empty_trash)
        for digest in await asyncio.to_thread(self.store.complete_digests):
            await self.upkeep.adopt_complete(digest)
        resumed = 0
        for digest in await asyncio.to_thread(self.store.partial_digests):
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
            self.start_job(PullJob(digest, manifest))
            resumed += 1
        # Unpacked runtime layers count against the quota with their artifacts; orphans go.
        await self.upkeep.adopt_layers()
        # Hugging Face layouts: links back for what is complete, gone for what is not.
        await self.hf_reconcile()
        log.info("node %s ready: zone %s, peers on %s:%s, %d artifacts in cache, %d downloads resumed (%s stop)",
                 self.node_id, self.cfg.zone, self.cfg.peer_host, self.engine.listen_port,
                 sum(j.state is READY for j in self.jobs.values()), resumed, "clean" if clean else "unclean")

    async def stop(self) -> None:
        """Save resume data, leave every swarm, stop; within a few seconds."""
        reconcile, heartbeat, persist = self._tasks
        reconcile.cancel()  # first: no step starts from now on
        heartbeat.cancel()
        self._stopping.set()
        await persist  # it ends after its current save: no write of it races the ones below
        active = [j for j in self.jobs.values() if j.state is PullState.DOWNLOADING and self.engine.has(j.digest)]
        await asyncio.gather(*(self._save_resume(j) for j in active))
        for download in self._downloads.values():
            download.fill_task.cancel()
        for job in list(self.jobs.values()):
            if job.step is not None and not job.step.done():
                job.step.cancel()  # its job fails as cancelled
            else:
                self._end(job, FAILED, PullFailed(f"pull of {job.manifest.name} ({job.digest}) was cancelled"))
        try:
            # Leave every swarm at once, before libtorrent's per-torrent "stopped" announces.
            await self.registry.leave(self.node_id, self.node_key)
        except ModelcastError as exc:
            log.warning("could not tell the tracker this node leaves: %s", exc)
        self.fetcher.close()  # origin reads still in worker threads end now
        await self.engine.close()
        self.engine = None
        await self._http.close()
        await self.registry.close()
        try:
            await self.pins.flush(force=True)
            await asyncio.to_thread(self.store.mark_clean_stop)
        except OSError as exc:
            log.warning("could not record a clean stop (%s); the next start re-checks partial downloads", exc)

    async def _persist(self) -> None:
        """Save resume data of active downloads and the LRU order, every second, until stop."""
        while not self._stopping.is_set():
            try:
                async with asyncio.timeout(PERSIST_INTERVAL_S):
                    await self._stopping.wait()
                return
            except TimeoutError:
                pass
            try:
                await asyncio.gather(*(self._save_resume(j) for j in list(self.jobs.values())
                                       if j.state is PullState.DOWNLOADING))
                await self.pins.flush()
            except Exception:
                log.exception("saving state")

    async def _save_resume(self, job: PullJob) -> None:
        """Ask libtorrent for the resume data of a download and write it (in a thread) if it is still one."""
        try:
            data = await asyncio.wait_for(self.engine.save_resume(job.digest), RESUME_TIMEOUT_S)
        except TimeoutError:
            return
        if data is None:
            return
        async with self._resume_lock:
            if job.state is not PullState.DOWNLOADING or self.jobs.get(job.digest) is not job:
                return
            try:
                await asyncio.to_thread(self.store.save_resume, job.digest, data)
            except OSError as exc:
                # A full disk must not stop the daemon.  Older resume data would now
                # understate what is on disk: drop it, so the next attempt re-checks.
                log.warning("could not save resume data of %s: %s", job.digest, exc)
                await asyncio.to_thread(self.store.drop_resume, job.digest)

    async def drop_resume(self, digest: str) -> None:
        async with self._resume_lock:
            await asyncio.to_thread(self.store.drop_resume, digest)

    async def _heartbeat(self) -> None:
        """One heartbeat per node (not per torrent) keeps all its swarm entries alive.

        It carries the node's report (node_cache/report.py): what it pulls and holds, how
        far each pull is and where its bytes came from, for the registry's console.
        """
        warned = False
        reports = True
        while True:
            try:
                report = (self.reporter.next_report(self.jobs.values(), self.pins.last_used, time.time())
                          if reports else None)
                try:
                    answer = await self.registry.heartbeat(self.node_id, self.cfg.zone, self.cfg.heartbeat_ttl_s,
                                                           report, self.node_key, self.cfg.node_token,
                                                           relay=self.relay.url)
                    self.reporter.answered(answer)
                    self.relay.registered(self.node_id, answer)
                    self._rejoin(answer)
                except BadRequest as exc:
                    if report is None:
                        raise
                    # A registry older than reports refuses the larger body: liveness matters more.
                    log.warning("the registry refuses this node's progress reports (%s); heartbeats go on without them",
                                exc)
                    reports = False
                    answer = await self.registry.heartbeat(self.node_id, self.cfg.zone, self.cfg.heartbeat_ttl_s,
                                                           node_key=self.node_key, node_token=self.cfg.node_token,
                                                           relay=self.relay.url)
                    self.relay.registered(self.node_id, answer)
                warned = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure (too many redirects, a bug): log, keep beating
                if not warned:
                    detail = str(exc) if isinstance(exc, ModelcastError) else f"{exc.__class__.__name__}: {exc}"
                    log.warning("heartbeat failed (will keep trying): %s", detail)
                    warned = True
            await asyncio.sleep(self.cfg.heartbeat_interval_s)

    def _rejoin(self, answer: dict) -> None:
        """The registry knows none of this node's swarm entries (it restarted, or its swarm store lost its
        data): announce every torrent now rather than at the next interval (30 s), at most every few seconds."""
        if answer.get("entries") != 0 or self.engine is None or not self.cfg.p2p:
            return
        now = time.monotonic()
        if now - self._rejoined_at < REJOIN_MIN_S:
            return
        if self.engine.reannounce_all():  # a node in no swarm yet (its first heartbeats) does not count
            self._rejoined_at = now
            log.info("the registry knows none of this node's swarm entries; announcing every torrent now")

    def trackers(self) -> list[str]:
        if not self.cfg.p2p:
            return []
        # Every replica, one tier each, the one this node talks to now first: libtorrent
        # announces to the first that answers and moves on to the next when it fails.
        return self.registry.announce_urls(self.cfg.zone, self.node_id, self.node_key)

    # ---- the reconcile loop ------------------------------------------------------------
    def wake(self) -> None:
        """Have the reconcile loop look at every job now."""
        self._wake.set()

    async def _reconcile(self) -> None:
        while True:
            self._wake.clear()
            try:
                self.update()
            except Exception:  # a bug in one step must not stop every pull
                log.exception("reconciling pull jobs")
            try:
                async with asyncio.timeout(SAMPLE_S):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def update(self) -> None:
        """Move every job one step towards ready (or failed).

        Safe to call at any time, any number of times: a job with a step under way is left
        alone, and each state starts only the step it calls for.
        """
        for job in list(self.jobs.values()):
            if job.state.terminal or (job.step is not None and not job.step.done()):
                continue
            if job.state is PullState.QUEUED:
                self._begin(job, self._prepare(job))
            elif job.state is PullState.DOWNLOADING:
                self._update_download(job)

    def _update_download(self, job: PullJob) -> None:
        self._sample(job)
        # Errors first: libtorrent may call a torrent finished whose writes failed.
        err = self.engine.error(job.digest)
        if err:
            self._begin(job, self._abort(job, err))
            return
        download = self._downloads.get(job.digest)
        fill = download.fill_task if download is not None else None
        if fill is not None and fill.done() and not fill.cancelled() and fill.exception() is not None:
            self._begin(job, self._abort(job, fill.exception()))
            return
        finished_at = self.engine.finished_at(job.digest)
        if finished_at is not None:
            loop = asyncio.get_running_loop()
            if loop.time() < finished_at + LATE_ERROR_S:
                loop.call_at(finished_at + LATE_ERROR_S, self.wake)  # let a late write error arrive
            else:
                self._begin(job, self._complete(job))

    def _begin(self, job: PullJob, step) -> None:
        job.step = asyncio.create_task(self._run_step(job, step))

    async def _run_step(self, job: PullJob, step) -> None:
        try:
            await step
        except asyncio.CancelledError:
            self._end(job, FAILED, PullFailed(f"pull of {job.manifest.name} ({job.digest}) was cancelled"))
            raise
        except ModelcastError as exc:
            log.error("pull of %s failed: %s", job.digest, exc)
            self._end(job, FAILED, exc)
        except Exception as exc:  # keep the daemon alive; report the failure to the caller
            log.exception("pull of %s failed", job.digest)
            self._end(job, FAILED, PullFailed(f"pull of {job.digest} failed: {exc}"))
        finally:
            self.wake()

    def _end(self, job: PullJob, state: PullState, error: ModelcastError | None = None) -> None:
        if job.state.terminal:
            return
        job.end(state, error)
        self.counters.observe_pull(job.finished - job.started, state is READY)

    def _on_engine_event(self, digest: str, kind: str) -> None:
        if kind in ("finished", "error"):
            self.wake()
        download = self._downloads.get(digest)
        if download is not None:
            download.fill.poke()

    # ---- steps -------------------------------------------------------------------------
    async def _prepare(self, job: PullJob) -> None:
        """Queued -> downloading: the torrent, room in the quota, meta on disk, the torrent in the swarm."""
        digest, manifest = job.digest, job.manifest
        if await asyncio.to_thread(self.store.is_complete, digest):
            job.path = str(self.store.artifact_path(digest))
            self._end(job, READY)
            return
        torrent = await asyncio.to_thread(self.store.load_torrent, digest) or await self.registry.torrent(digest)
        ti = check_torrent(torrent, manifest)
        spans = piece_spans(ti)
        await self.upkeep.make_room(job)
        await asyncio.to_thread(self.store.save_meta, digest, manifest, torrent)
        await asyncio.to_thread(self.store.ensure_partial_files, digest, manifest)
        resume = await asyncio.to_thread(self.store.load_resume, digest)
        job.state = PullState.DOWNLOADING
        url_seed = self.fetcher.url_seed(self.registry.webseed_url(digest))
        if url_seed is not None and self.cfg.p2p and await self.registry.swarm_size(swarm_key(ti)) != 0:
            url_seed = None  # somebody is in the swarm (or the tracker did not say): share the first copy
        self.engine.add(digest, ti, manifest, str(self.store.partial_path(digest)), trackers=self.trackers(),
                        seed=False, resume=resume, url_seed=url_seed)
        fill = OriginFill(job, spans, self.registry, self.fetcher, self.cfg)
        task = asyncio.create_task(fill.run())
        task.add_done_callback(lambda _: self.wake())
        self._downloads[digest] = Download(ti, fill, task)

    async def _complete(self, job: PullJob) -> None:
        """Downloading -> verifying -> ready: every file checked, renamed into place, seeded."""
        digest, manifest = job.digest, job.manifest
        self._sample(job)
        download = self._downloads.pop(digest)
        download.fill_task.cancel()
        await self.remove_torrent(digest)
        job.state = PullState.VERIFYING
        partial = self.store.partial_path(digest)
        try:
            await asyncio.to_thread(self.store.verify_tree, partial, manifest, full=True)
            self.counters.verified_bytes += manifest.total_size
        except IntegrityError:
            self.counters.verify_failures += 1
            raise
        path = await asyncio.to_thread(self.store.promote, digest)
        await asyncio.to_thread(self.store.stamp, digest, manifest)
        await self.drop_resume(digest)
        job.path = str(path)
        # Seed from the final place; the files were just verified, so no re-check, and no
        # piece is hashed again as peers ask for it (libtorrent's seed mode would).
        self.engine.add(digest, download.ti, manifest, str(path), trackers=self.trackers(), seed=True,
                        verified=True)
        log.info("%s ready at %s: %d bytes from peers, %d from the origin (%d of them through libtorrent's URL seed)",
                 manifest.name, path, job.bytes_from_peers, job.bytes_from_origin, job.bytes_from_url_seed)
        self._end(job, READY)
        if self.hf.for_digest(digest):
            await self.hf_reconcile()  # a repaired artifact gets its Hugging Face layouts back

    async def _abort(self, job: PullJob, problem: str | BaseException) -> None:
        """Downloading -> failed, keeping the verified pieces (and resume data) for the next pull."""
        self._sample(job)
        download = self._downloads.pop(job.digest, None)
        if download is not None:
            download.fill_task.cancel()
        if self.engine.has(job.digest):
            await self._save_resume(job)
            await self.remove_torrent(job.digest)
        if isinstance(problem, str):
            raise self._download_error(job, problem)
        if isinstance(problem, OSError) and problem.errno == errno.ENOSPC:
            raise self._download_error(job, str(problem)) from problem
        raise problem

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
        # libtorrent's payload counts what its URL seed fetched from the origin, too.
        from_url_seed = self.engine.url_seed_bytes(job.digest)
        if from_url_seed > job.bytes_from_url_seed:
            more = from_url_seed - job.bytes_from_url_seed
            job.bytes_from_url_seed = from_url_seed
            job.bytes_from_origin += more
            self.counters.bytes_from_origin += more
        from_peers = max(0, p.payload_download - from_url_seed)
        self.counters.bytes_from_peers += max(0, from_peers - job.bytes_from_peers)
        job.bytes_from_peers = from_peers
        job.done_bytes = p.done_bytes
        job.download_rate, job.upload_rate, job.peers = p.download_rate, p.upload_rate, p.peers

    async def remove_torrent(self, digest: str) -> None:
        """Take ``digest`` out of the swarm and wait until libtorrent has closed its files."""
        try:
            await asyncio.wait_for(self.engine.remove(digest), REMOVE_TIMEOUT_S)
        except TimeoutError:
            log.warning("libtorrent took over %gs to close the files of %s; going on", REMOVE_TIMEOUT_S, digest)

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
        except (Unreachable, Unavailable) as exc:
            # Every replica unreachable, or answering 503 (its database down): what this
            # node holds is still served.
            cached = self.tags.get(ref_text)
            if cached and cached in self.jobs and self.jobs[cached].state is READY:
                log.warning("registry %s; using the last resolution of %s",
                            "unavailable" if isinstance(exc, Unavailable) else "unreachable", ref_text)
                return cached, self.jobs[cached].manifest
            raise
        if ref.tag:
            self.tags[ref_text] = digest
        return digest, manifest

    async def pull(self, ref_text: str, pin: str | None = None) -> PullJob:
        """Start (or join) the pull of ``ref_text``; concurrent pulls share one download."""
        digest, manifest = await self.resolve(ref_text)
        if pin:
            await self.pins.pin(digest, pin)
        self.pins.touch(digest)
        job = self.jobs.get(digest)
        if (job is not None and job.state is READY
                and not await asyncio.to_thread(os.path.isdir, job.path or "")):
            # Deleted behind the daemon's back: never hand out a path that is not there.
            await self.upkeep.repair(job, f"{job.path} is missing")
            return self.jobs[digest]
        if job is not None and job.state is not FAILED:
            return job
        return self.start_job(PullJob(digest, manifest))

    def start_job(self, job: PullJob) -> PullJob:
        self.jobs[job.digest] = job
        self.wake()
        return job

    # ---- Hugging Face layouts and deletion --------------------------------------------------
    async def hf_reconcile(self) -> None:
        """Links of every Hugging Face layout in place for ready artifacts, and for no other (hf.py)."""
        ready = {d for d, j in self.jobs.items() if j.state is READY}
        try:
            await asyncio.to_thread(self.hf.reconcile, ready, set(self.jobs))
        except OSError as exc:
            log.warning("could not bring the Hugging Face layouts up to date: %s", exc)

    async def lay_out_hf(self, digest: str, name: HfName | None, cache: Path | None) -> dict:
        """Lay a ready artifact out in a Hugging Face hub cache; returns where (snapshot, repo, revision)."""
        job = self.jobs.get(digest)
        if job is None or job.state is not READY:
            raise ArtifactNotFound(f"{digest} is not complete on this node; pull it first")
        cache = cache or self.cfg.hf_cache
        if cache is None:
            raise BadRequest("no Hugging Face cache given and this node has none configured; "
                             "pass \"cache\": \"/abs/dir\" (modelcast pull --hf-cache DIR)")
        layout = layout_for(digest, job.manifest, cache, resolve_target(name, job.manifest.annotations, digest,
                                                                          label=job.manifest.name))
        try:
            await asyncio.to_thread(self.hf.apply, layout)
        except OSError as exc:
            raise ModelcastError(f"could not lay {job.manifest.name} out at {layout.snapshot}: "
                                 f"{exc.strerror or exc}") from exc
        if self.jobs.get(digest) is not job or job.state is not READY:
            # Evicted while the links were made: take them away again, never leave them dangling.
            await asyncio.to_thread(self.hf.drop, digest)
            raise ArtifactNotFound(f"{digest} was evicted while it was being laid out; pull it again")
        log.info("%s laid out for Hugging Face as %s@%s at %s", job.manifest.name, layout.repo_id, layout.commit,
                 layout.snapshot)
        return layout.summary()

    async def evict(self, digest: str) -> dict:
        """Delete a complete artifact now (``modelcast node evict``): its layouts first, then its bytes."""
        job = self.jobs.get(digest)
        if job is None or job.state is FAILED:
            raise ArtifactNotFound(f"{digest} is not on this node")
        if job.busy:
            raise Conflict(f"{job.manifest.name} ({digest}) is being {job.state.value}; evict it once it is ready")
        holders = self.pins.holders(digest)
        if holders:
            raise Conflict(f"{job.manifest.name} ({digest}) is pinned by {', '.join(holders)}; unpin it first "
                           f"(modelcast node unpin {digest})")
        removed = [layout.summary() for layout in self.hf.for_digest(digest)]
        await self.upkeep.evict_now(digest)
        return {"digest": digest, "name": job.manifest.name, "evicted": True, "hf_removed": removed}

    # ---- views -------------------------------------------------------------------------
    def listing(self) -> list[dict]:
        return [self.job_json(j) for j in sorted(self.jobs.values(), key=lambda j: j.started)]

    def job_json(self, job: PullJob) -> dict:
        return {**job.to_json(self.pins.pins, self.pins.last_used.get(job.digest)),
                "unpacked_bytes": self.upkeep.unpacked_of(job.digest),
                "hf_layouts": [layout.summary() for layout in self.hf.for_digest(job.digest)] if self.hf else []}

    def _gauges(self) -> NodeGauges:
        ready = [j for j in self.jobs.values() if j.state is READY]
        busy = [j for j in self.jobs.values() if j.busy]
        return NodeGauges(
            cache_bytes=sum(j.manifest.total_size for j in ready), cache_artifacts=len(ready),
            unpacked_bytes=self.upkeep.unpacked_total(), unpacked_layers=len(self.upkeep.layers),
            used_bytes=self.upkeep.used_bytes() if self.pins else 0,
            quota_bytes=self.cfg.quota, pinned_artifacts=len(self.pins.pins) if self.pins else 0,
            peers_connected=sum(j.peers for j in busy),
            piece_hash_failures=self.engine.hash_failures if self.engine else 0,
            peers_banned=self.engine.peers_banned if self.engine else 0,
            node_id=self.node_id or "", zone=self.cfg.zone, pulls_in_progress=len(busy),
            pulling_bytes=sum(j.manifest.total_size for j in busy),
            pulling_done_bytes=sum(min(j.done_bytes, j.manifest.total_size) for j in busy))
