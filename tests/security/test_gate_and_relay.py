"""The first-copy gate and the relays can't be steered by a client (issue #15, two "High" findings).

* Gate pollution: whole-file GETs from a client in no swarm, connection dropped at once,
  kept a two-node pull stuck (the gate refused the nodes the bytes "served" to the client).
* Forged relays: a web-seed request naming any zone and any ``X-Modelcast-Relay`` URL got
  that URL handed to other zones' nodes, which then sent pieces there and fetched from there;
  a fake holder's oversized answers were read whole, and pushes to an address that never
  answers piled up in memory.

Each test failed on the code of 2026-12-03.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
import urllib.request

import aiohttp
import pytest
from aiohttp import web

from adapters.torrent import PieceSpan
from harness import start_tracker, wait_until
from modelcast.config import NodeConfig
from modelcast.errors import Unreachable
from modelcast.wire import FIRST_COPY_HEADER, RELAY_FROM_HEADER, RELAY_HEADER, RELAY_TO_HEADER, ZONE_HEADER
from node_cache.client import NodeClient
from node_cache.metrics import NodeCounters
from node_cache.relay import MAX_PENDING_PUSH_BYTES, Relay
from tracker.firstcopy import MAX_REFUSALS

from ..helpers import TOKEN, make_model, publish, registry_stats, tree_hashes

MiB = 1 << 20
ATTACKER, NODE = "127.0.0.3", "127.0.0.2"


def webseed_get(tracker_url: str, source: str, path: str, headers: dict[str, str],
                read: bool = True) -> tuple[int, dict[str, str]]:
    host, port = tracker_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        if read:
            resp.read()
        return resp.status, dict(resp.getheaders())
    finally:
        conn.close()  # unread: the connection dropped at once, as the attack did


@pytest.fixture
def published(tmp_path):
    svc = start_tracker(tmp_path, token=TOKEN)
    try:
        model = make_model(tmp_path / "m", {"a.bin": 64 * MiB, "b.bin": 16 * MiB})
        digest = publish(svc.url, model, "sec/gate:v1", (tmp_path / "o").as_uri())
        yield svc, digest, model
    finally:
        svc.stop()


def test_relay_urls_are_believed_only_at_the_requesters_own_address(published):
    tracker, digest, _ = published
    path = f"/v1/webseed/{digest}/gate/a.bin"
    piece = {"Range": "bytes=0-262143", FIRST_COPY_HEADER: "1"}
    # The attacker names zone b and a relay URL of some other service.
    webseed_get(tracker.url, ATTACKER, path, {**piece, ZONE_HEADER: "b", RELAY_HEADER: "http://203.0.113.5:9"})
    # A node of zone c asking for the same bytes is not sent there: it gets its zone's copy.
    status, headers = webseed_get(tracker.url, NODE, path, {**piece, ZONE_HEADER: "c",
                                                            RELAY_HEADER: f"http://{NODE}:7999"})
    assert status == 206 and RELAY_FROM_HEADER not in headers, headers
    # Nor is anyone told to push pieces to the attacker's URL.
    webseed_get(tracker.url, ATTACKER, path, {"Range": "bytes=262144-524287", FIRST_COPY_HEADER: "1",
                                              ZONE_HEADER: "d", RELAY_HEADER: "http://203.0.113.7:9"})
    status, headers = webseed_get(tracker.url, NODE, path, {"Range": "bytes=524288-786431", FIRST_COPY_HEADER: "1",
                                                            ZONE_HEADER: "c", RELAY_HEADER: f"http://{NODE}:7999"})
    assert status == 206 and "203.0.113.7" not in headers.get(RELAY_TO_HEADER, ""), headers


def test_a_pull_finishes_while_a_client_pollutes_the_gate(published, node_factory, tmp_path):
    tracker, digest, model = published
    stop = threading.Event()
    sent = [0]

    def pollute() -> None:
        # Whole-file GETs, anonymous and naming the nodes' zone as a first copy, dropped at
        # once; bounded in count and time.
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline and sent[0] < 2000:
            for name in ("a.bin", "b.bin"):
                for headers in ({}, {ZONE_HEADER: "default", FIRST_COPY_HEADER: "1"}):
                    try:
                        webseed_get(tracker.url, ATTACKER, f"/v1/webseed/{digest}/gate/{name}", headers, read=False)
                    except OSError:
                        pass
                    sent[0] += 1
            stop.wait(0.05)

    attacker = threading.Thread(target=pollute, daemon=True)
    attacker.start()
    try:
        wait_until(lambda: sent[0] >= 8, 10, 0.05, "the polluter's first requests")
        nodes = [node_factory(tracker.url, f"n{i}", "--token", TOKEN, host=f"127.0.1.{i + 1}") for i in range(2)]

        async def pull_all() -> list[dict]:
            return await asyncio.wait_for(asyncio.gather(*(NodeClient(n.url).pull("sec/gate:v1", wait=True)
                                                           for n in nodes)), 90)

        statuses = asyncio.run(pull_all())
    finally:
        stop.set()
        attacker.join(10)
    for status in statuses:
        assert status["state"] == "ready", status
        assert tree_hashes(status["path"]) == tree_hashes(model)
    # The nodes were refused a bounded number of times: at most MAX_REFUSALS per range they
    # asked for in a window (a piece may be asked for in runs of different lengths, hence
    # the factor 2; the code of 2026-12-03 refused them 8,256 times, until each gave up on
    # first copies after 5 s without progress).
    with urllib.request.urlopen(f"{tracker.url}/v1/artifacts/{digest}", timeout=10) as resp:
        pieces = -(-80 * MiB // json.load(resp)["piece_length"])
    refused = registry_stats(tracker.url)["origin_refused_repeats"]
    assert refused <= 2 * MAX_REFUSALS * pieces, (refused, pieces, sent[0])


async def test_a_holder_answering_too_much_is_not_read_on(aiohttp_server):
    big = 48 * MiB
    written = [0]

    async def holder(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(big)})
        await resp.prepare(request)
        chunk = bytes(MiB)
        try:
            for _ in range(big // MiB):
                await resp.write(chunk)
                written[0] += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    app = web.Application()
    app.router.add_get("/v1/artifacts/{digest}/pieces/{n}", holder)
    server = await aiohttp_server(app)
    relay = Relay(NodeConfig(), NodeCounters(), {})
    async with aiohttp.ClientSession() as http:
        relay.attach(None, http)
        span = PieceSpan(piece=0, path="a.bin", file_offset=0, length=262144, size=262144)
        with pytest.raises(Unreachable, match="expected 262144"):
            await relay.fetch(str(server.make_url("")).rstrip("/"), "token", "sha256:" + "a" * 64, span)
    # The node hung up at the headers: the holder could not push its 48 MiB into the node's
    # memory (what fit in the sockets' buffers aside).
    assert written[0] < 16 * MiB, written[0]


async def test_pushes_to_a_node_that_never_answers_are_bounded():
    # A listener that accepts connections and never answers.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    relay = Relay(NodeConfig(), NodeCounters(), {})
    async with aiohttp.ClientSession() as http:
        relay.attach(None, http)
        for piece in range(400):  # 100 MiB of pieces to a node that never answers
            relay.push("sha256:" + "a" * 64, f"http://127.0.0.1:{port}", "token", piece, bytes(262144))
        await asyncio.sleep(0)
        assert relay.pending_push_bytes <= MAX_PENDING_PUSH_BYTES
        assert len(relay._pushes) == MAX_PENDING_PUSH_BYTES // 262144
        for task in list(relay._pushes):
            task.cancel()
        await asyncio.gather(*relay._pushes, return_exceptions=True)
    server.close()
