"""Placement as pure data: node labels, and the ``ray_actor_options`` a deployment uses.

Nodes started by ``modelcast ray start`` carry labels (Kubernetes label syntax):

* ``modelcast.io/accelerator``: ``cpu``, ``cuda12``, ``cann8`` … (hard requirement),
* ``modelcast.io/zone``: the node daemon's zone,
* ``modelcast.io/has.<ref>`` = ``1`` for each artifact preloaded when the node started
  (``--preload REF``); see :func:`artifact_label`.

:func:`modelcast_options` asks for the accelerator with ``label_selector`` and prefers
nodes that hold the artifacts with ``fallback_strategy``: Ray first tries the selector with
the artifact labels, then falls back to the accelerator alone.  Ray ≥ 2.49 has both
options on actors and on Serve's ``ray_actor_options``.
"""

from __future__ import annotations

from .config import LABEL_ACCELERATOR, LABEL_PREFIX, LABEL_ZONE
from .spec import FIELD, label_safe, parse_env


def artifact_label(ref: str) -> str:
    """The node label that says "this node preloaded ``ref`` at start"."""
    return f"{LABEL_PREFIX}/has.{label_safe(ref)}"


def node_labels(accelerator: str, zone: str | None = None, preloaded: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    labels = {LABEL_ACCELERATOR: accelerator}
    if zone:
        labels[LABEL_ZONE] = label_safe(zone)
    labels.update({artifact_label(ref): "1" for ref in preloaded})
    return labels


def modelcast_options(artifacts: dict[str, str] | None = None, *, runtime: str | None = None,
                      accelerator: str | None = None, prefer_holders: bool = True, **ray_options) -> dict:
    """``ray_actor_options`` for a deployment that uses ``artifacts`` (KEY -> reference).

    Adds the runtime_env plugin's field, a hard ``label_selector`` on the accelerator (if
    given) and, with ``prefer_holders``, a soft preference for nodes that preloaded the
    artifacts.  Extra keyword arguments (``num_cpus``, ``runtime_env`` …) are merged in.
    """
    field = {"artifacts": dict(artifacts or {})}
    if runtime:
        field["runtime"] = runtime
    parse_env(field)  # fail at declaration time, not on the node
    opts = dict(ray_options)
    runtime_env = dict(opts.pop("runtime_env", None) or {})
    runtime_env[FIELD] = field
    opts["runtime_env"] = runtime_env
    hard = dict(opts.pop("label_selector", None) or {})
    if accelerator:
        hard[LABEL_ACCELERATOR] = accelerator
    preferred = {artifact_label(ref): "1" for ref in (artifacts or {}).values()} if prefer_holders else {}
    if preferred:
        opts["label_selector"] = {**hard, **preferred}
        opts["fallback_strategy"] = [{"label_selector": hard}]
    elif hard:
        opts["label_selector"] = hard
    return opts
