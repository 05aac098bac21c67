"""``deploy(app)``: ``serve.run`` that never hangs on placement and says why a deploy failed.

Two things plain ``serve.run`` does not do:

* A replica whose hard label requirement no node meets stays pending forever (Serve logs
  "has taken more than 30s to be scheduled").  ``deploy`` checks every deployment's
  selectors against the live nodes' labels first and raises :class:`PlacementUnsatisfiable`
  naming the label and ``modelcast ray start``.
* When a replica cannot start (say the plugin's ``ArtifactNotFound: … not found in
  registry``), ``serve.run`` raises only "Failed to update the deployments ['Model']";
  the reason is in ``serve.status()``.  ``deploy`` raises :class:`DeployFailed` with it.
"""

from __future__ import annotations

from typing import Any

from modelcast.errors import ModelcastError

from . import ray_api
from .placement import PlacementUnsatisfiable, unmet_requirement


class DeployFailed(ModelcastError, RuntimeError):
    """Serve could not deploy an application; the message holds each deployment's reason."""

    code = "deploy_failed"
    http_status = 500


def check_placement(app: Any) -> None:
    """Raise :class:`PlacementUnsatisfiable` if a deployment of ``app`` fits no live node."""
    ray_api.connect_for_serve()
    nodes = [n["labels"] for n in ray_api.alive_nodes()]
    problems = [p for name, opts in ray_api.app_deployments(app)
                if (p := unmet_requirement(name, opts, nodes, ray_api.labels_match))]
    if problems:
        raise PlacementUnsatisfiable("; ".join(problems))


def deploy(app: Any, *, check: bool = True, **serve_run_kwargs: Any) -> Any:
    """``serve.run(app, **serve_run_kwargs)`` after :func:`check_placement`; returns its handle.

    Pass ``check=False`` on an autoscaling cluster that adds labelled nodes on demand.
    """
    if check:
        check_placement(app)
    name = serve_run_kwargs.get("name", "default")
    try:
        return ray_api.serve_run(app, **serve_run_kwargs)
    except RuntimeError as exc:
        reasons = ray_api.deployment_messages(name)
        if not reasons:
            raise
        detail = "; ".join(f"{dep}: {summary(msg)}" for dep, msg in sorted(reasons.items()))
        raise DeployFailed(f"{exc} {detail} (whole text: serve.status().applications[{name!r}]"
                           f".deployments[...].message)") from exc


def summary(message: str) -> str:
    """A deployment's status message in one line: its first line and, when it holds a
    traceback (a replica or the runtime_env plugin failed), the exception it ended with."""
    lines = [ln.rstrip() for ln in message.splitlines() if ln.strip()]
    if not lines:
        return message
    reason = next((ln for ln in reversed(lines) if not ln.startswith((" ", "\t", "Traceback", "[Node"))
                   and ln is not lines[0]), "")
    head = lines[0].removesuffix("Error:").rstrip()
    return f"{head} {reason}".strip() if reason else head
