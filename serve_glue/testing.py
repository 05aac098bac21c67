"""A whole modelcast + Ray fleet on one machine, for tests, the example and the benchmark.

One registry/tracker, one node daemon per Ray node, and a ``ray.cluster_utils.Cluster``
whose nodes each carry the plugin registration, their daemon's URL and labels, exactly as
``modelcast ray start`` sets them on real hosts.  Real processes throughout, on loopback.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from harness import NodeProcess, TrackerProcess, free_port, modelcast_argv, start_node, start_tracker

from . import ray_api
from .config import ENV_NODE_URL, LABEL_ZONE, RAY_PLUGINS_ENV, RAY_URI_CACHE_ENV, plugin_env_value
from .placement import node_labels

TOKEN = "fleet-token"


class LocalFleet:
    """Registry + ``n`` node daemons + a Ray cluster of ``n`` nodes (zones ``z0``, ``z1`` …)."""

    def __init__(self, work: Path, nodes: int = 2, *, cpus_per_node: float = 1, download_limit: str | None = None,
                 node_env: dict[str, str] | None = None):
        self.work = Path(work)
        self.n = nodes
        self.cpus_per_node = cpus_per_node
        self.download_limit = download_limit
        self.node_env = node_env or {}
        self.registry: TrackerProcess | None = None
        self.registry_url = ""
        self.origin = (self.work / "origin").as_uri()
        self.api_ports = [free_port() for _ in range(nodes)]
        self.daemons: list[NodeProcess | None] = [None] * nodes
        self.cluster = None

    # ---- services -------------------------------------------------------------------------
    def node_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.api_ports[i]}"

    def cache_dir(self, i: int) -> Path:
        return self.work / f"node-{i}"

    def zone(self, i: int) -> str:
        return f"z{i}"

    def start_registry(self) -> str:
        self.registry = start_tracker(self.work, token=TOKEN)
        self.registry_url = self.registry.url
        return self.registry_url

    def publish(self, path: Path, ref: str) -> str:
        out = subprocess.run(modelcast_argv("publish", str(path), ref, "--registry", self.registry_url,
                                            "--origin", self.origin, "--token", TOKEN),
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"publish {ref} failed: {out.stderr.strip()}")
        return out.stdout.strip().splitlines()[-1]

    def start_daemon(self, i: int) -> NodeProcess:
        extra = ["--download-limit", self.download_limit] if self.download_limit else []
        self.daemons[i] = start_node(self.work, self.registry_url, f"node-{i}", cache=self.cache_dir(i),
                                     api_port=self.api_ports[i], zone=self.zone(i), token=TOKEN, extra=extra)
        return self.daemons[i]

    def ensure_daemon(self, i: int) -> NodeProcess:
        return self.daemons[i] or self.start_daemon(i)

    def ray_node_args(self, i: int) -> dict:
        env = {RAY_PLUGINS_ENV: plugin_env_value(), ENV_NODE_URL: self.node_url(i), RAY_URI_CACHE_ENV: "0",
               **self.node_env}
        return {"num_cpus": self.cpus_per_node, "env_vars": env,
                "labels": node_labels("cpu", self.zone(i))}

    def start_ray(self) -> None:
        self.cluster = ray_api.start_local_cluster([self.ray_node_args(i) for i in range(self.n)])

    def ray_node_id(self, i: int) -> str:
        from .spec import label_safe

        return ray_api.node_id_with_label(LABEL_ZONE, label_safe(self.zone(i)))

    def stop(self) -> None:
        if self.cluster is not None:
            ray_api.stop_local_cluster(self.cluster)
            self.cluster = None
        for svc in self.daemons:
            if svc is not None:
                svc.stop()
        if self.registry is not None:
            self.registry.stop()

    # ---- cache surgery (tests) ------------------------------------------------------------
    def artifact_dir(self, i: int, digest: str) -> Path:
        return self.cache_dir(i) / "artifacts" / "sha256" / digest.split(":", 1)[1]

    def delete_artifact_files(self, i: int, digest: str) -> None:
        """Delete every file of a complete artifact from node ``i``'s cache, as a careless
        operator would (the read-only modes are lifted first).

        The top directory stays: the node daemon repairs an artifact whose files are gone,
        but not yet one whose directory itself is gone (``Store.demote`` renames it).
        """
        root = self.artifact_dir(i, digest)
        for dirpath, _, _ in os.walk(root):
            os.chmod(dirpath, stat.S_IRWXU)
        for child in root.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
