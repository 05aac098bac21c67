"""xxh3-128 of many files in parallel threads (never on the event loop)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import xxhash

from .scan import ScannedFile

CHUNK = 8 << 20


def xxh3_file(path, progress: Callable[[int], None] | None = None) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress:
                progress(n)
    return h.hexdigest()


def hash_files(files: list[ScannedFile], workers: int, progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """Return ``{path: xxh3_128 hex}``; the largest files start first so threads finish together."""
    order = sorted(files, key=lambda f: -f.size)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = list(pool.map(lambda f: xxh3_file(f.source, progress), order))
    return {f.path: d for f, d in zip(order, digests)}
