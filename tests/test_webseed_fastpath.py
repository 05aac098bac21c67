"""The web seed on the fast path (tracker/webseed.py ``fast_webseed``, tracker/fastpath.py).

A node's plain range request for a file origin's blob is answered without aiohttp; every
other web seed request is handed to aiohttp and answered as before.  The server is built
exactly as ``serve()`` builds it (``start_server`` on 127.0.0.1:0), and each answer of the
fast path is compared with aiohttp's answer to the same range (asked with an ``If-Range``
that holds, which only aiohttp answers).
"""

from __future__ import annotations

import random

import aiohttp
import pytest

from modelcast.config import TrackerConfig
from tracker.app import make_app, start_server
from tracker.metrics import METRICS

from .helpers import AUTH, TOKEN, build_artifact, upload, wait_until_async

MiB = 1 << 20
SAME = ("Content-Type", "Content-Range", "Content-Length", "ETag", "Last-Modified", "Accept-Ranges")


@pytest.fixture
async def served(tmp_path, origin):
    """A running registry (fast path in front; reads need a token) with one published artifact:
    (base URL, server, artifact, blob)."""
    cfg = TrackerConfig(data_dir=tmp_path / "registry", token=TOKEN, read_token="reader-token")
    blob = random.Random(11).randbytes(3 * MiB + 17)
    art = build_artifact(tmp_path, files={"w.bin": blob, "small.txt": b"hello"})
    upload(art, origin)
    running = await start_server(make_app(cfg), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{running.port}"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{base}/v1/artifacts", json=art.body(origin, "v1"), headers=AUTH) as resp:
                assert resp.status == 201, await resp.text()
        yield base, running, art, blob
    finally:
        await running.stop()


def webseed_count(running, status: str) -> int:
    return running.runner.app[METRICS].requests[("/v1/webseed/{digest}/{tail}", "GET", status)]


async def test_a_nodes_ranges_are_answered_by_the_fast_path_as_aiohttp_answers_them(served):
    base, running, art, blob = served
    handed_off = running.fast.handed_off  # the publish
    url = f"{base}/v1/webseed/{art.digest}/model/w.bin"
    ranges = [(0, MiB - 1), (MiB + 5, 3 * MiB + 16), (3 * MiB, 3 * MiB + 10 * MiB)]  # the last runs past the end
    async with aiohttp.ClientSession() as fast:  # keep-alive: every range on one connection
        answers = []
        for first, last in ranges:
            async with fast.get(url, headers={**AUTH, "Range": f"bytes={first}-{last}"}) as resp:
                answers.append((resp.status, resp.headers.copy(), await resp.read()))
    assert running.fast.answered == 3 and running.fast.handed_off == handed_off
    assert webseed_count(running, "206") == 3
    for (first, last), (status, headers, body) in zip(ranges, answers):
        assert status == 206 and body == blob[first:last + 1]
        # aiohttp's answer to the same range: the same status, bytes and headers.
        async with aiohttp.ClientSession() as slow:
            async with slow.get(url, headers={**AUTH, "Range": f"bytes={first}-{last}",
                                              "If-Range": headers["ETag"]}) as resp:
                assert resp.status == 206 and await resp.read() == body
                assert {k: resp.headers[k] for k in SAME} == {k: headers[k] for k in SAME}
    # Every answer counted in the route's metrics (aiohttp's before its status turns 206).
    assert running.fast.handed_off == handed_off + 3
    assert webseed_count(running, "206") + webseed_count(running, "200") == 6
    async with aiohttp.ClientSession() as s:  # the bytes are counted as origin bytes served either way
        async with s.get(f"{base}/v1/stats", headers=AUTH) as resp:
            served_bytes = (await resp.json())["origin_bytes_served"]
    assert served_bytes == 2 * sum(min(last, len(blob) - 1) - first + 1 for first, last in ranges)


async def test_a_range_with_connection_close_is_answered_and_the_connection_closed(served):
    base, running, art, blob = served
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v1/webseed/{art.digest}/model/small.txt",
                         headers={**AUTH, "Range": "bytes=1-3", "Connection": "close"}) as resp:
            assert resp.status == 206 and await resp.read() == b"ell"
            assert resp.headers["Connection"] == "close"
    await wait_until_async(lambda: running.fast.answered == 1, 10, message="the fast path to count its answer")


@pytest.mark.parametrize("headers, status", [
    ({"Range": "bytes=0-9"}, 401),  # no token: aiohttp says why
    ({**AUTH, "Range": "bytes=5000000-5000010"}, 416),  # past the end
    ({**AUTH}, 200),  # the whole file
    ({**AUTH, "Range": "bytes=-10"}, 206),  # a suffix range
    ({**AUTH, "Range": "bytes=0-1,4-5"}, 416),  # several ranges
    ({**AUTH, "Range": "bytes=0-9", "If-None-Match": "*"}, 304),
])
async def test_every_other_request_is_answered_by_aiohttp_as_before(served, headers, status):
    base, running, art, blob = served
    handed_off = running.fast.handed_off
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v1/webseed/{art.digest}/model/w.bin", headers=headers) as resp:
            assert resp.status == status
            body = await resp.read()
    if status == 200:
        assert body == blob
    elif status == 206:
        assert body == blob[-10:]
    elif status >= 400:
        assert "error" in body.decode() or status == 416
    assert running.fast.answered == 0 and running.fast.handed_off == handed_off + 1


async def test_unknown_files_and_digests_are_aiohttps_404s(served):
    base, running, art, _ = served
    async with aiohttp.ClientSession() as s:
        for path in (f"{art.digest}/model/nope.bin", f"{art.digest}/other/w.bin", f"sha256:{'3' * 64}/model/w.bin",
                     "sha256:nothex/model/w.bin"):
            async with s.get(f"{base}/v1/webseed/{path}", headers={**AUTH, "Range": "bytes=0-9"}) as resp:
                assert resp.status in (400, 404) and "error" in await resp.json()
    assert running.fast.answered == 0


async def test_readers_that_stop_reading_hold_a_sending_thread_no_longer_than_the_stall_bound(tmp_path, origin):
    import asyncio
    import socket

    from tracker.filesend import FILE_SENDING, FileSender

    blob = random.Random(12).randbytes(16 * MiB)
    art = build_artifact(tmp_path, files={"big.bin": blob})
    upload(art, origin)
    app = make_app(TrackerConfig(data_dir=tmp_path / "registry", token=TOKEN))
    pool = app[FILE_SENDING].sender = FileSender(threads=2, stall_s=0.5)
    running = await start_server(app, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{running.port}"
    loop = asyncio.get_running_loop()

    def stalled() -> socket.socket:  # asks for the whole blob as one range, then reads nothing
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", running.port))
        sock.sendall(f"GET /v1/webseed/{art.digest}/model/big.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=0-{16 * MiB - 1}"
                     f"\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        return sock

    readers = []
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{base}/v1/artifacts", json=art.body(origin, "v1"), headers=AUTH) as resp:
                assert resp.status == 201
            readers = [await loop.run_in_executor(None, stalled) for _ in range(3)]
            # Two fill the pool, the third is sent on the event loop; all three were let through the fast path.
            await wait_until_async(lambda: running.fast.handed_off == 1 and pool.busy == 0 and webseed_count(
                running, "206") >= 2, 20, message="the threaded sends to stall and end")
            # Another node's ranges still come whole, from the fast path.
            for first in (0, 7 * MiB):
                async with s.get(f"{base}/v1/webseed/{art.digest}/model/big.bin",
                                 headers={**AUTH, "Range": f"bytes={first}-{first + MiB - 1}"}) as resp:
                    assert resp.status == 206 and await resp.read() == blob[first:first + MiB]
    finally:
        for r in readers:
            r.close()
        await running.stop()


def test_the_head_parser_leaves_odd_web_seed_requests_to_aiohttp():
    from tracker.fastpath import parse_webseed_head

    ok = parse_webseed_head(b"GET /v1/webseed/x/m/w.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=0-9\r\nConnection: close")
    assert ok is not None and ok.target == b"/v1/webseed/x/m/w.bin" and not ok.keep_alive
    assert ok.headers[b"range"] == b"bytes=0-9" and ok.headers[b"host"] == b"t"
    for head in (b"GET /v1/webseed/x/m/w.bin HTTP/1.0\r\nHost: t",  # HTTP/1.0
                 b"GET /v1/webseed/x/m/w.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=0-1\r\nRange: bytes=2-3",  # twice
                 b"GET /v1/webseed/x/m/w.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 5",  # a body
                 b"GET /v1/webseed/x/m/w.bin HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked",
                 b"GET /v1/webseed/x/m/w.bin HTTP/1.1\r\nRange: bytes=0-1",  # no Host
                 b"GET /v1/webseed/x/m/w.bin HTTP/1.1\r\nHost: t\r\n Folded: x",  # odd framing
                 b"GET /v1/webseed/x/m/w\x00.bin HTTP/1.1\r\nHost: t"):
        assert parse_webseed_head(head) is None, head
