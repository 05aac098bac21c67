"""Prewarm: make an artifact warm on many nodes at once before a rollout.

Two ways to pick the nodes:

* by daemon URL (``--nodes``): talk to each node daemon directly, no Ray needed;
  ``zone`` then keeps only daemons whose ``/v1/health`` reports that zone;
* through Ray (``--zone`` alone, or no selection): one zero-CPU task on every live Ray
  node (with ``modelcast.io/zone=<zone>`` if given), each warming through its own node's
  daemon (``MODELCAST_NODE`` of that Ray node).

Every node pulls in parallel, so the swarm shares the first copy; each result says how
long that node took and where its bytes came from.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from modelcast.errors import ModelcastError

from . import ray_api
from .config import LABEL_ZONE, GlueConfig
from .node import NodeCache
from .spec import label_safe


@dataclass(frozen=True)
class PrewarmResult:
    """What one node reported."""

    node: str
    ok: bool
    seconds: float
    digest: str | None = None
    bytes_from_peers: int = 0
    bytes_from_origin: int = 0
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


async def _warm_one(node_url: str, ref: str, pin: str | None, token: str | None, deadline_s: float,
                    ca: Path | None = None) -> PrewarmResult:
    start = time.monotonic()
    try:
        async with NodeCache(GlueConfig(node=node_url, token=token, ca=ca)) as node:
            warm = await node.ensure_warm(ref, pin=pin, deadline_s=deadline_s)
            status = await node.status(warm.digest)
        return PrewarmResult(node_url, True, round(time.monotonic() - start, 3), warm.digest,
                             int(status.get("bytes_from_peers") or 0), int(status.get("bytes_from_origin") or 0))
    except ModelcastError as exc:
        return PrewarmResult(node_url, False, round(time.monotonic() - start, 3), error=str(exc))


async def _zone_of(node_url: str, token: str | None, ca: Path | None = None) -> str | None:
    try:
        async with NodeCache(GlueConfig(node=node_url, token=token, ca=ca)) as node:
            return (await node.health()).get("zone")
    except ModelcastError:
        return None


async def prewarm_nodes(ref: str, node_urls: list[str], *, zone: str | None = None, pin: str | None = None,
                        token: str | None = None, deadline_s: float = 600.0,
                        ca: Path | None = None) -> list[PrewarmResult]:
    """Warm ``ref`` on every daemon in ``node_urls`` (those in ``zone``, if given), in parallel."""
    urls = [u.rstrip("/") for u in node_urls]
    if zone is not None:
        zones = await asyncio.gather(*(_zone_of(u, token, ca) for u in urls))
        urls = [u for u, z in zip(urls, zones) if z == zone]
    return list(await asyncio.gather(*(_warm_one(u, ref, pin, token, deadline_s, ca) for u in urls)))


def _warm_here(ref: str, pin: str | None, deadline_s: float) -> dict:
    """Runs as a Ray task on the chosen node: warm through that node's own daemon."""
    cfg = GlueConfig.from_env()
    return asyncio.run(_warm_one(cfg.node, ref, pin, cfg.token, deadline_s, cfg.ca)).to_json()


def prewarm_ray(ref: str, *, zone: str | None = None, pin: str | None = None, address: str | None = None,
                deadline_s: float = 600.0) -> list[PrewarmResult]:
    """Warm ``ref`` on every live Ray node (in ``zone``, if given), each through its daemon."""
    ray_api.ensure_connected(address)
    nodes = ray_api.alive_nodes()
    if zone is not None:
        nodes = [n for n in nodes if n["labels"].get(LABEL_ZONE) == label_safe(zone)]
    if not nodes:
        raise ModelcastError(f"prewarm {ref}: no live Ray node" + (f" has label {LABEL_ZONE}={zone}" if zone else "")
                             + "; start nodes with `modelcast ray start --zone Z` or pass --nodes URL,…")
    answers = ray_api.run_on_each_node(_warm_here, [n["node_id"] for n in nodes], ref, pin, deadline_s,
                                       timeout_s=deadline_s + 60)
    return [PrewarmResult(**a) for a in answers]
