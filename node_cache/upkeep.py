"""Keeping the cache whole and within bounds: adopt, verify, repair, make room, evict.

* **Adopt** (start-up): a complete artifact whose files still have the size and mtime
  recorded when it was verified is seeded again without re-hashing; one that changed is
  verified in full.
* **Verify and repair**: a full xxh3 check; a corrupt artifact is renamed back to
  ``partial/`` and pulled again, and libtorrent fetches only the pieces that fail.
* **Room**: a pull that does not fit the quota evicts least recently used artifacts as
  :func:`node_cache.quota.plan_eviction` plans, or fails at once; one that does not fit the
  filesystem fails at once.  Eviction removes the pointer first (LAYOUT.md).
* **Unpacked layers**: a runtime artifact's unpacked tree (``layers/``) counts with its
  artifact: room is made for it before unpacking (the tar's size bounds it), its measured
  size is what counts afterwards, and it goes when its artifact is evicted, before the
  artifact's bytes.  While a layer is being activated its artifact is not evicted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.torrent import check_torrent
from modelcast.errors import ArtifactNotFound, IntegrityError, InvalidManifest, ModelcastError
from modelcast.units import human_bytes

from .jobs import PullJob, PullState
from .quota import Held, check_disk, plan_eviction, used_bytes
from .runtime import layer_path, remove_layer, scan_layers, unpack_layer, unpack_reserve, unpacked_bytes

if TYPE_CHECKING:
    from .daemon import NodeDaemon

log = logging.getLogger("modelcast.node")


class CacheUpkeep:
    """Works on one daemon's jobs, store and engine."""

    def __init__(self, daemon: NodeDaemon):
        self.node = daemon
        self._space_lock = asyncio.Lock()  # one pull makes room at a time
        self.layers: dict[str, int] = {}  # digest -> bytes of its unpacked runtime layer (complete ones)
        self.unpacking: dict[str, int] = {}  # digest -> room promised to a layer being unpacked
        self.activating: set[str] = set()  # artifacts whose layer is being unpacked: not evicted

    async def adopt_complete(self, digest: str) -> None:
        """Seed an artifact found complete at start-up after a cheap check (sizes, mtimes).

        A file whose size or mtime changed since it was verified gets a full xxh3 check
        and, if it fails, a repair from the swarm; nothing is re-hashed otherwise.
        """
        node, store = self.node, self.node.store
        try:
            manifest, torrent = await asyncio.to_thread(store.load_meta, digest)
            ti = check_torrent(torrent, manifest)
        except (OSError, ModelcastError) as exc:
            log.warning("cached artifact %s has no usable meta (%s); removing it", digest, exc)
            await asyncio.to_thread(store.evict, digest)
            return
        path = store.artifact_path(digest)
        node.jobs[digest] = PullJob(digest, manifest, state=PullState.READY, path=str(path), finished=time.time())
        if await asyncio.to_thread(store.stamps_match, digest, manifest):
            node.engine.add(digest, ti, manifest, str(path), trackers=node.trackers(), seed=True)
            return
        log.warning("%s (%s) changed on disk since it was verified; checking every file", manifest.name, digest)
        await self.verify(digest)

    # ---- verification and repair ------------------------------------------------------
    async def verify(self, digest: str) -> dict:
        """Re-hash every file of a complete artifact; repair it from the swarm if any differs."""
        node, store = self.node, self.node.store
        job = node.jobs.get(digest)
        if job is None or (job.state is not PullState.READY
                           and not await asyncio.to_thread(store.is_complete, digest)):
            raise ArtifactNotFound(f"{digest} is not complete on this node")
        if job.busy:
            return {"digest": digest, "ok": None, "state": job.state.value, "repairing": job.repairing}
        path = store.artifact_path(digest)
        try:
            await asyncio.to_thread(store.verify_tree, path, job.manifest, full=True)
            node.counters.verified_bytes += job.manifest.total_size
        except (IntegrityError, InvalidManifest, OSError) as exc:
            node.counters.verify_failures += 1
            await self.repair(job, str(exc))
            return {"digest": digest, "ok": False, "problem": str(exc), "repairing": True}
        try:
            await asyncio.to_thread(store.stamp, digest, job.manifest)
        except OSError as exc:  # e.g. a full disk: the artifact is fine, only the stamp is stale
            log.warning("could not record file stamps of %s: %s", digest, exc)
        if not node.engine.has(digest):
            _, torrent = await asyncio.to_thread(store.load_meta, digest)
            # Every file was just hashed against the manifest: no piece is hashed again as peers ask.
            node.engine.add(digest, check_torrent(torrent, job.manifest), job.manifest, str(path),
                            trackers=node.trackers(), seed=True, verified=True)
        return {"digest": digest, "ok": True}

    async def repair(self, job: PullJob, problem: str) -> None:
        """Take a corrupt artifact out of service and fetch only its bad pieces again."""
        node = self.node
        node.counters.repairs += 1
        log.error("%s (%s) failed verification: %s; repairing it from the swarm", job.manifest.name, job.digest,
                  problem)
        await node.remove_torrent(job.digest)
        # Its Hugging Face layouts go first (records kept): no link points at a file under repair.
        await asyncio.to_thread(node.hf.suspend, job.digest)
        await asyncio.to_thread(node.store.demote, job.digest)
        await node.drop_resume(job.digest)
        node.start_job(PullJob(job.digest, job.manifest, repairing=True))

    # ---- room: quota and disk ---------------------------------------------------------
    def held(self) -> list[Held]:
        pins = self.node.pins
        return [Held(d, j.manifest.total_size, ready=j.state is PullState.READY,
                     busy=j.busy or d in self.activating, pinned=pins.pinned(d),
                     last_used=pins.last_used.get(d, 0.0), unpacked=self.unpacked_of(d))
                for d, j in self.node.jobs.items()]

    def used_bytes(self) -> int:
        """Bytes held or promised: complete artifacts plus downloads under way, and unpacked layers."""
        return used_bytes(self.held())

    def unpacked_of(self, digest: str) -> int:
        return self.layers.get(digest, 0) + self.unpacking.get(digest, 0)

    def unpacked_total(self) -> int:
        return sum(self.layers.values()) + sum(self.unpacking.values())

    # ---- unpacked runtime layers ------------------------------------------------------
    async def adopt_layers(self) -> None:
        """Start-up: count the unpacked layers of artifacts this node holds; remove the others.

        A staging folder a crash left behind is removed (it was never complete); a layer whose
        artifact is gone (deleted behind the node's back) is removed too: nothing on disk is
        outside the quota.
        """
        root = self.node.store.root
        for digest, size in (await asyncio.to_thread(scan_layers, root)).items():
            if digest in self.node.jobs:
                self.layers[digest] = size
            else:
                log.warning("removing the unpacked layer of %s: its artifact is not in the cache", digest)
                await asyncio.to_thread(remove_layer, root, self.node.store.trash_dir, digest)

    async def unpack_layer(self, job: PullJob) -> Path:
        """Unpack a ready runtime artifact's layer once, within the quota; returns its folder.

        Room for the tar's size (an upper bound) is made first, evicting least recently used
        artifacts as for a pull; the artifact itself is not evicted meanwhile.  Once unpacked,
        the measured size replaces the promise.
        """
        node, digest = self.node, job.digest
        root = node.store.root
        dest = layer_path(root, digest)
        if digest in self.layers and await asyncio.to_thread(dest.is_dir):
            node.pins.touch(digest)
            return dest
        self.activating.add(digest)
        try:
            async with self._space_lock:
                if node.jobs.get(digest) is not job or job.state is not PullState.READY:
                    raise ArtifactNotFound(f"{job.manifest.name} ({digest}) was evicted before its layer could be "
                                           "unpacked; activate it again")
                reserve = await asyncio.to_thread(unpack_reserve, Path(job.path))
                plan = plan_eviction(self.held(), name=f"the unpacked layer of {job.manifest.name}", digest=None,
                                     size=reserve, quota=node.cfg.quota)
                for other in plan.digests:
                    await self._evict(other, for_quota=True)
                self.unpacking[digest] = reserve
            try:
                path = await asyncio.to_thread(unpack_layer, Path(job.path), root, digest)
                self.layers[digest] = await asyncio.to_thread(unpacked_bytes, path)
            finally:
                self.unpacking.pop(digest, None)
        finally:
            self.activating.discard(digest)
        node.pins.touch(digest)
        log.info("unpacked the layer of %s (%s): %s", job.manifest.name, digest, human_bytes(self.layers[digest]))
        return path

    async def make_room(self, job: PullJob) -> None:
        """Fit ``job`` in the quota, evicting LRU artifacts if needed, or fail at once with the sizes."""
        store, size = self.node.store, job.manifest.total_size
        async with self._space_lock:
            plan = plan_eviction(self.held(), name=job.manifest.name, digest=job.digest, size=size,
                                 quota=self.node.cfg.quota)
            for digest in plan.digests:
                await self._evict(digest, for_quota=True)
            on_disk = await asyncio.to_thread(store.partial_bytes, job.digest, job.manifest)
            free = await asyncio.to_thread(store.disk_free)
            check_disk(name=job.manifest.name, size=size, on_disk=on_disk, free=free, root=store.root)

    async def evict_now(self, digest: str) -> None:
        """Delete a complete artifact on request (``DELETE /v1/artifacts/…``), between two pulls' room-making."""
        async with self._space_lock:
            job = self.node.jobs.get(digest)
            if job is None or job.state is not PullState.READY:
                raise ArtifactNotFound(f"{digest} is not complete on this node")
            await self._evict(digest, for_quota=False)

    async def _evict(self, digest: str, *, for_quota: bool) -> None:
        """Delete a complete artifact: pointers first (its job, its Hugging Face layouts), then the bytes."""
        node = self.node
        job = node.jobs.pop(digest)
        await asyncio.to_thread(node.hf.drop, digest)
        await node.remove_torrent(digest)
        # Its unpacked layer goes with it, before the artifact's bytes (a crash between the two
        # leaves an artifact without its tree, which the next activation unpacks again).
        unpacked = self.layers.pop(digest, 0)
        await asyncio.to_thread(remove_layer, node.store.root, node.store.trash_dir, digest)
        await asyncio.to_thread(node.store.evict, digest)
        node.pins.forget(digest)
        freed = job.manifest.total_size + unpacked
        if for_quota:  # the counters are the quota's (modelcast_node_evictions_total)
            node.counters.evictions += 1
            node.counters.evicted_bytes += freed
        log.info("evicted %s (%s, %s%s) %s", job.manifest.name, digest, human_bytes(job.manifest.total_size),
                 f" and its unpacked layer, {human_bytes(unpacked)}" if unpacked else "",
                 "to make room" if for_quota else "on request")
