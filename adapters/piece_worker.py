"""Hashing a run of whole pieces of one file: SHA-1 per piece (v1), SHA-256 leaves and trees (v2).

Standard library only, so that it also runs as :mod:`adapters.piece_hash`'s worker process,
started as ``python -I -S piece_worker.py`` (no site-packages, nor json and the ``re`` it
imports: it starts in ~10 ms of CPU): it reads runs on stdin, each a :data:`RUN` and the
file's path, and answers each with its pieces' hashes on stdout in records of :data:`HEAD`
(kind, payload length) and a payload:

* ``p``: ``!I`` piece index in the file, its SHA-1 (20 bytes), then its v2 part: nothing
  (:data:`V1_ONLY`), its layer hash (:data:`LAYER`, 32 bytes) or its leaves (:data:`LEAVES`,
  32 bytes each: a file of at most one piece has no piece layer);
* ``d``: the run is done; ``s``: the file is shorter than the run (payload: its size now);
* ``o``: an OSError (payload: ``!I`` errno, then its text); ``e``: any other failure (text).

A worker of its own per core, rather than threads of the publishing process: each 16 KiB
leaf is one ``hashlib`` call that releases the GIL and takes it back, and with two hashing
threads (and the publish's xxh3, upload and event-loop threads) in one process a thread
often found the GIL taken when its hash ended and slept until it was handed over; a
worker process never waits for a lock, and a file truncated under its mapping ends the
worker (SIGBUS), which the publish reports, rather than the publish itself.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
import struct
import sys

BLOCK = 16 << 10  # BEP 52: the merkle tree's leaves cover 16 KiB blocks
ZERO = bytes(32)
V1_ONLY, LAYER, LEAVES = 0, 1, 2  # what follows a piece's SHA-1 in its result
HEAD = struct.Struct("!cI")  # record kind, payload length
INDEX = struct.Struct("!I")
# file size, first piece, end piece, piece length, v1 tail, mode, length of the path that follows
RUN = struct.Struct("!QIIIQBI")


def encode_run(path: str, file_size: int, start: int, end: int, piece_length: int, v1_tail: int, mode: int) -> bytes:
    """A run as the worker reads it: :data:`RUN`, then the path's bytes."""
    name = os.fsencode(path)
    return RUN.pack(file_size, start, end, piece_length, v1_tail, mode, len(name)) + name


class Shrank(Exception):
    """The file is shorter than the run: it was truncated or rewritten since the scan."""

    def __init__(self, now: int):
        super().__init__(now)
        self.now = now


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


def hash_run(path: str, file_size: int, start: int, end: int, piece_length: int, v1_tail: int, mode: int,
             emit, stop=None) -> None:
    """Hash pieces ``start`` to ``end - 1`` of the file at ``path``; ``emit(k, sha1, v2)`` each.

    ``v1_tail`` zero bytes follow the file's last piece in its v1 hash (the pad file after
    it, or nothing at the end of a torrent without tail padding).  The bytes are hashed where
    they lie, through a read-only mapping of the page cache.  Raises :class:`Shrank` if the
    file no longer holds the run (checked before the run and before each piece), OSError
    as is.  ``stop()`` true ends the run early (the caller then says why).
    """
    first = start * piece_length
    last = min(end * piece_length, file_size)  # the run's end in the file
    fd = os.open(path, os.O_RDONLY)
    try:
        now = os.fstat(fd).st_size
        if now < last:
            raise Shrank(now)
        mapped = mmap.mmap(fd, last - first, prot=mmap.PROT_READ, offset=first)
        try:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            _hash_pieces(fd, mapped, file_size, start, end, piece_length, v1_tail, mode, last, emit, stop)
        finally:
            close_mapping(mapped)
    finally:
        os.close(fd)


def _hash_pieces(fd, mapped, file_size, start, end, piece_length, v1_tail, mode, last, emit, stop) -> None:
    sha1, sha256 = hashlib.sha1, hashlib.sha256
    fstat = os.fstat
    width = piece_length // BLOCK
    with memoryview(mapped) as view:
        for k in range(start, end):
            if stop is not None and stop():
                return
            if k > start and fstat(fd).st_size < last:
                raise Shrank(fstat(fd).st_size)
            at = (k - start) * piece_length
            want = min(piece_length, file_size - k * piece_length)
            piece = view[at:at + want]
            h1 = sha1(piece)
            if want < piece_length and v1_tail:
                h1.update(bytes(v1_tail))
            if mode == V1_ONLY:
                v2 = b""
            else:
                leaves = [sha256(piece[b:b + BLOCK]).digest() for b in range(0, want, BLOCK)]
                v2 = b"".join(leaves) if mode == LEAVES else merkle_root(leaves, width)
            piece.release()
            emit(k, h1.digest(), v2)


def worker_main() -> int:
    """The worker process: hash each run named on stdin, answer on stdout (see the module notes)."""
    # Ctrl-C reaches the whole process group: the publish ends its workers itself.  A
    # publish that died leaves a broken pipe, which ends the worker without a word.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    inp, out = sys.stdin.buffer, sys.stdout.buffer

    def send(kind: bytes, payload: bytes) -> None:
        out.write(HEAD.pack(kind, len(payload)))
        out.write(payload)

    def emit(k: int, h1: bytes, v2: bytes) -> None:
        send(b"p", INDEX.pack(k) + h1 + v2)

    while head := inp.read(RUN.size):
        if len(head) < RUN.size:
            return 1
        file_size, start, end, piece_length, v1_tail, mode, name_len = RUN.unpack(head)
        path = os.fsdecode(inp.read(name_len))
        try:
            hash_run(path, file_size, start, end, piece_length, v1_tail, mode, emit)
            send(b"d", b"")
        except Shrank as exc:
            send(b"s", str(exc.now).encode())
        except OSError as exc:
            send(b"o", INDEX.pack(exc.errno or 0) + (exc.strerror or str(exc)).encode(errors="replace"))
        except Exception as exc:  # noqa: BLE001 - told to the publish, which says it in one line
            send(b"e", f"{type(exc).__name__}: {exc}".encode(errors="replace"))
        out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main())
