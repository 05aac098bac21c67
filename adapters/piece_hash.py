"""Piece hashes of a torrent, computed on every core: SHA-1 per piece (v1), SHA-256 merkle trees (v2).

libtorrent's ``set_piece_hashes`` hashes on one thread and its Python binding holds the
GIL throughout, so a publish was bounded by one core doing both hash families (measured:
443 MB/s with the other core idle).  Here the work is cut into runs of whole pieces of one
file (about 8 MiB), handed out one at a time to a worker process per core
(:mod:`adapters.piece_worker`, which does the hashing); a small torrent, or a machine where
no process can be started, is hashed on threads of this process instead (``hashlib``
releases the GIL on buffers this large).  Processes rather than threads: with a leaf hash
every 16 KiB, threads of one process kept finding the GIL taken when their hash ended and
slept until it was handed over (a 1 GiB publish kept its 2 cores 91% busy, and spent 13%
more CPU than the hashes themselves).  Each run is hashed where its bytes lie, through a
read-only mapping of the file's pages: reading them into a buffer of our own first cost
~0.13 CPU-s per GiB, a tenth of what both hash families cost.  On a cold page cache the
kernel is asked for the runs' bytes (``POSIX_FADV_WILLNEED``) up to 64 MiB beyond the runs
handed out, from a thread of its own, so that the workers find them read; the publish's xxh3
thread reads the files in the same order.  The file's size is checked before each piece; a
file truncated under a worker's mapping ends that worker with SIGBUS, which is reported as
the file having changed.

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

import os
import signal
import subprocess
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from modelcast.errors import ModelcastError

from . import piece_worker
from .piece_worker import BLOCK, HEAD, INDEX, LAYER, LEAVES, V1_ONLY, ZERO, Shrank, merkle_root

__all__ = ["BLOCK", "ZERO", "FileHashes", "FileSlot", "PieceHasher", "merkle_root", "pow2_at_least"]

RUN_BYTES = 8 << 20  # work unit: whole pieces of one file, about this many bytes
PROCESS_MIN = 96 << 20  # smaller torrents are hashed on threads: starting a worker costs ~10 ms of CPU
IN_FLIGHT = 2  # runs handed to a worker at once: it never waits for the next one
READ_AHEAD = 64 << 20  # bytes the kernel is asked to read beyond the runs handed out (a cold page cache)


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


@dataclass(frozen=True)
class _Run:
    """Pieces ``start`` to ``end - 1`` of one file, and how to hash them."""

    slot: FileSlot
    start: int
    end: int
    v1_tail: int  # zero bytes after the file's last piece in its v1 hash
    mode: int  # piece_worker.V1_ONLY, LAYER or LEAVES

    def args(self, piece_length: int) -> list:
        return [os.fsdecode(self.slot.source), self.slot.size, self.start, self.end, piece_length,
                self.v1_tail, self.mode]


class PieceHasher:
    """Hash ``files`` into v1 piece hashes and (unless ``v1_only``) v2 trees, on ``workers`` cores.

    ``processes``: True hashes in worker processes, False on threads of this process, None
    (default) chooses by size (see :data:`PROCESS_MIN`).
    """

    def __init__(self, files: list[FileSlot], piece_length: int, total_size: int, *, v1_only: bool = False,
                 workers: int | None = None, on_piece: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None, processes: bool | None = None):
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
        self.processes = processes
        self._lock = threading.Lock()
        self._failed = threading.Event()  # one run failed: the others stop
        self.v1 = [b""] * num_pieces
        # piece index -> that piece's v2 layer hash (files > 1 piece) or its leaves (files <= 1 piece)
        self._v2: dict[int, bytes | list[bytes]] = {}

    def run(self) -> tuple[bytes, dict[int, FileHashes]]:
        """Return (v1 ``pieces`` string, {index in ``files``: v2 hashes}); raises if a file changed size."""
        runs = self._runs()
        workers = max(1, min(self.workers, len(runs)))
        use_processes = self.processes
        if use_processes is None:
            use_processes = bool(runs) and sum(f.size for f in self.files) >= PROCESS_MIN
        # A worker runs piece_worker.py by its path: none where the code is packed (a zip).
        use_processes = use_processes and os.path.isfile(piece_worker.__file__)
        if use_processes:
            self._run_in_processes(runs, workers)
        else:
            self._run_in_threads(runs, workers)
        missing = [i for i, h in enumerate(self.v1) if not h]
        if missing:
            raise ModelcastError(f"{len(missing)} pieces belong to no file (first: {missing[0]}): the layout is wrong")
        v2 = {} if self.v1_only else {i: self._file_hashes(f) for i, f in enumerate(self.files)}
        return b"".join(self.v1), v2

    def _runs(self) -> list[_Run]:
        length = self.piece_length
        per_run = max(1, RUN_BYTES // length)
        runs = []
        # Largest file first (then by path), the order the publish's xxh3 pass reads them in: on
        # a cold page cache that pass reads ahead of the hashing, which then finds the pages there.
        for f in sorted(self.files, key=lambda f: (-f.size, os.fsdecode(f.source))):
            pieces = self._pieces_of(f)
            last = f.first_piece + pieces - 1
            # v1: the last piece of a file runs on into its pad file's zeros, or ends the
            # torrent short (the last file of a torrent without tail padding).
            v1_tail = min(length, self.total_size - last * length) - (f.size - (pieces - 1) * length)
            mode = V1_ONLY if self.v1_only else LEAVES if f.size <= length else LAYER
            runs.extend(_Run(f, start, min(start + per_run, pieces), v1_tail, mode)
                        for start in range(0, pieces, per_run))
        return runs

    def _pieces_of(self, f: FileSlot) -> int:
        return -(-f.size // self.piece_length)

    def _stopped(self) -> bool:
        return self._failed.is_set() or (self.stop is not None and self.stop.is_set())

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise ModelcastError("piece hashing stopped because another publish step failed")

    def _record(self, run: _Run, k: int, h1: bytes, v2: bytes) -> None:
        index = run.slot.first_piece + k
        hashes: bytes | list[bytes] | None = None
        if run.mode == LAYER:
            hashes = v2
        elif run.mode == LEAVES:
            hashes = [v2[i:i + 32] for i in range(0, len(v2), 32)]
        with self._lock:
            self.v1[index] = h1
            if hashes is not None:
                self._v2[index] = hashes
        if self.on_piece is not None:
            self.on_piece(index)

    def _shrank(self, run: _Run, now: int) -> ModelcastError:
        return ModelcastError(f"{run.slot.source} shrank while it was hashed (now {now} of {run.slot.size} bytes); "
                              "publish again once it is no longer written")

    # -- threads of this process -----------------------------------------------------------

    def _run_in_threads(self, runs: list[_Run], workers: int) -> None:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="piece-hash")
        try:
            for done in [pool.submit(self._hash_run_here, run) for run in runs]:
                done.result()
        finally:
            # On the first failure the queued runs are dropped, not hashed for nothing.
            self._failed.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _hash_run_here(self, run: _Run) -> None:
        self._check_stop()
        if self._failed.is_set():
            return
        try:
            piece_worker.hash_run(*run.args(self.piece_length), lambda k, h1, v2: self._record(run, k, h1, v2),
                                  self._stopped)
        except Shrank as exc:
            raise self._shrank(run, exc.now) from None
        self._check_stop()

    # -- worker processes -----------------------------------------------------------------

    def _run_in_processes(self, runs: list[_Run], workers: int) -> None:
        procs: list[subprocess.Popen] = []
        try:
            for _ in range(workers):
                procs.append(subprocess.Popen([sys.executable, "-I", "-S", piece_worker.__file__],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        except OSError:
            # No process to be had (a sandbox, a frozen executable): hash on threads here.
            for proc in procs:
                proc.kill()
                proc.wait()
            return self._run_in_threads(runs, workers)
        todo = iter(runs)
        take_lock = threading.Lock()
        handed = 0
        ahead = _ReadAhead(runs, self.piece_length)

        def take() -> _Run | None:
            nonlocal handed
            with take_lock:
                run = None if self._stopped() else next(todo, None)
                handed += 1
                ahead.handed(handed)
                return run

        errors: list[BaseException] = []
        threads = [threading.Thread(target=self._drive, args=(proc, take, errors), name=f"piece-hash-{i}", daemon=True)
                   for i, proc in enumerate(procs)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            self._failed.set()
            ahead.close()
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                proc.stdout.close()
        self._check_stop()
        if errors:
            raise errors[0]

    def _drive(self, proc: subprocess.Popen, take: Callable[[], _Run | None], errors: list[BaseException]) -> None:
        """Hand runs to one worker, IN_FLIGHT at a time, and take in its answers (a thread per worker)."""
        pending: deque[_Run] = deque()
        try:
            while True:
                while len(pending) < IN_FLIGHT and (run := take()) is not None:
                    pending.append(run)
                    try:
                        proc.stdin.write(piece_worker.encode_run(*run.args(self.piece_length)))
                        proc.stdin.flush()
                    except BrokenPipeError:
                        raise self._died(proc, pending[0]) from None
                if not pending:
                    proc.stdin.close()
                    return
                if not self._answers(proc, pending.popleft()):
                    return  # stopped: the worker is ended, its remaining answers unread
        except BaseException as exc:  # told to run(), which raises the first
            self._failed.set()
            errors.append(exc)

    def _answers(self, proc: subprocess.Popen, run: _Run) -> bool:
        """Take in one run's answers; False if hashing was stopped before they were all in."""
        out = proc.stdout
        while True:
            head = out.read(HEAD.size)
            if len(head) < HEAD.size:
                raise self._died(proc, run)
            kind, n = HEAD.unpack(head)
            payload = out.read(n)
            if len(payload) < n:
                raise self._died(proc, run)
            if kind == b"p":
                (k,) = INDEX.unpack_from(payload)
                self._record(run, k, payload[4:24], payload[24:])
                if self._stopped():
                    return False
            elif kind == b"d":
                return True
            elif kind == b"s":
                raise self._shrank(run, int(payload))
            elif kind == b"o":
                (code,) = INDEX.unpack_from(payload)
                raise OSError(code, payload[INDEX.size:].decode(errors="replace"), os.fsdecode(run.slot.source))
            else:
                raise ModelcastError(f"hashing {run.slot.source} failed: {payload.decode(errors='replace')}")

    def _died(self, proc: subprocess.Popen, run: _Run) -> ModelcastError:
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None and code < 0 and -code == signal.SIGBUS:
            # Its mapping of the file lost pages: the file was truncated while it was hashed.
            return ModelcastError(f"{run.slot.source} changed while it was hashed (it shrank under the hashing "
                                  "process); publish again once it is no longer written")
        return ModelcastError(f"the process hashing {run.slot.source} ended unexpectedly (exit status {code})")

    # -- v2 trees -------------------------------------------------------------------------

    def _file_hashes(self, f: FileSlot) -> FileHashes:
        pieces = self._pieces_of(f)
        if f.size <= self.piece_length:
            leaves = self._v2[f.first_piece]
            return FileHashes(merkle_root(leaves, pow2_at_least(len(leaves))), b"")
        layer = [self._v2[f.first_piece + k] for k in range(pieces)]
        pad = merkle_root([], self.piece_length // BLOCK)
        return FileHashes(merkle_root(layer, pow2_at_least(pieces), pad), b"".join(layer))


class _ReadAhead:
    """Asks the kernel for the runs' bytes (``POSIX_FADV_WILLNEED``) in the order they are hashed,
    up to :data:`READ_AHEAD` bytes beyond the runs handed out, on a thread of its own.

    Its own thread, because asking may wait for room in the disk's queue (the blobs being
    written at the same time), and the threads that hand out runs must not: a worker left
    without a run waits with them.
    """

    def __init__(self, runs: list[_Run], piece_length: int):
        self.runs = runs
        self.piece_length = piece_length
        self._cond = threading.Condition()
        self._handed = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="piece-read-ahead", daemon=True)
        self._thread.start()

    def handed(self, count: int) -> None:
        """``count`` runs have been handed out to workers."""
        with self._cond:
            self._handed = count
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _loop(self) -> None:
        ahead = max(IN_FLIGHT, READ_AHEAD // RUN_BYTES)
        for i, run in enumerate(self.runs):
            with self._cond:
                while not self._closed and i >= self._handed + ahead:
                    self._cond.wait()
                if self._closed:
                    return
            _read_ahead(run, self.piece_length)


def _read_ahead(run: _Run, piece_length: int) -> None:
    try:
        fd = os.open(run.slot.source, os.O_RDONLY)
    except OSError:
        return  # the worker says why
    try:
        first = run.start * piece_length
        os.posix_fadvise(fd, first, min(run.end * piece_length, run.slot.size) - first, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
