"""xxh3-128 of many files in parallel threads (never on the event loop).

python-xxhash releases the GIL while it hashes, so threads do run in parallel.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import xxhash

from modelcast.errors import ModelcastError

from .scan import ScannedFile

CHUNK = 8 << 20


def xxh3_file(path: Path, progress: Callable[[int], None] | None = None, expected_size: int | None = None) -> str:
    """Return the xxh3-128 hex digest of the file at ``path``, reading 8 MiB at a time.

    With ``expected_size``, a file that turns out shorter or longer (rewritten since it was
    scanned) is an error rather than a wrong hash in the manifest.
    """
    h = xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                done += n
                if progress:
                    progress(n)
    except OSError as exc:
        raise ModelcastError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if expected_size is not None and done != expected_size:
        raise ModelcastError(f"{path} is {done} bytes now but was {expected_size} when scanned; "
                             "publish again once it is stable")
    return h.hexdigest()


def hash_files(files: list[ScannedFile], workers: int, progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """Return ``{path: xxh3_128 hex}``; the largest files start first so threads finish together."""
    order = sorted(files, key=lambda f: -f.size)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="xxh3") as pool:
        digests = list(pool.map(lambda f: xxh3_file(f.source, progress, f.size), order))
    return {f.path: d for f, d in zip(order, digests)}
