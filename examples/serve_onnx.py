"""A Ray Serve deployment serving an ONNX model referenced by ``name:tag``.

Runs on the embedded default, on this machine: it starts a registry, two node daemons and
a two-node Ray cluster (``ray.cluster_utils.Cluster``) with the modelcast plugin on every
node, publishes the demo ONNX model as ``demo/onnx:v1``, deploys two replicas that need
it, and queries them over HTTP::

    python examples/serve_onnx.py

On a real cluster the deployment below is all you write; each host runs ``modelcast node``
and ``modelcast ray start -- --address HEAD:6379`` instead of the fleet set-up.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray import serve  # noqa: E402

from demo_model import expected_output, onnx_model_bytes  # noqa: E402
from harness.procs import free_port  # noqa: E402
from serve_glue import WarmArtifacts, modelcast_options  # noqa: E402
from serve_glue.testing import LocalFleet  # noqa: E402

REF = "demo/onnx:v1"


@serve.deployment(num_replicas=2, health_check_period_s=2,
                  ray_actor_options=modelcast_options({"MODEL": REF}, accelerator="cpu", num_cpus=1))
class OnnxModel:
    """Ready only once ``demo/onnx:v1`` is warm and verified on the replica's node."""

    async def __init__(self):
        import onnxruntime as ort

        self.artifacts = await WarmArtifacts.open()   # the paths the runtime_env plugin prepared
        self.session = ort.InferenceSession(str(self.artifacts.path("MODEL") / "model.onnx"),
                                            providers=["CPUExecutionProvider"])

    async def __call__(self, request) -> dict:
        import numpy as np

        x = (await request.json())["x"]
        y = self.session.run(["Y"], {"X": np.asarray([x], dtype=np.float32)})[0][0].tolist()
        return {"y": y, "node": os.environ["MODELCAST_NODE"], "model": self.artifacts.digest("MODEL")}

    async def check_health(self) -> None:
        await self.artifacts.check()  # a vanished or corrupt artifact: Serve replaces the replica


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="modelcast-serve-") as tmp:
        work = Path(tmp)
        fleet = LocalFleet(work, nodes=2, node_env={"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"})
        try:
            fleet.start_registry()
            model = work / "model"
            model.mkdir()
            (model / "model.onnx").write_bytes(onnx_model_bytes())
            (model / "weights.bin").write_bytes(os.urandom(8 << 20))
            digest = fleet.publish(model, REF)
            print(f"published {REF} -> {digest}")
            for i in range(fleet.n):
                fleet.start_daemon(i)
            fleet.start_ray()
            port = free_port()
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            started = time.monotonic()
            serve.run(OnnxModel.bind(), name="onnx", route_prefix="/")
            print(f"2 replicas ready in {time.monotonic() - started:.1f} s (artifact pulled on both nodes)")
            x = [1.0, 2.0, 3.0, 4.0]
            nodes = set()
            for _ in range(10):
                req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=json.dumps({"x": x}).encode())
                with urllib.request.urlopen(req, timeout=10) as resp:
                    answer = json.load(resp)
                nodes.add(answer["node"])
            print(f"Y = {answer['y']} (expected {expected_output(x)}), answered by nodes {sorted(nodes)}")
            ok = all(abs(a - b) < 1e-5 for a, b in zip(answer["y"], expected_output(x)))
            return 0 if ok else 1
        finally:
            fleet.stop()


if __name__ == "__main__":
    raise SystemExit(main())
