"""``modelcast publish``: scan, hash, make the torrent, upload to the origin, register."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from modelcast.config import PublishConfig
from modelcast.manifest import FileEntry, Manifest, choose_piece_length
from modelcast.origin import Origin, open_origin
from modelcast.progress import ProgressBar
from modelcast.reference import Reference
from tracker.client import RegistryClient

from .hashing import hash_files
from .scan import ScannedFile, scan
from .torrent import make_torrent, torrent_name_for


@dataclass(frozen=True)
class PublishResult:
    """What a publish did, with its timings."""

    digest: str
    manifest: Manifest
    uploaded_bytes: int
    skipped_bytes: int
    created: bool
    seconds: float
    hash_s: float
    upload_s: float


def upload_blobs(origin: Origin, files: list[ScannedFile], manifest: Manifest, workers: int,
                 progress=None) -> tuple[int, int]:
    """Upload every distinct blob the origin lacks, in parallel; returns (uploaded, skipped) bytes."""
    by_key: dict[str, ScannedFile] = {}
    sources = {f.path: f for f in files}
    for entry in manifest.files:
        by_key.setdefault(entry.xxh3_128, sources[entry.path])

    def one(item: tuple[str, ScannedFile]) -> tuple[int, int]:
        key, f = item
        if origin.has_blob(key, f.size):
            if progress:
                progress(f.size)
            return 0, f.size
        origin.put_blob(key, f.source, f.size, progress)
        return f.size, 0

    order = sorted(by_key.items(), key=lambda kv: -kv[1].size)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one, order))
    return sum(r[0] for r in results), sum(r[1] for r in results)


async def publish(path: Path, ref: Reference, cfg: PublishConfig, *, kind: str = "model",
                  annotations: dict[str, str] | None = None, progress: bool = False) -> PublishResult:
    """Publish ``path`` as ``ref`` (NAME:TAG) and return its digest and what was uploaded."""
    t0 = time.monotonic()
    label = f"{ref.name}:{ref.tag}"
    async with RegistryClient(cfg.registry, cfg.token) as registry:
        # Fail on a wrong token or a dead registry before hashing gigabytes.
        await registry.check_write_access(f"publish {label}")
        files = await asyncio.to_thread(scan, path)
        total = sum(f.size for f in files)
        piece_length = choose_piece_length(total)
        torrent_name = torrent_name_for(ref.name)

        # xxh3 (for nodes) and the piece hashes (for the wire) read the same bytes; run
        # them together so the second pass mostly hits the page cache.
        bar = ProgressBar(f"hash {label}", 2 * total, enabled=progress)
        xxh, (torrent, info_hash) = await asyncio.gather(
            asyncio.to_thread(hash_files, files, cfg.hash_workers, bar.advance),
            asyncio.to_thread(make_torrent, files, torrent_name, piece_length, registry.announce_url(),
                              bar.advance),
        )
        bar.update(2 * total)
        bar.close()
        hash_s = time.monotonic() - t0

        manifest = Manifest(
            kind=kind, name=ref.name, piece_length=piece_length, info_hash=info_hash, torrent_name=torrent_name,
            files=tuple(FileEntry(f.path, f.size, xxh[f.path]) for f in files),
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), annotations=annotations or {},
        )
        existing = await registry.find_by_content(manifest.content_key)
        if existing is not None:
            # Same content as an earlier publish: reuse its manifest so the digest is the same.
            manifest = Manifest.from_bytes(await registry.manifest_bytes(existing["digest"]),
                                           expected_digest=existing["digest"])

        t1 = time.monotonic()
        origin = await asyncio.to_thread(open_origin, cfg.origin, cfg.s3_endpoint)
        bar = ProgressBar(f"upload {label}", total, enabled=progress)
        uploaded, skipped = await asyncio.to_thread(upload_blobs, origin, files, manifest, cfg.upload_workers,
                                                    bar.advance)
        bar.close()
        hexd = manifest.digest.split(":", 1)[1]
        await asyncio.to_thread(origin.put_document, f"manifests/sha256/{hexd}.json", manifest.canonical_bytes())
        await asyncio.to_thread(origin.put_document, f"torrents/sha256/{hexd}.torrent", torrent)
        upload_s = time.monotonic() - t1

        answer = await registry.publish(manifest, torrent, origin.url, cfg.s3_endpoint, ref.tag)
    return PublishResult(digest=answer["digest"], manifest=manifest, uploaded_bytes=uploaded, skipped_bytes=skipped,
                         created=bool(answer.get("created")), seconds=time.monotonic() - t0, hash_s=hash_s,
                         upload_s=upload_s)


def publish_sync(path: Path, ref: Reference, cfg: PublishConfig, **kwargs) -> PublishResult:
    """Blocking wrapper of :func:`publish` for the CLI and scripts."""
    return asyncio.run(publish(path, ref, cfg, **kwargs))
