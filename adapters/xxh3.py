"""xxh3-128 of a file, the one hasher for publish and the node's verification.

python-xxhash releases the GIL while it hashes, so callers run it in parallel threads
(never on the event loop).  The file is hashed where it lies, through a read-only
mapping of its pages: xxh3 itself costs ~0.02 CPU-s per GiB, and copying the bytes
into a buffer of our own first cost five times that.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Callable

import xxhash

CHUNK = 8 << 20


def xxh3_file(path: Path, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Return (xxh3-128 hex digest, bytes hashed) of the file at ``path``, 8 MiB at a time.

    ``progress`` receives the bytes of each chunk.  OSError goes to the caller, which
    knows what the file was for.  A file truncated while it is hashed ends the process
    with SIGBUS (the price of reading through a mapping); a rewrite of the same size is
    the caller's to catch (publish compares sizes and mtimes afterwards).
    """
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        mapped = None
        if size:
            try:
                mapped = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
            except (OSError, ValueError):
                mapped = None  # not mappable (a special file): read it instead
        if mapped is None:
            return _xxh3_read(f, h, progress)
        try:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            with memoryview(mapped) as view:
                for off in range(0, size, CHUNK):
                    chunk = view[off:off + CHUNK]
                    h.update(chunk)
                    chunk.release()
                    if progress:
                        progress(min(CHUNK, size - off))
        finally:
            try:
                mapped.close()
            except BufferError:
                pass  # a failure's traceback still holds a view: unmapped once it is freed
    return h.hexdigest(), size


def _xxh3_read(f, h, progress: Callable[[int], None] | None) -> tuple[str, int]:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    while n := f.readinto(buf):
        h.update(view[:n])
        done += n
        if progress:
            progress(n)
    return h.hexdigest(), done
