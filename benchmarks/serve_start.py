"""Replica start time with modelcast: cold cache, warm cache, and a plain local path.

One Ray node with its node daemon (the embedded default, ``serve_glue.testing.LocalFleet``).
The same ONNX deployment is started (one replica, time from deploy to RUNNING):

* ``cold``: its artifact referenced by ``name:tag``, never pulled on this node: the runtime_env
  plugin pulls it through the swarm before the worker starts;
* ``warm``: the same again once the cache holds it (plugin create + WarmArtifacts.open);
* ``local_path``: the deployment loads the same files from a local directory, no glue.

Warm and local runs alternate, ``--rounds`` times each; medians are reported.
JSON last line: ``cold_start_s``, ``warm_start_s``, ``local_path_start_s``, ``warm_overhead_s``.
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
    async def __init__(self, local_path: str | None = None):
        import onnxruntime as ort

        if local_path is None:
            self.artifacts = await WarmArtifacts.open()
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
            glue = Model.options(ray_actor_options=modelcast_options({"MODEL": REF}, num_cpus=1))
            local = Model.options(ray_actor_options={"num_cpus": 1})
            # Worker processes and imports warm up once, off the clock, with no artifact.
            timed_start(local.bind(str(model)), "warmup")
            cold = timed_start(glue.bind(), "cold")
            print(f"cold start ({args.size} MiB pulled): {cold:.2f} s")
            warm, plain = [], []
            for i in range(args.rounds):
                warm.append(timed_start(glue.bind(), f"warm{i}"))
                plain.append(timed_start(local.bind(str(model)), f"local{i}"))
                print(f"round {i + 1}: warm {warm[-1]:.2f} s, local path {plain[-1]:.2f} s")
        finally:
            fleet.stop()
    warm_s, local_s = statistics.median(warm), statistics.median(plain)
    print(json.dumps({"cold_start_s": round(cold, 3), "warm_start_s": round(warm_s, 3),
                      "local_path_start_s": round(local_s, 3), "warm_overhead_s": round(warm_s - local_s, 3),
                      "size_mib": args.size, "rounds": args.rounds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
