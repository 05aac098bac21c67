"""xxh3-128 of many files in parallel threads (never on the event loop); see adapters/xxh3.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from adapters.xxh3 import xxh3_file
from modelcast.errors import ModelcastError

from .scan import ScannedFile


def checked_xxh3(path: Path, progress: Callable[[int], None] | None = None, expected_size: int | None = None) -> str:
    """Return the xxh3-128 hex digest of the file at ``path``.

    With ``expected_size``, a file that turns out shorter or longer (rewritten since it was
    scanned) is an error rather than a wrong hash in the manifest.
    """
    try:
        digest, done = xxh3_file(path, progress)
    except OSError as exc:
        raise ModelcastError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if expected_size is not None and done != expected_size:
        raise ModelcastError(f"{path} is {done} bytes now but was {expected_size} when scanned; "
                             "publish again once it is stable")
    return digest


def hash_files(files: list[ScannedFile], workers: int, progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """Return ``{path: xxh3_128 hex}``; the largest files start first so threads finish together."""
    order = sorted(files, key=lambda f: -f.size)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="xxh3") as pool:
        digests = list(pool.map(lambda f: checked_xxh3(f.source, progress, f.size), order))
    return {f.path: d for f, d in zip(order, digests)}
