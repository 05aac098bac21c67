"""Replica start time with modelcast: cold cache, warm cache, and a plain local path.

One Ray node with its node daemon (the embedded default, ``serve_glue.testing.LocalFleet``).
The same ONNX deployment is started (one replica, time from deploy to RUNNING):

* ``cold``: its artifact referenced by ``name:tag``, never pulled on this node: the runtime_env
  plugin pulls it through the swarm before the worker starts;
* ``warm``: the same again once the cache holds it, declared in the replica's async
  ``__init__`` (``WarmArtifacts.open({"MODEL": ref})``: pull through the daemon, stat);
* ``warm_plugin``: the same through the runtime_env plugin; Ray then starts a dedicated
  worker process for that runtime_env instead of reusing a prestarted default one, which
  costs about half a second here (the plugin's own create() takes ~10 ms, see the
  runtime_env_setup log);
* ``local_path``: the deployment loads the same files from a local directory, no glue.

The variants alternate, ``--rounds`` times each; medians are reported.  JSON last line:
``cold_start_s``, ``warm_start_s``, ``local_path_start_s``, ``warm_overhead_s`` (= warm −
local path), plus ``warm_plugin_start_s`` and ``warm_plugin_overhead_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from ray import serve  # noqa: E402

from demo_model import onnx_model_bytes  # noqa: E402
from serve_glue import WarmArtifacts, modelcast_options  # noqa: E402
from serve_glue.testing import LocalFleet  # noqa: E402

REF = "bench/onnx:v1"


@serve.deployment(num_replicas=1)
class Model:
    async def __init__(self, local_path: str | None = None, artifacts: dict | None = None):
        import onnxruntime as ort

        if local_path is None:
            self.artifacts = await WarmArtifacts.open(artifacts)  # None: what the plugin handed over
            root = self.artifacts.path("MODEL")
        else:
            root = Path(local_path)
        self.session = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])

    async def __call__(self, request) -> str:
        return "ok"


def timed_start(app, name: str) -> float:
    started = time.monotonic()
    serve._run(app, name=name, route_prefix=f"/{name}", _blocking=False)
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            elapsed = time.monotonic() - started
            break
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"{name}: {status.status}: {status.message}")
        time.sleep(0.02)
    serve.delete(name)
    time.sleep(0.5)  # let the old replica's worker exit before the next start is timed
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="weights size in MiB (default 256)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelcast-bench-serve-") as tmp:
        work = Path(tmp)
        model = work / "model"
        model.mkdir()
        (model / "model.onnx").write_bytes(onnx_model_bytes())
        with open(model / "weights.bin", "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1 << 20))
        fleet = LocalFleet(work, nodes=1, cpus_per_node=1)
        try:
            fleet.start_registry()
            fleet.publish(model, REF)
            fleet.start_daemon(0)
            fleet.start_ray()
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": 0})
            plugin = Model.options(ray_actor_options=modelcast_options({"MODEL": REF}, num_cpus=1))
            local = Model.options(ray_actor_options={"num_cpus": 1})
            # Worker processes and imports warm up once, off the clock, with no artifact.
            timed_start(local.bind(str(model)), "warmup")
            cold = timed_start(plugin.bind(), "cold")
            print(f"cold start ({args.size} MiB pulled): {cold:.2f} s")
            warm, warm_plugin, plain = [], [], []
            for i in range(args.rounds):
                warm.append(timed_start(local.bind(None, {"MODEL": REF}), f"warm{i}"))
                warm_plugin.append(timed_start(plugin.bind(), f"plugin{i}"))
                plain.append(timed_start(local.bind(str(model)), f"local{i}"))
                print(f"round {i + 1}: warm {warm[-1]:.2f} s, warm through the plugin {warm_plugin[-1]:.2f} s, "
                      f"local path {plain[-1]:.2f} s")
        finally:
            fleet.stop()
    warm_s, local_s = statistics.median(warm), statistics.median(plain)
    plugin_s = statistics.median(warm_plugin)
    print(json.dumps({"cold_start_s": round(cold, 3), "warm_start_s": round(warm_s, 3),
                      "local_path_start_s": round(local_s, 3), "warm_overhead_s": round(warm_s - local_s, 3),
                      "warm_plugin_start_s": round(plugin_s, 3), "warm_plugin_overhead_s": round(plugin_s - local_s, 3),
                      "size_mib": args.size, "rounds": args.rounds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
