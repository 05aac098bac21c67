"""The fleet as the registry sees it through heartbeats: ``GET /v1/nodes`` and ``GET /v1/rollout/{digest}``.

Nodes report what they pull and hold with each heartbeat (modelcast/progress.py,
tracker/nodebook.py); these views add what the registry itself knows (artifact names,
tracker swarm counts).  The console (tracker/console/) renders the same views, so a
page shows what the API says.  Both routes are guarded like reads.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from modelcast.errors import ArtifactNotFound, BadRequest, InvalidManifest
from modelcast.manifest import Manifest
from modelcast.reference import Reference

from .announce import ZONE_RE
from .auth import check_auth
from .registry_api import digest_param
from .state import NODES, STORE, SWARMS
from .swarmstore import settle

_SUMS = ("bytes_from_peers", "bytes_from_origin", "bytes_from_other_zones", "rate")
DEFAULT_NODES = 1000  # nodes in one answer of GET /v1/nodes (and the console's page) unless ?limit= says
MAX_NODES = 10_000


async def stored_manifest(app: web.Application, digest: str) -> Manifest | None:
    """The manifest of ``digest`` if this registry holds it (no pull-through from an upstream)."""
    found = await asyncio.to_thread(app[STORE].lookup, Reference(None, None, digest))
    if found is None:
        return None
    try:
        return Manifest.from_bytes(found.manifest)
    except InvalidManifest:  # stored by an older schema: show the rollout without it
        return None


async def nodes_view(app: web.Application, zone: str | None = None, limit: int = DEFAULT_NODES) -> dict:
    """Live nodes (then the recently gone), with what each last reported, artifact names added.

    At most ``limit``, by zone then id; ``zone`` keeps one zone's.  ``more`` counts the
    nodes left out, so a page never has to carry a whole large fleet.
    """
    wall = time.time()
    book = app[NODES]
    records = [n for n in book.nodes() if zone is None or n.zone == zone]
    shown = records[:limit]
    names = await asyncio.to_thread(app[STORE].names, (d for n in shown for d in n.artifacts))
    nodes = []
    for record in shown:
        item = record.to_json(wall)
        for entry in item["artifacts"]:
            entry["name"] = names.get(entry["digest"])
        nodes.append(item)
    return {"nodes": nodes, "more": len(records) - len(shown), "live": len(book.live), "gone": len(book.gone),
            "at": wall}


def nodes_query(request: web.Request) -> tuple[str | None, int]:
    """``?zone=&limit=`` of a node list, checked."""
    zone = request.query.get("zone") or None
    if zone is not None and not ZONE_RE.fullmatch(zone):
        raise BadRequest(f"zone {zone[:80]!r} is invalid: up to 64 letters, digits and . _ : -")
    limit_s = request.query.get("limit") or str(DEFAULT_NODES)
    if not (limit_s.isascii() and limit_s.isdigit() and len(limit_s) < 7) or not 1 <= int(limit_s) <= MAX_NODES:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_NODES}, got {limit_s[:20]!r}")
    return zone, int(limit_s)


def _zero() -> dict:
    return {"nodes": 0, "complete": 0, "downloading": 0, "failed": 0, "done_bytes": 0, "total_bytes": 0,
            **{k: 0 for k in _SUMS}}


def _add(acc: dict, row: dict) -> None:
    acc["nodes"] += 1
    acc["complete"] += row["state"] == "ready"
    acc["downloading"] += row["state"] in ("queued", "downloading", "verifying")
    acc["failed"] += row["state"] == "failed"
    for key in ("done_bytes", "total_bytes", *_SUMS):
        acc[key] += row[key]


async def rollout_view(app: web.Application, digest: str, manifest: Manifest | None = None) -> dict:
    """One artifact across the fleet: a row per live node that pulls or holds it, sums per zone and overall.

    ``done`` is true once at least one node reported the artifact and none is still
    pulling it.  ``swarm`` is the tracker's count of the artifact's BitTorrent swarm
    (every client, node daemons or not).  404 when neither the registry nor any node
    knows the digest.
    """
    wall = time.time()
    if manifest is None:
        manifest = await stored_manifest(app, digest)
    holders = app[NODES].holders(digest)
    if manifest is None and not holders:
        raise ArtifactNotFound(f"artifact {digest} not found in registry, and no node reports it")
    rows, zones, summary = [], {}, _zero()
    for node, progress in holders:
        row = {"node": node.node_id, "zone": node.zone, **progress.to_json(), "fraction": round(progress.fraction, 4),
               "seconds_since_heartbeat": round(max(0.0, wall - node.last_heartbeat), 3)}
        rows.append(row)
        _add(zones.setdefault(node.zone or "", {"zone": node.zone, **_zero()}), row)
        _add(summary, row)
    summary["done"] = bool(rows) and summary["downloading"] == 0
    summary["fraction"] = round(summary["done_bytes"] / summary["total_bytes"], 4) if summary["total_bytes"] else 0.0
    swarm = None
    if manifest is not None:
        counts = await settle(app[SWARMS].scrape(manifest.info_hash.tracker_keys()))
        if counts:
            c = next(iter(counts.values()))  # a hybrid torrent's two keys name one swarm
            swarm = {"complete": c.complete, "incomplete": c.incomplete, "downloaded": c.downloaded}
    return {
        "digest": digest, "name": manifest.name if manifest else None,
        "total_bytes": manifest.total_size if manifest else (rows[0]["total_bytes"] if rows else 0),
        "at": wall, "nodes": rows, "zones": [zones[z] for z in sorted(zones)], "summary": summary, "swarm": swarm,
    }


async def nodes(request: web.Request) -> web.Response:
    """``GET /v1/nodes?zone=&limit=``: the nodes the registry knows through heartbeats."""
    check_auth(request, read=True)
    return web.json_response(await nodes_view(request.app, *nodes_query(request)))


async def rollout(request: web.Request) -> web.Response:
    """``GET /v1/rollout/{digest}``: the artifact's fan-out, node by node."""
    check_auth(request, read=True)
    return web.json_response(await rollout_view(request.app, digest_param(request)))


def add_fleet_routes(app: web.Application) -> None:
    app.router.add_get("/v1/nodes", nodes)
    app.router.add_get("/v1/rollout/{digest}", rollout)
