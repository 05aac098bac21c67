"""The node's one libtorrent session.  Every libtorrent call on the node lives here.

The rest of the daemon talks to :class:`TorrentEngine` in terms of digests, paths and
plain dataclasses; libtorrent errors are translated to :mod:`modelcast.errors` here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import libtorrent as lt

from modelcast.config import is_wildcard
from modelcast.errors import InvalidManifest, PullFailed
from modelcast.manifest import Manifest

log = logging.getLogger("modelcast.node.engine")

INCONSISTENT_HASHES = 217  # libtorrent errors::torrent_inconsistent_hashes
MAX_RECOVERIES = 5


@dataclass(frozen=True)
class PieceSpan:
    """Where one piece's bytes live: a range of one file (hybrid torrents align files to pieces)."""

    piece: int
    size: int  # the piece's size, including zero padding
    path: str  # path inside the torrent, "<torrent_name>/<file path>"
    file_offset: int
    length: int  # bytes of file data; the rest of the piece is zero padding


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


def check_torrent(torrent: bytes, manifest: Manifest) -> lt.torrent_info:
    """Parse ``torrent`` and prove it describes exactly ``manifest``'s files.

    A registry could be wrong or hostile: the info-hash must match the manifest, every
    non-pad file must be ``<torrent_name>/<manifest path>`` with the manifest's size,
    and the torrent may hold no symlinks, so nothing is written outside the artifact.
    """
    try:
        ti = lt.torrent_info(lt.bdecode(torrent))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidManifest(f"torrent for {manifest.name} is not a valid torrent: {exc}") from exc
    hashes = ti.info_hashes()
    got_v1 = str(hashes.v1) if hashes.has_v1() else None
    got_v2 = str(hashes.v2) if hashes.has_v2() else None
    if (got_v1, got_v2) != (manifest.info_hash.v1, manifest.info_hash.v2):
        raise InvalidManifest(f"torrent info-hash ({got_v1}, {got_v2}) does not match the manifest of {manifest.name}")
    fs = ti.layout()
    expected = {f"{manifest.torrent_name}/{f.path}": f.size for f in manifest.files}
    seen = {}
    for i in range(fs.num_files()):
        flags = fs.file_flags(i)
        if flags & lt.file_storage.flag_pad_file:
            continue
        if flags & lt.file_storage.flag_symlink:
            raise InvalidManifest(f"torrent for {manifest.name} contains a link ({fs.file_path(i)}); links are not allowed")
        seen[fs.file_path(i).replace("\\", "/")] = fs.file_size(i)
    if seen != expected:
        extra = sorted(set(seen) - set(expected))[:3]
        missing = sorted(set(expected) - set(seen))[:3]
        raise InvalidManifest(f"torrent files differ from the manifest of {manifest.name}: extra {extra}, missing {missing}")
    return ti


def piece_spans(ti: lt.torrent_info) -> list[PieceSpan]:
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


class TorrentEngine:
    """One libtorrent session: add, seed, watch and remove torrents."""

    def __init__(self, peer_host: str, peer_port: int, *, upload_limit: int = 0, download_limit: int = 0,
                 connections: int = 200):
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
            "connections_limit": connections,
            "connection_speed": 200,
            "unchoke_slots_limit": -1 if upload_limit == 0 else 16,
            "upload_rate_limit": upload_limit,
            "download_rate_limit": download_limit,
            # Limits are for payload; libtorrent's estimate of IP overhead would take ~5%.
            "rate_limit_ip_overhead": False,
            "alert_mask": (lt.alert_category.error | lt.alert_category.status | lt.alert_category.storage
                           | lt.alert_category.tracker | lt.alert_category.peer),
            "alert_queue_size": 10000,
            "aio_threads": 4,
            "hashing_threads": 2,
        }
        if specific:
            # Connections and announces leave from the node's own address, so the tracker
            # and the other peers see the address this node accepts connections on.
            settings["outgoing_interfaces"] = peer_host
            settings["announce_ip"] = peer_host
        self.session = lt.session(settings)
        if upload_limit or download_limit:
            # Peers on loopback/LAN are "local" and skip rate limits unless put in the
            # global peer class; limits are the point, so every address goes there.
            flt = lt.ip_filter()
            flt.add_rule("0.0.0.0", "255.255.255.255", 1 << lt.session.global_peer_class_id)
            flt.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1 << lt.session.global_peer_class_id)
            self.session.set_peer_class_filter(flt)
        self._handles: dict[str, lt.torrent_handle] = {}
        self._by_hash: dict[str, str] = {}
        self._removed: set[str] = set()
        self._removing: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        self._finished: set[str] = set()
        self._tracker_peers: dict[str, int] = {}  # peers in the last tracker reply, per digest
        self._recoveries: dict[str, int] = {}
        self.resume_data: dict[str, bytes] = {}  # resume data posted by libtorrent, to be saved
        self._reads: dict[tuple[str, int], list[asyncio.Future]] = {}  # (info-hash, piece) -> waiting readers
        self.hash_failures = 0
        self.peers_banned = 0

    @property
    def listen_port(self) -> int:
        return self.session.listen_port()

    def add(self, digest: str, ti: lt.torrent_info, manifest: Manifest, save_path: str, *,
            trackers: list[str], seed: bool, resume: bytes | None = None) -> None:
        """Download (or, with ``seed``, seed without re-checking) ``ti`` into ``save_path``.

        With ``resume`` (libtorrent resume data saved earlier) the pieces it records as
        verified are trusted and not fetched again; without it, files already in
        ``save_path`` are hash-checked and every good piece is kept.
        """
        atp = lt.add_torrent_params()
        if resume:
            try:
                atp = lt.read_resume_data(resume)
            except RuntimeError as exc:
                log.warning("ignoring unreadable resume data of %s: %s", digest, exc)
                atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(ti)
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
        flags = (atp.flags | lt.torrent_flags.override_trackers | lt.torrent_flags.disable_dht
                 | lt.torrent_flags.disable_lsd | lt.torrent_flags.disable_pex)
        flags &= ~lt.torrent_flags.auto_managed
        flags &= ~lt.torrent_flags.paused
        if seed:
            flags |= lt.torrent_flags.seed_mode
        atp.flags = flags
        try:
            handle = self.session.add_torrent(atp)
        except RuntimeError as exc:
            raise PullFailed(f"libtorrent refused {digest}: {exc}") from exc
        self._handles[digest] = handle
        self._by_hash[str(handle.info_hashes().get_best())] = digest
        self._errors.pop(digest, None)
        self._tracker_peers.pop(digest, None)
        self._finished.discard(digest)
        self._removed.discard(digest)

    def has(self, digest: str) -> bool:
        return digest in self._handles

    def remove(self, digest: str) -> None:
        """Remove a torrent (files stay); :meth:`removed` turns true once its files are closed."""
        handle = self._handles.pop(digest, None)
        if handle is None:
            self._removed.add(digest)
            return
        key = str(handle.info_hashes().get_best())
        self._by_hash.pop(key, None)
        self._removing[key] = digest
        self._removed.discard(digest)
        for read in [r for r in self._reads if r[0] == key]:
            for fut in self._reads.pop(read):
                if not fut.done():
                    fut.set_exception(PullFailed(f"{digest} left the swarm on this node"))
        self.session.remove_torrent(handle)

    def removed(self, digest: str) -> bool:
        """True once libtorrent has closed the files of a removed torrent."""
        return digest in self._removed

    def pump(self) -> None:
        """Drain alerts: record finished, removed and failed torrents."""
        for alert in self.session.pop_alerts():
            if isinstance(alert, lt.torrent_removed_alert):
                digest = self._removing.pop(str(alert.info_hashes.get_best()), None)
                if digest:
                    self._removed.add(digest)
                continue
            if isinstance(alert, lt.read_piece_alert):
                self._piece_read(alert)
                continue
            digest = self._digest_of(alert)
            if isinstance(alert, lt.torrent_finished_alert) and digest:
                self._finished.add(digest)
            elif isinstance(alert, lt.tracker_reply_alert) and digest:
                self._tracker_peers[digest] = int(alert.num_peers)
            elif isinstance(alert, lt.save_resume_data_alert) and digest:
                self.resume_data[digest] = bytes(lt.write_resume_data_buf(alert.params))
            elif isinstance(alert, lt.peer_ban_alert):
                self.peers_banned += 1
                log.warning("banned peer %s: %s", alert.ip, alert.message())
            elif isinstance(alert, lt.torrent_error_alert) and digest and self._recoverable(digest, alert):
                pass
            elif isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)) and digest:
                self._errors[digest] = alert.message()
                log.warning("torrent %s: %s", digest, alert.message())
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

    def tracker_peers(self, digest: str) -> int | None:
        """Peers the tracker handed out in its last reply (None before any reply)."""
        return self._tracker_peers.get(digest)

    def finished(self, digest: str) -> bool:
        return digest in self._finished

    def error(self, digest: str) -> str | None:
        return self._errors.get(digest)

    def progress(self, digest: str) -> TorrentProgress | None:
        handle = self._handles.get(digest)
        if handle is None:
            return None
        s = handle.status()
        err = self._errors.get(digest) or (str(s.errc.message()) if s.errc.value() else None)
        return TorrentProgress(
            state=str(s.state), done_bytes=int(s.total_wanted_done), total_bytes=int(s.total_wanted),
            payload_download=int(s.total_payload_download), payload_upload=int(s.total_payload_upload),
            download_rate=int(s.download_payload_rate), upload_rate=int(s.upload_payload_rate),
            peers=int(s.num_peers), seeds=int(s.num_seeds), finished=bool(s.is_finished), error=err,
        )

    def missing_pieces(self, digest: str) -> tuple[list[int], list[int], set[int]]:
        """(pieces we lack, availability among connected peers, pieces being downloaded)."""
        handle = self._handles[digest]
        have = handle.status(lt.status_flags_t.query_pieces).pieces
        missing = [i for i, h in enumerate(have) if not h]
        avail = handle.piece_availability()
        if len(avail) < len(have):
            # libtorrent answers an empty list while the torrent has no piece picker yet
            # (just added, or between states); then no peer is known to have anything.
            avail = [0] * len(have)
        in_flight = {p["piece_index"] for p in handle.get_download_queue()}
        return missing, avail, in_flight

    def have_piece(self, digest: str, piece: int) -> bool:
        """Whether ``piece`` of ``digest`` is here and passed its hash check."""
        handle = self._handles.get(digest)
        return handle is not None and 0 <= piece < handle.torrent_file().num_pieces() and handle.have_piece(piece)

    def piece_size(self, digest: str, piece: int) -> int | None:
        """The size of ``piece`` (padding included), or None if there is no such piece here."""
        handle = self._handles.get(digest)
        if handle is None:
            return None
        ti = handle.torrent_file()
        return ti.piece_size(piece) if 0 <= piece < ti.num_pieces() else None

    def read_piece(self, digest: str, piece: int) -> asyncio.Future:
        """A future of ``piece``'s bytes (padding included), read by libtorrent; see :meth:`pump`."""
        fut = asyncio.get_running_loop().create_future()
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
        failed = alert.error.value() != 0
        data = None if failed else bytes(alert.buffer)
        for fut in futures:
            if fut.done():
                continue
            if failed:
                fut.set_exception(PullFailed(f"reading piece {alert.piece}: {alert.error.message()}"))
            else:
                fut.set_result(data)

    def add_piece(self, digest: str, piece: int, data: bytes) -> None:
        """Hand libtorrent a piece fetched from the origin; it checks the piece hash itself."""
        handle = self._handles.get(digest)
        if handle is not None:
            handle.add_piece(piece, data, 0)

    def request_resume_data(self, digest: str | None = None) -> int:
        """Ask libtorrent for resume data of one or all downloads; it arrives via :meth:`pump`."""
        n = 0
        for d, handle in list(self._handles.items()):
            if digest is not None and d != digest:
                continue
            if handle.need_save_resume_data():
                handle.save_resume_data(lt.torrent_handle.flush_disk_cache)
                n += 1
        return n

    def reannounce(self, digest: str) -> None:
        handle = self._handles.get(digest)
        if handle is not None:
            handle.force_reannounce()

    def close(self) -> None:
        """Leave every swarm: libtorrent sends 'stopped' to the tracker as the session ends."""
        for digest in list(self._handles):
            self.remove(digest)
        self.session.pause()
        del self.session
