"""Artifacts laid out in the Hugging Face hub cache layout, so huggingface_hub finds them by repo id.

A layout (:class:`Layout`, one per artifact, hub cache, repo, commit and ref) is a set of
links the node owns (LAYOUT.md, "Hugging Face layouts")::

    HUB/models--ORG--NAME/
        blobs/<xxh3-128>          -> DIR/artifacts/sha256/<hex>/<path>   (absolute symlink)
        snapshots/<commit>/<path> -> ../../blobs/<xxh3-128>               (relative, as huggingface_hub makes)
        refs/<ref>                   the commit (no newline: huggingface_hub reads it as is)

Blobs are symlinks into the node's verified store, never copies and never hard links:
a hard link would keep an evicted artifact's bytes alive (outside the quota) and keep
serving a file the node took out of service for repair.  With symlinks the store stays
the one owner of the bytes, and the node removes the links itself before the bytes go.

The work is split the way eviction is (STYLE.md #7): :func:`plan_links` and
:func:`plan_removal` are pure (what links should exist; which to remove or repoint given
what is on disk), :class:`HfLayouts` observes the disk, asks the planner and executes,
writing each link under a temporary name and renaming it into place.  The records of
what the node laid out live in ``state/hf_layouts.json`` and are written *before* the
links, so a crash never leaves links the node does not know about.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from modelcast.errors import BadRequest, Conflict, ModelcastError
from modelcast.hf import COMMIT, HfTarget, repo_folder, validate_ref, validate_repo_id
from modelcast.manifest import Manifest, validate_path

log = logging.getLogger("modelcast.node")

STATE_FILE = "hf_layouts.json"
TMP_PREFIX = ".modelcast-tmp-"


@dataclass(frozen=True)
class Layout:
    """One artifact laid out in one hub cache under one repo, commit and ref."""

    digest: str
    cache: str  # absolute path of the hub cache (HF_HUB_CACHE)
    repo_id: str
    commit: str
    ref: str | None
    files: tuple[tuple[str, str], ...]  # (path in the snapshot, blob name = the file's xxh3-128)

    def __post_init__(self) -> None:
        if not os.path.isabs(self.cache):
            raise BadRequest(f"the Hugging Face cache must be an absolute path, got {self.cache!r}")
        validate_repo_id(self.repo_id)
        if not COMMIT.fullmatch(self.commit):
            raise BadRequest(f"{self.commit!r} is not a 40-hex commit hash")
        if self.ref is not None:
            validate_ref(self.ref)
        for path, blob in self.files:
            validate_path(path)
            if not blob or "/" in blob or blob in (".", ".."):
                raise BadRequest(f"bad blob name {blob!r}")

    @property
    def repo_dir(self) -> Path:
        return Path(self.cache) / repo_folder(self.repo_id)

    @property
    def snapshot(self) -> Path:
        return self.repo_dir / "snapshots" / self.commit

    @property
    def key(self) -> tuple:
        return (self.digest, self.cache, self.repo_id, self.commit, self.ref)

    def to_json(self) -> dict:
        return {"digest": self.digest, "cache": self.cache, "repo_id": self.repo_id, "revision": self.commit,
                "ref": self.ref, "files": [list(f) for f in self.files]}

    def summary(self) -> dict:
        """What the API answers: where it is and how huggingface_hub names it."""
        return {"digest": self.digest, "cache": self.cache, "repo_id": self.repo_id, "revision": self.commit,
                "ref": self.ref, "snapshot": str(self.snapshot)}

    @classmethod
    def from_json(cls, obj: Mapping) -> "Layout":
        return cls(str(obj["digest"]), str(obj["cache"]), str(obj["repo_id"]), str(obj["revision"]),
                   obj.get("ref"), tuple((str(p), str(b)) for p, b in obj["files"]))


def layout_for(digest: str, manifest: Manifest, cache: Path, target: HfTarget) -> Layout:
    """The layout of ``manifest``'s files under ``target`` in the hub cache ``cache``."""
    return Layout(digest, str(Path(cache).absolute()), target.repo_id, target.commit, target.ref,
                  tuple((f.path, f.xxh3_128) for f in manifest.files))


# ---- the pure plans ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A symlink at ``path`` whose text is ``target``."""

    path: Path
    target: str


def plan_links(layout: Layout, artifact_root: Path) -> list[Link]:
    """Every link the layout needs, blobs first (a snapshot link never points at a blob not yet made).

    Files with the same content share one blob, pointing at the first of them.
    """
    blobs_dir = layout.repo_dir / "blobs"
    blobs: dict[str, Link] = {}
    snaps: list[Link] = []
    for path, blob in layout.files:
        blob_path = blobs_dir / blob
        blobs.setdefault(blob, Link(blob_path, str(Path(artifact_root) / path)))
        entry = layout.snapshot / path
        snaps.append(Link(entry, os.path.relpath(blob_path, entry.parent)))
    return [*blobs.values(), *snaps]


@dataclass(frozen=True)
class RemovalPlan:
    """What taking a layout away does, in order: pointers (ref, snapshot entries) before blobs."""

    remove_ref: Path | None = None
    remove: tuple[Path, ...] = ()  # snapshot entries, then blobs
    repoint: tuple[Link, ...] = ()  # blobs another layout still needs, pointed at that layout's file
    prune: tuple[Path, ...] = ()  # folders to remove if empty, deepest first


def plan_removal(layout: Layout, artifact_root: Path, others: Iterable[tuple[Layout, Path]],
                 observed: Mapping[Path, str | None], observed_ref: str | None) -> RemovalPlan:
    """Which of ``layout``'s links to remove or repoint, given what is on disk.

    ``others`` are the layouts that stay, with their artifacts' roots; ``observed`` maps each
    of this layout's link paths to its link text on disk (None: absent or not a link);
    ``observed_ref`` is the text of ``refs/<ref>``.  Only links that still say what this
    layout made are touched (a file someone else put there is left alone); a link that
    another layout needs as it is stays; a blob another layout needs for the same content
    is pointed at that layout's file instead.  The ref goes only if it still names this
    commit and no other layout wants that ref at that commit.
    """
    wanted: dict[Path, str] = {}
    keeps_ref = False
    for other, root in others:
        for link in plan_links(other, root):
            wanted.setdefault(link.path, link.target)
        if (other.repo_dir, other.ref, other.commit) == (layout.repo_dir, layout.ref, layout.commit):
            keeps_ref = True
    remove: list[Path] = []
    repoint: list[Link] = []
    dirs: set[Path] = set()
    links = plan_links(layout, artifact_root)
    blobs_dir = layout.repo_dir / "blobs"
    # Pointers before data: the snapshot entries go before the blobs they point to.
    ordered = [k for k in links if not k.path.is_relative_to(blobs_dir)] + [k for k in links
                                                                          if k.path.is_relative_to(blobs_dir)]
    for link in ordered:
        if observed.get(link.path) != link.target:
            continue
        other_target = wanted.get(link.path)
        if other_target is None:
            remove.append(link.path)
            if link.path.is_relative_to(layout.snapshot):
                dirs.update(p for p in link.path.parents if p.is_relative_to(layout.snapshot))
        elif other_target != link.target:
            repoint.append(Link(link.path, other_target))
    ref_path = layout.repo_dir / "refs" / layout.ref if layout.ref else None
    remove_ref = ref_path if ref_path and observed_ref == layout.commit and not keeps_ref else None
    if remove_ref is not None:
        dirs.update(p for p in remove_ref.parents if p.is_relative_to(layout.repo_dir / "refs"))
    for sub in ("refs", "snapshots", "blobs"):
        dirs.add(layout.repo_dir / sub)
    dirs.add(layout.repo_dir)
    prune = tuple(sorted(dirs, key=lambda p: (-len(p.parts), str(p))))
    return RemovalPlan(remove_ref, tuple(remove), tuple(repoint), prune)


# ---- the executor ------------------------------------------------------------------------------


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except (FileNotFoundError, NotADirectoryError, OSError):
        return None


def _read_ref(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _real_dir(path: Path, stop: Path) -> None:
    """Create ``path`` (and its parents below ``stop``) as real folders; refuse a link on the way.

    A link in place of ``blobs/`` or ``refs/`` would make the node write wherever it points.
    """
    rel = path.relative_to(stop)
    for p in [*reversed(rel.parents), rel]:
        if p == Path("."):
            continue  # the hub cache itself may well be a link (~/.cache on another disk)
        d = stop / p
        try:
            st = d.lstat()
        except FileNotFoundError:
            d.mkdir(exist_ok=True)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise Conflict(f"{d} is a link or a file, not a folder; remove it or lay the model out with --hf-cache "
                           "in another folder")


def _place_link(link: Link) -> None:
    """Make or replace the symlink atomically: a temporary name in the same folder, then rename(2)."""
    tmp = link.path.parent / f"{TMP_PREFIX}{secrets.token_hex(6)}"
    os.symlink(link.target, tmp)
    try:
        os.replace(tmp, link.path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_ref(path: Path, commit: str) -> None:
    tmp = path.parent / f"{TMP_PREFIX}{secrets.token_hex(6)}"
    try:
        tmp.write_text(commit)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class HfLayouts:
    """The node's Hugging Face layouts: records in ``state/``, links in the hub caches.

    Blocking methods (call them in a thread); one at a time (a lock), though a crash in
    the middle of any of them leaves nothing that :meth:`reconcile` does not put right.
    """

    def __init__(self, load: Callable[[], object], save: Callable[[object], None],
                 artifact_root: Callable[[str], Path]):
        self._load, self._save, self._root = load, save, artifact_root
        self._lock = threading.Lock()
        self.records: list[Layout] = []
        self.applied: set[tuple] = set()  # keys of the layouts whose links are in place now
        for obj in self._load() or []:
            try:
                self.records.append(Layout.from_json(obj))
            except (KeyError, TypeError, ValueError, ModelcastError) as exc:
                log.warning("dropping an unreadable Hugging Face layout record %r: %s", obj, exc)

    def for_digest(self, digest: str) -> list[Layout]:
        return [r for r in self.records if r.digest == digest]

    def _persist(self) -> None:
        self._save([r.to_json() for r in self.records])

    def _others(self, layout: Layout) -> list[tuple[Layout, Path]]:
        return [(r, self._root(r.digest)) for r in self.records if r.key != layout.key and r.key in self.applied]

    # ---- lay out --------------------------------------------------------------------------
    def apply(self, layout: Layout) -> Layout:
        """Lay ``layout`` out (again): record it, then make every link that is missing.

        A layout of another artifact at the same repo, commit and ref is taken away first
        (the newer pull wins).  A snapshot entry that exists and is not a link this node
        would make is a Conflict, and nothing is written.
        """
        with self._lock:
            replaced = [r for r in self.records if r.key != layout.key and r.digest != layout.digest
                        and (r.repo_dir, r.commit) == (layout.repo_dir, layout.commit)]
            for old in replaced:
                self._take_away(old)
                self.records.remove(old)
            self._check(layout)
            if layout.key not in {r.key for r in self.records}:
                self.records.append(layout)
                self._persist()  # the record before the links: a crash leaves nothing unknown
            self._make_links(layout)
            self.applied.add(layout.key)
            return layout

    def _check(self, layout: Layout) -> None:
        root = self._root(layout.digest)
        for link in plan_links(layout, root):
            if link.path.is_relative_to(layout.repo_dir / "blobs"):
                continue  # an existing blob of the same name holds the same content
            try:
                st = link.path.lstat()
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISLNK(st.st_mode) or os.readlink(link.path) != link.target:
                raise Conflict(f"{link.path} already exists and is not a link this node made; "
                               f"remove {layout.snapshot} or lay the model out in another cache with --hf-cache DIR")

    def _make_links(self, layout: Layout) -> None:
        cache = Path(layout.cache)
        cache.mkdir(parents=True, exist_ok=True)
        for link in plan_links(layout, self._root(layout.digest)):
            _real_dir(link.path.parent, cache)
            current = _readlink(link.path)
            if current == link.target:
                continue
            if os.path.lexists(link.path):
                stale_blob = (current is not None and link.path.is_relative_to(layout.repo_dir / "blobs")
                              and not os.path.exists(link.path))
                if not stale_blob:
                    # Someone else's file or link (a blob huggingface_hub downloaded, another
                    # artifact's blob of the same content): never replaced.
                    continue
            _place_link(link)
        if layout.ref:
            ref_path = layout.repo_dir / "refs" / layout.ref
            _real_dir(ref_path.parent, cache)
            if _read_ref(ref_path) != layout.commit:
                _write_ref(ref_path, layout.commit)

    # ---- take away ------------------------------------------------------------------------
    def _take_away(self, layout: Layout) -> None:
        """Remove (or repoint) the layout's links as :func:`plan_removal` says; keep its record."""
        self.applied.discard(layout.key)
        root = self._root(layout.digest)
        observed = {link.path: _readlink(link.path) for link in plan_links(layout, root)}
        ref_path = layout.repo_dir / "refs" / layout.ref if layout.ref else None
        plan = plan_removal(layout, root, self._others(layout), observed,
                            _read_ref(ref_path) if ref_path else None)
        if plan.remove_ref is not None:
            plan.remove_ref.unlink(missing_ok=True)
        for path in plan.remove:
            path.unlink(missing_ok=True)
        for link in plan.repoint:
            _place_link(link)
        for d in plan.prune:
            try:
                d.rmdir()
            except OSError:
                pass  # not empty (someone else's files), or already gone

    def drop(self, digest: str) -> list[Layout]:
        """Take every layout of ``digest`` away and forget it (the artifact is being deleted)."""
        with self._lock:
            gone = self.for_digest(digest)
            for layout in gone:
                self._take_away(layout)
            if gone:
                self.records = [r for r in self.records if r.digest != digest]
                self._persist()
            return gone

    def suspend(self, digest: str) -> None:
        """Take the links away but keep the records (the artifact is out of service, e.g. being repaired)."""
        with self._lock:
            for layout in self.for_digest(digest):
                self._take_away(layout)

    def reconcile(self, ready: set[str], known: set[str]) -> None:
        """Converge on the records: links for ready artifacts, none for others, no record of deleted ones.

        Safe to call at any time.  ``known`` are the digests the node has (ready, or being
        pulled or repaired); a record of any other digest belongs to an artifact deleted
        (e.g. in a crash before its layout was taken away) and goes with its links.
        """
        with self._lock:
            changed = False
            for layout in list(self.records):
                if layout.digest not in known:
                    self._take_away(layout)
                    self.records.remove(layout)
                    changed = True
                elif layout.digest not in ready:
                    self._take_away(layout)
            for layout in self.records:
                if layout.digest in ready:
                    try:
                        self._make_links(layout)
                        self.applied.add(layout.key)
                    except (OSError, ModelcastError) as exc:
                        log.warning("could not restore the Hugging Face layout of %s at %s: %s", layout.digest,
                                    layout.snapshot, exc)
            if changed:
                self._persist()
