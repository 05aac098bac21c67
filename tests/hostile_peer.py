"""A BitTorrent peer that serves corrupted data: it seeds correct files, then damages them.

Run as a separate process: ``python hostile_peer.py TORRENT DATA_PARENT HOST:PORT ANNOUNCE_URL``.
It verifies the real data first (so libtorrent believes it is a seed), then overwrites
bytes in every piece in place; libtorrent serves from the page cache, so peers receive
bytes that fail the piece hashes.  Prints CORRUPTED when ready, runs until killed.
"""

import signal
import sys

import libtorrent as lt

from harness import wait_until


def main() -> None:
    torrent, parent, listen, announce = sys.argv[1:5]
    host = listen.rsplit(":", 1)[0]
    ses = lt.session({
        "listen_interfaces": listen, "outgoing_interfaces": host, "announce_ip": host,
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
        "enable_outgoing_utp": False, "enable_incoming_utp": False, "allow_multiple_connections_per_ip": True,
        "min_announce_interval": 5, "unchoke_slots_limit": -1,
    })
    ti = lt.torrent_info(torrent)
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = parent
    atp.trackers = [announce]
    handle = ses.add_torrent(atp)
    try:
        wait_until(lambda: handle.status().is_seeding, 60, message="the hostile peer to verify its data")
    except TimeoutError as exc:
        raise SystemExit(f"hostile peer: {exc}") from None
    fs = ti.layout()
    plen = ti.piece_length()
    for i in range(fs.num_files()):
        if fs.file_flags(i) & lt.file_storage.flag_pad_file or fs.file_size(i) == 0:
            continue
        with open(f"{parent}/{fs.file_path(i)}", "r+b") as f:
            for off in range(0, fs.file_size(i), plen):
                f.seek(off + min(100, fs.file_size(i) - off - 1))
                f.write(b"\xff")
    handle.force_reannounce()
    print("CORRUPTED", flush=True)
    while True:  # seed (libtorrent's threads) until the test kills this process
        signal.pause()


if __name__ == "__main__":
    main()
