"""xxh3-128 of a file, the one hasher for publish and the node's verification.

python-xxhash releases the GIL while it hashes, so callers run it in parallel threads
(never on the event loop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import xxhash

CHUNK = 8 << 20


def xxh3_file(path: Path, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Return (xxh3-128 hex digest, bytes read) of the file at ``path``, 8 MiB at a time.

    ``progress`` receives the bytes of each chunk.  OSError goes to the caller, which
    knows what the file was for.
    """
    h = xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            done += n
            if progress:
                progress(n)
    return h.hexdigest(), done
