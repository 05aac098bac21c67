"""Slow readers of the web seed (tracker/filesend.py): a file origin's ranges go out with one
blocking ``sendfile`` each from a bounded pool of threads, so a reader that stops reading
must not hold a thread for good, nor keep anyone else's bytes from going out.

The first test runs a real registry process and fills more than its pool with readers that
never read; the second runs the registry in this process with a 2-thread pool and a 0.5 s
stall bound to check the mechanism itself.  Loads are bounded in count and every wait is a
condition with a bound; nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import socket
import threading
import urllib.request

from harness import start_tracker, wait_until, wait_until_async
from tracker.filesend import FILE_SENDING, SEND_THREADS, FileSender

from ..helpers import AUTH, TOKEN, api_publish, build_artifact, make_model, publish, upload

MiB = 1 << 20


def stalled_reader(host: str, port: int, path: str, source: str = "127.0.0.1") -> socket.socket:
    """A connection that asks for ``path`` whole and then reads nothing (a small receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect((host, port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    return sock


def answered(sock: socket.socket) -> bool:
    """Whether the answer's first bytes have arrived (the registry is sending to it)."""
    return bool(select.select([sock], [], [], 0)[0])


def test_readers_that_stop_reading_do_not_stop_other_nodes_ranges(tmp_path):
    src = make_model(tmp_path / "model", {"big.bin": 24 * MiB})
    data = (src / "big.bin").read_bytes()
    tracker = start_tracker(tmp_path, token=TOKEN)
    stalled: list[socket.socket] = []
    try:
        digest = publish(tracker.url, src, "demo/slow:v1", (tmp_path / "origin").as_uri())
        host, port = tracker.url.removeprefix("http://").rsplit(":", 1)
        path = f"/v1/webseed/{digest}/slow/big.bin"
        # More readers that never read than the registry has sending threads.
        for i in range(SEND_THREADS + 8):
            stalled.append(stalled_reader(host, int(port), path, f"127.0.0.{2 + i % 8}"))
        wait_until(lambda: all(answered(s) for s in stalled), 30, 0.1, "the registry to answer every stalled reader")
        # A node's ranges still come, whole and right, while all of them hold their answers.
        rng = random.Random(3)
        for _ in range(6):
            first = rng.randrange(0, len(data) - 8 * MiB)
            req = urllib.request.Request(f"{tracker.url}{path}",
                                         headers={**AUTH, "Range": f"bytes={first}-{first + 8 * MiB - 1}"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert resp.status == 206 and resp.read() == data[first:first + 8 * MiB]
        with urllib.request.urlopen(f"{tracker.url}/v1/health", timeout=10) as resp:
            assert resp.status == 200
    finally:
        for s in stalled:
            s.close()
        tracker.stop()
    assert "Traceback" not in tracker.log_text()


async def test_a_stalled_reader_is_cut_and_its_thread_comes_back(aiohttp_client, cfg, tmp_path, origin):
    from tracker.app import make_app

    blob = random.Random(5).randbytes(16 * MiB)
    art = build_artifact(tmp_path, files={"big.bin": blob})
    upload(art, origin)
    app = make_app(cfg)
    # The app's sender: 2 threads, and a send that moves nothing for 0.5 s ends (closed by the app's cleanup).
    small_pool = app[FILE_SENDING].sender = FileSender(threads=2, stall_s=0.5)
    client = await aiohttp_client(app)
    await api_publish(client, art, origin)
    path = f"/v1/webseed/{art.digest}/model/big.bin"
    loop = asyncio.get_running_loop()
    # Three readers that never read: two fill the pool, the third is sent on the event loop.
    stalled = [await loop.run_in_executor(None, stalled_reader, client.host, client.port, path) for _ in range(3)]
    await wait_until_async(lambda: all(answered(s) for s in stalled), 10, message="answers to the stalled readers")
    # Meanwhile another client's ranges come whole.
    for first in (0, 5 * MiB, 11 * MiB):
        resp = await client.get(path, headers={**AUTH, "Range": f"bytes={first}-{first + MiB - 1}"})
        assert resp.status == 206 and await resp.read() == blob[first:first + MiB]
    # The threaded sends move nothing for 0.5 s: they end, their connections close, the pool is free again.
    await wait_until_async(lambda: small_pool.busy == 0, 20, message="the stalled sends to end")

    def drain(sock: socket.socket) -> int | None:
        """Read what was sent until the server's close: the bytes of the answer (None: not closed)."""
        got = 0
        sock.settimeout(3)
        try:
            while chunk := sock.recv(1 << 20):
                got += len(chunk)
        except TimeoutError:
            return None
        return got

    cut = [n for n in await asyncio.gather(*(loop.run_in_executor(None, drain, s) for s in stalled)) if n is not None]
    # The two sent from threads were cut short and closed; the one on the event loop holds no thread.
    assert len(cut) == 2 and all(n < len(blob) for n in cut), cut
    # A full range still goes out from a pool thread afterwards.
    resp = await client.get(path, headers={**AUTH, "Range": "bytes=1-8388608"})
    assert resp.status == 206 and await resp.read() == blob[1:8388609]
    for s in stalled:
        s.close()


def sending_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("webseed-send") and t.is_alive()]


def open_files_under(root) -> list[str]:
    """This process's descriptors open on files under ``root``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if target.startswith(str(root)):
            found.append(target)
    return found


async def test_a_stopped_registry_leaves_no_sending_thread_and_no_open_blob(aiohttp_client, cfg, tmp_path, origin):
    from tracker.app import make_app

    blob = random.Random(6).randbytes(4 * MiB)
    art = build_artifact(tmp_path, files={"w.bin": blob})
    upload(art, origin)
    before = set(sending_threads())
    client = await aiohttp_client(make_app(cfg))
    await api_publish(client, art, origin)
    for first in (0, 2 * MiB):
        resp = await client.get(f"/v1/webseed/{art.digest}/model/w.bin",
                                headers={**AUTH, "Range": f"bytes={first}-{first + 2 * MiB - 1}"})
        assert resp.status == 206 and await resp.read() == blob[first:first + 2 * MiB]
    # Serving: the ranges went out from the app's sending threads, from a blob kept open.
    assert set(sending_threads()) - before and open_files_under(tmp_path / "origin")
    await client.close()  # stops the server and runs the app's cleanup
    assert set(sending_threads()) - before == set() and open_files_under(tmp_path / "origin") == []
