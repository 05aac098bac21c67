"""Check a published torrent against its manifest before the registry keeps it.

A registry that stored a torrent disagreeing with its manifest would hand nodes a swarm
for different bytes than the manifest promises; a node would download, fail its xxh3
check and retry forever.  So the registry refuses such a pair at publish time.
"""

from __future__ import annotations

from adapters.torrent import check_torrent as check_against_manifest
from modelcast.errors import InvalidManifest
from modelcast.manifest import Manifest

from .bencode import ProtocolError, set_announce


def check_torrent(torrent: bytes, manifest: Manifest) -> None:
    """Raise InvalidManifest unless ``torrent`` describes exactly ``manifest``'s files.

    Besides :func:`adapters.torrent.check_torrent`, our own bencode decoder must accept
    it: the torrent endpoint rewrites ``announce`` with it, and a torrent that fails there
    would be a broken artifact forever.
    """
    try:
        set_announce(torrent, "http://registry.invalid/announce")
    except ProtocolError as exc:
        raise InvalidManifest(f"torrent of {manifest.name!r} is not a valid torrent file: {exc}") from exc
    check_against_manifest(torrent, manifest)
