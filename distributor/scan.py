"""Scan a model directory into the list of files an artifact will hold."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from modelcast.errors import BadRequest, UnsafePath
from modelcast.manifest import validate_path


@dataclass(frozen=True)
class ScannedFile:
    """A regular file to publish: its path inside the artifact and where it is on disk."""

    path: str
    source: Path
    size: int


def scan(root: Path) -> list[ScannedFile]:
    """Return the artifact's files sorted by path.

    Links are followed only while they stay inside ``root`` (and never in a loop); a link
    that leaves it, a dangling link, or a device/socket/fifo is refused with UnsafePath,
    because publishing it would copy bytes the user did not mean to share.
    """
    root = Path(root)
    if not root.exists():
        raise BadRequest(f"{root} does not exist")
    real_root = root.resolve()
    if real_root.is_file():
        validate_path(real_root.name)
        return [ScannedFile(real_root.name, real_root, real_root.stat().st_size)]
    files: list[ScannedFile] = []

    def walk(directory: Path, rel: str, ancestors: frozenset = frozenset()) -> None:
        st = directory.stat()
        here = (st.st_dev, st.st_ino)
        if here in ancestors:
            raise UnsafePath(f"{rel} is a link loop inside {root}")
        ancestors = ancestors | {here}
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            path = Path(entry.path)
            if entry.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (FileNotFoundError, RuntimeError) as exc:
                    raise UnsafePath(f"{entry_rel} is a dangling or looping link") from exc
                if target != real_root and real_root not in target.parents:
                    raise UnsafePath(f"{entry_rel} is a link to {target}, outside the artifact {root}")
            mode = path.stat().st_mode
            if stat.S_ISDIR(mode):
                walk(path, entry_rel, ancestors)
            elif stat.S_ISREG(mode):
                validate_path(entry_rel)
                files.append(ScannedFile(entry_rel, path, path.stat().st_size))
            else:
                raise UnsafePath(f"{entry_rel} is not a regular file or directory")

    walk(real_root, "")
    if not files:
        raise BadRequest(f"{root} holds no files to publish")
    return sorted(files, key=lambda f: f.path)
