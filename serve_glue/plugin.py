"""The ``modelcast`` runtime_env plugin: artifacts warm and pinned before a worker starts.

Register it on every Ray node (the raylet's environment, inherited by its runtime-env
agent)::

    RAY_RUNTIME_ENV_PLUGINS='[{"class": "serve_glue.plugin.ModelcastPlugin"}]'
    MODELCAST_NODE=http://127.0.0.1:7071      # this host's node daemon

``modelcast ray start`` sets both (``--dry-run`` prints them).  With a local ``ray.init()``
they must be in the environment of the process that calls it, before the call: the raylet
it starts passes them on.  Then::

    runtime_env={"modelcast": {"artifacts": {"MODEL": "resnet:v3"}, "runtime": "ort:1.31"}}

gives the worker ``MODELCAST_MODEL_PATH`` / ``MODELCAST_MODEL_DIGEST`` (one pair per key),
``HF_HUB_CACHE`` where ``"hf": {"MODEL": "org/name"}`` laid an artifact out for Hugging Face
(the runtime_env's own ``env_vars`` ``HF_HUB_CACHE`` if set, else the daemon's),
``MODELCAST_ARTIFACTS`` (JSON of them all), ``MODELCAST_NODE``, and, with ``runtime``, the
layer's activation environment (``PYTHONPATH``, ``LD_LIBRARY_PATH``, …) plus
``MODELCAST_RUNTIME_PATH`` and ``MODELCAST_RUNTIME``.

How it meets Ray's contract (ray._private.runtime_env.agent):

* ``create()`` runs once per URI (one per artifact, one for the runtime) under Ray's
  ``asyncio.wait_for(setup_timeout_seconds)``; Ray cancels it on timeout and tries three
  times.  Every step is idempotent (pull joins the daemon's download, pin is a set), so a
  cancelled attempt loses nothing but the wait.
* A failure we raise is cached by Ray for 10 minutes for that runtime_env, so transient
  failures (daemon not up yet, registry down, a failed download) are retried *here* until
  ``MODELCAST_RAY_PULL_DEADLINE_S`` (540 s, below Ray's 600 s default timeout); permanent
  ones (unknown reference, bad token, quota) fail at once with the daemon's message.
* What we raise reaches Serve as the deployment's status message (``serve.status()``) and
  the runtime-env agent's log; ``serve.run`` itself says only "Failed to update the
  deployments", :func:`serve_glue.deploy` puts our exception's line in its own.
* ``get_uris()`` never raises (Ray calls it for reference counting outside any guard).
* ``delete_uri()`` unpins; Ray calls it when its URI cache for this plugin overflows
  (``RAY_RUNTIME_ENV_MODELCAST_CACHE_SIZE_GB``; ``modelcast ray start`` sets 0, so a pin
  goes as soon as no worker on the node uses the artifact).  It never raises.

A ``name:tag`` reference is resolved when its URI is first created on a node; use
``name@sha256:…`` for rollouts that must not follow a moving tag.
"""

from __future__ import annotations

import json
import logging

from modelcast.config import ENV_HF_HUB_CACHE

from . import ray_api
from .config import ENV_ARTIFACTS, ENV_NODE_URL, ENV_RUNTIME, GlueConfig
from .node import NodeCache, Warm, run_sync
from .spec import ARTIFACT_SCHEME, FIELD, RUNTIME_SCHEME, EnvSpec, activation_env, holder_for, parse_env

log = logging.getLogger(__name__)


def _hf_cache(runtime_env) -> str | None:
    """The hub cache the runtime_env's own ``env_vars`` name (None: the node daemon's)."""
    return (runtime_env.get("env_vars") or {}).get(ENV_HF_HUB_CACHE) or None


class ModelcastPlugin(ray_api.plugin_base()):
    """Ray runtime_env plugin for the ``modelcast`` field (see the module docstring)."""

    name = FIELD
    # Before other plugins (default 10): a runtime layer's PYTHONPATH must be in place
    # before e.g. a pip plugin resolves imports.
    priority = 5

    def __init__(self) -> None:
        self._cfg: GlueConfig | None = None
        self._warm: dict[str, Warm] = {}        # artifact URI -> what create() made warm
        self._runtimes: dict[str, dict] = {}    # runtime URI -> activation answer

    @property
    def cfg(self) -> GlueConfig:
        if self._cfg is None:
            self._cfg = GlueConfig.from_env()
        return self._cfg

    @staticmethod
    def validate(runtime_env_dict: dict) -> None:
        parse_env(runtime_env_dict.get(FIELD))

    def get_uris(self, runtime_env) -> list[str]:
        try:
            return parse_env(runtime_env.get(FIELD)).uris
        except Exception:  # Ray calls this outside any guard; validate() reports the problem
            return []

    async def create(self, uri, runtime_env, context, logger: logging.Logger = log) -> float:
        spec = parse_env(runtime_env.get(FIELD))
        uris = [uri] if uri else spec.uris
        size = 0
        async with NodeCache(self.cfg, logger) as node:
            for u in uris:
                size += await self._create_one(node, spec, u, logger, _hf_cache(runtime_env))
        return float(size)

    async def _create_one(self, node: NodeCache, spec: EnvSpec, uri: str, logger: logging.Logger,
                          hf_cache: str | None = None) -> int:
        if uri.startswith(RUNTIME_SCHEME):
            ref = uri[len(RUNTIME_SCHEME):]
            answer = await node.activate_runtime(ref)
            self._runtimes[uri] = answer
            logger.info("modelcast: runtime %s active: variant %s at %s", ref, answer.get("variant"),
                        answer.get("path"))
            return 0
        art = spec.artifact_for(uri)
        if art is None:
            raise ValueError(f"modelcast: URI {uri!r} is not part of this runtime_env ({spec.uris})")
        hf = {"repo": art.hf, "cache": hf_cache} if art.hf is not None else None
        warm = await node.ensure_warm(art.ref, pin=art.holder, hf=hf)
        self._warm[uri] = warm
        logger.info("modelcast: %s (%s) warm at %s after %.2f s", art.ref, warm.digest, warm.path, warm.seconds)
        return warm.total_bytes

    def modify_context(self, uris, runtime_env, context, logger: logging.Logger = log) -> None:
        spec = parse_env(runtime_env.get(FIELD))
        env = context.env_vars
        env[ENV_NODE_URL] = self.cfg.node
        handed = {}
        for art in spec.artifacts:
            warm = self._warm.get(art.uri) or self._recreate(art.uri, spec, logger, _hf_cache(runtime_env))
            env[art.path_var] = warm.path
            env[art.digest_var] = warm.digest
            handed[art.key] = warm.to_json()
            if warm.hf:
                env[ENV_HF_HUB_CACHE] = warm.hf["cache"]  # where huggingface_hub in the worker looks
        env[ENV_ARTIFACTS] = json.dumps(handed, sort_keys=True)
        if spec.runtime:
            uri = RUNTIME_SCHEME + spec.runtime
            answer = self._runtimes.get(uri)
            if answer is None:
                self._recreate(uri, spec, logger, _hf_cache(runtime_env))
                answer = self._runtimes[uri]
            env.update(activation_env(dict(answer.get("env") or {}), env))
            env["MODELCAST_RUNTIME_PATH"] = str(answer.get("path") or "")
            env[ENV_RUNTIME] = json.dumps({"ref": spec.runtime, **{k: answer.get(k) for k in
                                                                    ("variant", "digest", "path")}}, sort_keys=True)

    def _recreate(self, uri: str, spec: EnvSpec, logger: logging.Logger, hf_cache: str | None = None) -> Warm | None:
        # Ray found the URI in its cache but this process has no record of it (it cannot
        # normally happen: the cache lives in this process).  Ask the daemon again; when
        # warm this is one local HTTP round trip.
        async def again():
            async with NodeCache(self.cfg, logger) as node:
                await self._create_one(node, spec, uri, logger, hf_cache)

        run_sync(again, timeout_s=60)
        return self._warm.get(uri)

    def delete_uri(self, uri: str, logger: logging.Logger = log) -> float:
        try:
            if uri.startswith(RUNTIME_SCHEME):
                self._runtimes.pop(uri, None)
                return 0.0
            warm = self._warm.pop(uri, None)
            if warm is None or not uri.startswith(ARTIFACT_SCHEME):
                return 0.0
            holder = holder_for(uri[len(ARTIFACT_SCHEME):])

            async def unpin():
                async with NodeCache(self.cfg, logger) as node:
                    await node.unpin(warm.digest, holder)

            run_sync(unpin, timeout_s=10)
            logger.info("modelcast: unpinned %s (%s)", warm.ref, warm.digest)
            return float(warm.total_bytes)
        except Exception as exc:  # Ray's URI cache must stay consistent: never raise here
            logger.warning("modelcast: could not unpin %s: %s", uri, exc)
            return 0.0
