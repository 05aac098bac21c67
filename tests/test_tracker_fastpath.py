"""The announce fast path in front of aiohttp (tracker/fastpath.py).

Three layers: the pure request-head parser; the server built exactly as ``serve()``
builds it (``start_server``: aiohttp's AppRunner behind the sniffing protocol, on
127.0.0.1:0), spoken to over raw sockets, so keep-alive, pipelining, HTTP/1.0, hand-off
to aiohttp and the timeouts are seen byte for byte; and a real ``modelcast tracker``
process for graceful shutdown with fast-path connections open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
import urllib.request
from urllib.parse import quote_from_bytes

import pytest

from modelcast.config import TrackerConfig
from tracker.fastpath import MAX_PIPELINED, parse_head
from tracker.announce import decode_compact_peers
from tracker.app import SWARMS, make_app, start_server
from tracker.bencode import bdecode

from .helpers import start_tracker, wait_until_async

IH = bytes([0x26, 0x3D, 0x25, 0x2B, 0x00, 0xFF]) + bytes(range(14))  # '&', '=', '%', '+', NUL, 0xff
PATHS = frozenset({b"/announce", b"/scrape"})


def announce_target(n: int, *, event: str = "", numwant: int = 50, left: int = 0, ih: bytes = IH) -> str:
    peer_id = b"-FP0001-%012d" % n
    return (f"/announce?info_hash={quote_from_bytes(ih, safe='')}&peer_id={quote_from_bytes(peer_id, safe='')}"
            f"&port={10000 + n}&uploaded=0&downloaded=0&left={left}&compact=1&numwant={numwant}"
            + (f"&event={event}" if event else ""))


def get(target: str, *, version: str = "1.1", headers: str = "Host: t\r\n") -> bytes:
    return f"GET {target} HTTP/{version}\r\n{headers}\r\n".encode()


# -- the pure head parser ----------------------------------------------------------------


def test_parse_head_accepts_plain_tracker_gets():
    head = parse_head(b"GET /announce?info_hash=%26x&port=1 HTTP/1.1\r\nHost: t\r\nUser-Agent: lt", PATHS)
    assert head is not None and head.path == b"/announce" and head.query == b"info_hash=%26x&port=1"
    assert head.http11 and head.keep_alive
    assert parse_head(b"GET /scrape?info_hash=x HTTP/1.1\r\nhost: t\r\nConnection: Close", PATHS).keep_alive is False
    one_oh = parse_head(b"GET /announce?a=1 HTTP/1.0", PATHS)
    assert one_oh is not None and not one_oh.http11 and not one_oh.keep_alive
    assert parse_head(b"GET /announce HTTP/1.1\r\nHost: t\r\nContent-Length: 0", PATHS).query == b""


@pytest.mark.parametrize("head", [
    b"POST /announce?a=1 HTTP/1.1\r\nHost: t",
    b"GET /v1/health HTTP/1.1\r\nHost: t",
    b"GET /announce?a=1 HTTP/2.0\r\nHost: t",
    b"GET /announce?a=1 HTTP/1.1",  # HTTP/1.1 without Host
    b"GET /announce?a=1 HTTP/1.1\r\nHost: t\r\nHost: u",
    b"GET /announce?a=1  HTTP/1.1\r\nHost: t",
    b"GET /announce?a=\x01 HTTP/1.1\r\nHost: t",
    b"GET /announce?a=\xff HTTP/1.1\r\nHost: t",
    b"GET /announce?a=1#frag HTTP/1.1\r\nHost: t",
    b"GET /announce?a=1 HTTP/1.1\nHost: t",  # bare LF
    b"GET /announce?a=1 HTTP/1.1\r\nHost: t\rX: y",  # bare CR
    b"GET /announce?a=1 HTTP/1.1\r\nHost: t\r\n folded",
    b"GET /announce?a=1 HTTP/1.1\r\nHost : t",
    b"GET /announce?a=1 HTTP/1.1\r\nHost: t\r\nno colon",
    b"GET /announce?a=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 5",
    b"GET /announce?a=1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked",
    b"GET /announce?a=1 HTTP/1.1\r\nHost: t\r\nUpgrade: websocket",
    b"GET /announce?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t",
])
def test_parse_head_leaves_everything_else_to_aiohttp(head):
    assert parse_head(head, PATHS) is None


# -- the server, built as serve() builds it --------------------------------------------


class Conn:
    """A raw HTTP/1.x client connection that reads answers framed by Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(self.reader.readexactly(int(headers["content-length"])), timeout)
        return status, headers | {"status-line": lines[0]}, body

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (after any answers still unread)."""
        return await asyncio.wait_for(self.reader.read(), timeout) == b""

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def server(request, tmp_path):
    """The server with short timeouts; ``parametrize("server", [{...}], indirect=True)`` changes them."""
    limits = {"head_timeout_s": 0.5, "keepalive_timeout_s": 1.0, **getattr(request, "param", {})}
    app = make_app(TrackerConfig(host="127.0.0.1", port=0, data_dir=tmp_path / "registry", token="secret"))
    running = await start_server(app, "127.0.0.1", 0, **limits)
    app[SWARMS].allow([IH])
    try:
        yield running
    finally:
        await running.stop()


async def test_keepalive_announces_on_one_connection(server):
    conn = await Conn.open(server.port)
    for n in range(20):
        await conn.send(get(announce_target(n, event="started")))
        status, headers, body = await conn.answer()
        answer = bdecode(body)
        assert status == 200 and headers["status-line"] == "HTTP/1.1 200 OK" and "connection" not in headers
        assert headers["content-type"] == "text/plain" and "date" in headers
        assert answer[b"complete"] == n + 1 and len(decode_compact_peers(answer[b"peers"])) == n
    conn.close()
    assert (server.fast.answered, server.fast.handed_off) == (20, 0)


async def test_pipelined_announces_are_answered_in_order(server):
    conn = await Conn.open(server.port)
    count = 3 * MAX_PIPELINED + 5  # more than one read may answer at once
    await conn.send(b"".join(get(announce_target(n, event="started", numwant=200)) for n in range(count)))
    for n in range(count):
        status, _, body = await conn.answer()
        assert status == 200 and bdecode(body)[b"complete"] == n + 1  # each answer saw the ones before it
    conn.close()


@pytest.mark.parametrize("server", [{"keepalive_timeout_s": 30.0}], indirect=True)
async def test_pipelined_flood_waits_for_a_client_that_does_not_read(server):
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # small, so the server's side fills up
    sock.connect(("127.0.0.1", server.port))
    conn = Conn(*await asyncio.open_connection(sock=sock, limit=16 * 1024))
    for n in range(50):
        await conn.send(get(announce_target(n, event="started")))
        await conn.answer()
    count = 20_000  # ~8 MB of answers, more than the socket buffers hold (the kernel grows them to 4 MB)
    sender = asyncio.create_task(conn.send(b"".join(get(announce_target(n % 50, numwant=200)) for n in range(count))))

    def paused_connections():  # not reading: the server has to stop writing, then stop reading
        return [c for c in server.fast.connections if c._write_paused and c._read_paused]

    with contextlib.suppress(TimeoutError):  # asserted below, with what the test did wrong
        await wait_until_async(paused_connections, 10, message="the server to pause the connection")
    paused = paused_connections()
    assert server.fast.answered < 50 + count
    for _ in range(count):
        status, _, body = await conn.answer()
        assert status == 200 and len(bdecode(body)[b"peers"]) == 49 * 6
    await sender
    assert paused, "the test did not fill the buffers; the server never had to wait"
    conn.close()


async def test_client_that_reads_no_answers_is_dropped_after_the_keepalive_timeout(server):
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.connect(("127.0.0.1", server.port))
    conn = Conn(*await asyncio.open_connection(sock=sock, limit=16 * 1024))
    sender = asyncio.create_task(conn.send(b"".join(get(announce_target(n % 50, numwant=200)) for n in range(20_000))))
    await wait_until_async(lambda: server.fast.connections, 5, message="the connection to reach the fast path")
    # keepalive_timeout_s=1.0 in the fixture
    await wait_until_async(lambda: not server.fast.connections, 5, message="the connection to be dropped")
    assert not server.fast.connections
    sender.cancel()
    conn.close()


async def test_http10_and_connection_close_get_one_answer_then_eof(server):
    for request, status_line in [(get(announce_target(1), version="1.0", headers=""), "HTTP/1.0 200 OK"),
                                 (get(announce_target(2), headers="Host: t\r\nConnection: close\r\n"),
                                  "HTTP/1.1 200 OK")]:
        conn = await Conn.open(server.port)
        # A second request behind the first is not answered: the connection ends with the first.
        await conn.send(request + get(announce_target(3)))
        status, headers, body = await conn.answer()
        assert headers["status-line"] == status_line and headers["connection"] == "close"
        assert b"peers" in bdecode(body)
        assert await conn.closed()
        conn.close()


async def test_bad_announce_gets_a_bencoded_failure_and_keeps_the_connection(server):
    conn = await Conn.open(server.port)
    await conn.send(get("/announce?peer_id=x"))
    status, _, body = await conn.answer()
    assert status == 200 and bdecode(body) == {b"failure reason": b"missing parameter info_hash"}
    await conn.send(get("/scrape"))
    status, _, body = await conn.answer()
    assert b"full scrapes are not served" in bdecode(body)[b"failure reason"]
    await conn.send(get(announce_target(5, ih=b"\x01" * 20)))
    status, _, body = await conn.answer()
    assert status == 200 and bdecode(body)[b"failure reason"].startswith(b"unknown info_hash 0101")
    conn.close()


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET /announce?info_hash=\x01 HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /announce?a=1 HTTP/1.1 extra\r\nHost: t\r\n\r\n",
    b"GET /announce?a=1 HTTP/1.1\r\n\r\n",  # no Host
    b"GET /announce?a=1 HTTP/1.1\r\nHost: t\r\nX-Big: " + b"x" * 40_000 + b"\r\n\r\n",  # oversize header
])
async def test_malformed_requests_get_aiohttps_400(server, request_bytes):
    conn = await Conn.open(server.port)
    await conn.send(request_bytes)
    status, _, body = await conn.answer()
    assert status == 400 and b"Traceback" not in body
    conn.close()
    assert server.fast.handed_off == 1 and server.fast.answered == 0


async def test_registry_routes_after_an_announce_on_the_same_connection(server):
    conn = await Conn.open(server.port)
    await conn.send(get(announce_target(7, event="started")))
    status, _, body = await conn.answer()
    assert status == 200 and bdecode(body)[b"complete"] == 1
    # The next request is not the tracker's: the connection goes to aiohttp, which answers
    # it and, from then on, announces too (its own handler, the same answers).
    await conn.send(get("/v1/health") + get(announce_target(8, event="started")))
    status, headers, body = await conn.answer()
    assert status == 200 and headers["content-type"].startswith("application/json") and json.loads(body) == {"ok": True}
    status, headers, body = await conn.answer()
    assert status == 200 and "aiohttp" in headers.get("server", "") and bdecode(body)[b"complete"] == 2
    await conn.send(get("/v1/artifacts", headers="Host: t\r\nConnection: close\r\n"))
    status, _, _ = await conn.answer()
    assert status == 200 and await conn.closed()
    conn.close()
    assert (server.fast.answered, server.fast.handed_off) == (1, 1)


async def test_partial_request_times_out_with_408(server):
    conn = await Conn.open(server.port)
    t0 = time.monotonic()
    await conn.send(b"GET /announce?info_hash=")  # and never the rest
    status, headers, _ = await conn.answer()
    assert status == 408 and headers["connection"] == "close" and await conn.closed()
    assert 0.4 < time.monotonic() - t0 < 3.0  # head_timeout_s=0.5 in the fixture
    conn.close()


async def test_trickled_request_is_bounded_by_its_first_byte(server):
    conn = await Conn.open(server.port)
    request = get(announce_target(1))

    async def trickle() -> None:  # a byte every 50 ms: the whole request would take about 10 s
        for i in range(len(request)):
            conn.writer.write(request[i:i + 1])
            await asyncio.sleep(0.05)  # the slow client is what is tested, not a wait

    sender = asyncio.create_task(trickle())
    t0 = time.monotonic()
    status, _, _ = await conn.answer(timeout=5)
    assert status == 408 and time.monotonic() - t0 < 2.0  # head_timeout_s=0.5 in the fixture, from the first byte
    sender.cancel()
    conn.close()


async def test_idle_keepalive_connection_is_closed(server):
    conn = await Conn.open(server.port)
    await conn.send(get(announce_target(1)))
    await conn.answer()
    t0 = time.monotonic()
    assert await conn.closed(timeout=5)
    assert 0.8 < time.monotonic() - t0 < 3.0  # keepalive_timeout_s=1.0 in the fixture
    conn.close()


async def test_stop_closes_fast_path_connections_and_runs_cleanup(tmp_path):
    app = make_app(TrackerConfig(host="127.0.0.1", port=0, data_dir=tmp_path / "registry", token="secret"))
    running = await start_server(app, "127.0.0.1", 0)
    app[SWARMS].allow([IH])
    conn = await Conn.open(running.port)
    await conn.send(get(announce_target(1)))
    assert (await conn.answer())[0] == 200
    await running.stop()
    assert await conn.closed(timeout=2)
    assert not running.fast.connections
    conn.close()


def _read_answer(sock, buf: bytes) -> tuple[bytes, bytes, bytes]:
    """(head, body, what follows) of the next answer on a blocking socket, framed by Content-Length."""
    while True:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            if len(rest) >= length:
                return head, rest[:length], rest[length:]
        data = sock.recv(65536)
        assert data, f"connection closed after {buf!r}"
        buf += data


def test_tracker_process_serves_the_fast_path_and_stops_cleanly(tmp_path):
    """A real ``modelcast tracker``: announces over keep-alive, then SIGTERM with the connection open."""
    import socket

    svc = start_tracker(tmp_path, data_dir=tmp_path / "reg", token="secret", log_path=tmp_path / "tracker.log")
    port = svc.port
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        buf = b""
        for n in range(3):
            # No artifact is published: each answer is a bencoded failure, on the same kept-alive connection.
            sock.sendall(get(announce_target(n)))
            head, body, buf = _read_answer(sock, buf)
            assert head.startswith(b"HTTP/1.1 200") and b"unknown info_hash" in bdecode(body)[b"failure reason"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5) as resp:
            assert json.load(resp) == {"ok": True}
        t0 = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(10) == 0  # graceful: cleanup_ctx ran, the database is closed
        assert time.monotonic() - t0 < 6.0
        assert sock.recv(100) == b""  # the idle keep-alive connection was closed, not left hanging
        sock.close()
        log = (tmp_path / "tracker.log").read_text()
        assert "fast path answered 3 tracker requests" in log and "Traceback" not in log
    finally:
        svc.stop()


# -- node heartbeats and leaves on the fast path ------------------------------------------


def post(target: str, body: bytes, *, method: str = "POST", headers: str = "Host: t\r\n") -> bytes:
    return f"{method} {target} HTTP/1.1\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def test_heartbeats_and_leaves_are_answered_on_the_fast_path_like_aiohttp_answers_them(server):
    node, key = "fastnode01", "k" * 32
    keyed = f"Host: t\r\nX-Modelcast-Node-Key: {key}\r\n"
    conn = await Conn.open(server.port)
    # Pipelined: heartbeat (binds the key), an announce of the node, a heartbeat that names its zone.
    await conn.send(post(f"/v1/nodes/{node}/heartbeat", b'{"zone": "z1", "ttl_s": 5}', headers=keyed)
                    + get(announce_target(1, event="started") + f"&node={node}")
                    + post(f"/v1/nodes/{node}/heartbeat", b"", headers=keyed))
    status, headers, body = await conn.answer()
    assert status == 200 and headers["content-type"].startswith("application/json")
    answer = json.loads(body)
    # A keyed heartbeat also hears its relay registration (none named) and its relay secret.
    assert answer.pop("relay") is None and len(answer.pop("relay_secret")) == 64
    assert answer == {"ok": True, "ttl_s": 5.0, "entries": 0, "reported": False}
    status, _, body = await conn.answer()
    assert status == 200 and bdecode(body)[b"complete"] == 1
    status, _, body = await conn.answer()
    assert status == 200 and json.loads(body)["ttl_s"] == 3.0  # no body: the default ttl
    # Bad input: clear 4xx answers with JSON error bodies, the connection kept.
    for request, code, fragment in [
            (post(f"/v1/nodes/{node}/heartbeat", b'{"ttl_s": -1}', headers=keyed), 400, "ttl_s"),
            (post(f"/v1/nodes/{node}/heartbeat", b"[" * 3000, headers=keyed), 400, "heartbeat body"),
            (post(f"/v1/nodes/{node}/heartbeat", b"{}"), 401, "held by another node"),
            (post("/v1/nodes/bad%20id!/heartbeat", b"{}"), 400, "node"),
            (post(f"/v1/nodes/{node}", b"", method="DELETE", headers="Host: t\r\nX-Modelcast-Node-Key: wrong-key-0123456789\r\n"),
             401, "held by another node")]:
        await conn.send(request)
        status, headers, body = await conn.answer()
        assert status == code and fragment in json.loads(body)["error"]["message"], body
    # The leave with the node's key.
    await conn.send(post(f"/v1/nodes/{node}", b"", method="DELETE", headers=keyed))
    status, _, body = await conn.answer()
    assert status == 200 and json.loads(body) == {"ok": True, "removed": 0}
    conn.close()
    assert server.fast.handed_off == 0 and server.fast.answered == 9


def keyed(key: str) -> str:
    return f"Host: t\r\nX-Modelcast-Node-Key: {key}\r\n"


async def heartbeat_status(conn: Conn, node: str, key: str | None, body: bytes = b'{"ttl_s": 5}') -> int:
    await conn.send(post(f"/v1/nodes/{node}/heartbeat", body, headers=keyed(key) if key else "Host: t\r\n"))
    status, _, answer = await conn.answer()
    assert (status == 200) == json.loads(answer).get("ok", False), answer
    return status


async def test_a_connection_that_proved_one_nodes_key_speaks_for_no_other_node(server):
    """A key checked once on a keep-alive connection is not hashed again there, and proves nothing else."""
    key_a, key_b = "a" * 32, "b" * 32
    other = await Conn.open(server.port)
    assert await heartbeat_status(other, "nodeb", key_b) == 200  # node B bound, on another connection
    conn = await Conn.open(server.port)
    for _ in range(3):  # enrols A, then its proven key again and again
        assert await heartbeat_status(conn, "nodea", key_a) == 200
    # On the connection that proved A's key: B with A's key, without a key, with a near miss: refused.
    for node, key in [("nodeb", key_a), ("nodeb", None), ("nodeb", key_b[:-1] + "c"), ("nodea", key_b)]:
        assert await heartbeat_status(conn, node, key) == 401, (node, key)
    await conn.send(post("/v1/nodes/nodeb", b"", method="DELETE", headers=keyed(key_a)))
    assert (await conn.answer())[0] == 401
    # Each node with its own key, on either connection, still.
    assert await heartbeat_status(conn, "nodeb", key_b) == 200
    assert await heartbeat_status(conn, "nodea", key_a) == 200
    assert await heartbeat_status(other, "nodea", key_a) == 200
    conn.close()
    other.close()
    assert server.fast.handed_off == 0


async def test_a_key_changed_mid_connection_is_refused(server):
    node, key = "nodec", "c" * 32
    conn = await Conn.open(server.port)
    assert await heartbeat_status(conn, node, key) == 200
    assert await heartbeat_status(conn, node, key) == 200
    for wrong in ("d" * 32, key + "x", key[:-1], "C" * 32):
        assert await heartbeat_status(conn, node, wrong) == 401, wrong
        assert await heartbeat_status(conn, node, key, b'{"ttl_s": 6}') == 200  # another head, same key
    # The binding changes under the connection (a store lookup caching another key for the id):
    # the key this connection proved is checked again, and refused.
    from modelcast.wire import announce_token
    from tracker.nodekeys import key_hash
    from tracker.state import NODE_KEYS
    new_key = "e" * 32
    server.runner.app[NODE_KEYS].remember(node, key_hash(new_key), announce_token(new_key))
    assert await heartbeat_status(conn, node, key) == 401
    assert await heartbeat_status(conn, node, new_key) == 200
    conn.close()
    assert server.fast.handed_off == 0


async def test_the_same_heartbeat_head_again_is_answered_as_the_first(server):
    """A node daemon sends the same head with every heartbeat: each gets the answer its body asks for."""
    conn = await Conn.open(server.port)
    same = b'{"ttl_s": 7}'
    await conn.send(b"".join(post("/v1/nodes/nodef/heartbeat", body, headers=keyed("f" * 32))
                             for body in (same, same, b'{"ttl_s": 8}', same, b'{"ttl_s": -1}', same)))
    answers = [await conn.answer() for _ in range(6)]
    assert [a[0] for a in answers] == [200, 200, 200, 200, 400, 200]
    assert [json.loads(a[2]).get("ttl_s") for a in answers] == [7.0, 7.0, 8.0, 7.0, None, 7.0]
    conn.close()
    assert server.fast.handed_off == 0


async def test_a_heartbeat_through_a_trusted_proxy_registers_the_forwarded_address(tmp_path):
    """The fast path reads X-Forwarded-For as aiohttp's route does: a relay URL at the node's address, via the proxy."""
    app = make_app(TrackerConfig(host="127.0.0.1", port=0, data_dir=tmp_path / "registry", token="secret",
                                 trusted_proxies=("127.0.0.1/32",)))
    running = await start_server(app, "127.0.0.1", 0)
    try:
        conn = await Conn.open(running.port)
        relay = b'{"ttl_s": 5, "relay": "http://10.9.8.7:7001"}'
        for forwarded in ("", "X-Forwarded-For: 10.0.0.1, 10.9.8.7\r\n"):  # enrols; then through the proxy
            await conn.send(post("/v1/nodes/proxied/heartbeat", relay, headers=keyed("p" * 32) + forwarded))
            status, _, body = await conn.answer()
            assert status == 200
        assert json.loads(body)["relay"] == "http://10.9.8.7:7001"
        conn.close()
        assert running.fast.handed_off == 0
    finally:
        await running.stop()


async def test_heartbeats_that_this_path_leaves_to_aiohttp_get_the_same_answers(server):
    node = "fastnode02"
    conn = await Conn.open(server.port)
    # A chunked body is aiohttp's to read (it bounds it); the connection stays with aiohttp after.
    await conn.send(f"POST /v1/nodes/{node}/heartbeat HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "c\r\n{\"ttl_s\": 4}\r\n0\r\n\r\n".encode())
    status, headers, body = await conn.answer()
    assert status == 200 and json.loads(body)["ttl_s"] == 4.0 and "aiohttp" in headers.get("server", "")
    conn.close()
    # Over the body bound: aiohttp's 413.
    conn = await Conn.open(server.port)
    await conn.send(post(f"/v1/nodes/{node}/heartbeat", b" " * (64 * 1024 + 1)))
    status, _, _ = await conn.answer()
    assert status == 413
    conn.close()
    assert server.fast.handed_off == 2


@pytest.mark.parametrize("server", [{"keepalive_timeout_s": 30.0}], indirect=True)
async def test_a_swarm_store_that_answers_later_keeps_pipelined_answers_in_order(server):
    """A swarm store whose heartbeat is a coroutine (one over the network) plugs into the same path."""
    swarms = server.runner.app[SWARMS]
    plain = swarms.heartbeat

    async def later(node_id, now, ttl, zone=None):
        await asyncio.sleep(0.05)
        return plain(node_id, now, ttl, zone)

    swarms.heartbeat = later
    try:
        conn = await Conn.open(server.port)
        await conn.send(b"".join(post(f"/v1/nodes/slow{n:02d}/heartbeat", b'{"ttl_s": %d}' % (n + 1))
                                 + get(announce_target(n, event="started")) for n in range(5)))
        for n in range(5):
            status, _, body = await conn.answer()
            assert status == 200 and json.loads(body)["ttl_s"] == n + 1
            status, _, body = await conn.answer()
            assert status == 200 and bdecode(body)[b"complete"] == n + 1
        conn.close()
    finally:
        swarms.heartbeat = plain
    assert server.fast.handed_off == 0


@pytest.mark.parametrize("server", [{"keepalive_timeout_s": 30.0}], indirect=True)
async def test_announces_answered_later_stay_in_order_with_the_ones_answered_at_once(server):
    """An announce route that answers with a coroutine (a swarm store over the network) keeps pipelined order."""
    plain = server.fast.routes[b"/announce"]

    async def later(query, remote):
        await asyncio.sleep(0.02)
        return plain(query, remote)

    conn = await Conn.open(server.port)
    try:
        server.fast.routes[b"/announce"] = later
        await conn.send(b"".join(get(announce_target(n, event="started")) for n in range(4)))
        for n in range(4):
            status, _, body = await conn.answer()
            assert status == 200 and bdecode(body)[b"complete"] == n + 1
        server.fast.routes[b"/announce"] = plain
        await conn.send(get(announce_target(9, event="started")))
        status, _, body = await conn.answer()
        assert status == 200 and bdecode(body)[b"complete"] == 5
    finally:
        server.fast.routes[b"/announce"] = plain
        conn.close()
    assert server.fast.handed_off == 0
