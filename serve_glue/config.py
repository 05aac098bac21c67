"""Configuration of the Ray glue: every default and every environment variable it reads.

Environment variables are read only here, when a config is built (never at import time).
On a Ray node they come from the environment of the raylet, which its runtime-env agent
and its workers inherit: ``modelcast ray start`` (or ``Cluster.add_node(env_vars=...)``)
puts them there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from modelcast.config import DEFAULT_NODE, ENV_NODE, ENV_TOKEN, ca_from_args, env_float, env_str

# Where a node's daemon listens; set per Ray node (each host runs its own daemon).
ENV_NODE_URL = ENV_NODE
# JSON {KEY: {"ref", "digest", "path"}} that the plugin hands to the worker it prepared.
ENV_ARTIFACTS = "MODELCAST_ARTIFACTS"
# The runtime layer the plugin activated: JSON {"ref", "variant", "digest", "path"}.
ENV_RUNTIME = "MODELCAST_RUNTIME"
ENV_PULL_DEADLINE = "MODELCAST_RAY_PULL_DEADLINE_S"
ENV_VERIFY_EVERY = "MODELCAST_RAY_VERIFY_EVERY_S"

RAY_PLUGINS_ENV = "RAY_RUNTIME_ENV_PLUGINS"
PLUGIN_CLASS = "serve_glue.plugin.ModelcastPlugin"
# Ray keeps a URI cache per plugin (10 GB by default) and unpins (delete_uri) only when it
# overflows; 0 makes an artifact's pin go as soon as no worker on the node uses it.
RAY_URI_CACHE_ENV = "RAY_RUNTIME_ENV_MODELCAST_CACHE_SIZE_GB"

LABEL_PREFIX = "modelcast.io"
LABEL_ACCELERATOR = f"{LABEL_PREFIX}/accelerator"
LABEL_ZONE = f"{LABEL_PREFIX}/zone"


def plugin_env_value() -> str:
    """The value of RAY_RUNTIME_ENV_PLUGINS that registers the modelcast plugin."""
    return json.dumps([{"class": PLUGIN_CLASS}])


@dataclass(frozen=True)
class GlueConfig:
    """What the plugin and the Serve helpers need to reach and wait for their node's daemon."""

    node: str = DEFAULT_NODE
    token: str | None = None
    # How long create() keeps retrying transient failures (daemon down, registry down,
    # download errors) before giving up.  Below Ray's default setup timeout (600 s): a
    # failure we report is cached by Ray for 10 minutes, a timeout is retried by Ray.
    pull_deadline_s: float = 540.0
    # Backoff between attempts while the daemon is unreachable or a pull failed.
    retry_initial_s: float = 0.2
    retry_max_s: float = 5.0
    # How often a pull in progress is polled.
    poll_s: float = 0.1
    # Full re-hash through the daemon from check_health at most this often (0 = never;
    # the cheap stat check runs at every health check regardless).
    verify_every_s: float = 0.0
    # A CA trusted besides the system's roots, for a daemon that serves https (env MODELCAST_CA).
    ca: Path | None = None

    @classmethod
    def from_env(cls, node: str | None = None, ca: str | Path | None = None) -> "GlueConfig":
        return cls(
            node=(node or env_str(ENV_NODE_URL, DEFAULT_NODE)).rstrip("/"),
            token=env_str(ENV_TOKEN),
            ca=ca_from_args(ca),
            pull_deadline_s=env_float(ENV_PULL_DEADLINE, cls.pull_deadline_s),
            verify_every_s=env_float(ENV_VERIFY_EVERY, cls.verify_every_s),
        )


def handed_artifacts() -> dict[str, dict]:
    """The artifacts the runtime-env plugin prepared for this worker (empty without it)."""
    raw = env_str(ENV_ARTIFACTS)
    return json.loads(raw) if raw else {}


def handed_runtime() -> dict | None:
    raw = env_str(ENV_RUNTIME)
    return json.loads(raw) if raw else None
