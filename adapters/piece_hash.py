"""Piece hashes of a torrent, computed on every core: SHA-1 per piece (v1), SHA-256 merkle trees (v2).

libtorrent's ``set_piece_hashes`` hashes on one thread and its Python binding holds the
GIL throughout, so a publish was bounded by one core doing both hash families (measured:
443 MB/s with the other core idle).  Here the work is cut into runs of whole pieces of one
file, and a thread pool hashes them: ``hashlib`` releases the GIL on buffers this large,
so the threads run on separate cores.  Each run is hashed where its bytes lie, through a
read-only mapping of the file's pages: reading them into a buffer of our own first cost
~0.13 CPU-s per GiB, a tenth of what both hash families cost, on a 2-core machine where
the hashing is the bound.  A file truncated under the mapping ends the process with SIGBUS
(checked before each run, so only a truncation during that run's ~30 ms can).

The layout (which file starts at which piece) comes from the caller; with the pad files a
hybrid or canonical torrent has, every file starts on a piece boundary, so each piece
belongs to one file and the runs are independent.  BEP 52's trees:

* a leaf is the SHA-256 of one 16 KiB block of a file (the last block may be shorter);
* a piece's layer hash is the merkle root of its ``piece_length / 16 KiB`` leaves, the
  missing ones (past the end of the file) being 32 zero bytes;
* a file's ``pieces root`` is the merkle root of its piece-layer hashes padded to a power of
  two with the root of an all-zero piece; a file of at most one piece has no piece layer
  and its root is the merkle root of its leaves padded to a power of two.

Nothing here imports libtorrent: it is plain hashing, tested against libtorrent's own
output in tests/test_publish.py.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from modelcast.errors import ModelcastError

BLOCK = 16 << 10  # BEP 52: the merkle tree's leaves cover 16 KiB blocks
ZERO = bytes(32)
RUN_BYTES = 32 << 20  # work unit: whole pieces of one file, about this many bytes


def merkle_root(leaves: list[bytes], width: int, pad: bytes = ZERO) -> bytes:
    """Root of a merkle tree over ``leaves`` padded with ``pad`` to ``width`` (a power of two)."""
    layer = list(leaves) + [pad] * (width - len(leaves))
    while len(layer) > 1:
        layer = [hashlib.sha256(layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)]
    return layer[0]


def close_mapping(mapped: mmap.mmap) -> None:
    """Unmap now, or (while a failure's traceback still holds a view of it) once that is freed."""
    try:
        mapped.close()
    except BufferError:
        pass


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class FileSlot:
    """One non-empty file of the torrent: where its bytes are and where its pieces start."""

    source: Path
    size: int
    first_piece: int


@dataclass
class FileHashes:
    """What the torrent needs of one file's v2 tree."""

    pieces_root: bytes
    piece_layer: bytes  # the concatenated piece-layer hashes; empty for a file of <= 1 piece


class PieceHasher:
    """Hash ``files`` into v1 piece hashes and (unless ``v1_only``) v2 trees, on ``workers`` threads."""

    def __init__(self, files: list[FileSlot], piece_length: int, total_size: int, *, v1_only: bool = False,
                 workers: int | None = None, on_piece: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None):
        if piece_length < BLOCK or piece_length & (piece_length - 1):
            raise ValueError(f"piece length {piece_length} is not a power of two of at least 16 KiB")
        self.files = files
        self.piece_length = piece_length
        self.total_size = total_size  # of the whole torrent, pad files included
        num_pieces = -(-total_size // piece_length)
        self.num_pieces = num_pieces
        self.v1_only = v1_only
        self.workers = workers or len(os.sched_getaffinity(0))
        self.on_piece = on_piece
        self.stop = stop
        self._lock = threading.Lock()
        self.v1 = [b""] * num_pieces
        # piece index -> that piece's v2 layer hash (files > 1 piece) or its leaves (files <= 1 piece)
        self._v2: dict[int, bytes | list[bytes]] = {}

    def run(self) -> tuple[bytes, dict[int, FileHashes]]:
        """Return (v1 ``pieces`` string, {index in ``files``: v2 hashes}); raises if a file changed size."""
        runs_per_piece = max(1, RUN_BYTES // self.piece_length)
        # Largest file first, the order the publish's xxh3 pass reads them in: on a cold page
        # cache that pass reads ahead of the hashing threads, which then find the pages there.
        order = sorted(self.files, key=lambda f: -f.size)
        runs = [(f, start, min(start + runs_per_piece, self._pieces_of(f)))
                for f in order for start in range(0, self._pieces_of(f), runs_per_piece)]
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="piece-hash")
        try:
            for done in [pool.submit(self._hash_run, *run) for run in runs]:
                done.result()
        finally:
            # On the first failure the queued runs are dropped, not hashed for nothing.
            pool.shutdown(wait=True, cancel_futures=True)
        missing = [i for i, h in enumerate(self.v1) if not h]
        if missing:
            raise ModelcastError(f"{len(missing)} pieces belong to no file (first: {missing[0]}): the layout is wrong")
        v2 = {} if self.v1_only else {i: self._file_hashes(f) for i, f in enumerate(self.files)}
        return b"".join(self.v1), v2

    def _pieces_of(self, f: FileSlot) -> int:
        return -(-f.size // self.piece_length)

    def _hash_run(self, f: FileSlot, start: int, end: int) -> None:
        length = self.piece_length
        first = start * length
        last = min(end * length, f.size)  # the run's end in the file
        fd = os.open(f.source, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size < last:
                raise ModelcastError(f"{f.source} shrank while it was hashed (now {os.fstat(fd).st_size} of "
                                     f"{f.size} bytes); publish again once it is no longer written")
            # Hashed where the bytes lie, in the page cache (see the module notes).
            mapped = mmap.mmap(fd, last - first, prot=mmap.PROT_READ, offset=first)
            try:
                mapped.madvise(mmap.MADV_SEQUENTIAL)
                self._hash_pieces(f, start, end, mapped)
            finally:
                close_mapping(mapped)
        finally:
            os.close(fd)

    def _hash_pieces(self, f: FileSlot, start: int, end: int, mapped: mmap.mmap) -> None:
        length = self.piece_length
        sha1, sha256 = hashlib.sha1, hashlib.sha256
        with memoryview(mapped) as view:
            for k in range(start, end):
                if self.stop is not None and self.stop.is_set():
                    raise ModelcastError("piece hashing stopped because another publish step failed")
                at = (k - start) * length
                want = min(length, f.size - k * length)
                piece = view[at:at + want]
                # v1: the last piece of a file runs on into its pad file's zeros, or ends
                # the torrent short (the last file of a torrent without tail padding).
                piece_index = f.first_piece + k
                v1_len = min(length, self.total_size - piece_index * length)
                h1 = sha1(piece)
                if v1_len > want:
                    h1.update(bytes(v1_len - want))
                v2: bytes | list[bytes] | None = None
                if not self.v1_only:
                    leaves = [sha256(piece[b:b + BLOCK]).digest() for b in range(0, want, BLOCK)]
                    v2 = leaves if f.size <= length else merkle_root(leaves, length // BLOCK)
                piece.release()
                with self._lock:
                    self.v1[piece_index] = h1.digest()
                    if v2 is not None:
                        self._v2[piece_index] = v2
                if self.on_piece is not None:
                    self.on_piece(piece_index)

    def _file_hashes(self, f: FileSlot) -> FileHashes:
        pieces = self._pieces_of(f)
        if f.size <= self.piece_length:
            leaves = self._v2[f.first_piece]
            return FileHashes(merkle_root(leaves, pow2_at_least(len(leaves))), b"")
        layer = [self._v2[f.first_piece + k] for k in range(pieces)]
        pad = merkle_root([], self.piece_length // BLOCK)
        return FileHashes(merkle_root(layer, pow2_at_least(pieces), pad), b"".join(layer))
