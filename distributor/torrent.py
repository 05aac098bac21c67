"""The artifact's private torrent, made by :mod:`adapters.torrent` (where every libtorrent call is)."""

from __future__ import annotations

import threading
from typing import Callable

from adapters import torrent as lt_adapter
from modelcast.manifest import InfoHashes

from .scan import ScannedFile


def torrent_name_for(artifact_name: str) -> str:
    """The torrent's root folder: the last component of the artifact name."""
    return artifact_name.rsplit("/", 1)[-1]


def make_torrent(files: list[ScannedFile], torrent_name: str, piece_length: int, announce: str | None = None,
                 progress: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None, v1_only: bool = False) -> tuple[bytes, InfoHashes, float]:
    """Hash ``files`` into a hybrid (or, with ``v1_only``, v1) private torrent on every core.

    Returns (torrent bytes, info-hashes, seconds); ``progress`` receives bytes hashed and
    setting ``stop`` ends the hashing at its next piece.  Blocking: call it from
    a thread.
    """
    return lt_adapter.make_torrent([(f.path, f.source, f.size) for f in files], torrent_name, piece_length,
                                   announce, progress, stop, v1_only)
