"""Make the artifact's private hybrid (v1 + v2) torrent.  All libtorrent calls of publish are here."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import libtorrent as lt

from modelcast.manifest import InfoHashes

from .scan import ScannedFile


def torrent_name_for(artifact_name: str) -> str:
    """The torrent's root folder: the last component of the artifact name."""
    return artifact_name.rsplit("/", 1)[-1]


def make_torrent(files: list[ScannedFile], torrent_name: str, piece_length: int, announce: str | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[bytes, InfoHashes]:
    """Hash every piece and return (torrent bytes, info-hashes).

    Hybrid, so v1-only clients (aria2) can join too, and pieces align to files (pad files),
    which lets a node fetch any single piece from one file at the origin. No creation date
    or creator: identical content gives identical bytes and info-hashes.
    """
    entries = [lt.create_file_entry(f"{torrent_name}/{f.path}", f.size) for f in files]
    ct = lt.create_torrent(entries, piece_length)
    ct.set_priv(True)
    if announce:
        ct.add_tracker(announce)
    with tempfile.TemporaryDirectory(prefix="modelcast-torrent-") as parent:
        # libtorrent reads <parent>/<torrent_name>/<path>; link each file there, wherever it is.
        for f in files:
            link = Path(parent, torrent_name, f.path)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f.source.resolve(), link)
        plen = piece_length
        if progress is None:
            lt.set_piece_hashes(ct, parent)
        else:
            lt.set_piece_hashes(ct, parent, lambda piece: progress(plen))
    data = lt.bencode(ct.generate())
    hashes = lt.torrent_info(data).info_hashes()
    return data, InfoHashes(v1=str(hashes.v1) if hashes.has_v1() else None,
                            v2=str(hashes.v2) if hashes.has_v2() else None)
