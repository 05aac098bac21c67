"""No one client can hold a server (issue #15, "bounded servers"): real processes, loopback only.

* A chunked heartbeat body was read whole (the cap checked only Content-Length) and parsed:
  48 MiB took the registry to 1.36 GB.
* Requests other than plain announces reached aiohttp with no head or body timeout, a
  3,630 s keep-alive and no connection cap: half-sent requests stayed open for an hour, and
  relay PUTs that promised a piece and sent one byte stayed open for good.
* Relay GETs with ``?wait=60`` were not bounded in number.
* A malformed request cost ~11 log lines with a traceback; a heartbeat body of 3,000 ``[``
  was a 500 (RecursionError).

Attackers connect from 127.0.0.2-127.0.0.9, the well-behaved client from 127.0.0.1, so the
per-address caps are what keeps the service up for the latter.  Every load is bounded in
count; every wait is a condition with a bound, and the bounds asserted are resources
(bytes, descriptors, CPU seconds, log lines), not durations.  The last four run the registry
in this process with short timeouts and a cap of 3 per address, to check the mechanism
itself: aiohttp's 408s, its keep-alive, and every place given back when its connection ends.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import secrets
import select
import socket
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest

from adapters.http_server import NODE_API_LIMITS, REGISTRY_LIMITS, RELAY_LIMITS, ServerLimits
from harness import start_node, start_tracker, wait_until, wait_until_async
from modelcast.config import TrackerConfig
from node_cache.relay import MAX_RELAY_WAITERS
from tracker.app import make_app, start_server
from tracker.liveness import MAX_HEARTBEAT_BODY
from tracker.registry_api import MAX_PUBLISH_BODY

from ..helpers import AUTH, TOKEN, make_model, publish, relay_token

MiB = 1 << 20
GOOD = "127.0.0.1"
ATTACKERS = [f"127.0.0.{n}" for n in range(2, 10)]
NODE_ID = "n" + "0" * 15


# ---- reading a process ---------------------------------------------------------------------
def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def log_lines(svc) -> list[str]:
    return svc.log_text().splitlines()


# ---- a raw HTTP client -----------------------------------------------------------------------
def addr_of(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def get(url: str, path: str, source: str = GOOD, token: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*addr_of(url), timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"X-Modelcast-Relay-Token": token} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def chunked(pieces: Iterator[bytes]) -> Iterator[bytes]:
    for piece in pieces:
        yield b"%x\r\n%b\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


def send_until_answered(url: str, head: bytes, body: Iterator[bytes], limit_s: float = 60) -> tuple[int, dict, int]:
    """Send ``head`` then ``body`` until the server answers; (status, JSON answer, body bytes sent by then).

    The server may answer before the body is all sent, and close: that is what is tested.
    """
    sock = socket.create_connection(addr_of(url), timeout=10)
    sock.setblocking(False)
    pending, sent, got = head, -len(head), b""
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 1.0)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                got += data
                head_end = got.find(b"\r\n\r\n")
                if head_end >= 0 or not data:
                    break
            if writable:
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    pending = b""
                    continue
                sent += n
                pending = pending[n:] or next(body, b"")
        # The rest of the answer (its Content-Length), if it came.
        head_end = got.find(b"\r\n\r\n")
        assert head_end >= 0, f"no answer; got {got[:200]!r} after sending {sent} body bytes"
        length = int(next((line.split(b":")[1] for line in got[:head_end].split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), b"0"))
        sock.setblocking(True)
        sock.settimeout(10)
        while len(got) < head_end + 4 + length:
            data = sock.recv(65536)
            if not data:
                break
            got += data
        answer = got[head_end + 4:head_end + 4 + length]
        return int(got.split(b" ", 2)[1]), json.loads(answer) if answer else {}, sent
    finally:
        sock.close()


class HalfOpen:
    """Sockets from the attackers' addresses that each sent part of a request and hold it."""

    def __init__(self, url: str, requests: list[bytes], sources: list[str]):
        self.socks: list[socket.socket] = []
        self.closed: set[int] = set()
        self.answers: dict[int, bytes] = {}
        addr = addr_of(url)
        for i, request in enumerate(requests):
            sock = socket.create_connection(addr, timeout=10, source_address=(sources[i % len(sources)], 0))
            sock.sendall(request)
            sock.setblocking(False)
            self.socks.append(sock)

    def poll(self) -> int:
        """Read what came (answers, EOF); the number of sockets the server has closed."""
        open_socks = [s for i, s in enumerate(self.socks) if i not in self.closed]
        if open_socks:
            readable, _, _ = select.select(open_socks, [], [], 0)
            for sock in readable:
                i = self.socks.index(sock)
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    self.answers[i] = self.answers.get(i, b"") + data
                else:
                    self.closed.add(i)
        return len(self.closed)

    def statuses(self) -> list[int]:
        return sorted(int(a.split(b" ", 2)[1]) for a in self.answers.values() if a.startswith(b"HTTP/1.1 "))

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def wait_all_closed(half: HalfOpen, limits: ServerLimits, timeout_s: float) -> None:
    """Every half-open socket closed by the server, within ``timeout_s`` (the timeout plus slack)."""
    wait_until(lambda: half.poll() == len(half.socks), timeout_s, 0.1,
               lambda: f"the server to close {len(half.socks)} slow connections ({len(half.closed)} closed)")


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def tracker(tmp_path):
    svc = start_tracker(tmp_path, token=TOKEN)
    yield svc
    svc.stop()


@pytest.fixture
def node(tmp_path, tracker):
    svc = start_node(tmp_path, tracker.url, "node", zone="z1")
    with urllib.request.urlopen(f"{svc.url}/v1/health", timeout=10) as resp:
        svc.relay_url = json.load(resp)["relay"]
    assert svc.relay_url, "the node serves no relay listener"
    yield svc
    svc.stop()


# ---- bodies --------------------------------------------------------------------------------
def test_a_chunked_48_mib_heartbeat_is_refused_at_its_bound_and_the_registry_keeps_answering(tracker):
    peak_before = status_kb(tracker.pid, "VmHWM")
    one_mib = b"0," * (MiB // 2)
    body = chunked(iter([b"[", *([one_mib] * 48), b"0]"]))
    head = (f"POST /v1/nodes/{NODE_ID}/heartbeat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    result: dict = {}
    sender = threading.Thread(target=lambda: result.update(answer=send_until_answered(tracker.url, head, body)))
    sender.start()
    health = get(tracker.url, "/v1/health")  # while the body is on its way
    sender.join(120)
    status, answer, sent = result["answer"]
    assert status == 413 and answer["error"]["code"] == "too_large", answer
    assert str(MAX_HEARTBEAT_BODY) in answer["error"]["message"]
    # Refused at the bound, not after reading all 48 MiB (what got sent first sits in socket buffers).
    assert sent < 40 * MiB, f"the answer came only after {sent} bytes were sent"
    assert health[0] == 200 and get(tracker.url, "/v1/health")[0] == 200
    grown_mb = (status_kb(tracker.pid, "VmHWM") - peak_before) / 1024
    assert grown_mb < 100, f"the registry's peak RSS grew by {grown_mb:.0f} MB"
    assert "Traceback" not in tracker.log_text()


def test_a_chunked_publish_over_its_bound_is_a_413(tracker):
    # aiohttp's client_max_size bounded this already; the route's own bound is the same number.
    peak_before = status_kb(tracker.pid, "VmHWM")
    over = MAX_PUBLISH_BODY + 16 * MiB
    body = chunked(iter([b"{"] + [b" " * MiB] * (over // MiB)))
    head = (f"POST /v1/artifacts HTTP/1.1\r\nHost: t\r\nAuthorization: {AUTH['Authorization']}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    status, answer, sent = send_until_answered(tracker.url, head, body)
    assert status == 413 and answer["error"]["code"] == "too_large", answer
    assert sent < over
    grown_mb = (status_kb(tracker.pid, "VmHWM") - peak_before) / 1024
    assert grown_mb < MAX_PUBLISH_BODY / MiB + 48, f"the registry's peak RSS grew by {grown_mb:.0f} MB"
    assert get(tracker.url, "/v1/health")[0] == 200


def test_a_deeply_nested_json_body_is_a_400_not_a_traceback(tracker, node):
    deep = b"[" * 3000
    for url, path in [(tracker.url, f"/v1/nodes/{NODE_ID}/heartbeat"), (node.url, "/v1/pull"),
                      (node.url, "/v1/pins"), (node.url, "/v1/runtime/activate")]:
        head = (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(deep)}\r\n\r\n").encode()
        status, answer, _ = send_until_answered(url, head, iter([deep]))
        assert status == 400 and answer["error"]["code"] == "bad_request", (path, status, answer)
    assert "Traceback" not in tracker.log_text() and "Traceback" not in node.log_text()


# ---- slow clients --------------------------------------------------------------------------
def test_half_sent_requests_cannot_hold_the_registry(tracker):
    limits = REGISTRY_LIMITS
    fds_before = open_fds(tracker.pid)
    # More than one address may hold: what goes to aiohttp (any route but an announce)
    # and what the announce fast path keeps, each stopped mid-head.
    partial = [b"POST /v1/artifacts HTTP/1.1\r\nHost: t\r\nContent-Le", b"GET /v1/health HTTP/1.1\r\nHo",
               b"GET /v1/resolve?ref=a", b"GET /announce?info_hash="]
    count = limits.max_per_ip + 44
    half = HalfOpen(tracker.url, [partial[i % len(partial)] for i in range(count)], ATTACKERS[:1])
    try:
        # The well-behaved client is served meanwhile, health and announce alike.
        assert get(tracker.url, "/v1/health") == (200, b'{"ok": true}')
        status, body = get(tracker.url, "/announce?info_hash=" + "%AA" * 20 + "&peer_id=-MC0001-aaaaaaaaaaaa&port=1")
        assert status == 200 and body.startswith(b"d14:failure reason")  # an answer (an unknown torrent)
        # One address holds no more than its cap of connections (and so of descriptors).
        assert open_fds(tracker.pid) <= fds_before + limits.max_per_ip + 16
        wait_all_closed(half, limits, limits.header_timeout_s + 10)
        statuses = half.statuses()
        assert statuses.count(503) >= count - limits.max_per_ip, statuses  # refused at once, over the cap
        assert statuses.count(408) >= limits.max_per_ip // 2, statuses  # told why, then closed
        assert open_fds(tracker.pid) <= fds_before + 8
    finally:
        half.close()


def test_half_sent_requests_cannot_hold_the_node_api(node):
    limits = NODE_API_LIMITS
    half = HalfOpen(node.url, [b"GET /v1/artifacts HTTP/1.1\r\nHo", b"POST /v1/pull HTTP/1.1\r\nHost: t\r\n"] * 100,
                    ATTACKERS[:1])
    try:
        assert get(node.url, "/v1/health")[0] == 200
        wait_all_closed(half, limits, limits.header_timeout_s + 10)
        assert half.statuses().count(408) >= 150
    finally:
        half.close()


def test_relay_puts_that_promise_a_piece_and_send_one_byte_are_closed(tmp_path, tracker):
    limits = RELAY_LIMITS
    model = make_model(tmp_path / "m", {"w.bin": 4 * MiB})
    digest = publish(tracker.url, model, "sec/slow:v1", (tmp_path / "o").as_uri())
    # A pull that goes on while the test runs (16 KiB/s: 4 MiB would take minutes), so the node wants pieces.
    node = start_node(tmp_path, tracker.url, "slow", zone="z1", extra=["--download-limit", "16K"])
    try:
        health = json.loads(get(node.url, "/v1/health")[1])
        relay = health["relay"]
        name = json.loads(get(tracker.url, f"/v1/artifacts/{digest}")[1])["torrent_name"]
        # Sent as by nodes the registry named (tests/security/test_relay_tokens.py: without a token, refused at once).
        tokens = {m: relay_token(tracker, health["node_id"], m, digest, f"{name}/w.bin", 0, 4 * MiB - 1)
                  for m in ("GET", "PUT")}
        req = urllib.request.Request(f"{node.url}/v1/pull", data=json.dumps({"ref": "sec/slow:v1", "wait": False})
                                     .encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30):
            pass

        def state() -> str:
            return json.loads(get(node.url, f"/v1/pulls/{digest}")[1])["state"]

        wait_until(lambda: state() == "downloading", 30, 0.1, lambda: f"the pull to download (it is {state()})")
        piece, size = 14, 256 * 1024  # 16 pieces of 256 KiB; the slow pull is far from the 15th
        put = (f"PUT /v1/artifacts/{digest}/pieces/{piece} HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n"
               f"X-Modelcast-Relay-Token: {tokens['PUT']}\r\n\r\nx").encode()
        wait_until(lambda: get(relay, f"/v1/artifacts/{digest}/pieces/0?wait=0", token=tokens["GET"])[0] in (200, 404),
                   10, 0.2, "the node to take registry tokens")
        half = HalfOpen(relay, [put] * 100, ATTACKERS)
        try:
            assert get(relay, f"/v1/artifacts/{digest}/pieces/0?wait=0", token=tokens["GET"])[0] in (200, 404)
            wait_all_closed(half, limits, limits.body_timeout_s + 10)
            statuses = half.statuses()
            assert statuses.count(408) >= 90, statuses  # the body never came: timed out, not refused
            assert state() == "downloading"  # the pull goes on, unharmed
        finally:
            half.close()
        assert "Traceback" not in node.log_text()
    finally:
        node.stop()


def test_relay_waits_are_bounded_in_number_and_cost_no_cpu(tmp_path, tracker):
    # Waits need a registry token for a piece of an artifact the node pulls: a slow pull (16 KiB/s).
    model = make_model(tmp_path / "m", {"w.bin": 4 * MiB})
    digest = publish(tracker.url, model, "sec/wait:v1", (tmp_path / "o").as_uri())
    node = start_node(tmp_path, tracker.url, "node", zone="z1", extra=["--download-limit", "16K"])
    health = json.loads(get(node.url, "/v1/health")[1])
    node.relay_url = health["relay"]
    name = json.loads(get(tracker.url, f"/v1/artifacts/{digest}")[1])["torrent_name"]
    token = relay_token(tracker, health["node_id"], "GET", digest, f"{name}/w.bin", 0, 4 * MiB - 1)
    req = urllib.request.Request(f"{node.url}/v1/pull", data=json.dumps({"ref": "sec/wait:v1", "wait": False})
                                 .encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).close()
    wait_until(lambda: json.loads(get(node.url, f"/v1/pulls/{digest}")[1])["state"] == "downloading", 30, 0.1,
               "the pull to download")
    wait_until(lambda: get(node.relay_url, f"/v1/artifacts/{digest}/pieces/15?wait=0", token=token)[0] == 404, 30,
               0.1, "the node to take registry tokens for its pull")
    wait_path = f"/v1/artifacts/{digest}/pieces/15?wait=60"  # the last piece: far from what 16 KiB/s reaches
    count = 400  # 50 from each of 8 addresses: under the relay's per-address cap
    half = HalfOpen(node.relay_url, [f"GET {wait_path} HTTP/1.1\r\nHost: t\r\nX-Modelcast-Relay-Token: {token}\r\n"
                                     "\r\n".encode()] * count, ATTACKERS)
    try:
        # Past the bound, a wait is answered at once (busy: the asking node goes to the origin).
        wait_until(lambda: half.poll() >= 0 and len(half.answers) >= count - MAX_RELAY_WAITERS, 20, 0.1,
                   lambda: f"{count - MAX_RELAY_WAITERS} relay requests to be answered ({len(half.answers)} were)")
        assert half.statuses() == [503] * (count - MAX_RELAY_WAITERS)
        assert b'"code": "busy"' in next(iter(half.answers.values()))
        # The waiting ones cost nothing while they wait: no polling.
        before = cpu_seconds(node.pid)
        time.sleep(3.0)  # the measurement window (a resource bound), not a wait for a condition
        used = cpu_seconds(node.pid) - before
        assert used < 0.3, f"the node used {used:.2f} CPU-s in 3 s with {MAX_RELAY_WAITERS} relay requests waiting"
        half.poll()
        assert len(half.answers) == count - MAX_RELAY_WAITERS  # the others still wait for the piece
        assert get(node.relay_url, f"/v1/artifacts/{digest}/pieces/15?wait=0", token=token)[0] == 404
    finally:
        half.close()
        node.stop()


# ---- malformed requests ----------------------------------------------------------------------
MALFORMED = b"GET /v1/health HTTP/1.1\r\nHost: t\r\nthis is not a header\r\n\r\n"


def _send_malformed(url: str, times: int) -> list[int]:
    statuses = []
    for _ in range(times):
        with socket.create_connection(addr_of(url), timeout=10, source_address=(ATTACKERS[0], 0)) as sock:
            sock.sendall(MALFORMED)
            data = b""
            while b"\r\n" not in data:
                more = sock.recv(4096)
                if not more:
                    break
                data += more
            statuses.append(int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else 0)
    return statuses


@pytest.mark.parametrize("where", ["registry", "node API", "relay"])
def test_malformed_requests_are_a_400_and_at_most_one_short_log_line(where, tracker, node):
    svc, url = {"registry": (tracker, tracker.url), "node API": (node, node.url),
                "relay": (node, node.relay_url)}[where]
    before = log_lines(svc)
    assert _send_malformed(url, 50) == [400] * 50
    assert get(url, "/v1/health" if where != "relay" else "/v1/artifacts/" + "sha256:" + "0" * 64
               + "/pieces/0")[0] in (200, 401, 404)  # and still answering (the relay: 401, no token)
    # The probe's own refusal (a relay GET with no token) is another cause, logged on its own.
    new = [line for line in log_lines(svc)[len(before):] if "refused: token missing" not in line]
    assert len(new) <= 1, "\n".join(new)
    assert all(len(line) < 400 and "Traceback" not in line for line in new), new


# ---- the same bounds in process, with short timeouts and small caps ----------------------------
@pytest.fixture
async def small(tmp_path):
    """The registry in this process, with short timeouts and a cap of 3 connections per address."""
    limits = replace(REGISTRY_LIMITS, header_timeout_s=0.5, body_timeout_s=0.5, keepalive_timeout_s=1.0, max_per_ip=3)
    running = await start_server(make_app(TrackerConfig(data_dir=tmp_path / "reg", token=TOKEN)), GOOD, 0,
                                 limits=limits)
    yield running
    await running.stop()


async def _open(port: int, source: str, data: bytes = b""):
    reader, writer = await asyncio.open_connection(GOOD, port, local_addr=(source, 0))
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def _answer(reader) -> tuple[int, bytes]:
    """The status of the next answer and everything up to EOF (the server closes after these)."""
    data = await asyncio.wait_for(reader.read(), 10)
    return (int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else 0), data


async def test_a_half_sent_head_gets_a_408_from_aiohttp_too(small):
    reader, writer = await _open(small.port, ATTACKERS[0], b"POST /v1/artifacts HTTP/1.1\r\nHost: t\r\n")
    status, data = await _answer(reader)  # closed by the server: read() returns at EOF
    assert status == 408 and b"no whole request head within 0.5 s" in data
    writer.close()


async def test_a_body_that_stops_coming_gets_a_408(small):
    reader, writer = await _open(small.port, ATTACKERS[0],
                                 f"POST /v1/nodes/{NODE_ID}/heartbeat HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n"
                                 "\r\n{".encode())
    status, data = await _answer(reader)
    assert status == 408 and b"no request body bytes for 0.5 s" in data
    writer.close()


async def test_an_idle_keepalive_connection_to_aiohttp_is_closed(small):
    reader, writer = await _open(small.port, GOOD, b"GET /v1/health HTTP/1.1\r\nHost: t\r\n\r\n")
    status, data = await _answer(reader)  # the answer, then EOF after the 1 s keep-alive
    assert status == 200 and data.endswith(b'{"ok": true}')
    writer.close()


async def test_the_per_address_cap_refuses_the_next_and_frees_places_as_connections_close(small):
    limiter = small.bounded.limiter
    # Three places from one address: one still on the fast path, one handed to aiohttp, one idle.
    held = [await _open(small.port, ATTACKERS[0], data) for data in (b"GET /announce?", b"GET /v1/he", b"")]
    await wait_until_async(lambda: limiter.by_ip.get(ATTACKERS[0]) == 3, 5, message="3 connections counted")
    reader, writer = await _open(small.port, ATTACKERS[0])
    status, data = await _answer(reader)
    assert status == 503 and b"at most 3 from one address" in data
    writer.close()
    # Another address is served meanwhile.
    reader, writer = await _open(small.port, GOOD, b"GET /v1/health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert (await _answer(reader))[0] == 200
    writer.close()
    # Every place comes back when its connection ends (closed by the client or timed out by the server).
    for _, w in held:
        w.close()
    await wait_until_async(lambda: limiter.open == 0 and not limiter.by_ip, 5,
                           message=lambda: f"the places to come back ({limiter.open} held: {limiter.by_ip})")
    reader, writer = await _open(small.port, ATTACKERS[0], b"GET /v1/health HTTP/1.1\r\nHost: t\r\n"
                                 b"Connection: close\r\n\r\n")
    assert (await _answer(reader))[0] == 200
    writer.close()
