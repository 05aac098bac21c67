"""``modelcast ray start``: start a Ray node wired to this host's node daemon.

It sets, in the environment ``ray start`` hands to the raylet (and so to the runtime-env
agent and every worker), the plugin registration and the daemon's URL; it labels the node
with its accelerator, its zone and the artifacts it preloaded; then it execs ``ray start``.
The documented equivalent by hand::

    export RAY_RUNTIME_ENV_PLUGINS='[{"class": "serve_glue.plugin.ModelcastPlugin"}]'
    export MODELCAST_NODE=http://127.0.0.1:7071 RAY_RUNTIME_ENV_MODELCAST_CACHE_SIZE_GB=0
    ray start --address HEAD:6379 --labels modelcast.io/accelerator=cpu,modelcast.io/zone=rack-a
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from modelcast.config import ENV_CA
from modelcast.errors import ModelcastError

from .config import ENV_NODE_URL, RAY_PLUGINS_ENV, RAY_URI_CACHE_ENV, GlueConfig, plugin_env_value
from .node import NodeCache
from .placement import node_labels


def detect_accelerator() -> str:
    """``cuda`` with an NVIDIA device, ``cann`` with an Ascend one, else ``cpu``.

    A coarse, dependency-free probe; pass ``--accelerator`` (e.g. ``cuda12``) to be exact.
    """
    if glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi") and glob.glob("/dev/nvidiactl"):
        return "cuda"
    if glob.glob("/dev/davinci[0-9]*"):
        return "cann"
    return "cpu"


@dataclass(frozen=True)
class RayStartPlan:
    """What ``modelcast ray start`` will run: argv and the environment additions."""

    argv: list[str]
    env: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)


def plan(node_url: str, ray_args: list[str], *, accelerator: str, zone: str | None,
         preloaded: list[str], ca: Path | None = None) -> RayStartPlan:
    labels = node_labels(accelerator, zone, preloaded)
    beside = os.path.join(os.path.dirname(sys.executable), "ray")  # the ray of this interpreter's env
    argv = [beside if os.path.exists(beside) else "ray", "start", *ray_args, "--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
    env = {RAY_PLUGINS_ENV: plugin_env_value(), ENV_NODE_URL: node_url, RAY_URI_CACHE_ENV: "0",
           # The plugin and the workers reach an https daemon with the same CA.
           **({ENV_CA: str(Path(ca).resolve())} if ca else {})}
    return RayStartPlan(argv, env, labels)


async def preload(cfg: GlueConfig, refs: list[str]) -> dict:
    """Warm and pin ``refs`` on this node before it joins; returns its health (for the zone)."""
    async with NodeCache(cfg) as node:
        try:
            health = await node.health()
        except ModelcastError:
            if refs:
                raise
            # The plugin waits for a daemon that starts later; only preloading needs it now.
            return {}
        await asyncio.gather(*(node.ensure_warm(ref, pin="ray-preload") for ref in refs))
        return health


def start(node_url: str | None, ray_args: list[str], *, accelerator: str | None = None, zone: str | None = None,
          preloaded: list[str] = (), dry_run: bool = False, ca: Path | None = None) -> RayStartPlan:
    cfg = GlueConfig.from_env(node_url, ca=ca)
    health = asyncio.run(preload(cfg, list(preloaded)))
    the_plan = plan(cfg.node, ray_args, accelerator=accelerator or detect_accelerator(),
                    zone=zone or health.get("zone"), preloaded=list(preloaded), ca=cfg.ca)
    if not dry_run:
        os.execvpe(the_plan.argv[0], the_plan.argv, {**os.environ, **the_plan.env})
    return the_plan
