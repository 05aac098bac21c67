"""10,000 hostile requests across every server, none answered with a 5xx or a traceback (issue #15).

A real registry (HTTP with its announce fast path, and the BEP 15 UDP tracker) and a real
node daemon (its local API and its relay listener) each get a deterministic stream of
malformed and mutated requests, written byte by byte on raw sockets so that nothing in a
client library tidies them up: bad request lines, odd methods, junk and overlong paths,
percent-encoded garbage in every query parameter, impossible ranges, bodies that are not
what the headers say, random and truncated UDP packets.  Every answer that comes must be
below 500; afterwards both processes answer health checks, a real announce and a real
pull, and neither log holds a traceback.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import urllib.request
from urllib.parse import quote

from harness import start_node, start_tracker
from harness.procs import free_port
from node_cache.client import NodeClient

from ..helpers import TOKEN, announce_query, make_model, publish, tree_hashes

CASES = {"registry": 4000, "announce": 2500, "udp": 1500, "node": 1500, "relay": 500}
SEED = 20261204

TRICKY = ["", "\x00", "%", "%zz", "%00", "..", "../../etc/passwd", "9" * 5000, "-1", "1e9", "NaN", "[" * 3000,
          "sha256:" + "0" * 64, "sha256:" + "g" * 64, "demo/m:v1", "demo/m\n:v1", "\ud800", "²", "a" * 70000,
          "bytes=0-", "bytes=-0", "bytes=5-1", "bytes=0-1,2-3", "bytes=99999999999999999999-", "http://203.0.113.1:9",
          "{}", "[]", "null", '{"zone": "' + "z" * 5000 + '"}']


def junk(rng: random.Random, n: int | None = None) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64) if n is None else n))


def text(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(TRICKY)
    if roll < 0.8:
        return junk(rng).decode("latin-1")
    return "".join(rng.choice("abcz09-_./:@%?&=+ ") for _ in range(rng.randint(0, 40)))


def enc(value: str | bytes) -> str:
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return quote(data, safe="")


def http_request(rng: random.Random, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """A request as bytes; sometimes mangled at the request line or the framing."""
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    roll = rng.random()
    if roll < 0.05:
        lines[0] = junk(rng).decode("latin-1").replace("\r", "").replace("\n", "")
    elif roll < 0.08:
        lines.append("Transfer-Encoding: chunked")
        body = f"{len(body) + rng.randint(-3, 3):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    elif roll < 0.11:
        lines.append(f"Content-Length: {rng.choice(['-1', 'x', '99999999999999999999', str(len(body) + 5)])}")
    elif body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def exchange(host: str, port: int, data: bytes, wait_s: float = 0.5) -> int | None:
    """Send ``data``; the answer's status code, or None if none came within ``wait_s``.

    A request whose body is shorter than its headers promise gets no answer: the server
    waits for the rest (until its body timeout), and so this gives up on it.
    """
    with socket.create_connection((host, port), timeout=10) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may close early on garbage; what it said before still counts
        s.settimeout(wait_s)
        head = b""
        try:
            while b"\r\n" not in head and len(head) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
        except OSError:
            pass
    if not head.startswith(b"HTTP/1."):
        return None
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return -1


def registry_case(rng: random.Random, digest: str) -> bytes:
    templates = ["/v1/health", "/v1/stats", "/metrics", "/v1/artifacts", "/v1/resolve?ref={t}",
                 "/v1/artifacts/{d}", "/v1/artifacts/{d}/torrent", "/v1/webseed/{d}/{t}", "/v1/webseed/{d}/fuzz/a.bin",
                 "/v1/tags/{t}", "/v1/nodes/{t}/heartbeat", "/v1/nodes/fuzz-node/heartbeat", "/v1/nodes/{t}",
                 "/v1/nodes/fuzz-node", "/v1/auth/check", "/{t}",
                 "/v1/artifacts?limit={t}&after={t}&content_key={t}", "/ui", "/ui/artifacts/{d}"]
    path = rng.choice(templates).format(d=rng.choice([digest, "sha256:" + "0" * 64, enc(text(rng))]),
                                        t=enc(text(rng)))
    method = rng.choice(["GET", "GET", "POST", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "GeT", "X" * 30])
    headers = {}
    for name in rng.sample(["Range", "X-Modelcast-Zone", "X-Modelcast-First-Copy", "X-Modelcast-Relay",
                            "Authorization", "Content-Type", "If-Range", "Accept-Encoding"], rng.randint(0, 4)):
        headers[name] = text(rng).replace("\r", "").replace("\n", "")[:8000]
    if rng.random() < 0.3:
        headers["Authorization"] = f"Bearer {rng.choice([TOKEN, 'wrong', text(rng)])}".replace("\r", "").replace("\n", "")
    body = b""
    if method in ("POST", "PUT", "PATCH"):
        body = rng.choice([json.dumps(text(rng)).encode(), junk(rng, rng.randint(0, 2000)),
                           b'{"zone": "z", "ttl_s": ' + text(rng).encode("utf-8", "replace") + b"}",
                           b"[" * 3000, json.dumps({"manifest": text(rng), "torrent": text(rng)}).encode()])
    return http_request(rng, method, path, headers, body)


def announce_case(rng: random.Random, ih: bytes) -> bytes:
    params = {"info_hash": rng.choice([ih, ih[:19], junk(rng, 20), b""]), "peer_id": junk(rng, 20),
              "port": str(rng.randint(0, 70000)), "uploaded": "0", "downloaded": "0", "left": "0", "compact": "1"}
    for key in rng.sample(sorted(params) + ["event", "numwant", "ip", "key", "zone", "node", "role", "no_peer_id"],
                          rng.randint(1, 4)):
        params[key] = rng.choice([text(rng), junk(rng)])
    if rng.random() < 0.2:
        params.pop(rng.choice(sorted(params)))
    query = "&".join(f"{enc(k)}={enc(v)}" for k, v in params.items())
    if rng.random() < 0.1:
        query = junk(rng).decode("latin-1").replace(" ", "").replace("\r", "").replace("\n", "")
    path = rng.choice(["/announce", "/scrape", "/announce/", "/ANNOUNCE"]) + "?" + query
    return http_request(rng, rng.choice(["GET"] * 9 + ["POST"]), path, {}, b"")


def udp_case(rng: random.Random, ih: bytes, connection_id: int) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        return junk(rng, rng.randint(0, 200))
    action = rng.choice([0, 1, 2, 3, 7])
    tid = rng.getrandbits(32)
    if roll < 0.5:
        return struct.pack(">QII", 0x41727101980, action, tid) + junk(rng)
    body = struct.pack(">QII", connection_id, action, tid)
    if action == 1:
        body += ih + junk(rng, 20) + struct.pack(">QQQIIIiH", *(rng.getrandbits(63) for _ in range(3)),
                                                 rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32),
                                                 rng.randint(-2, 300), rng.randint(0, 65535))
        if rng.random() < 0.5:  # BEP 41 options
            url = junk(rng, rng.randint(0, 255))
            body += bytes([2, len(url)]) + url + bytes([rng.choice([0, 1, 2, 9])])
    elif action == 2:
        body += ih * rng.randint(0, 80) + junk(rng, rng.randint(0, 19))
    return body[: rng.randint(0, len(body))] if rng.random() < 0.2 else body


def node_case(rng: random.Random, digest: str) -> bytes:
    templates = ["/v1/pull", "/v1/pulls/{d}", "/v1/artifacts", "/v1/artifacts/{d}/verify", "/v1/verify",
                 "/v1/resolve?ref={t}", "/v1/pins", "/v1/pins/{d}", "/v1/health", "/metrics", "/{t}",
                 "/v1/pulls/{d}?wait={t}"]
    path = rng.choice(templates).format(d=rng.choice([digest, "sha256:" + "1" * 64, enc(text(rng))]),
                                        t=enc(text(rng)))
    method = rng.choice(["GET", "POST", "POST", "DELETE", "PUT"])
    body = b""
    if method in ("POST", "PUT"):
        body = rng.choice([json.dumps({"ref": text(rng), "wait": rng.choice([True, False, text(rng)])}).encode(),
                           json.dumps({"digest": text(rng)}).encode(), junk(rng, rng.randint(0, 500)), b"[" * 3000,
                           json.dumps({"ref": "fuzz/m:v1", "wait": False, "timeout_s": text(rng)}).encode()])
    return http_request(rng, method, path, {"Content-Type": "application/json"} if body else {}, body)


def relay_case(rng: random.Random, digest: str) -> bytes:
    d = rng.choice([digest, "sha256:" + "2" * 64, enc(text(rng))])
    piece = rng.choice([str(rng.randint(0, 50)), "999999999", enc(text(rng))])
    wait = rng.choice(["0", "0.1", "-1", "61", "nan", "inf", enc(text(rng))])
    method = rng.choice(["GET", "PUT", "PUT", "POST"])
    body = junk(rng, rng.choice([0, 1, 100, 2000])) if method != "GET" else b""
    return http_request(rng, method, f"/v1/artifacts/{d}/pieces/{piece}?wait={wait}", {}, body)


def run_cases(host: str, port: int, cases: list[bytes]) -> dict:
    seen = {"answers": 0, "no_answer": 0, "5xx": []}
    for data in cases:
        status = exchange(host, port, data)
        if status is None:
            seen["no_answer"] += 1
            continue
        seen["answers"] += 1
        if status >= 500 or status < 100:
            seen["5xx"].append((status, data[:200]))
    return seen


def test_ten_thousand_hostile_requests_get_no_5xx_and_no_traceback(tmp_path):
    rng = random.Random(SEED)
    udp_port = free_port()
    tracker = start_tracker(tmp_path, token=TOKEN, extra=["--udp-listen", f"127.0.0.1:{udp_port}"])
    node = None
    try:
        model = make_model(tmp_path / "m", {"a.bin": 300_000, "b.bin": 10})
        digest = publish(tracker.url, model, "fuzz/m:v1", (tmp_path / "o").as_uri())
        relay_port = free_port()
        node = start_node(tmp_path, tracker.url, "n1", extra=["--relay-listen", f"127.0.0.1:{relay_port}"],
                          token=TOKEN)
        with urllib.request.urlopen(f"{tracker.url}/v1/artifacts/{digest}", timeout=10) as resp:
            ih = bytes.fromhex(json.load(resp)["info_hash"]["v1"])
        host, port = "127.0.0.1", int(tracker.url.rsplit(":", 1)[1])
        node_port = int(node.url.rsplit(":", 1)[1])

        results = {
            "registry": run_cases(host, port, [registry_case(rng, digest) for _ in range(CASES["registry"])]),
            "announce": run_cases(host, port, [announce_case(rng, ih) for _ in range(CASES["announce"])]),
            "node": run_cases(host, node_port, [node_case(rng, digest) for _ in range(CASES["node"])]),
            "relay": run_cases(host, relay_port, [relay_case(rng, digest) for _ in range(CASES["relay"])]),
        }

        # UDP: connect once for a valid connection id, then the packets; count the answers.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(struct.pack(">QII", 0x41727101980, 0, 7), ("127.0.0.1", udp_port))
            cid = struct.unpack(">IIQ", s.recv(16))[2]
            answered = 0
            s.settimeout(0.05)
            for _ in range(CASES["udp"]):
                s.sendto(udp_case(rng, ih, cid), ("127.0.0.1", udp_port))
                try:
                    s.recv(65536)
                    answered += 1
                except (TimeoutError, socket.timeout):
                    pass
            results["udp"] = {"answers": answered}
        print(json.dumps({k: {**v, "5xx": len(v.get("5xx", []))} for k, v in results.items()}))

        for name, seen in results.items():
            assert not seen.get("5xx"), (name, seen["5xx"][:5])
        # Still serving, correctly: health, a real announce, a real pull.
        assert exchange(host, port, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 10) == 200
        assert exchange(host, port, f"GET /announce?{announce_query(ih, 1)} HTTP/1.1\r\nHost: x\r\n"
                                    "Connection: close\r\n\r\n".encode(), 10) == 200
        status = asyncio.run(NodeClient(node.url).pull("fuzz/m:v1", wait=True))
        assert tree_hashes(status["path"]) == tree_hashes(model)
        for svc in (tracker, node):
            log = svc.log_text()
            assert "Traceback" not in log, log[log.index("Traceback") - 500: log.index("Traceback") + 2000]
    finally:
        if node is not None:
            node.stop()
        tracker.stop()
