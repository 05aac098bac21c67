"""The small findings of the security review (issue #15, "Low"), each against real processes.

Each test failed on the code of 2026-12-03 and passes now: a huge integer in an announce
was a 500 with a traceback, the node's heartbeat loop died on an unexpected exception, a
resolve answer naming another digest was taken, a reference with a trailing newline was
accepted, ``/v1/stats`` was open around ``--read-token``, open writes started silently, a
publisher chose the S3 endpoint the registry signs requests for, and a federated zone asked
its parent again for every unknown reference.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from aiohttp import web

from harness import start_tracker
from modelcast.config import TrackerConfig
from modelcast.errors import IntegrityError, InvalidReference
from modelcast.reference import Reference
from tracker.app import make_app
from tracker.client import RegistryClient

from ..helpers import AUTH, TOKEN

HASH = "%AA" * 20


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("param", ["left", "uploaded", "port", "numwant"])
def test_a_huge_integer_in_an_announce_is_a_bencoded_failure_not_a_traceback(tracker, param):
    values = {"left": "0", "uploaded": "0", "downloaded": "0", "port": "6881", "numwant": "5"}
    values[param] = "9" * 5000  # past Python's int() digit limit (4300)
    query = "&".join(f"{k}={v}" for k, v in values.items())
    status, body = get(f"{tracker.url}/announce?info_hash={HASH}&peer_id={'-MC0001-' + 'a' * 12}&{query}")
    assert status == 200 and body.startswith(b"d14:failure reason"), (status, body[:200])
    assert b"out of range" in body or b"too long" in body
    assert get(f"{tracker.url}/v1/health")[0] == 200
    assert "Traceback" not in tracker.log_text()


def test_references_are_matched_whole_a_trailing_newline_is_refused():
    for bad in ("demo/m:v1\n", "demo/m\n:v1", "sha256:" + "a" * 64 + "\n", "demo/m@sha256:" + "a" * 64 + "\n"):
        with pytest.raises(InvalidReference):
            Reference.parse(bad)
    assert str(Reference.parse("demo/m:v1")) == "demo/m:v1"


async def test_resolve_refuses_an_answer_naming_another_digest(aiohttp_server, tmp_path):
    # A registry (or anything in between) answers a digest reference with another artifact.
    asked = "sha256:" + "1" * 64
    other = json.dumps({"schema_version": 1}).encode()

    async def resolve(request: web.Request) -> web.Response:
        return web.json_response({"digest": "sha256:" + "2" * 64})

    async def manifest(request: web.Request) -> web.Response:
        return web.Response(body=other)

    app = web.Application()
    app.router.add_get("/v1/resolve", resolve)
    app.router.add_get("/v1/artifacts/{digest}", manifest)
    server = await aiohttp_server(app)
    async with RegistryClient(str(server.make_url("")).rstrip("/"), None) as client:
        with pytest.raises(IntegrityError, match="asked for " + asked):
            await client.resolve(asked)
        with pytest.raises(IntegrityError, match="asked for"):
            await client.resolve("demo/m@" + asked)


def test_stats_need_the_read_token_when_one_is_set(tmp_path):
    svc = start_tracker(tmp_path, token=TOKEN, read_token="reader")
    try:
        assert get(f"{svc.url}/v1/stats")[0] == 401
        assert get(f"{svc.url}/v1/stats", "reader")[0] == 200
        assert get(f"{svc.url}/v1/health")[0] == 200  # liveness probes stay open
    finally:
        svc.stop()


def test_a_registry_with_open_writes_says_so_at_start(tmp_path):
    svc = start_tracker(tmp_path, token=None)
    try:
        log = svc.log_text()
        assert "WARNING" in log and "anyone who can reach" in log and "MODELCAST_TOKEN" in log
    finally:
        svc.stop()


def post(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, data=b"", method="POST",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("how", ["env", "file"])
def test_the_write_token_never_shows_in_ps(tmp_path, how):
    secret = "s3cr3t-write-token"
    if how == "env":
        svc = start_tracker(tmp_path, token=secret)
    else:
        (tmp_path / "token").write_text(secret + "\n")
        svc = start_tracker(tmp_path, extra=["--token-file", str(tmp_path / "token")])
    try:
        assert post(f"{svc.url}/v1/auth/check") == 401
        assert post(f"{svc.url}/v1/auth/check", "wrong") == 401
        assert post(f"{svc.url}/v1/auth/check", secret) == 200
        cmdline = open(f"/proc/{svc.pid}/cmdline", "rb").read()
        assert secret.encode() not in cmdline, cmdline
        assert "writes are OPEN" not in svc.log_text()
    finally:
        svc.stop()


async def test_a_publish_cannot_choose_the_s3_endpoint_the_registry_signs_for(client, art, origin):
    body = {**art.body(origin), "origin": {"url": "s3://bucket/prefix", "s3_endpoint": "http://169.254.169.254/"}}
    resp = await client.post("/v1/artifacts", json=body, headers=AUTH)
    assert resp.status == 400
    assert "--allow-s3-endpoint" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("parent_answer", [404, 503])
async def test_a_zone_does_not_ask_its_parent_again_for_every_unknown_reference(aiohttp_server, aiohttp_client,
                                                                                 tmp_path, parent_answer):
    asked = []

    async def parent(request: web.Request) -> web.Response:
        asked.append(request.path_qs)
        code = "not_found" if parent_answer == 404 else "unreachable"
        return web.json_response({"error": {"code": code, "message": "no"}}, status=parent_answer)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", parent)
    upstream = await aiohttp_server(app)
    zone = await aiohttp_client(make_app(TrackerConfig(data_dir=tmp_path / "zone", token=TOKEN,
                                                       upstream=str(upstream.make_url("")))))
    for i in range(20):
        # The same unknown name over and over (404), or many names while the parent fails (503).
        ref = "fed/missing:v1" if parent_answer == 404 else f"fed/missing{i}:v1"
        resp = await zone.get(f"/v1/resolve?ref={ref}")
        assert resp.status in (404, 502, 503, 504), resp.status
    assert len(asked) <= 2, asked
