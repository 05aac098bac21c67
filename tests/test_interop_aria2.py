"""Interop: aria2 (a v1-only BitTorrent client we did not write) downloads an artifact from a node.

The torrent comes from the registry API, the peer list from our tracker, the bytes from a
modelcast node daemon that pulled the artifact first.  The origin must send nothing while
aria2c downloads: the torrent carries no web seed, and the registry's counter proves it.

aria2 before 1.37.0 (Debian 12 ships 1.36.0) drops the empty-string keys of a BEP 52
``file tree`` when it re-encodes the info dictionary, so it computes a wrong v1 info-hash
for every hybrid torrent, announces a swarm nobody is in and handshakes for a torrent no
peer has (fixed upstream by aria2/aria2#1905).  No tracker or torrent change can make up
for that: the handshake carries the hash.  So the hybrid test checks that this, and only
this, is what goes wrong with such an aria2 (``modelcast publish --torrent hybrid``), and
marks itself as an expected failure; the second test publishes the files as ``modelcast
publish`` does by default (a v1 torrent, pad files aligned the same way), which a buggy
aria2 hashes right, and runs the whole download.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from modelcast.manifest import Manifest
from harness.procs import free_port
from tracker.bencode import bdecode, bencode, torrent_info_bytes

from .helpers import TOKEN, make_model, publish, registry_stats, run_cli, tree_hashes

ARIA2C = shutil.which("aria2c")
KiB = 1 << 10
ARIA2_TIMEOUT_S = 30

pytestmark = pytest.mark.skipif(ARIA2C is None, reason="aria2c is not installed (Debian package aria2; "
                                                       "make system-tools installs it)")

# Sizes that are not piece multiples, so the torrent has pad files between files; an empty
# file; a nested path.
SIZES = {"model.onnx": 5000, "weights/a.bin": 700 * KiB + 3, "weights/b.bin": 300 * KiB, "empty.txt": 0,
         "tokenizer.json": 1234}


def _http(url: str, body: dict | None = None) -> bytes:
    # Reads do not need the token today; sending it keeps the test valid if they ever do.
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read()


def _aria2_info_hash(torrent_path: Path) -> str:
    """The v1 info-hash aria2c computes for a torrent file (``aria2c -S``)."""
    out = subprocess.run([ARIA2C, "-S", str(torrent_path)], capture_output=True, text=True, timeout=10)
    match = re.search(r"^Info Hash: ([0-9a-f]{40})$", out.stdout, re.M)
    assert match, f"aria2c -S printed no info-hash: {out.stdout[-1000:]}{out.stderr[-1000:]}"
    return match.group(1)


def _without_empty_keys(value):
    if isinstance(value, dict):
        return {k: _without_empty_keys(v) for k, v in value.items() if k != b""}
    if isinstance(value, list):
        return [_without_empty_keys(v) for v in value]
    return value


def _fetch_torrent(registry: str, digest: str, dest: Path) -> dict:
    """GET the artifact's torrent from the registry into ``dest``; check it has no web seed."""
    torrent = _http(f"{registry}/v1/artifacts/{digest}/torrent")
    meta = bdecode(torrent)
    assert meta[b"announce"] == f"{registry}/announce".encode()
    # No BEP 19 / BEP 17 seed URL in the torrent: a client can get the bytes only from peers.
    assert b"url-list" not in meta and b"httpseeds" not in meta
    dest.write_bytes(torrent)
    return meta


def _pull_on_node(node, ref: str) -> None:
    out = run_cli("pull", ref, "--node", node.url)
    assert out.returncode == 0, out.stderr


def _aria2c_download(tracker, torrent_path: Path, name: str, model: Path, tmp_path: Path) -> float:
    """Run aria2c on ``torrent_path``, check the files and that the origin sent nothing; return seconds."""
    before = registry_stats(tracker.url)
    dest = tmp_path / "aria2"
    dest.mkdir()
    log_path = tmp_path / "aria2c.log"
    argv = [ARIA2C, "--dir", str(dest), "--listen-port", str(free_port()), "--seed-time=0",
            "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false", "--enable-peer-exchange=false",
            "--bt-tracker-connect-timeout=5", "--bt-tracker-timeout=5", f"--bt-stop-timeout={ARIA2_TIMEOUT_S - 5}",
            "--file-allocation=none", "--console-log-level=warn", "--summary-interval=0",
            "--log", str(log_path), "--log-level=info", str(torrent_path)]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=ARIA2_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"aria2c did not finish within {ARIA2_TIMEOUT_S} s; its log ends:\n"
                    + log_path.read_text(errors="replace")[-3000:])
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, (f"aria2c exited {proc.returncode}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}\n"
                                  f"its log ends:\n{log_path.read_text(errors='replace')[-3000:]}")
    got = tree_hashes(dest / name)
    # aria2 does not know BEP 47 pad files: it writes them as zero-filled .pad/N files.
    pads = {p for p in got if p.startswith(".pad/")}
    assert pads, "expected aria2 to write the pad files of the torrent"
    assert {p: h for p, h in got.items() if p not in pads} == tree_hashes(model)
    after = registry_stats(tracker.url)
    # Every byte came from the node: the origin served nothing while aria2c ran.
    assert (after["origin_bytes_served"], after["origin_requests"]) == \
        (before["origin_bytes_served"], before["origin_requests"])
    assert after["announces"] > before["announces"]
    return elapsed


def test_aria2c_downloads_a_published_hybrid_artifact_from_a_node(tracker, node_factory, tmp_path):
    model = make_model(tmp_path / "model", SIZES)
    digest = publish(tracker.url, model, "interop/aria2:v1", (tmp_path / "origin").as_uri(), "--torrent", "hybrid")
    manifest = Manifest.from_bytes(_http(f"{tracker.url}/v1/artifacts/{digest}"), expected_digest=digest)
    assert manifest.info_hash.v1 and manifest.info_hash.v2  # hybrid, as asked

    torrent_path = tmp_path / "artifact.torrent"
    meta = _fetch_torrent(tracker.url, digest, torrent_path)
    seen = _aria2_info_hash(torrent_path)
    if seen != manifest.info_hash.v1:
        # Only the known aria2 bug may explain a different hash; anything else is ours.
        buggy = hashlib.sha1(bencode(_without_empty_keys(bdecode(torrent_info_bytes(torrent_path.read_bytes())))))
        assert seen == buggy.hexdigest(), f"aria2c hashes the torrent as {seen}, not {manifest.info_hash.v1}"
        version = subprocess.run([ARIA2C, "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
        pytest.xfail(f"{version} computes v1 info-hash {seen} instead of {manifest.info_hash.v1} for hybrid "
                     "torrents: it drops the empty keys of the BEP 52 file tree (fixed in aria2 1.37.0, "
                     "aria2/aria2#1905); test_aria2c_downloads_a_v1_torrent_from_a_node covers the rest")

    node = node_factory(tracker.url, "n1")
    _pull_on_node(node, "interop/aria2:v1")
    elapsed = _aria2c_download(tracker, torrent_path, meta[b"info"][b"name"].decode(), model, tmp_path)
    assert elapsed < ARIA2_TIMEOUT_S


def test_aria2c_downloads_a_v1_torrent_from_a_node(tracker, node_factory, tmp_path):
    model = make_model(tmp_path / "model", SIZES, seed=2)
    # `publish` (its default, `--torrent v1`): the artifact's torrent is v1 only (pad files
    # kept), which aria2 of any version reads; the nodes pull it like any other.
    digest = publish(tracker.url, model, "interop/aria2:v1only", (tmp_path / "origin").as_uri())
    manifest = Manifest.from_bytes(_http(f"{tracker.url}/v1/artifacts/{digest}"), expected_digest=digest)
    assert manifest.info_hash.v1 and manifest.info_hash.v2 is None
    v1 = manifest.info_hash.v1

    node = node_factory(tracker.url, "n1")
    _pull_on_node(node, "interop/aria2:v1only")
    torrent_path = tmp_path / "artifact.torrent"
    meta = _fetch_torrent(tracker.url, digest, torrent_path)
    assert _aria2_info_hash(torrent_path) == v1
    elapsed = _aria2c_download(tracker, torrent_path, meta[b"info"][b"name"].decode(), model, tmp_path)
    assert elapsed < ARIA2_TIMEOUT_S
