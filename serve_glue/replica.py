"""Serve helpers: replicas that are ready only when their artifacts are warm, health
checks that notice a vanished artifact, and ``serve.multiplexed`` loaders by model ID.

A deployment names its artifacts by ID, either through the runtime_env plugin (the
worker does not even start until they are warm)::

    @serve.deployment(ray_actor_options=modelcast_options({"MODEL": "demo/onnx:v1"}))
    class Model:
        async def __init__(self):
            self.artifacts = await WarmArtifacts.open()        # what the plugin handed over
            self.session = ort.InferenceSession(str(self.artifacts.path("MODEL") / "model.onnx"))

        async def check_health(self):
            await self.artifacts.check()

or without the plugin, with ``await WarmArtifacts.open({"MODEL": "demo/onnx:v1"})``: Serve
does not mark a replica ready before its async ``__init__`` returns, so the replica waits
for the pull either way.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from pathlib import Path
from typing import Any, Callable

from modelcast.errors import ModelcastError

from . import ray_api
from .config import GlueConfig, handed_artifacts
from .node import NodeCache, Warm


class ArtifactUnhealthy(ModelcastError, RuntimeError):
    """An artifact a replica uses went missing, changed, or failed verification."""

    code = "artifact_unhealthy"
    http_status = 503


def _snapshot(root: str) -> dict[str, int]:
    """Relative path -> size of every file under ``root``: what check() compares against."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = os.stat(full).st_size
    return out


def _missing(root: str, files: dict[str, int]) -> str | None:
    for rel, size in files.items():
        try:
            actual = os.stat(os.path.join(root, rel)).st_size
        except OSError:
            return f"{rel} is missing from {root}"
        if actual != size:
            return f"{rel} in {root} has {actual} bytes, was {size}"
    return None


class WarmArtifacts:
    """The artifacts one replica uses, warm in this node's cache."""

    def __init__(self, node: NodeCache, warm: dict[str, Warm], files: dict[str, dict[str, int]]):
        self.node = node
        self.warm = warm
        self._files = files
        self._last_verify = time.monotonic()

    @classmethod
    async def open(cls, artifacts: dict[str, str] | None = None, *, node: str | None = None,
                   cfg: GlueConfig | None = None) -> "WarmArtifacts":
        """Wait until every artifact is warm and verified on this node.

        ``artifacts`` maps keys to references; by default, those the runtime_env plugin
        prepared for this worker (by digest, so a tag moved since changes nothing).
        """
        cfg = cfg or GlueConfig.from_env(node)
        if artifacts is None:
            handed = handed_artifacts()
            if not handed:
                raise ArtifactUnhealthy("WarmArtifacts.open() got no artifacts and the worker has none from the "
                                        "runtime_env plugin; pass {KEY: ref} or set runtime_env={'modelcast': ...}")
            artifacts = {k: v["digest"] for k, v in handed.items()}
        node_cache = NodeCache(cfg)
        try:
            warm = dict(zip(artifacts, await asyncio.gather(*(node_cache.ensure_warm(ref)
                                                              for ref in artifacts.values()))))
            files = {k: await asyncio.to_thread(_snapshot, w.path) for k, w in warm.items()}
        except BaseException:
            await node_cache.close()
            raise
        return cls(node_cache, warm, files)

    def path(self, key: str) -> Path:
        return Path(self.warm[key].path)

    def digest(self, key: str) -> str:
        return self.warm[key].digest

    async def check(self) -> None:
        """For ``check_health``: raise ArtifactUnhealthy if an artifact vanished or fails.

        Each call stats every file (cheap) and asks the daemon whether the artifact is
        still ready; every ``verify_every_s`` it also asks for a full re-hash.  On a problem
        it asks the daemon to verify, which starts a repair, and raises: Serve then replaces
        this replica, and the new one waits in ``open()`` until the artifact is warm again.
        """
        verify_now = bool(self.node.cfg.verify_every_s) and \
            time.monotonic() - self._last_verify >= self.node.cfg.verify_every_s
        for key, w in self.warm.items():
            problem = await asyncio.to_thread(_missing, w.path, self._files[key])
            if problem is None:
                try:
                    state = (await self.node.status(w.digest))["state"]
                    if state != "ready":
                        problem = f"the node reports it {state}"
                except ModelcastError as exc:
                    problem = f"the node cannot account for it: {exc}"
            if problem is None and verify_now:
                answer = await self.node.verify(w.digest)
                if answer.get("ok") is False:
                    problem = f"verification failed: {answer.get('problem')}"
                self._last_verify = time.monotonic()
            elif problem is not None:
                try:
                    await self.node.verify(w.digest)  # starts the repair
                except ModelcastError:
                    pass
            if problem is not None:
                raise ArtifactUnhealthy(f"artifact {key} ({w.ref}, {w.digest}) is unhealthy on node "
                                        f"{self.node.cfg.node}: {problem}; the node is repairing it")

    async def close(self) -> None:
        await self.node.close()


def model_loader(load: Callable[[Path], Any], *, max_num_models_per_replica: int = 3,
                 name: str = "get_model", cfg: GlueConfig | None = None) -> Callable:
    """A ``serve.multiplexed`` method that resolves a model ID through the node cache.

    ``load(path)`` (sync or async) turns the artifact's local directory into a model.
    Assign it in the class under ``name``::

        class Router:
            get_model = model_loader(lambda p: ort.InferenceSession(str(p / "model.onnx")))

            async def __call__(self, request):
                model = await self.get_model(serve.get_multiplexed_model_id())

    A model ID is any reference (``name:tag``, ``name@sha256:…``); the first request for it
    on a node pulls it through the swarm, later ones find it warm.
    """

    async def get_model(self, model_id: str):
        async with NodeCache(cfg or GlueConfig.from_env()) as node:
            warm = await node.ensure_warm(model_id)
        if inspect.iscoroutinefunction(load):
            return await load(Path(warm.path))
        return await asyncio.to_thread(load, Path(warm.path))

    get_model.__name__ = get_model.__qualname__ = name
    return ray_api.multiplexed(get_model, max_num_models_per_replica)


def multiplexed_model_id() -> str:
    """The model ID of the request being served (``serve.get_multiplexed_model_id``)."""
    return ray_api.multiplexed_model_id()
