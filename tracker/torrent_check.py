"""Check a published torrent against its manifest.  Every libtorrent call of the registry is here.

A registry that stored a torrent disagreeing with its manifest would hand nodes a swarm
for different bytes than the manifest promises; a node would download, fail its xxh3
check and retry forever.  So the registry refuses such a pair at publish time.
"""

from __future__ import annotations

from modelcast.errors import InvalidManifest, UnsafePath
from modelcast.manifest import Manifest

from .protocol import ProtocolError, set_announce


def check_torrent(torrent: bytes, manifest: Manifest) -> None:
    """Raise InvalidManifest unless ``torrent`` describes exactly ``manifest``'s files.

    Checked: it parses; its info-hashes are the manifest's (no more, no fewer); its name
    and piece length match; its files, pad files aside, are ``<torrent_name>/<path>``
    with the manifest's sizes; it holds no symlinks.
    """
    import libtorrent as lt

    try:
        # Our own decoder must accept it too: the torrent endpoint rewrites ``announce``
        # with it, and a torrent that fails there would be a broken artifact forever.
        set_announce(torrent, "http://registry.invalid/announce")
        ti = lt.torrent_info(lt.bdecode(torrent))
    except (RuntimeError, ProtocolError, TypeError, ValueError) as exc:
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
