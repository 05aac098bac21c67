"""Placement as pure data: node labels, the ``ray_actor_options`` a deployment uses, and
the check that a deployment's hard requirements can be met by some node.

Nodes started by ``modelcast ray start`` carry labels (Kubernetes label syntax):

* ``modelcast.io/accelerator``: ``cpu``, ``cuda12``, ``cann8`` …,
* ``modelcast.io/zone``: the node daemon's zone,
* ``modelcast.io/has.<ref>`` = ``1`` for each artifact preloaded when the node started
  (``--preload REF``); see :func:`artifact_label`.

:func:`modelcast_options` turns an accelerator, a zone and the artifacts into *preferences*
by default: ``label_selector`` asks for all of them and ``fallback_strategy`` relaxes them
one by one (preloaded artifacts first, then the zone, then the accelerator) down to what
is required, which is nothing unless asked (``require_accelerator``, ``require_zone``,
``hard``), so the last fallback admits any node.  A cluster started with a plain
``ray start`` / ``ray.init()`` (no modelcast labels) runs the deployment anyway.  Ray
falls back when no node that matches is free, as well as when none exists.

A hard requirement that no node meets leaves a Ray actor pending forever;
:func:`unmet_requirement` names it (``serve_glue.deploy`` checks it before ``serve.run``).
Ray ≥ 2.49 has ``label_selector`` and ``fallback_strategy`` on actors and on Serve's
``ray_actor_options``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from modelcast.errors import ModelcastError

from .config import LABEL_ACCELERATOR, LABEL_PREFIX, LABEL_ZONE
from .spec import FIELD, label_safe, parse_env


class PlacementUnsatisfiable(ModelcastError, RuntimeError):
    """A deployment requires node labels that no node of the Ray cluster has."""

    code = "placement_unsatisfiable"
    http_status = 409


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
                      accelerator: str | None = None, zone: str | None = None, prefer_holders: bool = True,
                      require_accelerator: bool = False, require_zone: bool = False, hard: bool = False,
                      **ray_options) -> dict:
    """``ray_actor_options`` for a deployment that uses ``artifacts`` (KEY -> reference).

    Adds the runtime_env plugin's field and the placement: ``accelerator`` and ``zone``
    (node labels set by ``modelcast ray start``) and, with ``prefer_holders``, nodes that
    preloaded the artifacts are *preferred*; any node will do when none fits.
    ``require_accelerator`` / ``require_zone`` make that one a requirement, ``hard`` makes
    all of them requirements.  A ``label_selector`` passed in is always a requirement.
    Other keyword arguments (``num_cpus``, ``runtime_env`` …) are merged in.
    """
    field = {"artifacts": dict(artifacts or {})}
    if runtime:
        field["runtime"] = runtime
    parse_env(field)  # fail at declaration time, not on the node
    if require_accelerator and not accelerator:
        raise ValueError("modelcast_options: require_accelerator=True needs accelerator=..., e.g. \"cuda12\"")
    if require_zone and not zone:
        raise ValueError("modelcast_options: require_zone=True needs zone=...")
    opts = dict(ray_options)
    runtime_env = dict(opts.pop("runtime_env", None) or {})
    runtime_env[FIELD] = field
    opts["runtime_env"] = runtime_env
    required = dict(opts.pop("label_selector", None) or {})
    # Preferences, from the first given up to the last: preloaded artifacts, zone, accelerator.
    steps: list[dict[str, str]] = []
    if prefer_holders:
        steps.append({artifact_label(ref): "1" for ref in (artifacts or {}).values()})
    steps.append({LABEL_ZONE: label_safe(zone)} if zone else {})
    steps.append({LABEL_ACCELERATOR: accelerator} if accelerator else {})
    if hard:
        required.update({k: v for step in steps for k, v in step.items()})
    else:
        if require_zone:
            required[LABEL_ZONE] = label_safe(zone)
        if require_accelerator:
            required[LABEL_ACCELERATOR] = accelerator
    selectors = []  # from the most to the least wanted; the last one is what is required
    for i in range(len(steps) + 1):
        wanted = {**{k: v for step in steps[i:] for k, v in step.items()}, **required}
        if not selectors or wanted != selectors[-1]:
            selectors.append(wanted)
    if "fallback_strategy" in opts and len(selectors) > 1:
        raise ValueError("modelcast_options sets fallback_strategy itself: pass accelerator=, zone= and "
                         "label_selector= (required labels) instead of a fallback_strategy")
    if selectors[0]:
        opts["label_selector"] = selectors[0]
    if len(selectors) > 1:
        opts["fallback_strategy"] = [{"label_selector": s} for s in selectors[1:]]
    return opts


def selectors_of(ray_actor_options: Mapping | None) -> list[dict[str, str]]:
    """Every label selector a replica may be placed by: the primary, then each fallback."""
    opts = ray_actor_options or {}
    out = [dict(opts.get("label_selector") or {})]
    out += [dict(f.get("label_selector") or {}) for f in opts.get("fallback_strategy") or [] if isinstance(f, Mapping)]
    return out


def unmet_requirement(deployment: str, ray_actor_options: Mapping | None, nodes: Iterable[Mapping[str, str]],
                      matches: Callable[[Mapping[str, str], Mapping[str, str]], bool]) -> str | None:
    """Why no node of the cluster can ever run ``deployment``, or None if one can.

    ``nodes`` are the live nodes' labels; ``matches(labels, selector)`` is Ray's own
    selector test.  A replica can land where any of its selectors (primary or fallback)
    matches; only when none matches anywhere does it wait forever.
    """
    nodes = [dict(n) for n in nodes]
    selectors = selectors_of(ray_actor_options)
    if any(matches(labels, sel) for sel in selectors for labels in nodes):
        return None
    least = selectors[-1]  # the least demanding: what is required
    missing = [f"{k}={v}" for k, v in least.items() if not any(matches(n, {k: v}) for n in nodes)] or \
        [f"{k}={v}" for k, v in least.items()]
    seen = sorted({f"{k}={v}" for n in nodes for k, v in n.items() if k.startswith(LABEL_PREFIX + "/")})
    hints = []
    for k, v in least.items():
        if k == LABEL_ACCELERATOR:
            hints.append(f"--accelerator {v}")
        elif k == LABEL_ZONE:
            hints.append(f"--zone {v}")
        elif k.startswith(f"{LABEL_PREFIX}/has."):
            hints.append("--preload <that artifact>")
    how = (f"start a node with `modelcast ray start {' '.join(hints)}`" if hints else
           f"start a node with `ray start --labels {','.join(f'{k}={v}' for k, v in least.items())}`")
    have = f"their modelcast labels: {', '.join(seen)}" if seen else \
        "they carry no modelcast labels: started without `modelcast ray start`"
    return (f"deployment {deployment!r} requires node label {' and '.join(missing)} and none of the "
            f"{len(nodes)} node(s) of this Ray cluster has it ({have}); {how}, or make it a preference "
            "(modelcast_options without require_accelerator/require_zone/hard)")
