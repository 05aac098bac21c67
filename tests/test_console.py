"""The fleet console: nodes' progress reports, the registry's views of them, the pages, and a browser.

Layers: the report's wire form and the registry's node book without I/O; the heartbeat,
``/v1/nodes``, ``/v1/rollout`` and ``/ui`` routes in process (the read token, bad reports);
then a registry and three node daemons as real processes, watched pulling a 100 MiB
artifact through Debian's chromium driven by Playwright, and through ``modelcast status``.
The browser test saves a screenshot of each page; with MODELCAST_UPDATE_SCREENSHOTS=1 it
writes them to docs/console/, which the README shows (otherwise to its temporary folder, so a
test run leaves the tree clean).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from modelcast.config import TrackerConfig
from modelcast.progress import MAX_HEARTBEAT_BODY, MAX_REPORTED_ARTIFACTS, ArtifactProgress, parse_report
from modelcast.errors import BadRequest
from modelcast.units import human_bytes
from node_cache.jobs import PullJob, PullState
from node_cache.report import ProgressReporter
from tracker.app import make_app
from tracker.nodebook import NodeBook

from .helpers import (AUTH, ROOT, TOKEN, api_publish, build_artifact, make_model, modelcast_argv, publish,
                      start_node, start_tracker, upload, wait_until)

MiB = 1 << 20
DIGEST = "sha256:" + "ab" * 32
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "docs" / "console"


def _entry(digest: str = DIGEST, state: str = "downloading", done: int = 10, total: int = 100, **over) -> dict:
    entry = {"digest": digest, "state": state, "done_bytes": done, "total_bytes": total, "rate": 5,
             "bytes_from_peers": 6, "bytes_from_origin": 4, "bytes_from_other_zones": 0}
    entry.update(over)
    return entry


# -- the report's wire form and the node book, no I/O ---------------------------------------


BAD_REPORTS = [
    ({"artifacts": {}}, "must be a list"),
    ({"artifacts": [1]}, "JSON objects"),
    ({"artifacts": [_entry(extra=1)]}, "unknown fields"),
    ({"artifacts": [{k: v for k, v in _entry().items() if k != "rate"}]}, "lacks rate"),
    ({"artifacts": [_entry(digest="sha256:AB")]}, "digest"),
    ({"artifacts": [_entry(state="done")]}, "state"),
    ({"artifacts": [_entry(rate=-1)]}, "rate"),
    ({"artifacts": [_entry(rate=True)]}, "rate"),
    ({"artifacts": [_entry(rate="5")]}, "rate"),
    ({"artifacts": [_entry(rate=1.5)]}, "rate"),
    ({"artifacts": [_entry(rate=float("inf"))]}, "rate"),
    ({"artifacts": [_entry(rate=2 ** 70)]}, "rate"),
    ({"artifacts": [_entry(done=101)]}, "exceeds total_bytes"),
    ({"artifacts": [_entry(), _entry()]}, "twice"),
    ({"artifacts": [_entry(digest=f"sha256:{i:064x}") for i in range(MAX_REPORTED_ARTIFACTS + 1)]}, "at most"),
    ({"artifacts": [], "more_artifacts": -1}, "more_artifacts"),
    ({"more_artifacts": 3}, "needs an artifacts list"),
]


@pytest.mark.parametrize("body,needle", BAD_REPORTS)
def test_a_report_with_anything_unexpected_is_refused_by_name(body, needle):
    with pytest.raises(BadRequest, match=needle):
        parse_report(body)


def test_a_full_report_fits_the_heartbeat_body_cap():
    big = (1 << 63) - 1
    entries = [_entry(digest=f"sha256:{i:064x}", state="downloading", done=big, total=big, rate=big,
                      bytes_from_peers=big, bytes_from_origin=big, bytes_from_other_zones=big)
               for i in range(MAX_REPORTED_ARTIFACTS)]
    body = {"zone": "z" * 64, "ttl_s": 30.0, "artifacts": entries, "more_artifacts": big}
    # json.dumps with its default separators is what the node's aiohttp client sends.
    assert len(json.dumps(body).encode()) <= MAX_HEARTBEAT_BODY
    assert len(parse_report(body)[0]) == MAX_REPORTED_ARTIFACTS
    assert parse_report({"zone": "z"}) is None  # an older node: no report, not an empty one


def test_node_book_keeps_the_latest_report_and_forgets_it_when_the_node_goes():
    book = NodeBook(max_gone=2)
    first = parse_report({"artifacts": [_entry(done=10)]})
    book.heartbeat("n1", "z1", first, now=0, wall=1000, ttl=3)
    book.heartbeat("n2", "z2", parse_report({"artifacts": [_entry(state="ready", done=100)]}), now=0, wall=1000,
                   ttl=3)
    assert book.counts(DIGEST) == (1, 1)
    book.heartbeat("n1", "z1", parse_report({"artifacts": [_entry(done=60)]}), now=2, wall=1002, ttl=3)
    assert [(n.node_id, p.done_bytes) for n, p in book.holders(DIGEST)] == [("n1", 60), ("n2", 100)]
    # A heartbeat without a report keeps the last one (an older node sends none at all).
    book.heartbeat("n1", "z1", None, now=2.5, wall=1002.5, ttl=3)
    assert book.live["n1"].artifacts[DIGEST].done_bytes == 60
    # n2 stops heartbeating: gone at its deadline, not before; n1's later heartbeats keep it.
    assert book.expire(now=2.9, wall=1002.9) == 0
    assert book.expire(now=3.0, wall=1003) == 1
    assert [n.node_id for n, _ in book.holders(DIGEST)] == ["n1"] and book.counts(DIGEST) == (0, 1)
    assert book.gone["n2"].gone == "expired" and not book.gone["n2"].artifacts
    assert book.leave("n1", wall=1004) and book.holders(DIGEST) == [] and book.counts(DIGEST) == (0, 0)
    assert [(n.node_id, n.alive, n.gone) for n in book.nodes()] == [("n1", False, "left"), ("n2", False, "expired")]
    # A gone node that comes back is live again; the list of gone nodes is bounded.
    book.heartbeat("n2", "z2", first, now=10, wall=1010, ttl=3)
    assert book.live["n2"].alive and "n2" not in book.gone and book.live["n2"].first_seen == 1000
    for i in range(5):
        book.heartbeat(f"x{i}", None, None, now=10, wall=1010, ttl=1)
        book.leave(f"x{i}", wall=1011)
    assert list(book.gone) == ["x3", "x4"]
    # A full book keeps the nodes it has and records no more (their swarm liveness is elsewhere).
    full = NodeBook(max_live=2)
    for name in ("a", "b", "c"):
        full.heartbeat(name, None, first, now=0, wall=0, ttl=3)
    assert sorted(full.live) == ["a", "b"] and full.refused == 1 and full.counts(DIGEST) == (0, 2)
    assert full.heartbeat("a", None, None, now=1, wall=1, ttl=3) is not None


def test_reporter_puts_pulls_first_measures_their_rate_and_counts_what_it_leaves_out(tmp_path):
    manifest = build_artifact(tmp_path).manifest
    total = manifest.total_size

    def job(n: int, state: PullState, done: int = 0) -> PullJob:
        j = PullJob(f"sha256:{n:064x}", manifest, state=state, started=n, done_bytes=done)
        j.finished = None if not state.terminal else 100 + n
        return j

    jobs = [job(1, PullState.READY), job(2, PullState.READY), job(3, PullState.FAILED, 7),
            job(4, PullState.DOWNLOADING, 1000), job(5, PullState.QUEUED)]
    jobs[3].download_rate = 42
    jobs[3].bytes_from_relay = 500
    reporter = ProgressReporter(limit=4)
    body = reporter.report(jobs, {jobs[0].digest: 5.0, jobs[1].digest: 9.0}, now=10.0)
    entries = [ArtifactProgress.from_json(e) for e in body["artifacts"]]
    assert [e.digest[-1] for e in entries] == ["4", "5", "3", "2"]  # pulls, then failed, then most recently used
    assert body["more_artifacts"] == 1
    assert entries[0].rate == 42 and entries[0].bytes_from_other_zones == 500  # first report: libtorrent's rate
    assert entries[3].done_bytes == entries[3].total_bytes == total and entries[3].rate == 0
    jobs[3].done_bytes = 1000 + 3000
    entries = [ArtifactProgress.from_json(e) for e in reporter.report(jobs, {}, now=12.0)["artifacts"]]
    assert entries[0].rate == 1500  # 3000 bytes over the 2 s between reports, whatever libtorrent says
    fresh = job(9, PullState.DOWNLOADING, 2000)  # began a second ago: its first report has a rate already
    assert ProgressReporter().report([fresh], {}, now=10.0)["artifacts"][0]["rate"] == 2000
    # A burst, then a quiet second: still the rate over the window, not 0 B/s.
    entries = [ArtifactProgress.from_json(e) for e in reporter.report(jobs, {}, now=13.0)["artifacts"]]
    assert entries[0].rate == 1000  # 3000 bytes over 3 s
    entries = [ArtifactProgress.from_json(e) for e in reporter.report(jobs, {}, now=14.0)["artifacts"]]
    assert entries[0].rate == 0  # nothing in the last 3 s: the window no longer holds the burst


def test_reporter_sends_an_unchanged_report_only_to_a_registry_that_lacks_it(tmp_path):
    manifest = build_artifact(tmp_path).manifest
    held = [PullJob(f"sha256:{n:064x}", manifest, state=PullState.READY, finished=n) for n in range(3)]
    reporter = ProgressReporter(refresh_s=30)
    assert len(reporter.next_report(held, {}, now=0)["artifacts"]) == 3
    reporter.answered({"ok": True, "reported": True})
    assert reporter.next_report(held, {}, now=1) is None  # the registry has it: a bare heartbeat
    reporter.answered({"ok": True, "reported": False})  # it restarted, or another replica answered
    assert reporter.next_report(held, {}, now=2) is not None
    reporter.answered({"ok": True, "reported": True})
    assert reporter.next_report(held, {}, now=3) is None
    gone = held[:2]
    assert len(reporter.next_report(gone, {}, now=4)["artifacts"]) == 2  # an artifact left: sent ...
    assert len(reporter.next_report(gone, {}, now=5)["artifacts"]) == 2  # ... again, as that heartbeat failed
    reporter.answered({"ok": True, "reported": True})
    assert reporter.next_report(gone, {}, now=6) is None
    assert reporter.next_report(gone, {}, now=37) is not None  # sent again every refresh_s anyway
    reporter.answered({"ok": True, "reported": True})
    pulling = PullJob("sha256:" + "f" * 64, manifest, state=PullState.DOWNLOADING, started=31)
    assert reporter.next_report([*gone, pulling], {}, now=38)["artifacts"][0]["state"] == "downloading"


# -- the routes, in process -------------------------------------------------------------------


async def test_heartbeat_reports_are_checked_kept_listed_and_dropped_on_leave(aiohttp_client, tmp_path, origin):
    client = await aiohttp_client(make_app(TrackerConfig(data_dir=tmp_path / "reg", token=TOKEN)))
    art = build_artifact(tmp_path)
    upload(art, origin)
    await api_publish(client, art, origin)
    url = "/v1/nodes/n1/heartbeat"
    for body, needle in BAD_REPORTS:
        resp = await client.post(url, data=json.dumps({"zone": "z1", **body}))
        assert resp.status == 400, body
        error = (await resp.json())["error"]
        assert error["code"] == "bad_request" and needle in error["message"]
    assert (await (await client.get("/v1/nodes")).json())["nodes"] == []  # nothing recorded from a bad one
    over = json.dumps({"artifacts": [], "pad": "x" * MAX_HEARTBEAT_BODY})
    assert (await client.post(url, data=over)).status == 413  # too large (adapters/http_server.read_body)

    async def chunked():
        yield over.encode()

    assert (await client.post(url, data=chunked())).status == 413  # no Content-Length: still capped

    total = art.manifest.total_size
    assert (await (await client.post(url, json={"zone": "z1"})).json())["reported"] is False
    report = {"zone": "z1", "ttl_s": 5, "artifacts": [_entry(art.digest, done=total // 2, total=total)]}
    assert (await (await client.post(url, json=report)).json())["reported"] is True
    # A bare heartbeat keeps the report the registry holds.
    assert (await (await client.post(url, json={"zone": "z1"})).json())["reported"] is True
    report2 = {"zone": "z2", "artifacts": [_entry(art.digest, state="ready", done=total, total=total)]}
    assert (await client.post("/v1/nodes/n2/heartbeat", json=report2)).status == 200
    nodes = (await (await client.get("/v1/nodes")).json())["nodes"]
    assert [(n["node"], n["zone"], n["alive"]) for n in nodes] == [("n1", "z1", True), ("n2", "z2", True)]
    one = await (await client.get("/v1/nodes?zone=z2")).json()
    assert [n["node"] for n in one["nodes"]] == ["n2"] and one["more"] == 0
    one = await (await client.get("/v1/nodes?limit=1")).json()
    assert [n["node"] for n in one["nodes"]] == ["n1"] and one["more"] == 1
    for query in ("zone=a%20b", "limit=0", "limit=x", "limit=99999999"):
        assert (await client.get(f"/v1/nodes?{query}")).status == 400, query
    page = await (await client.get("/ui/nodes?zone=z2")).text()
    assert 'data-node="n2"' in page and 'data-node="n1"' not in page
    assert nodes[0]["artifacts"][0]["name"] == "demo/model" and nodes[0]["artifacts"][0]["done_bytes"] == total // 2
    view = await (await client.get(f"/v1/rollout/{art.digest}")).json()
    assert view["name"] == "demo/model" and view["total_bytes"] == total
    assert [(r["node"], r["state"], r["fraction"]) for r in view["nodes"]] == [("n1", "downloading", 0.5),
                                                                              ("n2", "ready", 1.0)]
    assert [(z["zone"], z["complete"], z["downloading"]) for z in view["zones"]] == [("z1", 0, 1), ("z2", 1, 0)]
    assert view["summary"]["done"] is False and view["summary"]["bytes_from_origin"] == 8
    assert (await client.delete("/v1/nodes/n1")).status == 200
    view = await (await client.get(f"/v1/rollout/{art.digest}")).json()
    assert [r["node"] for r in view["nodes"]] == ["n2"] and view["summary"]["done"] is True
    nodes = (await (await client.get("/v1/nodes")).json())["nodes"]
    assert [(n["node"], n["alive"], n["gone"], n["artifacts"]) for n in nodes] == [
        ("n2", True, None, nodes[0]["artifacts"]), ("n1", False, "left", [])]
    resp = await client.get("/v1/rollout/sha256:" + "0" * 64)
    assert resp.status == 404 and "no node reports it" in (await resp.json())["error"]["message"]
    assert (await client.get("/v1/rollout/latest")).status == 400


async def test_console_needs_the_read_token_and_never_shows_a_token_or_credential(aiohttp_client, tmp_path, origin):
    read = "console-read-3f9a1c"
    endpoint = "http://minio:MINIOSECRET@127.0.0.1:9000/"
    cfg = TrackerConfig(data_dir=tmp_path / "reg", token=TOKEN, read_token=read, allowed_s3_endpoints=(endpoint,))
    client = await aiohttp_client(make_app(cfg))
    art = build_artifact(tmp_path)
    upload(art, origin)
    await api_publish(client, art, origin)
    # An origin URL may carry credentials (userinfo, a presigned query): the console never shows them.
    other = build_artifact(tmp_path, name="demo/s3")
    body = other.body(origin, "v1")
    body["origin"] = {"url": "s3://AKIAEXAMPLE:S3SECRETKEY@bucket/prefix?X-Amz-Signature=SIGSECRET",
                      "s3_endpoint": endpoint}
    assert (await client.post("/v1/artifacts", json=body, headers=AUTH)).status == 201
    bearer = {"Authorization": f"Bearer {read}"}
    total = art.manifest.total_size
    beat = {"zone": "z1", "artifacts": [_entry(art.digest, done=total // 3, total=total)]}
    assert (await client.post("/v1/nodes/n1/heartbeat", json=beat, headers=bearer)).status == 200

    routes = ["/ui", "/ui/", "/ui?q=demo", "/ui/nodes", f"/ui/artifacts/{art.digest}", f"/ui/rollout/{art.digest}",
              f"/ui/artifacts/{other.digest}", "/ui/api/nodes", f"/ui/api/rollout/{art.digest}"]
    secrets = (read, TOKEN, "S3SECRETKEY", "AKIAEXAMPLE", "SIGSECRET", "MINIOSECRET")
    for path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "modelcast_console=forged"}):
            resp = await client.get(path, headers=headers, allow_redirects=False)
            assert resp.status == 401, (path, headers)
            text = await resp.text()
            assert not any(s in text for s in secrets), path
        for token in (read, TOKEN):  # the write token reads too, as on the API
            resp = await client.get(path, headers={"Authorization": f"Bearer {token}"})
            assert resp.status == 200, path
            text = await resp.text()
            assert not any(s in text for s in secrets), (path, [s for s in secrets if s in text])
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    page = await (await client.get(f"/ui/artifacts/{other.digest}", headers=bearer)).text()
    assert "s3://bucket/prefix" in page and "http://127.0.0.1:9000/" in page  # shown, less the secrets
    for name in ("console.js", "console.css"):  # no data in them: served to anyone
        resp = await client.get(f"/ui/static/{name}")
        text = await resp.text()
        assert resp.status == 200 and not any(s in text for s in secrets)
    assert (await client.get("/ui/static/../app.py")).status == 404

    # ?token= once: a cookie that is not the token, and a redirect to the page without it.
    resp = await client.get("/ui/nodes?token=wrong", allow_redirects=False)
    assert resp.status == 401 and "wrong" in await resp.text()
    resp = await client.get(f"/ui/nodes?token={read}", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui/nodes"
    cookie = resp.cookies["modelcast_console"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and read not in cookie.value
    resp = await client.get("/ui/nodes")  # the test client keeps the cookie, as a browser does
    assert resp.status == 200 and 'data-node="n1"' in await resp.text()
    assert (await client.get(f"/ui/api/rollout/{art.digest}")).status == 200
    assert (await client.get("/v1/nodes")).status == 401  # the cookie is the console's only, not the API's
    assert (await client.get("/ui/logout", allow_redirects=False)).status == 303
    assert (await client.get("/ui/nodes")).status == 401
    # The sign-in form; it goes back only to console pages.
    resp = await client.post("/ui/login", data={"token": "nope", "next": "/ui/nodes"}, allow_redirects=False)
    assert resp.status == 401 and "nope" not in await resp.text()
    resp = await client.post("/ui/login", data={"token": read, "next": "https://evil.example/"},
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui"
    assert (await client.get("/ui")).status == 200
    resp = await client.post("/ui/login", data={"token": read, "next": "x" * 5000}, allow_redirects=False)
    assert resp.status == 400


async def test_console_pages_are_open_without_a_read_token_and_errors_are_pages(aiohttp_client, tmp_path, origin):
    client = await aiohttp_client(make_app(TrackerConfig(data_dir=tmp_path / "reg", token=TOKEN)))
    art = build_artifact(tmp_path)
    upload(art, origin)
    await api_publish(client, art, origin)
    resp = await client.get("/ui?q=mod")
    assert resp.status == 200 and f'data-digest="{art.digest}"' in await resp.text()
    assert 'data-digest' not in await (await client.get("/ui?q=nomatch")).text()
    resp = await client.get("/ui/artifacts/sha256:" + "0" * 64)
    assert resp.status == 404 and resp.content_type == "text/html" and "not in this registry" in await resp.text()
    resp = await client.get("/ui/artifacts/nonsense")
    assert resp.status == 400 and resp.content_type == "text/html"
    assert (await client.get("/ui?after=garbage")).status == 400
    resp = await client.get("/ui?q=" + "x" * 200)
    assert resp.status == 400
    resp = await client.get("/ui/nodes?token=anything", allow_redirects=False)  # no token needed: just go on
    assert resp.status == 303 and "modelcast_console" not in resp.cookies


# -- a real fleet in a real browser -------------------------------------------------------------

ROLLOUT_ROWS = """() => Array.from(document.querySelectorAll("section.rollout table.rollout-nodes tbody tr[data-node]"))
    .map(tr => ({node: tr.dataset.node, state: tr.dataset.state, fraction: parseFloat(tr.dataset.fraction),
                 bar: tr.querySelector("progress").value, pct: tr.querySelector(".pct").textContent,
                 zone: tr.cells[1].textContent}))"""
NODE_ROWS = """() => Array.from(document.querySelectorAll("#nodes tbody tr[data-node]"))
    .map(tr => ({node: tr.dataset.node, zone: tr.cells[1].textContent, alive: tr.dataset.alive,
                 holds: tr.dataset.holds.split(" ").filter(Boolean), pulling: tr.dataset.pulling}))"""
ARTIFACT_ROWS = """() => Array.from(document.querySelectorAll("#artifacts tbody tr[data-digest]"))
    .map(tr => ({digest: tr.dataset.digest, name: tr.cells[0].textContent, tags: tr.cells[1].textContent,
                 kind: tr.cells[2].textContent, size: tr.cells[3].textContent, created: tr.cells[5].textContent,
                 complete: parseInt(tr.cells[6].dataset.complete)}))"""


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def test_console_in_a_browser_follows_three_nodes_pulling_100_mib(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium: `make system-tools` installs Debian's (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    shots = SHOTS if os.environ.get("MODELCAST_UPDATE_SCREENSHOTS") == "1" else tmp_path / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    tracker = start_tracker(tmp_path, token=TOKEN)
    procs = [tracker]
    try:
        sizes = {"config.json": 4096, "tokenizer.json": 2 * MiB,
                 **{f"weights/shard-{i}.bin": 49 * MiB for i in range(2)}}
        model = make_model(tmp_path / "llm", sizes)
        origin = (tmp_path / "origin").as_uri()
        digest = publish(tracker.url, model, "demo/llm:v1", origin, "--annotation", "framework=onnx")
        small = publish(tracker.url, make_model(tmp_path / "tok", {"vocab.json": 300_000}), "demo/tokenizer:v3", origin)
        # Two zones, and each node held to 12 MiB/s (peers and origin alike), so a pull lasts
        # several heartbeats and its progress can be watched.
        zones = ["eu-west", "eu-west", "us-east"]
        nodes = [start_node(tmp_path, tracker.url, f"node-{i}", host=f"127.0.0.{i + 2}", zone=zone,
                            extra=["--download-limit", "12M"]) for i, zone in enumerate(zones)]
        procs += nodes
        ids = {_get(f"{n.url}/v1/health")["node_id"]: zone for n, zone in zip(nodes, zones)}
        wait_until(lambda: len(_get(f"{tracker.url}/v1/nodes")["nodes"]) == 3, 20, message="3 nodes heartbeating")

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            # The pages' CSP forbids eval, which Playwright's polling wait_for_function uses when
            # its predicate is not true at once; the test's own script is exempt, the pages' is not.
            context = browser.new_context(viewport={"width": 1440, "height": 640}, bypass_csp=True)
            page = context.new_page()
            page.goto(f"{tracker.url}/ui/artifacts/{digest}")
            assert page.locator("h1").inner_text() == "demo/llm"
            assert "No node reports this artifact yet" in page.locator(".summary").inner_text()
            files = page.eval_on_selector_all("#files tbody tr", "rows => rows.map(r => r.cells[0].textContent)")
            assert files == sorted(sizes)
            rollout_page = context.new_page()
            rollout_page.goto(f"{tracker.url}/ui/rollout/{digest}")

            status = subprocess.Popen(modelcast_argv("status", "demo/llm:v1", "--registry", tracker.url,
                                                     "--interval", "0.5"),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for n in nodes:
                body = json.dumps({"ref": "demo/llm:v1", "wait": False}).encode()
                req = urllib.request.Request(f"{n.url}/v1/pull", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=10).close()

            seen: dict[str, list[tuple[str, float]]] = {}
            shot = {}

            def watch():
                rows = page.evaluate(ROLLOUT_ROWS)
                for r in rows:
                    assert r["bar"] == pytest.approx(r["fraction"], abs=1e-3) and r["zone"] == ids[r["node"]]
                    seen.setdefault(r["node"], []).append((r["state"], r["fraction"]))
                moving = [r for r in rows if 0.05 < r["fraction"] < 0.9]
                if "rollout" not in shot and len(rows) == 3 and len(moving) >= 2:
                    # The rollout page redraws on its own too (in front: background tabs' timers are slowed).
                    rollout_page.bring_to_front()
                    rollout_page.wait_for_function(
                        "Array.from(document.querySelectorAll('table.rollout-nodes tbody tr[data-node]'))"
                        ".filter(tr => 0.02 < +tr.dataset.fraction && +tr.dataset.fraction < 1).length >= 2")
                    rollout_page.screenshot(path=str(shots / "rollout.png"), full_page=True)
                    # The node list mid-rollout: each node, what it pulls and how far.
                    nodes_page = context.new_page()
                    nodes_page.goto(f"{tracker.url}/ui/nodes")
                    pulling = {r["node"]: r["pulling"] for r in nodes_page.evaluate(NODE_ROWS)}
                    assert set(pulling) == set(ids) and list(pulling.values()).count(digest) >= 2, pulling
                    nodes_page.screenshot(path=str(shots / "nodes.png"), full_page=True)
                    nodes_page.close()
                    page.bring_to_front()
                    shot["rollout"] = True
                return len(rows) == 3 and all(r["state"] == "ready" for r in rows)

            wait_until(watch, 180, interval=0.1, message=lambda: f"3 nodes complete in the browser; saw {seen}")
            # Every node was seen on its way, below 100%, and then complete: the page redrew itself.
            assert set(seen) == set(ids)
            for node, samples in seen.items():
                assert any(s != "ready" and 0 < f < 1 for s, f in samples), (node, samples)
                assert samples[-1] == ("ready", 1.0), (node, samples)
            assert shot, "never saw two nodes mid-pull at once"
            assert "3 of 3 nodes complete" in page.locator(".summary").inner_text()
            page.screenshot(path=str(shots / "artifact.png"), full_page=True)

            # The status command waited for the same rollout, and says the same.
            out, err = status.communicate(timeout=30)
            print(out)
            assert status.returncode == 0, err
            lines = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in ids]
            assert len(lines) == 3 and all("complete" in line and "100.0%" in line for line in lines), out
            assert "3/3 nodes complete" in out.splitlines()[0]
            once = subprocess.run(modelcast_argv("status", digest, "--registry", tracker.url, "--once"),
                                  capture_output=True, text=True, timeout=30)
            assert once.returncode == 0 and once.stdout.count("complete") >= 3, once.stderr

            # The node list shows what GET /v1/nodes says.
            page.goto(f"{tracker.url}/ui/nodes")
            shown = {r["node"]: r for r in page.evaluate(NODE_ROWS)}
            api = {n["node"]: n for n in _get(f"{tracker.url}/v1/nodes")["nodes"]}
            assert set(shown) == set(api) == set(ids)
            for node, n in api.items():
                held = [a["digest"] for a in n["artifacts"] if a["state"] == "ready"]
                assert shown[node]["holds"] == held == [digest]
                assert shown[node]["zone"] == n["zone"] == ids[node]
                assert shown[node]["alive"] == "true" and n["alive"] and shown[node]["pulling"] == ""

            # The artifact list shows what GET /v1/artifacts says, and who holds each.
            page.goto(f"{tracker.url}/ui")
            shown = page.evaluate(ARTIFACT_ROWS)
            listed = _get(f"{tracker.url}/v1/artifacts")["artifacts"]
            assert [r["digest"] for r in shown] == [a["digest"] for a in listed] == [digest, small]
            for r, a in zip(shown, listed):
                assert (r["name"], r["kind"], r["size"], r["created"]) == (a["name"], a["kind"],
                                                                           human_bytes(a["total_size"]), a["created"])
                assert r["tags"] == " ".join(f"{a['name']}:{t}" for t in a["tags"])
            assert [r["complete"] for r in shown] == [_get(f"{tracker.url}/v1/rollout/{digest}")["summary"]["complete"],
                                                      0] == [3, 0]
            page.screenshot(path=str(shots / "artifacts.png"), full_page=True)
            page.fill("input[name=q]", "token")
            page.click("form.search button")
            page.wait_for_url("**/ui?q=token")
            assert [r["name"] for r in page.evaluate(ARTIFACT_ROWS)] == ["demo/tokenizer"]
            browser.close()
    finally:
        for proc in procs:
            proc.stop()
