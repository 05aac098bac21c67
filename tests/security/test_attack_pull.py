"""A 4-node, two-zone pull under every attack of issue #15 at once ends byte-identical, within 2x its calm time.

Real registry/tracker and four real node daemons (two zones of two, on 127.0.1.x and
127.0.2.x).  A 32 MiB artifact is pulled by all four undisturbed; then a fresh artifact of
the same size is pulled while attackers on other loopback addresses (127.0.0.3-127.0.0.8),
speaking only the public protocol, run:

* gate pollution: whole-file web-seed GETs dropped at once, with no zone and naming each
  of the nodes' zones as a first copy;
* forged relays: first-copy GETs naming a zone and an ``X-Modelcast-Relay`` URL of a fake
  holder on the attacker's own address (whole files dropped at once, and single pieces),
  one holder that answers every piece with garbage and swallows pushes, one that accepts
  connections and never answers; they prove no enrolled node (no node id and key), so the
  gate serves them and neither records them nor names them to the nodes;
* spoofed stops: ``event=stopped`` announces for each victim's ip:port, from another
  address, with and without the victim's node id;
* slow clients: half-sent requests held open against the registry and every node API;
* garbage relay PUTs of every piece to every node's relay listener.

Every attack loop is bounded in count and time and stopped at the end.  The assertion is
the issue's acceptance criterion, as a ratio measured in the same test: the attacked pull
takes at most ``2 x`` the calm one plus :data:`NOISE_S` seconds (process noise: four
daemons, a tracker and the attackers share the machine's cores; a calm pull here takes a
few seconds, so a fixed slack covers scheduling jitter without hiding a stall, which costs
tens of seconds), and every node ends with the source's bytes.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote_from_bytes

from aiohttp import web

from harness import start_node, wait_until
from modelcast.wire import FIRST_COPY_HEADER, RELAY_HEADER, ZONE_HEADER
from node_cache.client import NodeClient

from ..helpers import TOKEN, make_model, metric, publish, relay_token, tree_hashes

MiB = 1 << 20
NOISE_S = 4.0  # see the module docstring
ZONES = {"zone-a": ["127.0.1.2", "127.0.1.3"], "zone-b": ["127.0.2.2", "127.0.2.3"]}
GATE, GARBAGE_HOLDER, SILENT_HOLDER, STOPPER, SLOW, PUTTER = (f"127.0.0.{n}" for n in range(3, 9))
ATTACK_S = 120  # no attack loop runs longer than this, whatever happens
SIZES = {f"weights/shard-{i}.bin": 8 * MiB for i in range(4)}
SLOW_PER_TARGET = 30  # half-sent requests held against the registry and each node API (per-address caps: 256)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


@dataclass
class Target:
    """What an attacker can learn from the public API about the artifact and the nodes."""

    tracker: str
    digest: str
    info_hash: bytes
    torrent_name: str
    piece_length: int
    files: list[tuple[str, int]]
    nodes: list[dict]  # {"ip", "port" (peer), "node_id", "api", "relay"}

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.tracker.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    @property
    def pieces(self) -> int:
        total = sum(-(-size // self.piece_length) * self.piece_length for _, size in self.files)
        return total // self.piece_length


@dataclass
class Attacks:
    """Every attack, as coroutines on one event loop in a thread of its own; counts what each sent."""

    target: Target
    sent: dict[str, int] = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "an attack loop did not stop"

    def count(self, name: str, n: int = 1) -> None:
        self.sent[name] = self.sent.get(name, 0) + n

    def running(self, deadline: float) -> bool:
        return not self.stop_event.is_set() and time.monotonic() < deadline

    async def _main(self) -> None:
        deadline = time.monotonic() + ATTACK_S
        garbage = await self._garbage_holder()
        silent_held: list[asyncio.StreamWriter] = []

        def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            silent_held.append(writer)  # kept open, never answered, until the end
            self.count("silent_connections")

        silent = await asyncio.start_server(hold, SILENT_HOLDER, 0)
        silent_url = f"http://{SILENT_HOLDER}:{silent.sockets[0].getsockname()[1]}"
        tasks = [asyncio.create_task(c) for c in (
            self._pollute_gate(deadline),
            self._forge_relay(GARBAGE_HOLDER, garbage, deadline),
            self._forge_relay(SILENT_HOLDER, silent_url, deadline),
            self._spoof_stops(deadline),
            self._slow_clients(deadline),
            self._garbage_puts(deadline),
        )]
        while self.running(deadline):
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        silent.close()
        for writer in silent_held:
            writer.transport.abort()
        await self._runner.cleanup()

    # ---- plumbing -------------------------------------------------------------------------
    async def _request(self, source: str, host_port: tuple[str, int], head: str, body: bytes = b"",
                       read: str = "status") -> bytes:
        """Send one request from ``source``; ``read``: "status" (first line, then hang up) or "all"."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*host_port, local_addr=(source, 0)), 5)
        try:
            writer.write(head.encode() + body)
            await writer.drain()
            if read == "status":
                return await asyncio.wait_for(reader.readline(), 10)
            return await asyncio.wait_for(reader.read(), 30)
        finally:
            writer.transport.abort()  # dropped at once, unread

    async def _garbage_holder(self) -> str:
        """A fake holder on the attacker's own address: garbage for every piece asked, every push swallowed."""
        t = self.target

        async def piece(request: web.Request) -> web.Response:
            self.count("garbage_answers")
            return web.Response(body=os.urandom(t.piece_length), content_type="application/octet-stream")

        async def swallow(request: web.Request) -> web.Response:
            await request.read()
            self.count("pushes_swallowed")
            return web.Response(status=204)

        app = web.Application()
        app.router.add_get("/v1/artifacts/{digest}/pieces/{n}", piece)
        app.router.add_put("/v1/artifacts/{digest}/pieces/{n}", swallow)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, GARBAGE_HOLDER, 0)
        await site.start()
        return f"http://{GARBAGE_HOLDER}:{site._server.sockets[0].getsockname()[1]}"

    def _webseed_head(self, path: str, headers: dict[str, str]) -> str:
        host, port = self.target.host_port
        lines = [f"GET /v1/webseed/{self.target.digest}/{self.target.torrent_name}/{path} HTTP/1.1",
                 f"Host: {host}:{port}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
        return "\r\n".join(lines) + "\r\n\r\n"

    # ---- the attacks ----------------------------------------------------------------------
    async def _pollute_gate(self, deadline: float) -> None:
        variants = [{}] + [{ZONE_HEADER: zone, FIRST_COPY_HEADER: "1"} for zone in ZONES]
        for _ in range(400):
            if not self.running(deadline):
                return
            for path, _ in self.target.files:
                for headers in variants:
                    try:
                        await self._request(GATE, self.target.host_port, self._webseed_head(path, headers))
                    except (OSError, asyncio.TimeoutError):
                        pass
                    self.count("gate_pollution")
            await asyncio.sleep(0.05)

    async def _forge_relay(self, source: str, holder: str, deadline: float) -> None:
        """First-copy GETs naming a zone (one no node is in, or the nodes' own) and the fake holder as relay.

        Whole files, dropped at once (the gate then names the holder to nodes asking for any
        of those bytes), and single pieces read to the end (the gate names nodes of the other
        zones for the holder to push to, and the holder to them).
        """
        t, zones = self.target, [*ZONES]
        for rnd in range(40):
            for f, (path, size) in enumerate(t.files):
                if not self.running(deadline):
                    return
                # The first half of the files claimed only for a zone no node is in: nodes of
                # both zones are sent to the holder for them; the rest for the nodes' zones.
                zone = "zone-x" if f < len(t.files) // 2 else zones[(rnd + f) % len(zones)]
                base = {FIRST_COPY_HEADER: "1", ZONE_HEADER: zone, RELAY_HEADER: holder}
                try:
                    await self._request(source, t.host_port, self._webseed_head(path, base))
                except (OSError, asyncio.TimeoutError):
                    pass
                self.count("forged_relay")
                for start in range(0, size, 4 * t.piece_length):  # every fourth piece
                    end = min(start + t.piece_length, size) - 1
                    headers = {**base, "Range": f"bytes={start}-{end}"}
                    try:
                        await self._request(source, t.host_port, self._webseed_head(path, headers), read="all")
                    except (OSError, asyncio.TimeoutError):
                        pass
                    self.count("forged_relay")
            await asyncio.sleep(0.05)

    async def _spoof_stops(self, deadline: float) -> None:
        t = self.target
        host, port = t.host_port
        for i in range(2000):
            if not self.running(deadline):
                return
            for n, node in enumerate(t.nodes):
                params = {"info_hash": t.info_hash, "peer_id": f"-MC0001-{i % 1000:06d}{n:06d}".encode(),
                          "port": str(node["port"]), "uploaded": "0", "downloaded": "0", "left": "0",
                          "compact": "1", "event": "stopped", "ip": node["ip"],
                          **({"node": node["node_id"]} if i % 2 else {})}
                query = "&".join(f"{k}={quote_from_bytes(v if isinstance(v, bytes) else v.encode(), safe='')}"
                                 for k, v in params.items())
                head = f"GET /announce?{query} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
                try:
                    await self._request(STOPPER, t.host_port, head)
                except (OSError, asyncio.TimeoutError):
                    pass
                self.count("spoofed_stops")
            await asyncio.sleep(0.1)

    async def _slow_clients(self, deadline: float) -> None:
        """Half-sent heads held open against the registry and each node API, topped up as the servers close them."""
        t = self.target
        targets = [t.host_port] + [tuple(n["api"]) for n in t.nodes]
        heads = [b"GET /v1/health HTTP/1.1\r\nHo", b"POST /v1/pull HTTP/1.1\r\nHost: x\r\nContent-Le"]
        held: list[asyncio.StreamWriter] = []
        try:
            for _ in range(60):
                if not self.running(deadline):
                    return
                held = [w for w in held if not w.is_closing() and not w.transport.is_closing()]
                for addr in targets:
                    for k in range(SLOW_PER_TARGET):
                        if len(held) >= SLOW_PER_TARGET * len(targets):
                            break
                        try:
                            _, writer = await asyncio.wait_for(
                                asyncio.open_connection(*addr, local_addr=(SLOW, 0)), 5)
                            writer.write(heads[k % 2])
                            held.append(writer)
                            self.count("slow_clients")
                        except (OSError, asyncio.TimeoutError):
                            pass
                await asyncio.sleep(1)
        finally:
            for w in held:
                w.transport.abort()

    async def _garbage_puts(self, deadline: float) -> None:
        t = self.target
        relays = [n["relay"] for n in t.nodes]
        for rnd in range(20):
            for piece in range(t.pieces):
                if not self.running(deadline):
                    return
                relay = relays[(rnd + piece) % len(relays)]
                host, port = relay.removeprefix("http://").rsplit(":", 1)
                head = (f"PUT /v1/artifacts/{t.digest}/pieces/{piece} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                        f"Content-Length: {t.piece_length}\r\nConnection: close\r\n\r\n")
                try:
                    await self._request(PUTTER, (host, int(port)), head, os.urandom(t.piece_length))
                except (OSError, asyncio.TimeoutError):
                    pass
                self.count("garbage_puts")
            await asyncio.sleep(0.05)


def learn(tracker_url: str, digest: str, nodes) -> Target:
    art = get_json(f"{tracker_url}/v1/artifacts/{digest}")
    manifest = art.get("manifest", art)
    info = []
    for n in nodes:
        health = get_json(f"{n.url}/v1/health")
        node_id = get_json(f"{n.url}/v1/artifacts")["node_id"]
        info.append({"ip": n.host, "port": n.peer_port, "node_id": node_id, "api": (n.host, n.api_port),
                     "relay": health["relay"]})
    return Target(tracker_url, digest, bytes.fromhex(manifest["info_hash"]["v1"]), manifest["torrent_name"],
                  manifest["piece_length"], [(f["path"], f["size"]) for f in manifest["files"]], info)


async def pull_all(nodes, ref: str, limit_s: float = 120) -> tuple[float, list[dict]]:
    """Pull ``ref`` on every node at once; (seconds until all were ready, their statuses).

    Past ``limit_s`` the test fails with where each node stands (a stalled pull would
    otherwise wait for the test's timeout).
    """
    clients = [NodeClient(n.url) for n in nodes]
    try:
        began = time.monotonic()
        pulls = asyncio.gather(*(c.pull(ref, wait=True) for c in clients))
        try:
            statuses = await asyncio.wait_for(asyncio.shield(pulls), limit_s)
        except TimeoutError:
            listings = [await c.listing() for c in clients]
            pulls.cancel()
            stuck = [{k: a[k] for k in ("name", "state", "done_bytes", "total_bytes", "peers", "bytes_from_origin",
                                        "bytes_from_relay")} for listing in listings for a in listing["artifacts"]
                     if a["state"] != "ready"]
            raise AssertionError(f"the pull of {ref} did not finish in {limit_s:.0f} s: {stuck}") from None
        return time.monotonic() - began, statuses
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def test_a_two_zone_pull_under_attack_ends_byte_identical_within_twice_its_calm_time(tracker, tmp_path):
    calm_model = make_model(tmp_path / "calm", SIZES, seed=11)
    storm_model = make_model(tmp_path / "storm", SIZES, seed=12)
    publish(tracker.url, calm_model, "atk/calm:v1", (tmp_path / "origin").as_uri())
    storm = publish(tracker.url, storm_model, "atk/storm:v1", (tmp_path / "origin").as_uri())
    nodes = []
    try:
        for zone, hosts in ZONES.items():
            for i, host in enumerate(hosts):
                nodes.append(start_node(tmp_path, tracker.url, f"{zone}-{i}", host=host, zone=zone, token=TOKEN,
                                        extra=["--download-limit", "8M"]))
        calm_s, statuses = asyncio.run(pull_all(nodes, "atk/calm:v1"))
        source = tree_hashes(calm_model)
        assert all(s["state"] == "ready" and tree_hashes(Path(s["path"])) == source for s in statuses), statuses

        attacks = Attacks(learn(tracker.url, storm, nodes))
        attacks.start()
        try:
            began = time.monotonic()  # every attack has started before the pull does
            while not all(attacks.sent.get(k) for k in ("gate_pollution", "forged_relay", "spoofed_stops",
                                                         "slow_clients", "garbage_puts")):
                assert time.monotonic() - began < 30, f"the attacks did not all start: {attacks.sent}"
                time.sleep(0.05)
            # Well past the criterion, so a failure says where each node stood.
            storm_s, statuses = asyncio.run(pull_all(nodes, "atk/storm:v1", 2 * calm_s + NOISE_S + 30))
        finally:
            attacks.stop()
        print(f"4-node two-zone pull of {sum(SIZES.values()) >> 20} MiB: calm {calm_s:.2f} s, "
              f"under attack {storm_s:.2f} s ({storm_s / calm_s:.2f}x); attacks sent {attacks.sent}")
        source = tree_hashes(storm_model)
        for s in statuses:
            assert s["state"] == "ready" and tree_hashes(Path(s["path"])) == source, s
        assert storm_s <= 2 * calm_s + NOISE_S, (calm_s, storm_s, attacks.sent)
        for svc in [*nodes, tracker]:  # every service still answers, and none logged a traceback
            assert get_json(f"{svc.url}/v1/health")
            assert "Traceback" not in svc.log_text(), svc.log_text()[-3000:]
    finally:
        for n in nodes:
            n.stop()


def test_a_garbage_relay_push_is_refused_before_libtorrent_sees_it(tracker, tmp_path):
    """The cause of the stall the test above found: a forged piece handed to libtorrent got honest peers banned.

    libtorrent blames a piece that fails its hash on every peer that sent a block of it; a
    garbage push filling the rest of a half-downloaded piece made a node ban its zone-mate,
    and the pull crawled on the origin's stall fallback (a 4-node pull stuck at its last
    pieces for minutes).  Now a pushed piece is hashed before it is handed over: garbage is a
    400, counted as a hash failure, and the right bytes are taken.  (Since relay tokens, an
    untokened push is refused before its body: this sends the garbage with a registry token,
    as a node the registry named could.)
    """
    model = make_model(tmp_path / "m", {"w.bin": 4 * MiB}, seed=5)
    digest = publish(tracker.url, model, "atk/push:v1", (tmp_path / "o").as_uri())
    # 16 KiB/s: the pull is far from its last pieces while the test runs.
    node = start_node(tmp_path, tracker.url, "n", host="127.0.1.9", zone="z1", token=TOKEN,
                      extra=["--download-limit", "16K"])
    try:
        health = get_json(f"{node.url}/v1/health")
        relay = health["relay"]
        name = get_json(f"{tracker.url}/v1/artifacts/{digest}")["torrent_name"]
        req = urllib.request.Request(f"{node.url}/v1/pull", data=json.dumps({"ref": "atk/push:v1", "wait": False})
                                     .encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).close()

        def state() -> str:
            return get_json(f"{node.url}/v1/pulls/{digest}")["state"]

        wait_until(lambda: state() == "downloading", 30, 0.1, lambda: f"the pull to download (it is {state()})")
        piece = 15  # the last of 16 pieces of 256 KiB: far from what 16 KiB/s has reached
        url = f"{relay}/v1/artifacts/{digest}/pieces/{piece}"
        token = relay_token(tracker, health["node_id"], "PUT", digest, f"{name}/w.bin", 0, 4 * MiB - 1)
        # The node takes tokens once its heartbeat's answer gave it its relay secret.
        wait_until(lambda: put(url, b"x", PUTTER, token)[0] == 400, 10, 0.2, "the node to take registry tokens")
        status, body = put(url, os.urandom(256 * 1024), PUTTER, token)
        assert status == 400 and "does not match its hash" in json.loads(body)["error"]["message"], body
        assert metric(node.url, "modelcast_node_piece_hash_failures_total") == 1
        assert metric(node.url, "modelcast_node_bytes_from_relay_total") == 0
        good = (model / "w.bin").read_bytes()[piece * 256 * 1024:]
        assert put(url, good, PUTTER, token)[0] == 204
        assert metric(node.url, "modelcast_node_bytes_from_relay_total") == len(good)
        assert metric(node.url, "modelcast_node_peers_banned_total") == 0
        assert "Traceback" not in node.log_text()
    finally:
        node.stop()


def put(url: str, data: bytes, source: str, token: str | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split("/", 1)[0].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    try:
        conn.request("PUT", "/" + url.split("/", 3)[3], body=data,
                     headers={"X-Modelcast-Relay-Token": token} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
