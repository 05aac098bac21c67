"""Node liveness: heartbeats and leaves of node daemons, and the expiry of dead nodes and silent peers.

A node daemon announces with ``node=ID`` and sends one heartbeat per node (not per
torrent); when its heartbeat lapses, or it leaves, every entry of the node goes at once,
in every swarm (:class:`~tracker.swarm.SwarmRegistry` keeps the books).  Other clients
keep the plain per-peer TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from aiohttp import web

from adapters.http_server import read_json
from modelcast.config import TrackerConfig
from modelcast.errors import BadRequest
from modelcast.progress import MAX_HEARTBEAT_BODY, parse_report
from modelcast.wire import NODE_KEY_HEADER

from .announce import ZONE_RE, validate_node_id
from .auth import check_auth
from .state import CONFIG, NODE_KEYS, NODES, RELAYS, SWARMS

log = logging.getLogger("modelcast.tracker")


def relay_registration(app: web.Application, node_id: str, node_key: str | None, body: dict,
                       remote: str | None, forwarded_for: str | None = None) -> dict:
    """Register the relay URL a heartbeat names (``"relay"``); the answer's fields about it.

    Only a heartbeat that proves its node id with a node key registers a URL and learns the
    node's relay secret (tracker/relaytokens.py); the URL must be at the heartbeat's source
    address.  Shared by every path that answers heartbeats.
    """
    relays = app[RELAYS]
    if node_key is None:
        relays.forget(node_id)
        return {}
    url = relays.register(node_id, body.get("relay"), relays.source(remote, forwarded_for))
    secret = relays.node_secret(node_id)
    return {"relay": url, **({"relay_secret": secret} if secret is not None else {})}


def _heartbeat_ttl(body: Any, cfg: TrackerConfig) -> float:
    """The ttl a heartbeat body asks for, defaulted and capped by ``cfg``."""
    if not isinstance(body, dict):
        raise BadRequest('heartbeat body must be a JSON object like {"zone": "z1", "ttl_s": 3.0}')
    zone = body.get("zone")
    if zone is not None and not (isinstance(zone, str) and ZONE_RE.fullmatch(zone)):
        raise BadRequest(f"heartbeat zone {str(zone)[:80]!r} is invalid: up to 64 letters, digits and . _ : -")
    ttl = body.get("ttl_s", cfg.heartbeat_ttl_default_s)
    # bool is an int; NaN and infinity compare in ways that would keep a node forever.
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < float("inf"):
        raise BadRequest(f"heartbeat ttl_s must be a positive number of seconds, got {ttl!r}")
    return min(float(ttl), cfg.heartbeat_ttl_max_s)


async def node_heartbeat(request: web.Request) -> web.Response:
    """``POST /v1/nodes/{node_id}/heartbeat``: keep every swarm entry of the node alive for ``ttl_s``.

    Guarded like a read, not a write: a node holds at most the read token (it never
    publishes), and its random node id, sent only to this tracker, is what ties the
    heartbeat to its swarm entries, the same trust an announce gets.
    """
    check_auth(request, read=True)
    node_id = validate_node_id(request.match_info["node_id"])
    request.app[NODE_KEYS].heartbeat(node_id, request.headers.get(NODE_KEY_HEADER))
    # Bounded however it is framed (a chunked body has no Content-Length to check first).
    body = await read_json(request, MAX_HEARTBEAT_BODY, "heartbeat body", '{"zone": "z1", "ttl_s": 3.0}', empty={})
    ttl = _heartbeat_ttl(body, request.app[CONFIG])
    report = parse_report(body)  # checked whole before anything is recorded
    now = time.monotonic()
    entries = request.app[SWARMS].heartbeat(node_id, now, ttl, body.get("zone"))
    node = request.app[NODES].heartbeat(node_id, body.get("zone"), report, now, time.time(), ttl)
    relay = relay_registration(request.app, node_id, request.headers.get(NODE_KEY_HEADER), body, request.remote,
                               request.headers.get("X-Forwarded-For"))
    # "reported": whether this registry holds a report of the node, so that a node which
    # sends its report only when it changes sends it again to a registry that lost it.
    return web.json_response({"ok": True, "ttl_s": ttl, "entries": entries,
                              "reported": node is not None and node.reported, **relay})


async def node_leave(request: web.Request) -> web.Response:
    """``DELETE /v1/nodes/{node_id}``: the node stops; its entries leave every swarm at once."""
    check_auth(request, read=True)
    node_id = validate_node_id(request.match_info["node_id"])
    request.app[NODE_KEYS].leave(node_id, request.headers.get(NODE_KEY_HEADER))
    removed = request.app[SWARMS].leave(node_id)
    request.app[RELAYS].forget(node_id)
    request.app[NODES].leave(node_id, time.time())
    log.info("node %s left %d swarm entries", node_id, removed)
    return web.json_response({"ok": True, "removed": removed})


async def _expire_peers(app: web.Application) -> None:
    """Drop dead nodes and silent peers; off the announce path, on a timer.

    Each tick costs only what is due (see :meth:`SwarmRegistry.expire`), so it can run
    often enough that a dead node leaves the peer lists within its ttl plus one period.
    """
    cfg = app[CONFIG]
    period = max(0.05, min(cfg.expiry_interval_s, cfg.peer_ttl_s / 4))
    while True:
        await asyncio.sleep(period)
        try:
            now = time.monotonic()
            gone = app[SWARMS].expire(now, cfg.peer_ttl_s)
            app[NODES].expire(now, time.time())
            if gone:
                log.debug("expired %d swarm entries of dead nodes and silent peers", gone)
        except Exception:  # A bug here must not stop expiry for the life of the server.
            log.exception("peer expiry failed")



async def peer_expiry_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run peer expiry for the life of the application (a ``cleanup_ctx``, after the registry's)."""
    expiry = asyncio.create_task(_expire_peers(app), name="modelcast-peer-expiry")
    try:
        yield
    finally:
        expiry.cancel()
        try:
            await expiry
        except asyncio.CancelledError:
            pass
