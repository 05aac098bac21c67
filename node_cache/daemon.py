"""The node daemon: pulls artifacts over the swarm, verifies, promotes, seeds, and serves a local API.

Origin policy: a node fetches a piece from the origin (the registry's BEP 19 web-seed
endpoint) only when no connected peer has it and nobody is sending it to us, choosing at
random among such pieces.  Nodes that pull together thus split the first copy between
them instead of each taking a whole copy from the origin.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from modelcast.config import NodeConfig
from modelcast.errors import (ArtifactNotFound, BadRequest, IntegrityError, InvalidManifest, ModelcastError,
                              PullFailed, Unreachable, error_body)
from modelcast.http import bearer
from modelcast.manifest import Manifest
from modelcast.reference import Reference
from tracker.client import RegistryClient

from .engine import PieceSpan, TorrentEngine, check_torrent, piece_spans
from .store import Store

log = logging.getLogger("modelcast.node")

ORIGIN_PARALLEL = 4  # origin requests in flight at once per node
ORIGIN_RUN_BYTES = 8 << 20  # a node with no peers asks the origin for up to this much per request
STALL_S = 5.0  # without progress for this long, fetch from the origin even what peers claim to have
REMOVE_TIMEOUT_S = 10.0


@dataclass
class PullJob:
    """One artifact on this node: being pulled, verified, or ready."""

    digest: str
    manifest: Manifest
    state: str = "queued"  # queued | downloading | verifying | ready | failed
    path: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    bytes_from_origin: int = 0
    bytes_from_peers: int = 0
    done_bytes: int = 0
    download_rate: int = 0
    upload_rate: int = 0
    peers: int = 0
    error: ModelcastError | None = None
    task: asyncio.Task | None = None
    waiters: int = 0

    def to_json(self) -> dict:
        total = self.manifest.total_size
        return {
            "digest": self.digest, "name": self.manifest.name, "state": self.state, "path": self.path,
            "total_bytes": total, "done_bytes": total if self.state == "ready" else self.done_bytes,
            "bytes_from_peers": self.bytes_from_peers, "bytes_from_origin": self.bytes_from_origin,
            "download_rate": self.download_rate, "upload_rate": self.upload_rate, "peers": self.peers,
            "started": self.started, "finished": self.finished,
            "seconds": (self.finished - self.started) if self.finished else None,
            "error": None if self.error is None else {"code": self.error.code, "message": str(self.error)},
        }


class Metrics:
    def __init__(self) -> None:
        self.bytes_from_peers = 0
        self.bytes_from_origin = 0
        self.pulls = {"ready": 0, "failed": 0}
        self.pull_seconds_sum = 0.0
        self.verify_failures = 0
        self.verified_bytes = 0  # bytes re-hashed with xxh3 (full verification only)


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
        self._http: aiohttp.ClientSession | None = None
        self._pump_task: asyncio.Task | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self.node_id = self.store.node_id()

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self.engine = TorrentEngine(self.cfg.peer_host, self.cfg.peer_port, upload_limit=self.cfg.upload_limit,
                                    download_limit=self.cfg.download_limit, connections=self.cfg.peer_connections)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120, sock_read=30))
        self._pump_task = asyncio.create_task(self._pump())
        self._heartbeat_task = asyncio.create_task(self._heartbeat())
        for digest in self.store.complete_digests():
            await self._adopt_complete(digest)
        log.info("node ready: zone %s, peers on %s:%s, %d artifacts in cache",
                 self.cfg.zone, self.cfg.peer_host, self.engine.listen_port, len(self.jobs))

    async def stop(self) -> None:
        for job in self.jobs.values():
            if job.task and not job.task.done():
                job.task.cancel()
        if self._pump_task:
            self._pump_task.cancel()
        if self._heartbeat_task:
            self._heartbeat_task.cancel()
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

    async def _pump(self) -> None:
        while True:
            try:
                self.engine.pump()
            except Exception:  # a bad alert must not stop the daemon
                log.exception("alert pump")
            await asyncio.sleep(0.05)

    async def _adopt_complete(self, digest: str) -> None:
        """Seed an artifact found complete at start-up, after a cheap size check only."""
        try:
            manifest, torrent = await asyncio.to_thread(self.store.load_meta, digest)
            path = self.store.artifact_path(digest)
            await asyncio.to_thread(self.store.verify_tree, path, manifest, full=False)
            ti = check_torrent(torrent, manifest)
        except (OSError, ModelcastError) as exc:
            log.warning("cached artifact %s failed its start-up check (%s); it will be pulled again", digest, exc)
            self.metrics.verify_failures += 1
            await asyncio.to_thread(self.store.remove_tree, self.store.artifact_path(digest))
            return
        self.engine.add(digest, ti, manifest, str(path), trackers=self._trackers(), seed=True)
        self.jobs[digest] = PullJob(digest, manifest, state="ready", path=str(path), finished=time.time())

    def _trackers(self) -> list[str]:
        return [self.registry.announce_url(self.cfg.zone, self.node_id)]

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

    # ---- pulls -----------------------------------------------------------------------
    async def resolve(self, ref_text: str) -> tuple[str, Manifest | None]:
        """Resolve a reference to a digest; a digest already complete needs no registry."""
        ref = Reference.parse(ref_text)
        if ref.digest:
            job = self.jobs.get(ref.digest)
            if job and (ref.name is None or job.manifest.name == ref.name) and job.state != "failed":
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

    async def pull(self, ref_text: str) -> PullJob:
        """Start (or join) the pull of ``ref_text``; concurrent pulls share one download."""
        digest, manifest = await self.resolve(ref_text)
        job = self.jobs.get(digest)
        if job is not None and job.state != "failed":
            return job
        job = PullJob(digest, manifest)
        self.jobs[digest] = job
        job.task = asyncio.create_task(self._run_pull(job))
        return job

    async def _run_pull(self, job: PullJob) -> None:
        try:
            await self._download(job)
            job.state = "ready"
            self.metrics.pulls["ready"] += 1
        except asyncio.CancelledError:
            job.state, job.error = "failed", PullFailed(f"pull of {job.manifest.name} ({job.digest}) was cancelled")
            raise
        except ModelcastError as exc:
            job.state, job.error = "failed", exc
            self.metrics.pulls["failed"] += 1
            log.error("pull of %s failed: %s", job.digest, exc)
        except Exception as exc:  # keep the daemon alive; report the failure to the caller
            log.exception("pull of %s failed", job.digest)
            job.state, job.error = "failed", PullFailed(f"pull of {job.digest} failed: {exc}")
            self.metrics.pulls["failed"] += 1
        finally:
            job.finished = time.time()
            self.metrics.pull_seconds_sum += job.finished - job.started

    async def _download(self, job: PullJob) -> None:
        digest, manifest, engine = job.digest, job.manifest, self.engine
        if self.store.is_complete(digest):
            await self._adopt_complete(digest)
            if digest in self.jobs and self.jobs[digest].state == "ready":
                job.path = self.jobs[digest].path
                self.jobs[digest] = job
                return
        torrent = await self.registry.torrent(digest)
        ti = check_torrent(torrent, manifest)
        spans = piece_spans(ti)
        await asyncio.to_thread(self.store.save_meta, digest, manifest, torrent)
        partial = self.store.partial_path(digest)
        partial.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.store.ensure_partial_files, digest, manifest)
        job.state = "downloading"
        engine.add(digest, ti, manifest, str(partial), trackers=self._trackers(), seed=False)
        origin = asyncio.create_task(self._origin_fill(job, spans))
        try:
            while not engine.finished(digest):
                err = engine.error(digest)
                if err:
                    raise PullFailed(f"download of {manifest.name} ({digest}) failed: {err}")
                if origin.done() and origin.exception():
                    raise origin.exception()
                self._sample(job)
                await asyncio.sleep(0.1)
        finally:
            origin.cancel()
        self._sample(job)
        engine.remove(digest)
        deadline = time.monotonic() + REMOVE_TIMEOUT_S
        while not engine.removed(digest) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        job.state = "verifying"
        try:
            await asyncio.to_thread(self.store.verify_tree, partial, manifest, full=True)
            self.metrics.verified_bytes += manifest.total_size
        except IntegrityError:
            self.metrics.verify_failures += 1
            raise
        path = await asyncio.to_thread(self.store.promote, digest)
        job.path = str(path)
        # Seed from the final place; the files were just verified, so no re-check.
        engine.add(digest, ti, manifest, str(path), trackers=self._trackers(), seed=True)
        log.info("%s ready at %s: %d bytes from peers, %d from the origin",
                 manifest.name, path, job.bytes_from_peers, job.bytes_from_origin)

    def _sample(self, job: PullJob) -> None:
        p = self.engine.progress(job.digest)
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
        grace_end = time.monotonic() + self.cfg.webseed_grace_s
        while time.monotonic() < grace_end and self.engine.tracker_peers(job.digest) != 0:
            await asyncio.sleep(0.02)
        base = self.registry.webseed_url(job.digest)
        claimed: dict[int, asyncio.Task] = {}  # piece -> the fetch that covers it
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
            wanted = {i for i in missing if i not in claimed and now - fetched_at.get(i, -1e9) > 5
                      and (stalled or (avail[i] == 0 and i not in queued))}
            candidates = sorted(wanted)
            run_limit = ORIGIN_RUN_BYTES if alone else 1
            while candidates and len(set(claimed.values())) < ORIGIN_PARALLEL:
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
                task = asyncio.create_task(self._fetch_run(job, base, run))
                for span in run:
                    claimed[span.piece] = task
                    wanted.discard(span.piece)
                candidates = sorted(wanted)
            tasks = set(claimed.values())
            if tasks:
                await asyncio.wait(tasks, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
                failed = False
                for piece, task in list(claimed.items()):
                    if task.done():
                        del claimed[piece]
                        fetched_at[piece] = time.monotonic()
                        failed |= task.exception() is not None
                if failed:
                    log.warning("origin fetch failed: %s", next(t.exception() for t in tasks if t.done() and t.exception()))
                    await asyncio.sleep(0.5)
            else:
                await asyncio.sleep(0.05)
        for task in set(claimed.values()):
            task.cancel()

    async def _fetch_run(self, job: PullJob, base: str, run: list[PieceSpan]) -> None:
        """Fetch consecutive pieces of one file with one range request and hand them to libtorrent."""
        first, last = run[0], run[-1]
        start, end = first.file_offset, last.file_offset + last.length - 1
        url = base + "/".join(aiohttp.helpers.quote(part, safe="") for part in first.path.split("/"))
        headers = {"Range": f"bytes={start}-{end}", **bearer(self.cfg.token)}
        try:
            async with self._http.get(url, headers=headers) as resp:
                if resp.status not in (200, 206):
                    raise Unreachable(f"origin answered HTTP {resp.status} for {first.path}")
                data = await resp.read()
        except aiohttp.ClientError as exc:
            raise Unreachable(f"origin fetch of {first.path} failed: {exc}") from exc
        if resp.status == 200:
            data = data[start:end + 1]
        if len(data) != end - start + 1:
            raise Unreachable(f"origin sent {len(data)} bytes of {first.path}, expected {end - start + 1}")
        job.bytes_from_origin += len(data)
        self.metrics.bytes_from_origin += len(data)
        view = memoryview(data)
        for span in run:
            piece = bytes(view[span.file_offset - start: span.file_offset - start + span.length])
            if len(piece) < span.size:
                piece += bytes(span.size - len(piece))  # the pad file's zeros
            self.engine.add_piece(job.digest, span.piece, piece)

    # ---- views -------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        return sum(j.manifest.total_size for j in self.jobs.values() if j.state == "ready")

    def metrics_text(self) -> str:
        m = self.metrics
        peers = sum(j.peers for j in self.jobs.values())
        ready = [j for j in self.jobs.values() if j.state == "ready"]
        lines = [
            "# HELP modelcast_node_bytes_from_peers_total Payload bytes received from peers.",
            "# TYPE modelcast_node_bytes_from_peers_total counter",
            f"modelcast_node_bytes_from_peers_total {m.bytes_from_peers}",
            "# HELP modelcast_node_bytes_from_origin_total Bytes fetched from the origin web seed.",
            "# TYPE modelcast_node_bytes_from_origin_total counter",
            f"modelcast_node_bytes_from_origin_total {m.bytes_from_origin}",
            "# HELP modelcast_node_pulls_total Pulls that ended, by result.",
            "# TYPE modelcast_node_pulls_total counter",
            *(f'modelcast_node_pulls_total{{result="{k}"}} {v}' for k, v in m.pulls.items()),
            "# HELP modelcast_node_pull_seconds_total Seconds spent in pulls that ended.",
            "# TYPE modelcast_node_pull_seconds_total counter",
            f"modelcast_node_pull_seconds_total {m.pull_seconds_sum:.3f}",
            "# HELP modelcast_node_cache_bytes Bytes of complete artifacts in the cache.",
            "# TYPE modelcast_node_cache_bytes gauge",
            f"modelcast_node_cache_bytes {sum(j.manifest.total_size for j in ready)}",
            "# HELP modelcast_node_cache_artifacts Complete artifacts in the cache.",
            "# TYPE modelcast_node_cache_artifacts gauge",
            f"modelcast_node_cache_artifacts {len(ready)}",
            "# HELP modelcast_node_verification_failures_total Artifacts that failed verification.",
            "# TYPE modelcast_node_verification_failures_total counter",
            f"modelcast_node_verification_failures_total {m.verify_failures}",
            "# HELP modelcast_node_verified_bytes_total Bytes re-hashed with xxh3 to verify artifacts.",
            "# TYPE modelcast_node_verified_bytes_total counter",
            f"modelcast_node_verified_bytes_total {m.verified_bytes}",
            "# HELP modelcast_node_peers_connected Peers connected across active downloads.",
            "# TYPE modelcast_node_peers_connected gauge",
            f"modelcast_node_peers_connected {peers}",
        ]
        return "\n".join(lines) + "\n"


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


async def handle_pull(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("pull body must be JSON: {\"ref\": \"name:tag\", \"wait\": true}") from None
    if not isinstance(body, dict) or not isinstance(body.get("ref"), str):
        raise BadRequest("pull body needs a string field \"ref\"")
    daemon = request.app[DAEMON]
    job = await daemon.pull(body["ref"])
    if body.get("wait", True) and job.task is not None and job.state not in ("ready", "failed"):
        await asyncio.shield(job.task)
    if job.state == "failed" and body.get("wait", True):
        raise job.error
    return web.json_response(job.to_json(), status=200 if job.state == "ready" else 202)


async def handle_pull_status(request: web.Request) -> web.Response:
    digest = "sha256:" + request.match_info["hex"]
    job = request.app[DAEMON].jobs.get(digest)
    if job is None:
        raise ArtifactNotFound(f"no pull of {digest} on this node")
    return web.json_response(job.to_json())


async def handle_list(request: web.Request) -> web.Response:
    jobs = request.app[DAEMON].jobs.values()
    return web.json_response({"artifacts": [j.to_json() for j in sorted(jobs, key=lambda j: j.started)]})


async def handle_health(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    return web.json_response({"ok": True, "zone": d.cfg.zone, "peer_listen": f"{d.cfg.peer_host}:{d.engine.listen_port}",
                              "cache": str(d.store.root), "registry": d.cfg.registry})


async def handle_metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[DAEMON].metrics_text(), content_type="text/plain")


def make_app(cfg: NodeConfig) -> web.Application:
    app = web.Application(middlewares=[errors_middleware])

    async def lifecycle(app: web.Application):
        daemon = NodeDaemon(cfg)
        await daemon.start()
        app[DAEMON] = daemon
        yield
        await daemon.stop()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/pull", handle_pull)
    app.router.add_get("/v1/pulls/sha256:{hex:[0-9a-f]{64}}", handle_pull_status)
    app.router.add_get("/v1/artifacts", handle_list)
    app.router.add_get("/v1/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    return app


def serve(cfg: NodeConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # No access log: clients poll pull status several times a second.
    web.run_app(make_app(cfg), host=cfg.api_host, port=cfg.api_port, print=None, shutdown_timeout=2,
                access_log=None)
