"""The one wrapper around libtorrent: making, checking and running torrents.

Every libtorrent call of modelcast is in this module; the rest of the code talks to it in
terms of digests, paths, manifests and plain records, and libtorrent's errors are
translated to :mod:`modelcast.errors` here.

* Making (publish): :func:`make_torrent` lets libtorrent lay the files out and hashes the
  pieces on a thread pool (:mod:`adapters.piece_hash`; ``hashlib`` releases the GIL), then
  writes the torrent libtorrent would write, byte for byte.  libtorrent's own
  ``set_piece_hashes`` (:func:`build_torrent`, kept as the reference the tests compare
  with) hashes on one thread and its binding holds the GIL throughout, which bounded a
  publish by one core.
* Checking (registry and node): :func:`check_torrent` proves a torrent describes exactly
  a manifest's files.
* Running (node): :class:`TorrentEngine` is the node's one libtorrent session.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import libtorrent as lt

from modelcast.config import is_wildcard
from modelcast.errors import InvalidManifest, ModelcastError, PullFailed, UnsafePath
from modelcast.manifest import InfoHashes, Manifest

from . import piece_hash
from .tls import libtorrent_ca

log = logging.getLogger("modelcast.torrent")

INCONSISTENT_HASHES = 217  # libtorrent errors::torrent_inconsistent_hashes
MAX_RECOVERIES = 5

TorrentInfo = lt.torrent_info
"""A parsed torrent, as :func:`check_torrent` returns it; opaque outside this module."""

# ---------------------------------------------------------------------------------------
# Making torrents (publish)
def info_hashes(torrent: bytes) -> InfoHashes:
    """The v1 and v2 info-hashes of a bencoded torrent, as lowercase hex."""
    try:
        hashes = lt.torrent_info(torrent).info_hashes()
    except RuntimeError as exc:
        raise ModelcastError(f"libtorrent rejected the torrent it made: {exc}") from exc
    return InfoHashes(v1=str(hashes.v1) if hashes.has_v1() else None,
                      v2=str(hashes.v2) if hashes.has_v2() else None)


def torrent_flags(v1_only: bool = False) -> int:
    """libtorrent ``create_torrent`` flags: hybrid by default, or v1 only with pad files.

    A hybrid torrent (no flag) is what every modelcast node reads; v1 only is for clients
    that cannot read v2 metadata (aria2 before 1.37 computes a wrong info-hash for hybrid
    torrents).  ``canonical_files`` keeps the pad files that align every file to a piece.
    """
    return (lt.create_torrent.v1_only | lt.create_torrent.canonical_files) if v1_only else 0


def build_torrent(files: list[tuple[str, str, int]], torrent_name: str, piece_length: int,
                  announce: str | None = None, on_piece: Callable[[int], None] | None = None,
                  v1_only: bool = False) -> bytes:
    """Hash every piece of ``files`` (``(path in artifact, source path, size)``) and return the torrent.

    Hybrid (libtorrent's default; no v1_only/v2_only flag), so v1-only clients (aria2) can
    join too, with pad files aligning every file to a piece, which lets a node fetch any
    piece from one file at the origin.  No creation date and no creator: identical content
    gives identical bytes.  This holds the GIL throughout: call it in its own process.
    """
    entries = [lt.create_file_entry(f"{torrent_name}/{path}", size) for path, _, size in files]
    ct = lt.create_torrent(entries, piece_length, torrent_flags(v1_only))
    ct.set_priv(True)
    ct.set_creation_date(0)
    if announce:
        # Outside the info dict: it does not change the info-hash.
        ct.add_tracker(announce)
    with tempfile.TemporaryDirectory(prefix="modelcast-torrent-") as parent:
        # libtorrent reads <parent>/<torrent_name>/<path>; link each file there, wherever it
        # lies, so links the scan followed and a single-file artifact need no special case.
        for path, source, _ in files:
            link = Path(parent, torrent_name, path)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(source).resolve(), link)
        if on_piece is None:
            lt.set_piece_hashes(ct, parent)
        else:
            lt.set_piece_hashes(ct, parent, on_piece)
    return lt.bencode(ct.generate())


def build_torrent_parallel(files: list[tuple[str, str | Path, int]], torrent_name: str, piece_length: int,
                           announce: str | None = None, on_piece: Callable[[int], None] | None = None,
                           v1_only: bool = False, stop: threading.Event | None = None,
                           workers: int | None = None) -> bytes:
    """The same torrent as :func:`build_torrent`, byte for byte, hashed on every core.

    libtorrent lays the files out (their order, the pad files, where each starts), so the
    torrent is the one libtorrent would make; :mod:`adapters.piece_hash` hashes the pieces
    on a thread pool; the info dict is then written here the way libtorrent writes it
    (tests/test_publish.py compares the bytes with libtorrent's for many layouts).  Needed
    because the binding has no ``set_hash2`` to hand v2 hashes to ``create_torrent``.
    """
    sources = {f"{torrent_name}/{path}": (Path(source), size) for path, source, size in files}
    entries = [lt.create_file_entry(name, size) for name, (_, size) in sources.items()]
    fs = lt.create_torrent(entries, piece_length, torrent_flags(v1_only)).files()
    pad = int(lt.file_storage.flag_pad_file)
    layout: list[tuple[list[str], int, bool]] = []  # (path below the root, size, is pad)
    slots: list[piece_hash.FileSlot] = []
    slot_of: dict[int, int] = {}
    for i in range(fs.num_files()):
        parts = fs.file_path(i).replace("\\", "/").split("/")[1:]
        is_pad = bool(int(fs.file_flags(i)) & pad)
        size = fs.file_size(i)
        layout.append((parts, size, is_pad))
        if not is_pad and size:
            source, expected = sources[f"{torrent_name}/{'/'.join(parts)}"]
            if fs.file_offset(i) % piece_length or expected != size:
                raise ModelcastError(f"libtorrent laid out {'/'.join(parts)} off a piece boundary; cannot hash in parallel")
            slot_of[i] = len(slots)
            slots.append(piece_hash.FileSlot(source, size, fs.file_offset(i) // piece_length))
    pieces, trees = piece_hash.PieceHasher(slots, piece_length, fs.total_size(), v1_only=v1_only, workers=workers,
                                           on_piece=on_piece, stop=stop).run()

    v1_files = []
    for parts, size, is_pad in layout:
        entry: dict = {b"length": size, b"path": [part.encode() for part in parts]}
        if is_pad:
            entry[b"attr"] = b"p"
        v1_files.append(entry)
    info: dict = {b"name": torrent_name.encode(), b"piece length": piece_length, b"pieces": pieces,
                  b"private": 1, b"files": v1_files}
    top: dict = {b"info": info}
    if not v1_only:
        tree: dict = {}
        layers: dict[bytes, bytes] = {}
        for i, (parts, size, is_pad) in enumerate(layout):
            if is_pad:
                continue
            node = tree
            for part in parts:
                node = node.setdefault(part.encode(), {})
            leaf: dict = {b"length": size}
            if size:
                hashes = trees[slot_of[i]]
                leaf[b"pieces root"] = hashes.pieces_root
                if hashes.piece_layer:
                    layers[hashes.pieces_root] = hashes.piece_layer
            node[b""] = leaf
        info[b"file tree"] = tree
        info[b"meta version"] = 2
        top[b"piece layers"] = layers
    if announce:
        top[b"announce"] = announce.encode()
    return lt.bencode(top)


class _FileBytesProgress:
    """Turns "piece done" calls (from any hashing thread) into file bytes for a progress bar.

    File bytes, not piece bytes: pad files make the pieces add up to more.
    """

    def __init__(self, files: list[tuple[str, Path, int]], piece_length: int, progress: Callable[[int], None]):
        self.total = sum(size for _, _, size in files)
        self.num_pieces = max(1, sum(-(-size // piece_length) for _, _, size in files))
        self.progress = progress
        self.done = 0
        self._lock = threading.Lock()

    def __call__(self, _index: int) -> None:
        with self._lock:
            before = self.total * self.done // self.num_pieces
            self.done += 1
            self.progress(self.total * self.done // self.num_pieces - before)


def make_torrent(files: list[tuple[str, Path, int]], torrent_name: str, piece_length: int, announce: str | None = None,
                 progress: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None, v1_only: bool = False) -> tuple[bytes, InfoHashes, float]:
    """Make the torrent of ``files`` (``(path in artifact, source, size)``), hashing on every core.

    Returns (torrent bytes, info-hashes, seconds).  ``progress`` receives file bytes hashed
    (in piece-sized steps); setting ``stop`` ends the hashing at its next piece with a
    :class:`ModelcastError`.  Blocking: call it from a thread.
    """
    t0 = time.monotonic()
    on_piece = None if progress is None else _FileBytesProgress(files, piece_length, progress)
    try:
        data = build_torrent_parallel(files, torrent_name, piece_length, announce, on_piece, v1_only, stop)
    except OSError as exc:
        raise ModelcastError(f"making the torrent of {torrent_name} failed: {exc}") from exc
    return data, info_hashes(data), time.monotonic() - t0


# ---------------------------------------------------------------------------------------
# Checking torrents (registry and node)


def check_torrent(torrent: bytes, manifest: Manifest) -> TorrentInfo:
    """Raise InvalidManifest unless ``torrent`` describes exactly ``manifest``'s files.

    Checked: it parses; its info-hashes are the manifest's (no more, no fewer); its name
    and piece length match; its files, pad files aside, are ``<torrent_name>/<path>``
    with the manifest's sizes; it holds no symlinks, so nothing is written outside the
    artifact.  A registry could be wrong or hostile: nodes check what they are given too.
    """
    try:
        ti = lt.torrent_info(lt.bdecode(torrent))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidManifest(f"torrent of {manifest.name!r} is not a valid torrent file: {exc}") from exc
    if not ti.is_valid():
        raise InvalidManifest(f"torrent of {manifest.name!r} is not a valid torrent file")

    hashes = ti.info_hashes()
    got_v1 = str(hashes.v1) if hashes.has_v1() else None
    got_v2 = str(hashes.v2) if hashes.has_v2() else None
    want = manifest.info_hash
    if (got_v1, got_v2) != (want.v1, want.v2):
        raise InvalidManifest(
            f"torrent info-hashes (v1 {got_v1}, v2 {got_v2}) differ from the manifest's "
            f"(v1 {want.v1}, v2 {want.v2}); publish the torrent that was made from these files"
        )
    if ti.name() != manifest.torrent_name:
        raise InvalidManifest(f"torrent name {ti.name()!r} differs from the manifest's torrent_name {manifest.torrent_name!r}")
    if ti.piece_length() != manifest.piece_length:
        raise InvalidManifest(
            f"torrent piece length {ti.piece_length()} differs from the manifest's {manifest.piece_length}"
        )

    fs = ti.layout()
    pad, symlink = int(lt.file_storage.flag_pad_file), int(lt.file_storage.flag_symlink)
    got: list[tuple[str, int]] = []
    for i in range(fs.num_files()):
        flags = int(fs.file_flags(i))
        path = fs.file_path(i).replace("\\", "/")
        if flags & symlink:
            raise UnsafePath(f"torrent of {manifest.name!r} contains a symlink {path!r}; artifacts hold regular files only")
        if flags & pad:
            continue
        got.append((path, fs.file_size(i)))
    expected = [(f"{manifest.torrent_name}/{f.path}", f.size) for f in manifest.files]
    if sorted(got) != expected:
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        raise InvalidManifest(
            f"torrent files differ from the manifest of {manifest.name!r}: "
            f"{len(got)} files in the torrent, {len(expected)} in the manifest; "
            f"missing from the torrent {missing or 'none'}, not in the manifest {extra or 'none'}"
        )
    return ti
# ---------------------------------------------------------------------------------------
# Running torrents (node)



@dataclass(frozen=True)
class PieceSpan:
    """Where one piece's bytes live: a range of one file (hybrid torrents align files to pieces)."""

    piece: int
    size: int  # the piece's size, including zero padding
    path: str  # path inside the torrent, "<torrent_name>/<file path>"
    file_offset: int
    length: int  # bytes of file data; the rest of the piece is zero padding


# What :meth:`TorrentEngine.progress` reads: libtorrent's default (every flag) would also
# build the piece bitfields, the distributed-copies figure and copies of the torrent's name,
# save path and metadata on every call.  With the accurate counters ``done_bytes`` is what
# it was with every flag (without them libtorrent estimates it from whole pieces).
PROGRESS_FLAGS = lt.status_flags_t.query_accurate_download_counters


@dataclass(frozen=True)
class TorrentProgress:
    state: str
    done_bytes: int
    total_bytes: int
    payload_download: int
    payload_upload: int
    download_rate: int
    upload_rate: int
    peers: int
    seeds: int
    finished: bool
    error: str | None




def swarm_key(ti: TorrentInfo) -> bytes:
    """The 20-byte info-hash the tracker knows the torrent's swarm by (v1; a v2-only torrent's truncated v2)."""
    hashes = ti.info_hashes()
    return (hashes.v1 if hashes.has_v1() else hashes.v2).to_bytes()[:20]


def piece_spans(ti: TorrentInfo) -> list[PieceSpan]:
    """Map every piece to the single file range it holds (pad files make that exact)."""
    fs = ti.layout()
    plen = ti.piece_length()
    spans: list[PieceSpan | None] = [None] * ti.num_pieces()
    for i in range(fs.num_files()):
        if fs.file_flags(i) & lt.file_storage.flag_pad_file or fs.file_size(i) == 0:
            continue
        off, size = fs.file_offset(i), fs.file_size(i)
        first, last = off // plen, (off + size - 1) // plen
        for p in range(first, last + 1):
            start = max(p * plen, off)
            end = min((p + 1) * plen, off + size)
            if spans[p] is not None or start != p * plen:
                # Only v1-only torrents let two files share a piece; modelcast makes hybrids.
                raise InvalidManifest("torrent pieces are not aligned to files (not a hybrid/v2 torrent)")
            spans[p] = PieceSpan(p, ti.piece_size(p), fs.file_path(i), start - off, end - start)
    if any(s is None for s in spans):
        raise InvalidManifest("torrent has pieces that belong to no file")
    return spans  # type: ignore[return-value]


EngineEvent = str
"""What :class:`TorrentEngine` tells its owner about a torrent: ``"finished"``, ``"error"``,
``"peers"`` (a peer connected or left), ``"tracker"`` (a tracker replied), ``"state"``
(checking ended, downloading began, ...) or ``"url_seed"`` (its URL seed failed)."""

# A torrent's URL seed (:meth:`TorrentEngine.add`): running from the start, then failed or dropped.
URL_SEED_RUNNING, URL_SEED_FAILED, URL_SEED_DROPPED = "running", "failed", "dropped"


@dataclass
class UrlSeed:
    """One torrent's BEP 19 URL seed: libtorrent fetches from ``url`` itself, with ``headers``."""

    url: str
    headers: list[tuple[str, str]]
    state: str = URL_SEED_RUNNING
    error: str | None = None
    status: int | None = None  # the HTTP status that ended it, if one did
    bytes: int = 0  # payload it brought, as of when it was dropped
    seen: int = 0  # the most its web seed connection was seen to have sent

SAFETY_PUMP_S = 1.0  # alerts are also drained this often, should a wake-up ever be lost

# glibc malloc options (malloc.h): M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_TUNING = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 128 << 20), (_M_TOP_PAD, 16 << 20))
_malloc_tuned = False


def tune_malloc() -> None:
    """Keep freed piece buffers in the process instead of returning them to the kernel at once.

    libtorrent allocates a 16 KiB buffer per block it receives or writes and frees it on
    another thread; a node's origin reads are piece-sized ``bytes``.  With glibc's defaults
    each thread arena's top is trimmed as soon as it is free and grown again (``mprotect``)
    a moment later, and large buffers are mapped and unmapped: the profile of a pull showed
    the network thread spinning on the address-space lock (``rwsem_spin_on_owner`` under
    ``mprotect``, 6% of the daemon) and page faults zeroing fresh pages.  Up to 128 MiB
    free per arena is kept, buffers under 32 MiB come from the heap.  Process-wide, once;
    a no-op where the C library has no ``mallopt`` (not glibc).
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for option, value in MALLOC_TUNING:
        mallopt(option, value)


def aio_threads(cores: int | None = None) -> int:
    """libtorrent's disk threads for this machine: one per 4 cores, 1 to 4."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, min(4, cores // 4))


class TorrentEngine:
    """One libtorrent session: add, seed, watch and remove torrents.

    Alerts are drained on the event loop as soon as libtorrent posts them: libtorrent writes
    a byte to a pipe when its alert queue stops being empty, and the loop, which watches
    the pipe, pops the alerts.  What the node waits for comes back as futures (a torrent
    removed, its resume data, a piece read from disk, a piece arrived) or as a call of
    ``on_event(digest, kind)`` on the loop (see :data:`EngineEvent`).  Make it on the loop
    that will use it; :meth:`close` it there.
    """

    def __init__(self, peer_host: str, peer_port: int, *, upload_limit: int = 0, download_limit: int = 0,
                 connections: int = 200, on_event: Callable[[str, EngineEvent], None] | None = None,
                 ca: Path | None = None):
        specific = not is_wildcard(peer_host)
        settings = {
            "listen_interfaces": f"[{peer_host}]:{peer_port}" if ":" in peer_host else f"{peer_host}:{peer_port}",
            "user_agent": "modelcast-node/0.1",
            # A private swarm: no DHT, no local discovery, no port mapping.
            "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
            # uTP over loopback/LAN is ~12x slower than TCP here and buys nothing in a datacentre.
            "enable_outgoing_utp": False, "enable_incoming_utp": False,
            # Several nodes may share an address in tests and on multi-tenant hosts.
            "allow_multiple_connections_per_ip": True,
            # The tracker's interval is short on purpose; libtorrent's 300 s floor would override it.
            "min_announce_interval": 5,
            "stop_tracker_timeout": 2,
            # A peer whose connection closed is tried again after this many seconds (times its
            # failures), not libtorrent's 60: a node that finishes re-adds its torrent as a seed
            # (node_cache/daemon.py), which drops its peers' connections, and a peer still
            # pulling then took the rest from the origin (two-zone pulls under load: 8 of 14 runs
            # above 1.5 origin copies; 1.00-1.14 with this and the origin fill's reconnect wait).
            "min_reconnect_time": 1,
            # A lone node's URL seed (node_cache/origin_fill.py) asks the registry for up to this
            # much per request, not 16 MiB: each request costs the registry a fixed ~1.5 ms of
            # Python (accept, auth, the first-copy gate, headers) beside the bytes' sendfile.
            "urlseed_max_request_bytes": 64 << 20,
            "connections_limit": connections,
            "connection_speed": 200,
            "unchoke_slots_limit": -1 if upload_limit == 0 else 16,
            "upload_rate_limit": upload_limit,
            "download_rate_limit": download_limit,
            # Limits are for payload; libtorrent's estimate of IP overhead would take ~5%.
            "rate_limit_ip_overhead": False,
            # piece_progress: a relay waiting for a piece hears the moment it passes its hash;
            # connect: the origin fill hears when the first peer connects (or the last leaves).
            "alert_mask": (lt.alert_category.error | lt.alert_category.status | lt.alert_category.storage
                           | lt.alert_category.tracker | lt.alert_category.peer | lt.alert_category.connect
                           | lt.alert_category.piece_progress),
            "alert_queue_size": 10000,
            # Disk threads (libtorrent 2's pread back end: writes, and reads for peers).  Two or
            # more writers to one file queue on its inode lock and wake each other; one per 4
            # cores, at most 4, cost the least here (2 cores: seeder -20%, origin ingest -15%).
            "aio_threads": aio_threads(),
            "hashing_threads": 2,
        }
        if specific:
            # Connections and announces leave from the node's own address, so the tracker
            # and the other peers see the address this node accepts connections on.
            settings["outgoing_interfaces"] = peer_host
            settings["announce_ip"] = peer_host
        tune_malloc()
        # ca: a CA file that https trackers' certificates may chain to, besides the system's roots.
        with libtorrent_ca(ca):
            self.session = lt.session(settings)
        if upload_limit or download_limit:
            # Peers on loopback/LAN are "local" and skip rate limits unless put in the
            # global peer class; limits are the point, so every address goes there.
            flt = lt.ip_filter()
            flt.add_rule("0.0.0.0", "255.255.255.255", 1 << lt.session.global_peer_class_id)
            flt.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1 << lt.session.global_peer_class_id)
            self.session.set_peer_class_filter(flt)
        self.on_event = on_event
        self._handles: dict[str, lt.torrent_handle] = {}
        self._spans: dict[str, list[PieceSpan]] = {}  # piece_span()'s, per digest (immutable), a few kept
        self._by_hash: dict[str, str] = {}
        self._removing: dict[str, asyncio.Future] = {}  # info-hash -> resolved once its files are closed
        self._errors: dict[str, str] = {}
        self._finished: dict[str, float] = {}  # digest -> loop time its torrent_finished_alert was seen
        self._tracker_peers: dict[str, int] = {}  # peers in the last tracker reply, per digest
        self._url_seeds: dict[str, UrlSeed] = {}  # digest -> its URL seed, while the download has one
        self._recoveries: dict[str, int] = {}
        self._resume: dict[str, list[asyncio.Future]] = {}  # digest -> waiting for resume data
        self._reads: dict[tuple[str, int], list[asyncio.Future]] = {}  # (info-hash, piece) -> waiting readers
        self._arrivals: dict[tuple[str, int], list[asyncio.Future]] = {}  # (digest, piece) -> waiting for it
        self.hash_failures = 0
        self.peers_banned = 0
        # Not set_alert_notify: its Python callback runs on libtorrent's network thread, which
        # must take the GIL while it holds the alert queue's lock, and a thread holding the
        # GIL while it waits on libtorrent (the session's destructor joins the network thread)
        # would deadlock with it.  The file-descriptor notification is a plain write(2).
        self._loop = asyncio.get_running_loop()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.session.set_alert_fd(self._wake_w)
        self._loop.add_reader(self._wake_r, self._on_wake)
        self._safety = self._loop.call_later(SAFETY_PUMP_S, self._safety_pump)

    @property
    def listen_port(self) -> int:
        return self.session.listen_port()

    def add(self, digest: str, ti: TorrentInfo, manifest: Manifest, save_path: str, *,
            trackers: list[str], seed: bool, resume: bytes | None = None, verified: bool = False,
            url_seed: UrlSeed | None = None) -> None:
        """Download (or, with ``seed``, seed without re-checking) ``ti`` into ``save_path``.

        With ``resume`` (libtorrent resume data saved earlier) the pieces it records as
        verified are trusted and not fetched again; without it, files already in
        ``save_path`` are hash-checked and every good piece is kept.

        A seed is in libtorrent's seed mode: each piece is hashed the first time a peer asks
        for it.  With ``verified`` (every file's bytes were just checked against the
        manifest) no piece is hashed again: the seeder's CPU goes to sending.

        With ``url_seed`` (a download only) libtorrent fetches from that web seed itself,
        the bytes never passing through Python, until :meth:`drop_url_seed`.  The binding
        takes a URL seed's headers only on a ``torrent_info`` before the torrent is added,
        hence here.  (Not added held in upload mode while deciding: a seed closes an
        upload-only connection, and two held nodes close theirs and wait a minute to
        reconnect.)
        """
        atp = lt.add_torrent_params()
        if resume:
            try:
                atp = lt.read_resume_data(resume)
            except RuntimeError as exc:
                log.warning("ignoring unreadable resume data of %s: %s", digest, exc)
                atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(ti)
        if url_seed is not None and not seed:
            atp.ti.add_url_seed(url_seed.url, "", url_seed.headers)
        atp.save_path = save_path
        fs = ti.layout()
        prefix = manifest.torrent_name + "/"
        renamed = {}
        for i in range(fs.num_files()):
            if not fs.file_flags(i) & lt.file_storage.flag_pad_file:
                # Files land directly in save_path, without the torrent's root folder.
                renamed[i] = fs.file_path(i)[len(prefix):]
        atp.renamed_files = renamed
        atp.trackers = trackers
        # One tier per tracker (BEP 12): the first is announced to, the next only when it fails.
        atp.tracker_tiers = list(range(len(trackers)))
        flags = (atp.flags | lt.torrent_flags.override_trackers | lt.torrent_flags.disable_dht
                 | lt.torrent_flags.disable_lsd | lt.torrent_flags.disable_pex)
        flags &= ~lt.torrent_flags.auto_managed
        flags &= ~lt.torrent_flags.paused
        if seed:
            flags |= lt.torrent_flags.seed_mode
            if verified:
                atp.verified_pieces = [True] * ti.num_pieces()
        atp.flags = flags
        try:
            handle = self.session.add_torrent(atp)
        except RuntimeError as exc:
            raise PullFailed(f"libtorrent refused {digest}: {exc}") from exc
        self._handles[digest] = handle
        self._by_hash[str(handle.info_hashes().get_best())] = digest
        self._errors.pop(digest, None)
        self._tracker_peers.pop(digest, None)
        self._finished.pop(digest, None)
        self._url_seeds.pop(digest, None)
        if url_seed is not None and not seed:
            self._url_seeds[digest] = url_seed
        if seed:
            # Seed mode posts no piece_finished_alert: every piece is here now.
            for key in [k for k in self._arrivals if k[0] == digest]:
                _resolve_all(self._arrivals.pop(key), None)

    def has(self, digest: str) -> bool:
        return digest in self._handles

    def remove(self, digest: str) -> asyncio.Future:
        """Remove a torrent (files stay); the future resolves once libtorrent has closed its files."""
        done = self._loop.create_future()
        handle = self._handles.pop(digest, None)
        if handle is None:
            done.set_result(None)
            return done
        key = str(handle.info_hashes().get_best())
        self._by_hash.pop(key, None)
        self._url_seeds.pop(digest, None)
        self._removing[key] = done
        for read in [r for r in self._reads if r[0] == key]:
            _fail_all(self._reads.pop(read), PullFailed(f"{digest} left the swarm on this node"))
        _resolve_all(self._resume.pop(digest, []), None)
        self.session.remove_torrent(handle)
        return done

    # ---- the alert pump -------------------------------------------------------------
    def _on_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self.pump()

    def _safety_pump(self) -> None:
        self._safety = self._loop.call_later(SAFETY_PUMP_S, self._safety_pump)
        self.pump()

    def pump(self) -> None:
        """Drain alerts: resolve what waits on them, record finished and failed torrents."""
        try:
            alerts = self.session.pop_alerts()
        except AttributeError:  # closed
            return
        for alert in alerts:
            try:
                self._handle_alert(alert)
            except Exception:  # one bad alert must not stop the pump
                log.exception("handling libtorrent alert %s", type(alert).__name__)

    def _emit(self, digest: str, kind: EngineEvent) -> None:
        if self.on_event is not None:
            self.on_event(digest, kind)

    def _handle_alert(self, alert) -> None:
        if isinstance(alert, lt.torrent_removed_alert):
            done = self._removing.pop(str(alert.info_hashes.get_best()), None)
            if done is not None and not done.done():
                done.set_result(None)
            return
        if isinstance(alert, lt.read_piece_alert):
            self._piece_read(alert)
            return
        digest = self._digest_of(alert)
        if isinstance(alert, lt.piece_finished_alert):
            if digest:
                _resolve_all(self._arrivals.pop((digest, int(alert.piece_index)), []), None)
        elif isinstance(alert, (lt.peer_connect_alert, lt.peer_disconnected_alert)):
            if digest:
                self._emit(digest, "peers")
        elif isinstance(alert, lt.torrent_finished_alert) and digest:
            self._finished[digest] = self._loop.time()
            self._emit(digest, "finished")
        elif isinstance(alert, lt.tracker_reply_alert) and digest:
            self._tracker_peers[digest] = int(alert.num_peers)
            self._emit(digest, "tracker")
        elif isinstance(alert, lt.save_resume_data_alert) and digest:
            _resolve_all(self._resume.pop(digest, []), bytes(lt.write_resume_data_buf(alert.params)))
        elif isinstance(alert, lt.save_resume_data_failed_alert) and digest:
            _resolve_all(self._resume.pop(digest, []), None)
        elif isinstance(alert, (lt.state_changed_alert, lt.torrent_checked_alert)) and digest:
            self._emit(digest, "state")
        elif isinstance(alert, lt.url_seed_alert) and digest:
            seed = self._url_seeds.get(digest)
            if seed is not None and seed.state == URL_SEED_RUNNING:
                seed.state, seed.error = URL_SEED_FAILED, alert.error_message() or alert.message()
                # An HTTP refusal reads "409 Conflict" (the error code itself is 0).
                code = seed.error.split(" ", 1)[0]
                seed.status = int(code) if code.isdigit() and len(code) == 3 else None
                self._emit(digest, "url_seed")
        elif isinstance(alert, lt.peer_ban_alert):
            self.peers_banned += 1
            log.warning("banned peer %s: %s", alert.ip, alert.message())
        elif isinstance(alert, lt.torrent_error_alert) and digest and self._recoverable(digest, alert):
            pass
        elif isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)) and digest:
            self._errors[digest] = alert.message()
            log.warning("torrent %s: %s", digest, alert.message())
            self._emit(digest, "error")
        elif isinstance(alert, lt.hash_failed_alert):
            # A peer (or the origin) sent bytes that fail the piece hash; libtorrent
            # drops the piece and bans the peer that sent it (smart-ban plugin).
            self.hash_failures += 1
            log.warning("%s", alert.message())
        elif alert.category() & lt.alert_category.error:
            log.debug("libtorrent: %s", alert.message())

    def _recoverable(self, digest: str, alert) -> bool:
        """Recover from a hybrid torrent's v1/v2 hash disagreement instead of failing the pull.

        libtorrent pauses a hybrid torrent and forgets every verified piece when one hash
        of a piece passes and the other fails, which bytes from a bad peer can provoke.
        The data on disk is still checkable, so: clear the error, re-check, carry on.
        """
        err = alert.error
        if err.value() != INCONSISTENT_HASHES or err.category().name() != "libtorrent":
            return False
        tries = self._recoveries.get(digest, 0)
        if tries >= MAX_RECOVERIES:
            return False
        self._recoveries[digest] = tries + 1
        self.hash_failures += 1
        handle = self._handles[digest]
        log.warning("torrent %s: %s; re-checking the pieces on disk and resuming (%d/%d)",
                    digest, alert.message(), tries + 1, MAX_RECOVERIES)
        handle.clear_error()
        handle.force_recheck()
        handle.resume()
        return True

    def _digest_of(self, alert) -> str | None:
        handle = getattr(alert, "handle", None)
        if handle is None or not handle.is_valid():
            return None
        return self._by_hash.get(str(handle.info_hashes().get_best()))

    # ---- what the node asks ---------------------------------------------------------
    def tracker_peers(self, digest: str) -> int | None:
        """Peers the tracker handed out in its last reply (None before any reply)."""
        return self._tracker_peers.get(digest)

    def finished(self, digest: str) -> bool:
        return digest in self._finished

    def finished_at(self, digest: str) -> float | None:
        """Loop time (``loop.time()``) at which the torrent was seen finished, or None."""
        return self._finished.get(digest)

    def error(self, digest: str) -> str | None:
        return self._errors.get(digest)

    def progress(self, digest: str) -> TorrentProgress | None:
        handle = self._handles.get(digest)
        if handle is None:
            return None
        return self._progress(digest, handle.status(PROGRESS_FLAGS))

    def _progress(self, digest: str, s) -> TorrentProgress:
        """``digest``'s progress from its status ``s`` (queried with at least :data:`PROGRESS_FLAGS`)."""
        err = self._errors.get(digest) or (str(s.errc.message()) if s.errc.value() else None)
        return TorrentProgress(
            state=str(s.state), done_bytes=int(s.total_wanted_done), total_bytes=int(s.total_wanted),
            payload_download=int(s.total_payload_download), payload_upload=int(s.total_payload_upload),
            download_rate=int(s.download_payload_rate), upload_rate=int(s.upload_payload_rate),
            # A running URL seed is a connection, not a peer.
            peers=self.peers(digest) if self._url_seed_running(digest) else int(s.num_peers),
            seeds=int(s.num_seeds), finished=bool(s.is_finished), error=err,
        )

    # ---- a download's URL seed ---------------------------------------------------------
    def url_seed(self, digest: str) -> UrlSeed | None:
        """The download's URL seed (see :meth:`add`), None if it has none."""
        return self._url_seeds.get(digest)

    def _url_seed_running(self, digest: str) -> bool:
        seed = self._url_seeds.get(digest)
        return seed is not None and seed.state == URL_SEED_RUNNING

    def drop_url_seed(self, digest: str) -> None:
        """Take the URL seed away (its connection closes; its requests go back to the picker).
        What it brought stays counted."""
        seed = self._url_seeds.get(digest)
        if seed is None or seed.state == URL_SEED_DROPPED:
            return
        handle = self._handles[digest]
        seed.bytes = self._url_seed_payload(handle, seed)
        handle.remove_url_seed(seed.url)
        seed.state = URL_SEED_DROPPED

    def url_seed_bytes(self, digest: str) -> int:
        """Payload the download's URL seed brought so far (0 without one)."""
        seed = self._url_seeds.get(digest)
        if seed is None:
            return 0
        if seed.state == URL_SEED_DROPPED:
            return seed.bytes
        return self._url_seed_payload(self._handles[digest], seed)

    @staticmethod
    def _url_seed_payload(handle, seed: UrlSeed) -> int:
        """What the web seed sent: with no peer connected, the torrent's whole payload (exact);
        with peers, what its connection was last seen to have sent (peers' own counts lag the
        torrent's by the blocks in flight, so the difference would credit the origin with them)."""
        infos = handle.get_peer_info()
        web = sum(p.total_download for p in infos if p.connection_type != lt.peer_info.standard_bittorrent)
        seed.seen = max(seed.seen, web)
        payload = int(handle.status(PROGRESS_FLAGS).total_payload_download)
        if not any(p.connection_type == lt.peer_info.standard_bittorrent for p in infos):
            return payload
        return min(seed.seen, payload)

    def peers(self, digest: str) -> int:
        """BitTorrent peers connected to the download now (web seed connections not counted)."""
        handle = self._handles.get(digest)
        if handle is None:
            return 0
        return sum(1 for p in handle.get_peer_info() if p.connection_type == lt.peer_info.standard_bittorrent)

    def swarm_view(self, digest: str) -> tuple[TorrentProgress, list[int], list[int]]:
        """(progress, pieces we lack, availability among connected peers): what the origin
        fill looks at, from one status query and one availability query.

        Not libtorrent's download queue: a piece some peer is sending us is a piece a
        connected peer has (availability >= 1), and turning the queue into Python (a dict per
        partial piece and per block) cost each node of a 16-node fan-out ~1.2 ms a look.
        """
        handle = self._handles[digest]
        s = handle.status(PROGRESS_FLAGS | lt.status_flags_t.query_pieces)
        have = s.pieces
        missing = [i for i, h in enumerate(have) if not h]
        avail = handle.piece_availability()
        if len(avail) < len(have):
            # libtorrent answers an empty list while the torrent has no piece picker yet
            # (just added, or between states); then no peer is known to have anything.
            avail = [0] * len(have)
        return self._progress(digest, s), missing, avail

    def have_piece(self, digest: str, piece: int) -> bool:
        """Whether ``piece`` of ``digest`` is here and passed its hash check."""
        handle = self._handles.get(digest)
        return handle is not None and 0 <= piece < handle.torrent_file().num_pieces() and handle.have_piece(piece)

    def piece_arrival(self, digest: str, piece: int) -> asyncio.Future:
        """A future that resolves when ``piece`` of ``digest`` passes its hash here (or it is seeded).

        Check :meth:`have_piece` first, with no ``await`` in between: a piece already here
        posts no more alerts.  Cancelling the future (a timeout) forgets it.
        """
        fut = self._loop.create_future()
        key = (digest, piece)
        self._arrivals.setdefault(key, []).append(fut)
        fut.add_done_callback(lambda f: self._forget_arrival(key, f))
        return fut

    def _forget_arrival(self, key: tuple[str, int], fut: asyncio.Future) -> None:
        waiting = self._arrivals.get(key)
        if waiting and fut in waiting:
            waiting.remove(fut)
            if not waiting:
                del self._arrivals[key]

    def piece_size(self, digest: str, piece: int) -> int | None:
        """The size of ``piece`` (padding included), or None if there is no such piece here."""
        handle = self._handles.get(digest)
        if handle is None:
            return None
        ti = handle.torrent_file()
        return ti.piece_size(piece) if 0 <= piece < ti.num_pieces() else None

    def piece_span(self, digest: str, piece: int) -> PieceSpan | None:
        """Where ``piece`` of ``digest`` lives (file and range), or None if there is no such piece here."""
        handle = self._handles.get(digest)
        if handle is None:
            return None
        spans = self._spans.get(digest)
        if spans is None:
            spans = piece_spans(handle.torrent_file())
            self._spans[digest] = spans
            while len(self._spans) > 64:
                del self._spans[next(iter(self._spans))]
        return spans[piece] if 0 <= piece < len(spans) else None

    def read_piece(self, digest: str, piece: int) -> asyncio.Future:
        """A future of ``piece``'s bytes (padding included), read by libtorrent and answered by an alert."""
        fut = self._loop.create_future()
        handle = self._handles.get(digest)
        if handle is None:
            fut.set_exception(PullFailed(f"{digest} is not in the swarm on this node"))
            return fut
        key = (str(handle.info_hashes().get_best()), piece)
        waiting = self._reads.setdefault(key, [])
        waiting.append(fut)
        if len(waiting) == 1:
            handle.read_piece(piece)
        return fut

    def _piece_read(self, alert) -> None:
        handle = alert.handle
        if not handle.is_valid():
            return  # its torrent was removed, and remove() failed its readers
        futures = self._reads.pop((str(handle.info_hashes().get_best()), int(alert.piece)), [])
        if alert.error.value() != 0:
            _fail_all(futures, PullFailed(f"reading piece {alert.piece}: {alert.error.message()}"))
        else:
            _resolve_all(futures, bytes(alert.buffer))

    def add_piece(self, digest: str, piece: int, data: bytes) -> None:
        """Hand libtorrent a piece fetched from the origin; it checks the piece hash itself.

        A piece from anyone less trusted than the origin goes through :meth:`add_piece_checked`.
        """
        handle = self._handles.get(digest)
        if handle is not None:
            handle.add_piece(piece, data, 0)

    async def add_piece_checked(self, digest: str, piece: int, data: bytes) -> bool:
        """Hand libtorrent a piece from a node of another zone only if it matches its hash.

        Checked before libtorrent sees it (SHA-1, in a thread: a piece is up to 16 MiB):
        libtorrent blames a piece that fails its hash on every peer that sent a block of it,
        so a forged piece handed to it (a garbage relay push, a fake holder's answer) would
        get the honest peers that sent the other blocks banned and stall the pull (issue #15).
        Returns False, counting a hash failure, for bytes that do not match (or a torrent no
        longer here); nothing is written then.
        """
        handle = self._handles.get(digest)
        ti = handle.torrent_file() if handle is not None else None
        if ti is None or not 0 <= piece < ti.num_pieces() or len(data) != ti.piece_size(piece):
            self.hash_failures += handle is not None
            return False
        if ti.info_hashes().has_v1():
            expected = ti.hash_for_piece(piece)
            got = await asyncio.to_thread(lambda: hashlib.sha1(data).digest())
            if got != expected:
                self.hash_failures += 1
                return False
        handle = self._handles.get(digest)  # still here after the wait?
        if handle is None:
            return False
        handle.add_piece(piece, data, 0)
        return True

    def save_resume(self, digest: str) -> asyncio.Future:
        """A future of the resume data of ``digest`` (None if nothing changed since the last, or it failed)."""
        fut = self._loop.create_future()
        handle = self._handles.get(digest)
        if handle is None or not handle.need_save_resume_data():
            fut.set_result(None)
            return fut
        # Waiters that gave up (timed out) are dropped: if nobody still waits, ask again.
        waiting = self._resume[digest] = [f for f in self._resume.get(digest, []) if not f.done()]
        waiting.append(fut)
        if len(waiting) == 1:
            handle.save_resume_data(lt.torrent_handle.flush_disk_cache)
        return fut

    def reannounce(self, digest: str, at_once: bool = False) -> None:
        """Announce ``digest`` to its trackers now; ``at_once``: even within the tracker's min interval."""
        handle = self._handles.get(digest)
        if handle is not None:
            if at_once:
                handle.force_reannounce(0, -1, lt.reannounce_flags_t.ignore_min_interval)
            else:
                handle.force_reannounce()

    def reannounce_all(self) -> int:
        """Announce every torrent now (the tracker lost its swarms); how many there are."""
        for handle in self._handles.values():
            handle.force_reannounce()
        return len(self._handles)

    async def close(self) -> None:
        """Leave every swarm: libtorrent sends 'stopped' to the tracker as the session ends."""
        self._loop.remove_reader(self._wake_r)
        self._safety.cancel()
        for digest in list(self._handles):
            self.remove(digest)
        for waiting in [*self._resume.values(), *self._arrivals.values(), *self._removing.values()]:
            _resolve_all(waiting if isinstance(waiting, list) else [waiting], None)
        self._resume.clear()
        self._arrivals.clear()
        self._removing.clear()
        # The session's destructor joins libtorrent's threads: not on the event loop.
        await asyncio.to_thread(self._end_session)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _end_session(self) -> None:
        self.session.pause()
        del self.session


def _resolve_all(futures: list[asyncio.Future], value) -> None:
    for fut in list(futures):
        if not fut.done():
            fut.set_result(value)


def _fail_all(futures: list[asyncio.Future], exc: Exception) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(exc)
