"""Pulled artifacts in the Hugging Face hub cache layout: huggingface_hub loads them offline by repo id.

The plans (node_cache/hf.py) are checked as pure functions and their executor on a real
filesystem; then the whole path with real processes: a snapshot of a hub cache published
with ``modelcast publish``, pulled on a node daemon with ``modelcast pull --hf``, loaded by
the real ``huggingface_hub`` in a fresh interpreter with ``HF_HUB_OFFLINE=1``, evicted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from modelcast.errors import BadRequest, Conflict
from modelcast.hf import ANN_REF, ANN_REPO, ANN_REVISION, HfName, HfTarget, repo_folder, resolve_target
from node_cache.hf import HfLayouts, Layout, Link, plan_links, plan_removal

from .helpers import make_model, publish, run_cli, wait_until

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def layout(digest: str = DIGEST_A, cache: str = "/hub", repo: str = "org/name", commit: str = COMMIT,
           ref: str | None = "main", files=(("config.json", "c" * 32), ("model.safetensors", "d" * 32),
                                             ("tokenizer/vocab.txt", "e" * 32))) -> Layout:
    return Layout(digest, cache, repo, commit, ref, tuple(files))


# ---- names (modelcast/hf.py) ------------------------------------------------------------------------


def test_repo_ids_and_revisions_follow_huggingface_hub_rules():
    assert repo_folder("org/name") == "models--org--name"
    assert repo_folder("bert-base-uncased") == "models--bert-base-uncased"
    assert HfName.parse("Qwen/Qwen2.5-0.5B@main") == HfName("Qwen/Qwen2.5-0.5B", "main")
    for bad in ("a/b/c", "org--x/name", "org/../x", "-org/name", "org/name.git", "", "org/name@", "org/na me",
                "org/name@../x"):
        with pytest.raises(BadRequest):
            HfName.parse(bad)


def test_the_target_defaults_to_the_published_repo_and_commit_and_is_stable_otherwise():
    ann = {ANN_REPO: "org/name", ANN_REVISION: COMMIT, ANN_REF: "main"}
    assert resolve_target(None, ann, DIGEST_A) == HfTarget("org/name", COMMIT, "main")
    # Another repo name: the artifact's digest gives the commit, the same one every time.
    assert resolve_target(HfName("acme/other"), ann, DIGEST_B) == HfTarget("acme/other", "b" * 40, "main")
    # A branch or tag names the ref; a commit is taken as is, and main points to it.
    assert resolve_target(HfName("org/name", "v2"), ann, DIGEST_A) == HfTarget("org/name", COMMIT, "v2")
    assert resolve_target(HfName("org/name", OTHER_COMMIT), ann, DIGEST_A) == HfTarget("org/name", OTHER_COMMIT,
                                                                                         "main")
    with pytest.raises(BadRequest, match="--hf ORG/NAME"):
        resolve_target(None, {}, DIGEST_A)


# ---- the pure plans (node_cache/hf.py) ---------------------------------------------------------------


def test_the_link_plan_is_huggingface_hubs_layout_with_blobs_in_the_store():
    store = Path("/node/artifacts/sha256/" + "a" * 64)
    lay = layout(files=(("config.json", "c" * 32), ("copy.json", "c" * 32), ("tokenizer/vocab.txt", "e" * 32)))
    links = plan_links(lay, store)
    repo = Path("/hub/models--org--name")
    assert links == [
        # Blobs first, one per content, absolute into the node's verified store.
        Link(repo / "blobs" / ("c" * 32), str(store / "config.json")),
        Link(repo / "blobs" / ("e" * 32), str(store / "tokenizer/vocab.txt")),
        # Snapshot entries: relative links to the blobs, as huggingface_hub makes them.
        Link(repo / "snapshots" / COMMIT / "config.json", "../../blobs/" + "c" * 32),
        Link(repo / "snapshots" / COMMIT / "copy.json", "../../blobs/" + "c" * 32),
        Link(repo / "snapshots" / COMMIT / "tokenizer/vocab.txt", "../../../blobs/" + "e" * 32),
    ]


def test_the_removal_plan_takes_away_only_what_is_ours_and_repoints_what_others_share():
    root_a, root_b = Path("/store/a"), Path("/store/b")
    a = layout()
    # b: another artifact (another commit) sharing config.json's content.
    b = layout(DIGEST_B, commit=OTHER_COMMIT, ref="v2", files=(("config.json", "c" * 32),))
    observed = {link.path: link.target for link in plan_links(a, root_a)}
    weights = Path("/hub/models--org--name/snapshots") / COMMIT / "model.safetensors"
    observed[weights] = "../../blobs/somebody-else"  # replaced by someone: not ours any more
    plan = plan_removal(a, root_a, [(b, root_b)], observed, observed_ref=COMMIT)
    repo = Path("/hub/models--org--name")
    assert plan.remove_ref == repo / "refs/main"
    assert weights not in plan.remove
    assert set(plan.remove) == {repo / "snapshots" / COMMIT / "config.json",
                                repo / "snapshots" / COMMIT / "tokenizer/vocab.txt",
                                repo / "blobs" / ("d" * 32), repo / "blobs" / ("e" * 32)}
    # The shared blob stays, pointed at b's copy of the same content.
    assert plan.repoint == (Link(repo / "blobs" / ("c" * 32), str(root_b / "config.json")),)
    # Pointers before data, and folders deepest first.
    assert plan.remove.index(repo / "snapshots" / COMMIT / "config.json") < plan.remove.index(
        repo / "blobs" / ("d" * 32))
    assert plan.prune[0] == repo / "snapshots" / COMMIT / "tokenizer" and plan.prune[-1] == repo
    # A ref that names another commit now (a later pull) is left alone.
    assert plan_removal(a, root_a, [], observed, observed_ref=OTHER_COMMIT).remove_ref is None


# ---- the executor on a real filesystem ------------------------------------------------------------------


def make_store(tmp_path: Path, digest: str, files: dict[str, bytes]) -> Path:
    root = tmp_path / "store" / digest.split(":")[1][:8]
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_layouts_are_made_atomically_refuse_foreign_files_and_leave_nothing_dangling(tmp_path):
    hub = tmp_path / "hub"
    roots = {DIGEST_A: make_store(tmp_path, DIGEST_A, {"config.json": b"{}", "w.bin": b"A" * 100}),
             DIGEST_B: make_store(tmp_path, DIGEST_B, {"config.json": b"{}"})}
    saved: list = []
    layouts = HfLayouts(lambda: [], saved.append, roots.__getitem__)
    a = layout(cache=str(hub), files=(("config.json", "c" * 32), ("w.bin", "f" * 32)))
    b = layout(DIGEST_B, cache=str(hub), commit=OTHER_COMMIT, ref="v2", files=(("config.json", "c" * 32),))
    layouts.apply(a)
    layouts.apply(b)
    snap_a = hub / "models--org--name/snapshots" / COMMIT
    assert (snap_a / "w.bin").read_bytes() == b"A" * 100
    assert (hub / "models--org--name/refs/main").read_text() == COMMIT  # no newline: read as is
    assert saved[-1] == [a.to_json(), b.to_json()]  # recorded
    # The shared blob was made by a; dropping a points it at b's file instead.
    blob_c = hub / "models--org--name/blobs" / ("c" * 32)
    assert os.readlink(blob_c) == str(roots[DIGEST_A] / "config.json")
    layouts.drop(DIGEST_A)
    assert os.readlink(blob_c) == str(roots[DIGEST_B] / "config.json")
    assert not snap_a.exists() and not (hub / "models--org--name/refs/main").exists()
    assert (hub / "models--org--name/snapshots" / OTHER_COMMIT / "config.json").read_bytes() == b"{}"
    # A file the node did not make is never overwritten: the layout is refused, nothing written.
    snap_a.mkdir(parents=True)
    (snap_a / "w.bin").write_bytes(b"mine")
    with pytest.raises(Conflict, match="not a link this node made"):
        layouts.apply(a)
    assert (snap_a / "w.bin").read_bytes() == b"mine" and not (hub / "models--org--name/refs/main").exists()
    (snap_a / "w.bin").unlink()
    layouts.apply(a)
    # Out of service (repair): links gone, record kept; back when ready; gone with the artifact.
    layouts.reconcile(ready={DIGEST_B}, known={DIGEST_A, DIGEST_B})
    assert not snap_a.exists() and [r.digest for r in layouts.records] == [DIGEST_B, DIGEST_A]
    layouts.reconcile(ready={DIGEST_A, DIGEST_B}, known={DIGEST_A, DIGEST_B})
    assert (snap_a / "w.bin").read_bytes() == b"A" * 100
    layouts.reconcile(ready=set(), known=set())
    assert layouts.records == [] and not (hub / "models--org--name").exists()


# ---- the whole path, with real processes and the real huggingface_hub ------------------------------------

OFFLINE_LOAD = r"""
import json, sys
from huggingface_hub import hf_hub_download, snapshot_download
out = {}
for name, call in (("snapshot", lambda: snapshot_download(sys.argv[1], revision=sys.argv[2] or None)),
                   ("config", lambda: hf_hub_download(sys.argv[1], "config.json", revision=sys.argv[2] or None))):
    try:
        out[name] = call()
    except Exception as exc:
        out[name] = {"error": type(exc).__name__, "message": str(exc)}
print(json.dumps(out))
"""


def offline_load(hub: Path, repo_id: str, revision: str = "") -> dict:
    """``snapshot_download`` and ``hf_hub_download`` in a fresh interpreter, offline, on ``hub``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    env.pop("HF_HOME", None)
    out = subprocess.run([sys.executable, "-c", OFFLINE_LOAD, repo_id, revision], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)


def node_artifact(node_url: str, digest: str) -> dict | None:
    with urllib.request.urlopen(f"{node_url}/v1/artifacts", timeout=5) as resp:
        return next((a for a in json.load(resp)["artifacts"] if a["digest"] == digest), None)


def hub_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> Path:
    """A snapshot as huggingface_hub leaves it: blobs by sha256, relative links, refs/main."""
    repo = cache / repo_folder(repo_id)
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        entry = repo / "snapshots" / commit / rel
        entry.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, entry.parent), entry)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs/main").write_text(commit)
    return repo / "snapshots" / commit


def dangling_links(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_symlink() and not p.exists()]


def test_a_pulled_snapshot_loads_offline_by_repo_id_and_eviction_leaves_no_dangling_layout(tracker, node_factory,
                                                                                            tmp_path):
    model = make_model(tmp_path / "model", {"model.safetensors": 3 << 20, "tokenizer/vocab.bin": 70_000}, seed=7)
    files = {"config.json": b'{"model_type": "bert", "hidden_size": 8}\n',
             "model.safetensors": (model / "model.safetensors").read_bytes(),
             "tokenizer/vocab.bin": (model / "tokenizer/vocab.bin").read_bytes()}
    snapshot = hub_snapshot(tmp_path / "publisher-hub", "acme/tiny-bert", COMMIT, files)
    # A link out of the repo's folder is still refused: publish reads blobs inside the cache only.
    outside = tmp_path / "secret.txt"
    outside.write_text("not for sharing")
    os.symlink(outside, snapshot / "leak.txt")
    bad = run_cli("publish", str(snapshot), "acme/tiny-bert:v1", "--registry", tracker.url, "--origin",
                  (tmp_path / "origin").as_uri(), "--token", "secret")
    assert bad.returncode != 0 and "leak.txt is a link to" in bad.stderr and "Traceback" not in bad.stderr
    (snapshot / "leak.txt").unlink()
    digest = publish(tracker.url, snapshot, "acme/tiny-bert:v1", (tmp_path / "origin").as_uri())

    node = node_factory(tracker.url, "n1")
    hub = tmp_path / "hub"
    # --hf with no value: the repo, commit and branch recorded at publish.
    out = run_cli("pull", "acme/tiny-bert:v1", "--hf", "--hf-cache", str(hub), "--node", node.url)
    assert out.returncode == 0, out.stderr
    laid = Path(out.stdout.strip())
    assert laid == hub / "models--acme--tiny-bert" / "snapshots" / COMMIT
    # The same artifact under a name of the user's choosing, at a branch, through the node's API.
    answer = post_json(f"{node.url}/v1/pull", {"ref": "acme/tiny-bert:v1",
                                                "hf": {"repo": "me/bert-copy@prod", "cache": str(hub)}})
    # Another repo: the commit is the artifact's own (its digest's first 40 hex), not acme's.
    assert answer["hf"]["snapshot"] == str(hub / "models--me--bert-copy/snapshots" / digest.split(":")[1][:40])
    with pytest.raises(urllib.error.HTTPError) as refused:
        post_json(f"{node.url}/v1/pull", {"ref": "acme/tiny-bert:v1", "wait": False, "hf": "me/bert-copy"})
    assert refused.value.code == 400
    assert 'needs "wait": true' in json.loads(refused.value.read())["error"]["message"]

    loaded = offline_load(hub, "acme/tiny-bert")
    assert loaded["snapshot"] == str(laid), loaded
    assert loaded["config"] == str(laid / "config.json"), loaded
    for rel, data in files.items():
        assert (Path(loaded["snapshot"]) / rel).read_bytes() == data, rel
    assert Path(loaded["config"]).read_bytes() == files["config.json"]
    # No copy: the blobs are the node's verified files.
    blob = Path(loaded["snapshot"]) / "model.safetensors"
    assert blob.resolve() == (node.cache / "artifacts/sha256" / digest.split(":")[1] / "model.safetensors").resolve()
    other = offline_load(hub, "me/bert-copy", "prod")
    assert Path(other["config"]).read_bytes() == files["config.json"], other

    # Pinned: evicting is refused with what to do.
    assert run_cli("node", "pin", digest, "--node", node.url).returncode == 0
    refused = run_cli("node", "evict", "acme/tiny-bert:v1", "--node", node.url)
    assert refused.returncode != 0 and "unpin it first" in refused.stderr
    assert run_cli("node", "unpin", digest, "--node", node.url).returncode == 0

    out = run_cli("node", "evict", "acme/tiny-bert:v1", "--node", node.url)
    assert out.returncode == 0, out.stderr
    assert "removed Hugging Face layout acme/tiny-bert" in out.stdout
    assert not (node.cache / "artifacts/sha256" / digest.split(":")[1]).exists()
    # Nothing left that resolves to a missing file: the offline calls say the model is not cached.
    for repo_id, revision in (("acme/tiny-bert", ""), ("me/bert-copy", "prod")):
        gone = offline_load(hub, repo_id, revision)
        errors = {k: v.get("error") if isinstance(v, dict) else f"returned {v}" for k, v in gone.items()}
        assert errors == {"snapshot": "LocalEntryNotFoundError", "config": "LocalEntryNotFoundError"}, gone
    assert dangling_links(hub) == []


def test_a_layout_follows_its_artifact_through_repair_restarts_and_deletion_behind_the_nodes_back(
        tracker, node_factory, tmp_path):
    model = make_model(tmp_path / "plain", {"weights.bin": 1 << 20, "config.json": 300}, seed=3)
    original = {p.name: p.read_bytes() for p in model.iterdir()}
    # A plain folder, named as a Hugging Face repo at publish.
    digest = publish(tracker.url, model, "plain/m:v1", (tmp_path / "origin").as_uri(), "--hf-repo", "acme/plain")
    node = node_factory(tracker.url, "n1")
    hub = tmp_path / "hub"
    out = run_cli("pull", "plain/m:v1", "--hf", "--hf-cache", str(hub), "--node", node.url)
    assert out.returncode == 0, out.stderr
    commit = digest.split(":")[1][:40]  # no commit was recorded: the digest names the snapshot
    snapshot = hub / "models--acme--plain" / "snapshots" / commit
    assert Path(out.stdout.strip()) == snapshot
    assert (hub / "models--acme--plain/refs/main").read_text() == commit
    assert node_artifact(node.url, digest)["hf_layouts"][0]["snapshot"] == str(snapshot)
    # Bad names and unnamed artifacts fail in one line that says what to do.
    bad = run_cli("pull", "plain/m:v1", "--hf", "acme--x/y", "--hf-cache", str(hub), "--node", node.url)
    assert bad.returncode != 0 and "not a Hugging Face repo id" in bad.stderr and "Traceback" not in bad.stderr
    publish(tracker.url, make_model(tmp_path / "unnamed", {"w.bin": 1000}), "plain/unnamed:v1",
            (tmp_path / "origin").as_uri())
    bad = run_cli("pull", "plain/unnamed:v1", "--hf", "--hf-cache", str(hub), "--node", node.url)
    assert bad.returncode != 0 and "--hf ORG/NAME" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr

    # Corrupt a verified file: the repair takes the links away, and puts them back once the file is whole.
    stored = node.cache / "artifacts/sha256" / digest.split(":")[1] / "weights.bin"
    os.chmod(stored, 0o644)
    stored.write_bytes(b"\0" * len(original["weights.bin"]))
    assert run_cli("node", "verify", "plain/m:v1", "--node", node.url).returncode == 1
    wait_until(lambda: (node_artifact(node.url, digest) or {}).get("state") == "ready"
               and (snapshot / "weights.bin").exists(), 60, message="the repaired artifact and its layout")
    assert (snapshot / "weights.bin").read_bytes() == original["weights.bin"]

    # A link removed by hand comes back at the next start.
    node.stop()
    (snapshot / "config.json").unlink()
    node.start()
    assert (snapshot / "config.json").read_bytes() == original["config.json"]
    # An artifact deleted behind the node's back takes its layout with it at the next start.
    node.stop()
    gone = node.cache / "artifacts/sha256" / digest.split(":")[1]
    os.chmod(gone, 0o755)
    shutil.rmtree(gone)
    node.start()
    assert not (hub / "models--acme--plain").exists() and dangling_links(hub) == []
    assert offline_load(hub, "acme/plain")["snapshot"]["error"] == "LocalEntryNotFoundError"


class _WorkerContext:
    """What Ray hands the plugin's modify_context: the worker's environment to fill."""

    def __init__(self):
        self.env_vars: dict[str, str] = {}


def test_the_ray_plugin_lays_out_by_repo_id_and_points_the_worker_at_that_cache(tracker, node_factory, tmp_path):
    pytest.importorskip("ray")
    import asyncio
    import logging

    from serve_glue.config import GlueConfig
    from serve_glue.plugin import ModelcastPlugin

    model = make_model(tmp_path / "served", {"config.json": 200, "model.safetensors": 1 << 20}, seed=5)
    digest = publish(tracker.url, model, "served/m:v1", (tmp_path / "origin").as_uri(), "--hf-repo", "acme/served")
    node = node_factory(tracker.url, "n1")
    hub = tmp_path / "worker-hub"
    plugin = ModelcastPlugin()
    plugin._cfg = GlueConfig(node=node.url)
    env = {"modelcast": {"artifacts": {"MODEL": "served/m:v1"}, "hf": {"MODEL": ""}},
           "env_vars": {"HF_HUB_CACHE": str(hub)}}
    [uri] = plugin.get_uris(env)
    quiet = logging.getLogger("test-plugin")
    asyncio.run(plugin.create(uri, env, _WorkerContext(), quiet))
    worker = _WorkerContext()
    plugin.modify_context([uri], env, worker, quiet)
    assert worker.env_vars["HF_HUB_CACHE"] == str(hub)
    handed = json.loads(worker.env_vars["MODELCAST_ARTIFACTS"])["MODEL"]
    assert handed["hf"]["repo_id"] == "acme/served" and handed["digest"] == digest
    loaded = offline_load(hub, "acme/served")
    for name in ("config.json", "model.safetensors"):
        assert (Path(loaded["snapshot"]) / name).read_bytes() == (model / name).read_bytes()
    assert plugin.delete_uri(uri, quiet) > 0  # unpinned: evictable again
