"""Serve placement on a Ray cluster that ``modelcast ray start`` did not label.

A local ``ray.init()`` with the plugin's variables set (the ``plain_ray`` fixture of
tests/conftest.py): preferences must not keep a deployment pending, a requirement no node
meets must fail at deploy time naming the label, and the plugin's reason for a failed
replica must reach the exception ``deploy`` raises.
"""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402

from serve_glue import DeployFailed, PlacementUnsatisfiable, deploy, modelcast_options  # noqa: E402
from serve_glue.config import LABEL_ACCELERATOR, LABEL_PREFIX  # noqa: E402

from .helpers import wait_until  # noqa: E402


@serve.deployment
class Files:
    """Lists the artifact the plugin handed over."""

    def __call__(self) -> dict:
        path = os.environ["MODELCAST_MODEL_PATH"]
        return {"digest": os.environ["MODELCAST_MODEL_DIGEST"], "files": sorted(os.listdir(path))}


def _app_status(name: str) -> str:
    app = serve.status().applications.get(name)
    return app.status if app else "MISSING"


def test_preferences_on_unlabelled_nodes_still_run_the_deployment(plain_ray):
    assert not [k for n in ray.nodes() for k in n["Labels"] if k.startswith(LABEL_PREFIX)], "nodes carry modelcast labels"
    opts = modelcast_options({"MODEL": plain_ray.model_ref}, accelerator="cpu", zone="rack-a", num_cpus=0.5)
    assert opts["label_selector"][LABEL_ACCELERATOR] == "cpu"  # asked for, but not required
    assert opts["fallback_strategy"][-1] == {"label_selector": {}}
    started = time.monotonic()
    # Plain serve.run: nothing of ours between Serve and Ray's scheduler.
    handle = serve._run(Files.options(ray_actor_options=opts).bind(), name="soft", route_prefix=None,
                        _blocking=False)
    wait_until(lambda: _app_status("soft") == "RUNNING", 60, 0.2, "the application to run on an unlabelled node")
    print(f"ready in {time.monotonic() - started:.1f} s")
    answer = handle.remote().result(timeout_s=30)
    assert answer == {"digest": plain_ray.model_digest, "files": ["config.json", "weights.bin"]}
    serve.delete("soft")


def test_a_requirement_no_node_meets_fails_at_deploy_time_naming_the_label(plain_ray):
    app = Files.options(ray_actor_options=modelcast_options(
        {"MODEL": plain_ray.model_ref}, accelerator="cuda12", require_accelerator=True, num_cpus=0.5)).bind()
    started = time.monotonic()
    with pytest.raises(PlacementUnsatisfiable) as info:
        deploy(app, name="hard", route_prefix=None)
    assert time.monotonic() - started < 30
    message = str(info.value)
    print(message)
    assert f"{LABEL_ACCELERATOR}=cuda12" in message and "modelcast ray start --accelerator cuda12" in message
    assert "'Files'" in message and "no modelcast labels" in message
    assert _app_status("hard") == "MISSING"  # nothing left pending


def test_the_plugins_reason_reaches_the_deploy_exception(plain_ray):
    app = Files.options(ray_actor_options=modelcast_options({"MODEL": "plain/missing:v1"}, accelerator="cpu",
                                                            num_cpus=0.5)).bind()
    started = time.monotonic()
    with pytest.raises(DeployFailed) as info:
        deploy(app, name="missing", route_prefix=None)
    message = str(info.value)
    print(f"failed after {time.monotonic() - started:.1f} s: {message}")
    assert "\n" not in message and "Failed to update the deployments" in message
    assert "ArtifactNotFound" in message and "plain/missing:v1 not found in registry" in message
    serve.delete("missing")
