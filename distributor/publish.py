"""``modelcast publish``: scan, hash, make the torrent, upload to the origin, register.

The work is a small pipeline.  Three things read the artifact's bytes: xxh3 (for the
manifest), the piece hashes (for the torrent) and the upload (to the origin).  The
piece hashes run in a worker process per core over the whole artifact
(:mod:`adapters.piece_hash`); xxh3 reads the files in the same order just ahead of them
(on a cold page cache, their read-ahead), and each file's upload starts as soon as its
xxh3 is known, since the blob's name is that hash.  The manifest is
built once both hashes are done; nothing reaches the registry until every blob is
stored, so a registered artifact is always complete at the origin.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from modelcast.config import PublishConfig
from modelcast.errors import InvalidReference, ModelcastError
from modelcast.manifest import FileEntry, Manifest, choose_piece_length
from adapters.origin import Origin, open_origin
from adapters.terminal import ProgressBar
from modelcast.reference import Reference
from tracker.client import RegistryClient

from .hashing import checked_xxh3
from .scan import ScannedFile, check_unchanged, scan
from .torrent import make_torrent, torrent_name_for


@dataclass(frozen=True)
class PublishResult:
    """What a publish did, with its timings.

    The phases overlap (see the module docstring), so ``hash_s + torrent_s + upload_s``
    exceeds ``seconds``; each is the wall time from the start of the pipeline (or, for
    the upload, of its first file) to the end of that phase.
    """

    digest: str
    manifest: Manifest
    uploaded_bytes: int
    skipped_bytes: int
    created: bool
    seconds: float
    hash_s: float
    torrent_s: float
    upload_s: float


@dataclass(frozen=True)
class StoredBlobs:
    """What :func:`hash_and_store` did: each file's xxh3 and the bytes it moved or skipped."""

    xxh3: dict[str, str]
    uploaded_bytes: int
    skipped_bytes: int
    hash_s: float
    upload_s: float


class PhaseProgress:
    """One progress line for the publish phases that run at the same time.

    Two bars redrawn with ``\\r`` from different threads would overwrite each other, so
    the phases share one bar whose note shows each phase's share.
    """

    PHASES = ("xxh3", "pieces", "upload")

    def __init__(self, label: str, total: int, enabled: bool):
        self.total = total
        self._bar = ProgressBar(label, total * len(self.PHASES), enabled=enabled)
        self._done = dict.fromkeys(self.PHASES, 0)
        self._lock = threading.Lock()

    def callback(self, phase: str) -> Callable[[int], None] | None:
        """A ``progress(nbytes)`` callback counting toward ``phase``; None with no bar to draw.

        None rather than a callback that counts for nothing: the hashing then calls nothing
        per piece (three locks and a formatted note each, a thousand times per GiB).
        """
        if not self._bar.enabled:
            return None

        def advance(n: int) -> None:
            with self._lock:
                self._done[phase] += n
                done = sum(self._done.values())
                note = " ".join(f"{p} {min(100, 100 * d // max(1, self.total))}%" for p, d in self._done.items())
            self._bar.update(done, note)

        return advance

    def close(self) -> None:
        """Draw the final state and end the line."""
        self._bar.close()


def hash_and_store(files: list[ScannedFile], origin: Origin, hash_workers: int, upload_workers: int, *,
                   on_hashed: Callable[[int], None] | None = None,
                   on_uploaded: Callable[[int], None] | None = None,
                   stop: threading.Event | None = None) -> StoredBlobs:
    """Hash every file with xxh3 and store each distinct content at the origin as it is known.

    A blob the origin already holds (same xxh3 and size) is not sent again; files with
    the same content inside the artifact are sent once.  Blocking: call it from a thread.
    ``stop`` (set when another phase failed) keeps queued uploads from starting.
    """
    t0 = time.monotonic()
    xxh: dict[str, str] = {}
    first_upload: list[float] = []
    uploaded = skipped = 0
    lock = threading.Lock()

    def store(key: str, f: ScannedFile) -> tuple[int, int]:
        if stop is not None and stop.is_set():
            raise ModelcastError("upload stopped because another publish step failed")
        with lock:
            if not first_upload:
                first_upload.append(time.monotonic())
        if origin.has_blob(key, f.size):
            if on_uploaded:
                on_uploaded(f.size)
            return 0, f.size
        origin.put_blob(key, f.source, f.size, on_uploaded)
        return f.size, 0

    # Largest first (then by path): the order the piece hashing reads them in (see
    # PublishConfig.hash_workers), and with more threads they finish together.
    order = sorted(files, key=lambda f: (-f.size, str(f.source)))
    with ThreadPoolExecutor(max(1, hash_workers), thread_name_prefix="xxh3") as hash_pool, \
            ThreadPoolExecutor(max(1, upload_workers), thread_name_prefix="upload") as upload_pool:
        try:
            hashing = {hash_pool.submit(checked_xxh3, f.source, on_hashed, f.size): f for f in order}
            uploads = []
            seen: set[str] = set()
            for fut in as_completed(hashing):
                f = hashing[fut]
                key = xxh[f.path] = fut.result()
                if key in seen:
                    skipped += f.size
                    if on_uploaded:
                        on_uploaded(f.size)
                    continue
                seen.add(key)
                uploads.append(upload_pool.submit(store, key, f))
            hash_s = time.monotonic() - t0
            for fut in as_completed(uploads):
                up, skip = fut.result()
                uploaded += up
                skipped += skip
        except BaseException:
            # Queued work is dropped; running reads and uploads finish (they cannot be interrupted).
            hash_pool.shutdown(wait=False, cancel_futures=True)
            upload_pool.shutdown(wait=False, cancel_futures=True)
            raise
    upload_s = time.monotonic() - (first_upload[0] if first_upload else time.monotonic())
    return StoredBlobs(xxh, uploaded, skipped, hash_s, upload_s)


async def publish(path: Path, ref: Reference, cfg: PublishConfig, *, kind: str = "model",
                  annotations: dict[str, str] | None = None, progress: bool = False,
                  link_root: Path | None = None) -> PublishResult:
    """Publish the directory (or single file) ``path`` as ``ref`` (NAME:TAG).

    Links inside ``path`` are read as the files they point to while they stay inside
    ``link_root`` (default ``path``; a Hugging Face snapshot's repo folder, see
    :mod:`distributor.hf_snapshot`).

    Identical content gives the digest of its first publish and uploads nothing.
    Errors are :class:`modelcast.errors.ModelcastError` subclasses naming what failed.
    """
    if ref.name is None or ref.tag is None:
        raise InvalidReference(f"publish needs NAME:TAG, got {ref}")
    t0 = time.monotonic()
    label = f"{ref.name}:{ref.tag}"
    async with RegistryClient(cfg.registry, cfg.token, ca=cfg.ca) as registry:
        # Fail on a wrong token, a dead registry or a bad origin URL before reading gigabytes.
        await registry.check_write_access(f"publish {label}")
        origin = await asyncio.to_thread(open_origin, cfg.origin, cfg.s3_endpoint)
        files = await asyncio.to_thread(scan, path, link_root)
        total = sum(f.size for f in files)
        piece_length = choose_piece_length(total)
        torrent_name = torrent_name_for(ref.name)

        bar = PhaseProgress(f"publish {label}", total, enabled=progress)
        stop = threading.Event()
        try:
            (torrent, info_hash, torrent_s), blobs = await asyncio.gather(
                asyncio.to_thread(make_torrent, files, torrent_name, piece_length, registry.announce_url(),
                                  bar.callback("pieces"), stop, cfg.torrent_format == "v1"),
                asyncio.to_thread(hash_and_store, files, origin, cfg.hash_workers, cfg.upload_workers,
                                  on_hashed=bar.callback("xxh3"), on_uploaded=bar.callback("upload"), stop=stop),
            )
        except BaseException:
            stop.set()
            raise
        finally:
            bar.close()
        await asyncio.to_thread(check_unchanged, files)

        manifest = Manifest(
            kind=kind, name=ref.name, piece_length=piece_length, info_hash=info_hash, torrent_name=torrent_name,
            files=tuple(FileEntry(f.path, f.size, blobs.xxh3[f.path]) for f in files),
            annotations=dict(annotations or {}),  # no publish time inside: same files, same digest anywhere
        )
        existing = await registry.find_by_content(manifest.content_key)
        if existing is not None:
            # Same content as an earlier publish: reuse its manifest, so that one written
            # with a creation time inside (before digests were clock-free) keeps its digest.
            manifest = Manifest.from_bytes(await registry.manifest_bytes(existing["digest"]),
                                           expected_digest=existing["digest"])

        t1 = time.monotonic()
        hexd = manifest.digest.split(":", 1)[1]
        # Both at once: each waits for its fsyncs (file and directory), the last step before registering.
        await asyncio.gather(
            asyncio.to_thread(origin.put_document, f"manifests/sha256/{hexd}.json", manifest.canonical_bytes()),
            asyncio.to_thread(origin.put_document, f"torrents/sha256/{hexd}.torrent", torrent))
        docs_s = time.monotonic() - t1

        answer = await registry.publish(manifest, torrent, origin.url, cfg.s3_endpoint, ref.tag)
    if answer.get("digest") != manifest.digest:
        raise ModelcastError(f"publish {label}: the registry recorded {answer.get('digest')} "
                             f"but the manifest hashes to {manifest.digest}")
    return PublishResult(digest=manifest.digest, manifest=manifest, uploaded_bytes=blobs.uploaded_bytes,
                         skipped_bytes=blobs.skipped_bytes, created=bool(answer.get("created")),
                         seconds=time.monotonic() - t0, hash_s=blobs.hash_s, torrent_s=torrent_s,
                         upload_s=blobs.upload_s + docs_s)


def publish_sync(path: Path, ref: Reference, cfg: PublishConfig, **kwargs) -> PublishResult:
    """Blocking wrapper of :func:`publish` for the CLI and scripts (same arguments)."""
    return asyncio.run(publish(path, ref, cfg, **kwargs))
