"""Every call into Ray made by serve_glue lives here (one wrapper per foreign engine).

The rest of serve_glue talks to these few functions; a Ray upgrade that moves an API
touches only this file.  Ray is imported lazily so that the pure parts of serve_glue
(spec, placement, config) import without Ray installed.
"""

from __future__ import annotations

from typing import Any, Callable


def plugin_base() -> type:
    """Ray's ``RuntimeEnvPlugin`` base class (a DeveloperAPI in Ray 2.x)."""
    from ray._private.runtime_env.plugin import RuntimeEnvPlugin

    return RuntimeEnvPlugin


def multiplexed(func: Callable, max_num_models_per_replica: int) -> Callable:
    from ray import serve

    return serve.multiplexed(max_num_models_per_replica=max_num_models_per_replica)(func)


def multiplexed_model_id() -> str:
    from ray import serve

    return serve.get_multiplexed_model_id()


def current_node_id() -> str | None:
    import ray

    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def alive_nodes() -> list[dict]:
    """``[{"node_id", "labels", "address"}]`` for every live node of the connected cluster."""
    import ray

    return [{"node_id": n["NodeID"], "labels": dict(n.get("Labels") or {}), "address": n.get("NodeManagerAddress")}
            for n in ray.nodes() if n.get("Alive")]


def ensure_connected(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "auto", include_dashboard=False, log_to_driver=False)


def run_on_each_node(func: Callable[..., Any], node_ids: list[str], *args: Any, timeout_s: float | None = None) -> list:
    """Run ``func(*args)`` once on each node (0 CPU, pinned to it); results in node order."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(func)
    refs = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(*args)
            for node_id in node_ids]
    return ray.get(refs, timeout=timeout_s)


def start_local_cluster(nodes: list[dict]) -> Any:
    """A ``ray.cluster_utils.Cluster`` on this machine, one Ray node per entry of ``nodes``.

    Each entry holds ``add_node`` arguments (``num_cpus``, ``env_vars`` for the raylet and
    what it starts, ``labels``).  The first one is the head.  The driver connects to it.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, **nodes[0]})
    for spec in nodes[1:]:
        cluster.add_node(**spec)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    return cluster


def stop_local_cluster(cluster: Any) -> None:
    import ray

    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # Serve may never have started
        pass
    ray.shutdown()
    cluster.shutdown()


def labels_match(labels: dict[str, str], selector: dict[str, str]) -> bool:
    """Ray's own label-selector test (``"v"``, ``"!v"``, ``"in(a,b)"``, ``"!in(a,b)"``)."""
    from ray._raylet import node_labels_match_selector

    return bool(node_labels_match_selector(dict(labels), dict(selector)))


def connect_for_serve() -> None:
    """Connect the way ``serve.run`` does when nothing is connected yet."""
    import ray

    if not ray.is_initialized():
        from ray.serve._private.constants import SERVE_NAMESPACE

        ray.init(namespace=SERVE_NAMESPACE)


def app_deployments(app: Any) -> list[tuple[str, dict]]:
    """``[(deployment name, ray_actor_options)]`` of every deployment a bound app holds."""
    from ray.serve._private.build_app import build_app

    built = build_app(app, name="modelcast-check")
    return [(d.name, dict(d.ray_actor_options or {})) for d in built.deployments]


def serve_run(app: Any, **kwargs: Any) -> Any:
    from ray import serve

    return serve.run(app, **kwargs)


def deployment_messages(app_name: str) -> dict[str, str]:
    """``{deployment: "STATUS: message"}`` of an application, as ``serve.status()`` has them."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: f"{getattr(d.status, 'value', d.status)}: {d.message}".rstrip(": ")
            for name, d in app.deployments.items()}


def node_id_with_label(key: str, value: str) -> str:
    for node in alive_nodes():
        if node["labels"].get(key) == value:
            return node["node_id"]
    raise LookupError(f"no live Ray node has label {key}={value}")
