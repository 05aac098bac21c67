"""Scan a model directory into the list of files an artifact will hold."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from modelcast.errors import BadRequest, ModelcastError, UnsafePath
from modelcast.manifest import validate_path


@dataclass(frozen=True)
class ScannedFile:
    """A regular file to publish: its path inside the artifact and where it is on disk.

    ``size`` and ``mtime_ns`` are what the scan saw; :func:`check_unchanged` compares
    them again after hashing and upload, so a file rewritten meanwhile is caught.
    """

    path: str
    source: Path
    size: int
    mtime_ns: int = 0


def _checked_rel(rel: str) -> str:
    validate_path(rel)
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        # A manifest is UTF-8 JSON; a name that is not UTF-8 on disk cannot be written into it.
        raise UnsafePath(f"file name {rel!r} is not valid UTF-8; rename it before publishing") from None
    return rel


def _scanned(rel: str, path: Path) -> ScannedFile:
    st = path.stat()
    return ScannedFile(_checked_rel(rel), path, st.st_size, st.st_mtime_ns)


def scan(root: Path, link_root: Path | None = None) -> list[ScannedFile]:
    """Return the artifact's files sorted by path.

    ``root`` may be a directory (every regular file below it) or one regular file.
    Links are followed only while they stay inside ``link_root`` (default: ``root``; for a
    Hugging Face snapshot, its repo folder, whose ``blobs/`` the snapshot's links point
    into) and never in a loop; a link that leaves it, a dangling link, or a
    device/socket/fifo is refused with UnsafePath, because publishing it would copy bytes
    the user did not mean to share.  The artifact holds the files links point to, never
    links (DESIGN.md, Paths).
    """
    root = Path(root)
    try:
        return _scan(root, link_root)
    except OSError as exc:
        raise ModelcastError(f"cannot scan {exc.filename or root}: {exc.strerror or exc}") from exc


def _scan(root: Path, link_root: Path | None) -> list[ScannedFile]:
    if not root.exists():
        raise BadRequest(f"{root} does not exist; give the directory (or file) to publish")
    real_root = root.resolve()
    fence = Path(link_root).resolve() if link_root is not None else real_root
    mode = real_root.stat().st_mode
    if stat.S_ISREG(mode):
        # The name the user gave, not the target of a link they gave.
        return [_scanned(root.absolute().name, real_root)]
    if not stat.S_ISDIR(mode):
        raise UnsafePath(f"{root} is not a regular file or directory")
    files: list[ScannedFile] = []

    def walk(directory: Path, rel: str, ancestors: frozenset) -> None:
        st = directory.stat()
        here = (st.st_dev, st.st_ino)
        if here in ancestors:
            # A link to a directory above itself would make the walk endless.
            raise UnsafePath(f"{rel} is a link loop inside {root}")
        ancestors = ancestors | {here}
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            path = Path(entry.path)
            if entry.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (FileNotFoundError, RuntimeError) as exc:
                    hint = (" (an incomplete Hugging Face download? run snapshot_download again)"
                            if link_root is not None else "")
                    raise UnsafePath(f"{entry_rel} is a dangling or looping link{hint}") from exc
                if target != fence and fence not in target.parents:
                    raise UnsafePath(f"{entry_rel} is a link to {target}, outside {fence}; "
                                     "copy the file in or publish its own directory")
            mode = path.stat().st_mode
            if stat.S_ISDIR(mode):
                walk(path, entry_rel, ancestors)
            elif stat.S_ISREG(mode):
                files.append(_scanned(entry_rel, path))
            else:
                raise UnsafePath(f"{entry_rel} in {root} is not a regular file or directory "
                                 "(fifo, socket or device); remove it before publishing")

    walk(real_root, "", frozenset())
    if not files:
        raise BadRequest(f"{root} holds no files to publish")
    return sorted(files, key=lambda f: f.path)


def check_unchanged(files: list[ScannedFile]) -> None:
    """Raise if a file's size or modification time differs from what the scan saw.

    The xxh3, the piece hashes and the upload each read the file; a writer in between
    would make them disagree, and nodes would then reject the artifact.
    """
    for f in files:
        try:
            st = f.source.stat()
        except OSError as exc:
            raise ModelcastError(f"{f.path} vanished while it was being published: {exc.strerror}") from exc
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            raise ModelcastError(f"{f.path} changed while it was being published "
                                 f"(size {f.size} -> {st.st_size}); publish again once it is stable")
