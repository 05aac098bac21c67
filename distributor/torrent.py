"""Make the artifact's private hybrid (v1 + v2) torrent.  All libtorrent calls of publish are here.

Piece hashing runs in a child Python process (:func:`_child_main`), not a thread:
libtorrent 2.1's Python binding holds the GIL for the whole of ``set_piece_hashes``
(measured: the event loop stalled for the 1.7 s it took to hash 1 GiB), which would
stop the xxh3 threads, the uploads and the event loop.  In its own process the
SHA-1 + SHA-256 work runs on its own core beside them.  Python's multiprocessing is not
used because ``spawn`` re-runs the caller's ``__main__`` (``modelcast/__main__.py`` would
run the CLI again) and ``fork`` from a threaded process is unsafe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from modelcast.errors import ModelcastError
from modelcast.manifest import InfoHashes

from .scan import ScannedFile

_PKG_ROOT = Path(__file__).resolve().parent.parent


def torrent_name_for(artifact_name: str) -> str:
    """The torrent's root folder: the last component of the artifact name."""
    return artifact_name.rsplit("/", 1)[-1]


def info_hashes(torrent: bytes) -> InfoHashes:
    """The v1 and v2 info-hashes of a bencoded torrent, as lowercase hex."""
    import libtorrent as lt

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
    import libtorrent as lt

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
    import libtorrent as lt

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


def make_torrent(files: list[ScannedFile], torrent_name: str, piece_length: int, announce: str | None = None,
                 progress: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None, v1_only: bool = False) -> tuple[bytes, InfoHashes, float]:
    """Make the torrent in a child process; return (torrent bytes, info-hashes, seconds).

    ``progress`` receives bytes hashed (in piece-sized steps); setting ``stop`` kills the
    child at its next progress report.  Blocking: call it from a thread.
    """
    t0 = time.monotonic()
    total = sum(f.size for f in files)
    request = json.dumps({"torrent_name": torrent_name, "piece_length": piece_length, "announce": announce, "v1_only": v1_only,
                          "files": [[f.path, str(f.source), f.size] for f in files]}).encode()
    # This very package first on the child's path: with ``-m`` the working directory would
    # come first, and another checkout's ``distributor`` there would be imported instead.
    child = (f"import sys; sys.path.insert(0, {str(_PKG_ROOT)!r}); "
             "from distributor.torrent import _child_main; raise SystemExit(_child_main())")
    with tempfile.TemporaryFile() as errors:
        # stderr to a file: a child that writes much there can never block on a full pipe.
        proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=errors)
        try:
            proc.stdin.write(request)
            proc.stdin.close()
            data, pieces_done, num_pieces = None, 0, 1
            while line := proc.stdout.readline():
                if stop is not None and stop.is_set():
                    raise ModelcastError("torrent creation stopped because another publish step failed")
                word, _, arg = line.decode().strip().partition(" ")
                if word == "pieces":
                    num_pieces = max(1, int(arg))
                elif word == "piece" and progress:
                    # Report file bytes, not piece bytes: pad files make the pieces add up to more.
                    before = total * pieces_done // num_pieces
                    pieces_done += 1
                    progress(total * pieces_done // num_pieces - before)
                elif word == "torrent":
                    data = proc.stdout.read(int(arg))
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code != 0 or data is None:
            errors.seek(0)
            detail = errors.read().decode(errors="replace").strip().splitlines()
            raise ModelcastError(f"making the torrent of {torrent_name} failed: "
                                 f"{detail[-1] if detail else f'hasher exited with code {code}'}")
    return data, info_hashes(data), time.monotonic() - t0


def _child_main() -> int:
    """The child side of :func:`make_torrent`: JSON request on stdin, progress and torrent on stdout."""
    req = json.loads(sys.stdin.buffer.read())
    out = sys.stdout.buffer
    files = [tuple(f) for f in req["files"]]

    def on_piece(_index: int) -> None:
        out.write(b"piece\n")
        out.flush()

    import libtorrent as lt

    num_pieces = lt.create_torrent([lt.create_file_entry(f"{req['torrent_name']}/{p}", s) for p, _, s in files],
                                   req["piece_length"], torrent_flags(req["v1_only"])).num_pieces()
    out.write(b"pieces %d\n" % num_pieces)
    try:
        data = build_torrent(files, req["torrent_name"], req["piece_length"], req["announce"], on_piece,
                             req["v1_only"])
    except (RuntimeError, OSError) as exc:
        print(f"{exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    out.write(b"torrent %d\n" % len(data))
    out.write(data)
    out.flush()
    return 0
