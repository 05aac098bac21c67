"""The node's on-disk cache: layout, verification and atomic promotion.  See LAYOUT.md."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from adapters.xxh3 import xxh3_file
from modelcast.errors import IntegrityError, UnsafePath
from modelcast.manifest import Manifest

CLEAN_STOP_MARKER = "clean_stop"


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


@dataclass(frozen=True)
class CachedArtifact:
    digest: str
    manifest: Manifest
    path: Path


class Store:
    """Paths and atomic operations on one cache directory."""

    def __init__(self, root: Path, verify_workers: int = 4):
        self.root = Path(root).resolve()
        self.verify_workers = verify_workers
        self._state_lock = threading.Lock()
        for d in (self.artifacts_dir, self.meta_dir, self.partial_dir, self.tmp_dir, self.state_dir,
                  self.resume_dir, self.trash_dir):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts" / "sha256"

    @property
    def meta_dir(self) -> Path:
        return self.root / "meta" / "sha256"

    @property
    def partial_dir(self) -> Path:
        return self.root / "partial" / "sha256"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def resume_dir(self) -> Path:
        return self.root / "resume" / "sha256"

    @property
    def trash_dir(self) -> Path:
        return self.root / "trash"

    def resume_path(self, digest: str) -> Path:
        return self.resume_dir / _hex(digest)

    def save_resume(self, digest: str, data: bytes) -> None:
        self._write_atomic(self.resume_path(digest), data, sync=False)

    def load_resume(self, digest: str) -> bytes | None:
        try:
            return self.resume_path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def drop_resume(self, digest: str) -> None:
        self.resume_path(digest).unlink(missing_ok=True)

    # ---- pins and last use: small JSON documents under state/ ---------------------
    def _read_json(self, name: str, default):
        try:
            return json.loads((self.state_dir / name).read_text())
        except FileNotFoundError:
            return default
        except ValueError:
            # A torn write is impossible (temp + rename), but a hand edit is not.
            return default

    def load_pins(self) -> dict[str, list[str]]:
        """``{digest: [holder, ...]}``: an artifact with any holder is never evicted."""
        return {k: list(v) for k, v in self._read_json("pins.json", {}).items() if v}

    def save_pins(self, pins: dict[str, list[str]]) -> None:
        with self._state_lock:
            self._write_atomic(self.state_dir / "pins.json", json.dumps(pins, sort_keys=True).encode())

    def load_state(self, name: str, default=None):
        """A JSON document under ``state/`` (``default`` if missing or hand-broken)."""
        return self._read_json(name, default)

    def save_state(self, name: str, obj) -> None:
        """Write a JSON document under ``state/`` atomically (temp, fsync, rename)."""
        with self._state_lock:
            self._write_atomic(self.state_dir / name, json.dumps(obj, sort_keys=True).encode())

    def load_last_used(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._read_json("last_used.json", {}).items()}

    def save_last_used(self, last_used: dict[str, float]) -> None:
        # Not fsynced: losing a few seconds of LRU order in a crash costs nothing.
        with self._state_lock:
            self._write_atomic(self.state_dir / "last_used.json", json.dumps(last_used, sort_keys=True).encode(),
                               sync=False)

    # ---- file stamps: the cheap start-up check -------------------------------------
    def stamp(self, digest: str, manifest: Manifest) -> None:
        """Record each file's size and mtime, so a start-up check can spot a change cheaply."""
        root = self.artifact_path(digest)
        stamps = {}
        for f in manifest.files:
            st = (root / f.path).stat()
            stamps[f.path] = [st.st_size, st.st_mtime_ns]
        self._write_atomic(self.meta_path(digest) / "stamps.json", json.dumps(stamps, sort_keys=True).encode())

    def stamps_match(self, digest: str, manifest: Manifest) -> bool:
        """True if every file still has the size and mtime recorded when it was verified."""
        try:
            stamps = json.loads((self.meta_path(digest) / "stamps.json").read_text())
        except (FileNotFoundError, ValueError):
            return False
        root = self.artifact_path(digest)
        for f in manifest.files:
            try:
                st = (root / f.path).stat()
            except FileNotFoundError:
                return False
            if stamps.get(f.path) != [st.st_size, st.st_mtime_ns]:
                return False
        return True

    # ---- the clean-stop marker -------------------------------------------------------
    def take_clean_stop(self) -> bool:
        """Whether the last stop was clean (its marker is there); removes the marker."""
        marker = self.state_dir / CLEAN_STOP_MARKER
        clean = marker.exists()
        marker.unlink(missing_ok=True)
        return clean

    def mark_clean_stop(self) -> None:
        """Written last at a clean stop: its presence tells the next start that resume data is current."""
        (self.state_dir / CLEAN_STOP_MARKER).write_text(str(time.time()))

    def node_id(self) -> str:
        """This cache's stable node id (made once, kept in state/node_id)."""
        path = self.state_dir / "node_id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            import secrets

            self._write_atomic(path, secrets.token_hex(10).encode())
            return path.read_text().strip()

    def node_key(self) -> str:
        """This cache's node key (made once, kept in state/node_key, readable by its owner only).

        It proves the node id to the registry (tracker/nodekeys.py): with it, nobody else can
        heartbeat as this node or make it leave.
        """
        path = self.state_dir / "node_key"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            import secrets

            self._write_atomic(path, secrets.token_hex(32).encode())
            os.chmod(path, 0o600)
            return path.read_text().strip()

    def artifact_path(self, digest: str) -> Path:
        return self.artifacts_dir / _hex(digest)

    def partial_path(self, digest: str) -> Path:
        return self.partial_dir / _hex(digest)

    def meta_path(self, digest: str) -> Path:
        return self.meta_dir / _hex(digest)

    def is_complete(self, digest: str) -> bool:
        return self.artifact_path(digest).is_dir()

    def _write_atomic(self, dest: Path, data: bytes, sync: bool = True) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=dest.name + ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if sync:
                    os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def save_meta(self, digest: str, manifest: Manifest, torrent: bytes) -> None:
        """Keep the manifest and torrent beside the artifact (needed to seed it after a restart)."""
        meta = self.meta_path(digest)
        self._write_atomic(meta / "torrent", torrent)
        self._write_atomic(meta / "manifest.json", manifest.canonical_bytes())

    def load_torrent(self, digest: str) -> bytes | None:
        """The torrent kept in meta/ (None before the first pull wrote it)."""
        try:
            return (self.meta_path(digest) / "torrent").read_bytes()
        except FileNotFoundError:
            return None

    def load_meta(self, digest: str) -> tuple[Manifest, bytes]:
        meta = self.meta_path(digest)
        manifest = Manifest.from_bytes((meta / "manifest.json").read_bytes(), expected_digest=digest)
        return manifest, (meta / "torrent").read_bytes()

    def verify_tree(self, root: Path, manifest: Manifest, *, full: bool = True) -> None:
        """Check that ``root`` holds exactly the manifest's files, as regular files.

        With ``full`` every file's xxh3-128 is recomputed (in parallel threads); without
        it only sizes are compared.  Raises IntegrityError naming the first bad file.
        """
        expected = {f.path: f for f in manifest.files}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafePath(f"{p} is a link; artifacts hold only regular files")
            for name in filenames:
                rel = (Path(dirpath) / name).relative_to(root).as_posix()
                if rel not in expected:
                    raise IntegrityError(f"unexpected file {rel!r} in {root}")
        for f in manifest.files:
            p = root / f.path
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise IntegrityError(f"{f.path} is missing from {root}") from None
            if size != f.size:
                raise IntegrityError(f"{f.path} has {size} bytes, the manifest says {f.size}")
        if not full:
            return

        def check(f) -> str | None:
            actual, _ = xxh3_file(root / f.path)
            return None if actual == f.xxh3_128 else f"{f.path}: xxh3 {actual} != {f.xxh3_128}"

        big_first = sorted(manifest.files, key=lambda f: -f.size)
        with ThreadPoolExecutor(self.verify_workers) as pool:
            for problem in pool.map(check, big_first):
                if problem:
                    raise IntegrityError(f"verification failed for {manifest.name}: {problem}")

    def ensure_partial_files(self, digest: str, manifest: Manifest) -> None:
        """Create the partial download's folder, and the empty files libtorrent never writes (zero-length files)."""
        root = self.partial_path(digest)
        root.mkdir(parents=True, exist_ok=True)
        for f in manifest.files:
            if f.size == 0:
                p = root / f.path
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch(exist_ok=True)

    def partial_bytes(self, digest: str, manifest: Manifest) -> int:
        """Bytes of the manifest's files already present in the partial download (the disk-space check)."""
        root = self.partial_path(digest)
        return sum(f.size for f in manifest.files if (root / f.path).exists())

    def promote(self, digest: str) -> Path:
        """Make a verified partial download complete: fsync, read-only, one atomic rename.

        The rename is the commit point: before it the artifact is not complete, after
        it every byte is on disk, so a crash never leaves a half artifact that looks whole.
        """
        src = self.partial_path(digest)
        dest = self.artifact_path(digest)
        for dirpath, dirnames, filenames in os.walk(src, topdown=False):
            for name in filenames:
                p = os.path.join(dirpath, name)
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.chmod(p, 0o444)
            os.chmod(dirpath, 0o555)
        os.rename(src, dest)
        dir_fd = os.open(self.artifacts_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return dest

    def demote(self, digest: str) -> Path:
        """Move a complete artifact back to partial/ (writable) so it can be repaired in place.

        The rename comes first: from that instant the artifact is no longer complete.
        """
        src, dest = self.artifact_path(digest), self.partial_path(digest)
        if dest.exists():
            self.remove_tree(dest)
        try:
            os.rename(src, dest)
        except FileNotFoundError:
            # The whole artifact was deleted behind our back: repair means fetch it all.
            dest.mkdir(parents=True)
        for dirpath, dirnames, filenames in os.walk(dest):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        return dest

    def evict(self, digest: str) -> None:
        """Delete a complete artifact: pointer first (rename into trash/), then data, then meta."""
        src = self.artifact_path(digest)
        trash = self.trash_dir / f"{_hex(digest)}.{time.time_ns()}"
        try:
            os.rename(src, trash)
        except FileNotFoundError:
            pass
        self.remove_tree(self.meta_path(digest))
        self.drop_resume(digest)
        self.remove_tree(trash)

    def empty_trash(self) -> None:
        """Finish evictions a crash interrupted."""
        for p in self.trash_dir.iterdir():
            self.remove_tree(p)

    def partial_digests(self) -> list[str]:
        return sorted("sha256:" + p.name for p in self.partial_dir.iterdir() if p.is_dir())

    def disk_free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def complete_digests(self) -> list[str]:
        return sorted("sha256:" + p.name for p in self.artifacts_dir.iterdir() if p.is_dir())

    def remove_tree(self, path: Path) -> None:
        """Delete a tree even if it was made read-only."""
        if not path.exists():
            return
        if not path.is_dir():
            path.unlink()
            return
        for dirpath, dirnames, _ in os.walk(path):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(path)
