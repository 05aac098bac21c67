"""TLS on every server (issue #15, "No TLS on the registry, node API or relay listener").

A throwaway CA signs one certificate for the loopback addresses; the registry (its API,
web seed and announce fast path, one port), the nodes' APIs and their relay listeners
serve it; every client (publish, the CLI, the nodes, libtorrent's announces) trusts the CA
through ``--ca``.  A whole pull goes over TLS; plain HTTP to a TLS port and clients
without the CA are refused, cleanly and with a line that says what to do.

Each test failed on the code of 2026-12-04 (no --tls-cert, --tls-key or --ca).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import ssl
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from adapters.tls import client_context, server_context
from modelcast.errors import ModelcastError
from node_cache.client import NodeClient
from tracker.app import make_app, start_server
from tracker.bencode import bdecode
from tracker.client import RegistryClient

from ..helpers import (TOKEN, make_model, make_pki, publish, run_cli, start_node, start_tracker, tree_hashes)

MiB = 1 << 20
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), HOSTS)


@pytest.fixture
def tls_tracker(tmp_path, pki):
    svc = start_tracker(tmp_path, token=TOKEN, tls=pki.tls, ca=pki.ca)
    yield svc
    svc.stop()


@pytest.fixture
def nodes(tmp_path, pki):
    """Start node daemons serving TLS on their API and relay listener and trusting the CA (unless told not to)."""
    started = []

    def start(registry: str, name: str, *extra: str, host: str = "127.0.0.1", zone: str = "default",
              tls: bool = True, ca: bool = True):
        svc = start_node(tmp_path, registry, name, host=host, zone=zone, token=TOKEN, extra=extra,
                         tls=pki.tls if tls else None, ca=pki.ca if ca else None)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()


def https_json(url: str, ca: Path) -> dict:
    with urllib.request.urlopen(url, timeout=10, context=ssl.create_default_context(cafile=str(ca))) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def no_ca_env() -> dict[str, str]:
    return {"MODELCAST_CA": ""}  # an empty variable counts as unset


def assert_clean_log(svc) -> None:
    text = svc.log_text()
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]


def test_a_whole_pull_over_tls(tls_tracker, nodes, pki, tmp_path):
    tracker = tls_tracker
    assert tracker.url.startswith("https://")
    sizes = {"config.json": 300, "weights/a.bin": 8 * MiB, "weights/b.bin": 8 * MiB + 5}
    total = sum(sizes.values())
    model = make_model(tmp_path / "model", sizes)
    digest = publish(tracker.url, model, "tls/m:v1", (tmp_path / "origin").as_uri(), "--ca", str(pki.ca))

    async def torrent() -> dict:
        async with RegistryClient(tracker.url, ca=pki.ca) as reg:
            return bdecode(await reg.torrent(digest))

    # The torrent names the https tracker: libtorrent announces over TLS.
    assert asyncio.run(torrent())[b"announce"] == f"{tracker.url}/announce".encode()

    # Zone a's first node and zone b's pull at once, so pieces cross zones through the relays.
    a1 = nodes(tracker.url, "a1", "--download-limit", "8M", host="127.0.0.2", zone="a")
    b1 = nodes(tracker.url, "b1", "--download-limit", "8M", host="127.0.0.3", zone="b")
    for node, host in ((a1, "127.0.0.2"), (b1, "127.0.0.3")):
        health = https_json(f"{node.url}/v1/health", pki.ca)
        assert health["relay"].startswith(f"https://{host}:"), health

    async def pull_at_once(urls: list[str]) -> list[dict]:
        clients = [NodeClient(u, ca=pki.ca) for u in urls]
        try:
            return await asyncio.gather(*(c.pull("tls/m:v1", wait=True) for c in clients))
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    first = asyncio.run(pull_at_once([a1.url, b1.url]))
    # Zone a's second node, later: from its zone's peer, found through an https announce.
    a2 = nodes(tracker.url, "a2", host="127.0.0.4", zone="a")
    out = run_cli("pull", "tls/m:v1", "--node", a2.url, "--ca", str(pki.ca), env=no_ca_env())
    assert out.returncode == 0, out.stderr
    [late] = asyncio.run(pull_at_once([a2.url]))

    source = tree_hashes(model)
    for status in [*first, late]:
        assert status["state"] == "ready" and tree_hashes(Path(status["path"])) == source, status
    a, b = first
    assert a["bytes_from_origin"] > 0, a  # the web seed, over https
    assert a["bytes_from_relay"] + b["bytes_from_relay"] > 0, first  # relay listeners, over https
    assert late["bytes_from_peers"] >= total // 2, late  # libtorrent's https announce found a1
    for svc in (tracker, a1, b1, a2):
        assert_clean_log(svc)


async def test_one_tls_connection_goes_from_the_fast_path_to_aiohttp(cfg, pki):
    """Announces answered by the fast path, then a registry route: aiohttp takes the TLS connection over."""
    running = await start_server(make_app(cfg), "127.0.0.1", 0, ssl_context=server_context(pki.tls))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port, ssl=client_context(pki.ca),
                                                       server_hostname="127.0.0.1")
        announce = (b"GET /announce?info_hash=aaaaaaaaaaaaaaaaaaaa&peer_id=bbbbbbbbbbbbbbbbbbbb&port=1 HTTP/1.1\r\n"
                    b"Host: t\r\n\r\n")
        writer.write(announce + announce + b"GET /v1/health HTTP/1.1\r\nHost: t\r\n\r\n"
                     + announce.replace(b"Host: t", b"Host: t\r\nConnection: close"))
        data = await asyncio.wait_for(reader.read(), 10)  # to the close the last request asked for
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)
        assert data.count(b"HTTP/1.1 200 OK") == 4, data
        assert b'{"ok": true}' in data and data.count(b"failure reason") == 3, data
        assert (running.fast.answered, running.fast.handed_off) == (2, 1)
    finally:
        await running.stop()


def _plain_request(url: str, path: str) -> None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", path)
        conn.getresponse()
    finally:
        conn.close()


def test_plain_http_to_a_tls_port_is_refused_cleanly(tls_tracker, nodes, pki):
    tracker = tls_tracker
    node = nodes(tracker.url, "n1")
    relay = https_json(f"{node.url}/v1/health", pki.ca)["relay"]
    for url in (tracker.url, node.url, relay):
        for _ in range(3):
            with pytest.raises(ConnectionError):
                _plain_request(url, "/v1/health")
    # A plain announce, the fast path's own request, gets no plaintext answer either.
    parts = urlsplit(tracker.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"GET /announce?info_hash=aaaaaaaaaaaaaaaaaaaa&peer_id=bbbbbbbbbbbbbbbbbbbb&port=1 HTTP/1.1\r\n"
                     b"Host: x\r\n\r\n")
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/"), answer
    # The servers still answer over TLS, and logged no trace of it.
    for url in (tracker.url, node.url):
        assert https_json(f"{url}/v1/health", pki.ca)["ok"] is True
    assert_clean_log(tracker)
    assert_clean_log(node)
    # The CLI pointed at the TLS port with http:// says what to do, in one line.
    out = run_cli("ls", "--registry", tracker.url.replace("https://", "http://"), "--ca", str(pki.ca))
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "https://" in out.stderr, out.stderr


def test_a_client_without_the_ca_is_refused(tls_tracker, nodes, pki, tmp_path):
    tracker = tls_tracker
    node = nodes(tracker.url, "n1")
    for argv in (["ls", "--registry", tracker.url], ["node", "ls", "--node", node.url],
                 ["publish", str(make_model(tmp_path / "m", {"a": 10})), "tls/x:v1", "--registry", tracker.url,
                  "--origin", (tmp_path / "o").as_uri(), "--token", TOKEN]):
        out = run_cli(*argv, env=no_ca_env())
        assert out.returncode == 1, out
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "certificate verify failed" in out.stderr and "--ca" in out.stderr, out.stderr
    # The CA through the environment is as good as --ca, which goes before or after a node action.
    out = run_cli("ls", "--registry", tracker.url, env={"MODELCAST_CA": str(pki.ca)})
    assert out.returncode == 0, out.stderr
    for argv in (["node", "--ca", str(pki.ca), "ls", "--node", node.url],
                 ["node", "ls", "--node", node.url, "--ca", str(pki.ca)]):
        out = run_cli(*argv, env=no_ca_env())
        assert out.returncode == 0 and "zone default" in out.stdout, (argv, out)
    # A node daemon without the CA cannot use the registry, and says why.
    lost = nodes(tracker.url, "lost", tls=False, ca=False)

    async def pull() -> None:
        async with NodeClient(lost.url) as client:
            await client.pull("tls/x:v1")

    with pytest.raises(ModelcastError, match="certificate verify failed"):
        asyncio.run(pull())
    assert_clean_log(tracker)


def test_tls_files_are_checked_at_start(pki, tmp_path):
    cases = [
        (["tracker", "--data", str(tmp_path / "r"), "--tls-cert", str(pki.tls.cert)], "--tls-cert needs --tls-key"),
        (["tracker", "--data", str(tmp_path / "r"), "--tls-cert", str(pki.ca), "--tls-key", str(pki.tls.key)],
         "cannot load the certificate"),
        (["node", "--cache", str(tmp_path / "c"), "--tls-key", str(pki.tls.key)], "--tls-key needs --tls-cert"),
        (["node", "--cache", str(tmp_path / "c"), "--tls-cert", str(tmp_path / "none.pem"),
          "--tls-key", str(pki.tls.key)], "does not exist"),
        (["ls", "--registry", "https://127.0.0.1:9", "--ca", str(tmp_path / "none.pem")], "does not exist"),
    ]
    for argv, message in cases:
        out = run_cli(*argv, env=no_ca_env(), timeout=30)
        assert out.returncode == 1, (argv, out)
        assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, (argv, out.stderr)
