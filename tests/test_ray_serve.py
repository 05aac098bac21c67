"""Ray glue end to end: a 2-node ray.cluster_utils.Cluster, a node daemon per Ray node.

One fleet (registry, two daemons, two Ray nodes with the plugin registered) is shared by
every test here: Ray start-up is the slow part.  Node 1's daemon is down when the cluster
starts; the first test brings it up while a worker waits on it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("onnxruntime")

from ray import serve  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from harness.procs import free_port  # noqa: E402
from tests.helpers import run_cli, wait_until  # noqa: E402
from serve_glue import WarmArtifacts, model_loader, modelcast_options, multiplexed_model_id  # noqa: E402
from serve_glue.testing import LocalFleet  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from demo_model import expected_output, onnx_model_bytes  # noqa: E402

MiB = 1 << 20
X = [1.0, 2.0, 3.0, 4.0]


def write_onnx_model(root: Path, weights_bytes: int, seed: int) -> Path:
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(onnx_model_bytes())
    (root / "weights.bin").write_bytes(os.urandom(16) + bytes(seed % 256 for _ in range(16)) + b"\0" * weights_bytes)
    return root


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("ray-fleet")
    # A download limit makes a cold pull last seconds, long enough to watch replicas wait.
    # The proxy lives on node 0; without this it would send every request to node 0's replica.
    f = LocalFleet(work, nodes=2, cpus_per_node=1, download_limit="8M",
                   node_env={"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"})
    try:
        f.start_registry()
        f.digests = {
            "mc/plugin:v1": f.publish(write_onnx_model(work / "m-plugin", 1 * MiB, 1), "mc/plugin:v1"),
            "mc/onnx:v1": f.publish(write_onnx_model(work / "m-onnx", 24 * MiB, 2), "mc/onnx:v1"),
            "mc/multi-a:v1": f.publish(write_onnx_model(work / "m-a", 1000, 3), "mc/multi-a:v1"),
            "mc/prewarm:v1": f.publish(write_onnx_model(work / "m-prewarm", 2 * MiB, 4), "mc/prewarm:v1"),
        }
        f.start_daemon(0)  # node 1's daemon stays down until test_plugin_waits_for_daemon
        f.start_ray()
        yield f
    finally:
        f.stop()


@ray.remote(num_cpus=0)
def _worker_view() -> dict:
    path = os.environ.get("MODELCAST_MODEL_PATH", "")
    return {"path": path, "digest": os.environ.get("MODELCAST_MODEL_DIGEST"), "node": os.environ.get("MODELCAST_NODE"),
            "artifacts": json.loads(os.environ.get("MODELCAST_ARTIFACTS", "{}")),
            "files": sorted(os.listdir(path)) if path else []}


def _on_node(fleet, i: int):
    return NodeAffinitySchedulingStrategy(fleet.ray_node_id(i), soft=False)


def test_plugin_waits_for_daemon_then_exposes_paths(fleet):
    env = {"modelcast": {"artifacts": {"MODEL": "mc/plugin:v1"}}}
    ref = _worker_view.options(runtime_env=env, scheduling_strategy=_on_node(fleet, 1)).remote()
    ready, _ = ray.wait([ref], timeout=3)
    assert not ready, "the worker started although its node's daemon is down"
    fleet.ensure_daemon(1)
    started = time.monotonic()
    view = ray.get(ref, timeout=60)
    # Retried inside create(): no failure reached Ray, so no 10-minute failure cache.
    assert time.monotonic() - started < 20
    digest = fleet.digests["mc/plugin:v1"]
    assert view["digest"] == digest
    assert view["path"] == str(fleet.artifact_dir(1, digest))
    assert view["files"] == ["model.onnx", "weights.bin"]
    assert view["node"] == fleet.node_url(1)
    assert view["artifacts"]["MODEL"]["ref"] == "mc/plugin:v1"
    pins = json.load(urllib.request.urlopen(f"{fleet.node_url(1)}/v1/pins", timeout=5))["pins"]
    assert pins[digest] == ["ray-env:mc/plugin:v1"]


def test_plugin_fails_fast_on_unknown_reference(fleet):
    env = {"modelcast": {"artifacts": {"MODEL": "mc/does-not-exist:v1"}}}
    started = time.monotonic()
    with pytest.raises(ray.exceptions.RuntimeEnvSetupError) as info:
        ray.get(_worker_view.options(runtime_env=env, scheduling_strategy=_on_node(fleet, 0)).remote(), timeout=60)
    assert "mc/does-not-exist:v1" in str(info.value) and "not found" in str(info.value)
    assert time.monotonic() - started < 15  # Ray's own 3 attempts, no retry loop of ours


def test_plugin_delete_uri_unpins(fleet):
    from serve_glue.plugin import ModelcastPlugin
    from serve_glue.config import GlueConfig

    plugin = ModelcastPlugin()
    plugin._cfg = GlueConfig(node=fleet.node_url(0))
    env = {"modelcast": {"artifacts": {"MODEL": "mc/plugin:v1"}}}
    [uri] = plugin.get_uris(env)
    import asyncio

    size = asyncio.run(plugin.create(uri, env, _Context(), _quiet()))
    assert size > MiB
    digest = fleet.digests["mc/plugin:v1"]
    pins = lambda: json.load(urllib.request.urlopen(f"{fleet.node_url(0)}/v1/pins", timeout=5))["pins"]  # noqa: E731
    assert "ray-env:mc/plugin:v1" in pins()[digest]
    assert plugin.delete_uri(uri, _quiet()) == size
    assert "ray-env:mc/plugin:v1" not in pins().get(digest, [])
    assert plugin.get_uris({"modelcast": {"artifacts": {"bad key": 3}}}) == []


class _Context:
    def __init__(self):
        self.env_vars = {}


def _quiet():
    import logging

    return logging.getLogger("test-plugin")


@serve.deployment
class OnnxModel:
    """The model served in the e2e test: an ONNX graph from the node cache."""

    async def __init__(self):
        import onnxruntime as ort

        self.artifacts = await WarmArtifacts.open()
        self.session = ort.InferenceSession(str(self.artifacts.path("MODEL") / "model.onnx"),
                                            providers=["CPUExecutionProvider"])

    async def __call__(self, request) -> dict:
        import numpy as np

        x = (await request.json())["x"]
        y = self.session.run(["Y"], {"X": np.asarray([x], dtype=np.float32)})[0][0].tolist()
        return {"y": y, "pid": os.getpid(), "node": os.environ["MODELCAST_NODE"]}

    async def check_health(self) -> None:
        await self.artifacts.check()


def _post(url: str, body: dict, timeout: float = 5) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def _replicas_by_node(url: str, tries: int = 40) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = {}
    for _ in range(tries):
        answer = _post(url, {"x": X})
        assert answer["y"] == pytest.approx(expected_output(X), rel=1e-6)
        seen.setdefault(answer["node"], set()).add(answer["pid"])
    return seen


def _app_status(name: str) -> str:
    app = serve.status().applications.get(name)
    return app.status if app else "MISSING"


@pytest.fixture(scope="module")
def serve_url(fleet):
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"


def test_serve_replicas_wait_for_warm_cache_then_replace_on_lost_artifact(fleet, serve_url):
    digest = fleet.digests["mc/onnx:v1"]
    fleet.ensure_daemon(1)
    app = OnnxModel.options(
        num_replicas=2, health_check_period_s=0.5, health_check_timeout_s=10,
        ray_actor_options=modelcast_options({"MODEL": "mc/onnx:v1"}, accelerator="cpu", num_cpus=1),
    ).bind()
    serve._run(app, name="onnx", route_prefix="/onnx", _blocking=False)
    # Cold: 24 MiB at 8 MiB/s per node; the replicas must not be ready before it is warm.
    cold_checks = 0

    def warm_on_both_nodes() -> bool:
        nonlocal cold_checks
        if all(fleet.artifact_dir(i, digest).exists() for i in range(2)):
            return True
        assert _app_status("onnx") != "RUNNING", "application RUNNING while a node's cache is still cold"
        cold_checks += 1
        return False

    wait_until(warm_on_both_nodes, 60, 0.1, "the artifact to become warm on both nodes")
    assert cold_checks >= 5, "the cache was warm before the replicas could be observed waiting"
    wait_until(lambda: _app_status("onnx") == "RUNNING", 90, 0.2, "the application to run")
    url = serve_url + "/onnx"
    before = _replicas_by_node(url)

    assert set(before) == {fleet.node_url(0), fleet.node_url(1)}, before

    # Lose the artifact on node 1: its replica's health check fails, Serve replaces it, and
    # the new replica starts only when the node has repaired the artifact.
    fleet.delete_artifact_files(1, digest)
    old_pid = next(iter(before[fleet.node_url(1)]))

    def replaced():
        try:
            seen = _replicas_by_node(url, tries=10)
        except (OSError, AssertionError):
            return None
        pids = seen.get(fleet.node_url(1), set())
        return seen if pids and old_pid not in pids else None

    after = wait_until(replaced, 90, 0.5, "node 1's replica to be replaced")
    assert set(after) == {fleet.node_url(0), fleet.node_url(1)}
    assert sorted(os.listdir(fleet.artifact_dir(1, digest))) == ["model.onnx", "weights.bin"]
    assert _app_status("onnx") == "RUNNING"
    serve.delete("onnx")


@serve.deployment
class Router:
    """Multiplexed: the model ID of each request is a reference resolved by the node cache."""

    get_model = model_loader(lambda path: __import__("onnxruntime").InferenceSession(
        str(path / "model.onnx"), providers=["CPUExecutionProvider"]), max_num_models_per_replica=2)

    async def __call__(self, request) -> dict:
        import numpy as np

        model = await self.get_model(multiplexed_model_id())
        y = model.run(["Y"], {"X": np.asarray([X], dtype=np.float32)})[0][0].tolist()
        return {"y": y}


def test_multiplexed_loader_resolves_model_ids_through_node_cache(fleet, serve_url):
    serve.run(Router.options(num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(), name="router",
              route_prefix="/router")
    req = urllib.request.Request(serve_url + "/router", data=b"{}",
                                 headers={"serve_multiplexed_model_id": "mc/multi-a:v1"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert json.load(resp)["y"] == pytest.approx(expected_output(X), rel=1e-6)
    digest = fleet.digests["mc/multi-a:v1"]
    assert any(fleet.artifact_dir(i, digest).exists() for i in range(2))
    serve.delete("router")


def test_prewarm_through_ray_on_every_node_then_by_url_and_zone(fleet):
    from serve_glue.prewarm import prewarm_ray

    fleet.ensure_daemon(1)
    digest = fleet.digests["mc/prewarm:v1"]
    results = prewarm_ray("mc/prewarm:v1")
    assert sorted(r.node for r in results) == sorted([fleet.node_url(0), fleet.node_url(1)])
    assert all(r.ok and r.digest == digest and r.seconds > 0 for r in results), results
    assert all(fleet.artifact_dir(i, digest).exists() for i in range(2))
    # By daemon URL, no Ray: --zone keeps only node 1; a warm artifact answers at once.
    out = run_cli("prewarm", "mc/prewarm:v1", "--nodes", f"{fleet.node_url(0)},{fleet.node_url(1)}",
                  "--zone", fleet.zone(1), "--pin", "rollout-7")
    assert out.returncode == 0, out.stderr
    [only] = json.loads(out.stdout.strip().splitlines()[-1])["nodes"]
    assert only["node"] == fleet.node_url(1) and only["ok"] and only["seconds"] < 2
    pins = json.load(urllib.request.urlopen(f"{fleet.node_url(1)}/v1/pins", timeout=5))["pins"]
    assert "rollout-7" in pins[digest]
    out = run_cli("prewarm", "mc/no-such:v1", "--nodes", fleet.node_url(0))
    assert out.returncode == 1 and "not found" in out.stdout
