"""The registry HTTP API and BitTorrent tracker as one aiohttp application, and how it runs.

:func:`make_app` assembles the parts: the registry API (:mod:`tracker.registry_api`),
the web seed (:mod:`tracker.webseed`), the tracker (:mod:`tracker.endpoint`, and
:mod:`tracker.udp_server` beside it when configured) and node liveness
(:mod:`tracker.liveness`), with their state under the keys of :mod:`tracker.state`.
Errors become ``{"error": {"code", "message"}}`` JSON in one middleware; tracker routes
answer a bencoded ``failure reason`` instead, as BitTorrent clients expect.

:func:`serve` puts :mod:`tracker.fastpath` in front of aiohttp on the same socket: plain
announce and scrape GETs are answered there, through the same
:class:`~tracker.endpoint.TrackerEndpoint` as the aiohttp handlers, and every other
request goes to aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web

from adapters.tls import server_context
from adapters.http_server import REGISTRY_LIMITS, BoundedServer, ServerLimits
from modelcast.config import NODE_TOKEN_FILE, TrackerConfig
from modelcast.errors import ModelcastError, error_body, retry_after
from modelcast.manifest import Manifest
from modelcast.progress import MAX_HEARTBEAT_BODY

from . import registry_api as api
from .console import add_console_routes
from .endpoint import TRACKER, TrackerEndpoint, announce, scrape
from .fastpath import FastPathServer
from .federation import Upstream, validate_upstream
from .filesend import setup_file_sending
from .firstcopy import make_gate_store
from .fleet import add_fleet_routes
from .liveness import FastNodeRoutes, node_heartbeat, node_leave, peer_expiry_ctx
from .metrics import METRICS, RegistryMetrics, metrics, metrics_middleware
from .nodebook import NodeBook
from .state import (CONFIG, FIRST_COPY, NODE_KEYS, NODES, RELAYS, ORIGINS, STATS, STORE, SWARMS, UDP_TRACKER, UPSTREAM, WEBSEED_CACHE,
                    WRITE_LOCK, OriginCache, Stats)
from .store import RegistryStore
from .swarm_redis import RedisSwarmStore
from .swarmstore import make_swarm_store, settle
from .nodekeys import NodeKeys
from .relaytokens import make_relay_registry
from .peer_policy import PeerPolicy, parse_networks
from .udp_server import UdpTracker, start_udp_tracker
from .webseed import fast_webseed, webseed

__all__ = [
    "CONFIG", "FIRST_COPY", "METRICS", "ORIGINS", "STATS", "STORE", "SWARMS", "TRACKER", "UDP_TRACKER", "UPSTREAM",
    "WEBSEED_CACHE", "WRITE_LOCK", "RunningServer", "make_app", "serve", "start_server",
]

log = logging.getLogger("modelcast.tracker")

# aiohttp's own bound on request.read() and request.json(): no route reads more than a
# publish (each reads with adapters.http_server.read_body and its own, smaller, bound).
MAX_BODY_BYTES = api.MAX_PUBLISH_BODY

# ---------------------------------------------------------------------------------------
# Errors

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "too_large"}


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Turn every error into a JSON error body; an unexpected one is logged, never fatal."""
    try:
        return await handler(request)
    except ModelcastError as exc:
        return web.json_response(error_body(exc), status=exc.http_status, headers=retry_after(exc))
    except web.HTTPException as exc:
        # 416 carries a Content-Range header that clients need; let aiohttp send it as is.
        if exc.status < 400 or exc.status == 416:
            raise
        code = _HTTP_CODES.get(exc.status, "error")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404:
            message = f"no such endpoint {request.method} {request.path}"
        return web.json_response({"error": {"code": code, "message": message}}, status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception("unexpected error on %s %s", request.method, request.path_qs)
        return web.json_response(
            {"error": {"code": "internal", "message": f"internal error in the registry: {exc.__class__.__name__}: {exc}"}},
            status=500,
        )


# ---------------------------------------------------------------------------------------
# Application


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the registry database and allow the swarms of every published artifact."""
    cfg = app[CONFIG]
    store = await asyncio.to_thread(RegistryStore, Path(cfg.data_dir), app[METRICS].observe_store, db=cfg.db)
    app[STORE] = store
    app[RELAYS].secret = await asyncio.to_thread(store.registry_secret, "relay")
    # Swarm state is not persisted (peers re-announce within one interval), but the
    # allow-list is: without it every announce after a restart would be refused.
    swarms = app[SWARMS]
    published = [_tracker_keys(ih) for ih in await asyncio.to_thread(store.all_info_hashes)]
    if isinstance(swarms, RedisSwarmStore):
        try:
            await swarms.allow_many(published)
        except ModelcastError:
            pass  # Redis is down: logged once; announces re-make the allow-list when it is back
        log.info("swarm store %s (shared by every replica)", cfg.swarm_store)
    else:
        for keys in published:
            swarms.allow(keys)
    log.info("registry database %s (schema version %d); %d published swarms", store.location, store.schema_version,
             len(published))
    # Replicas share a PostgreSQL database: what another replica publishes or deletes
    # reaches this one's allow-list within ALLOW_LIST_REFRESH_S (a Redis swarm store keeps
    # one allow-list for every replica already).
    refresh = (asyncio.create_task(_refresh_allow_list(app))
               if cfg.db and not isinstance(swarms, RedisSwarmStore) else None)
    keys = app[NODE_KEYS]
    for node_id, hashed, token in await asyncio.to_thread(store.node_keys, keys.max_nodes):
        keys.remember(node_id, hashed, token)
    log.info("%d enrolled nodes", keys.count)
    try:
        yield
    finally:
        if refresh is not None:
            refresh.cancel()
            try:
                await refresh
            except asyncio.CancelledError:
                pass
        await asyncio.to_thread(store.close)
        if isinstance(swarms, RedisSwarmStore):
            await swarms.close()


ALLOW_LIST_REFRESH_S = 2.0


async def _refresh_allow_list(app: web.Application) -> None:
    """Keep the swarm allow-list in step with the shared database (artifacts published or deleted elsewhere)."""
    known: set[bytes] | None = None
    while True:
        await asyncio.sleep(ALLOW_LIST_REFRESH_S)
        try:
            torrents = [_tracker_keys(ih) for ih in await asyncio.to_thread(app[STORE].all_info_hashes)]
        except ModelcastError:
            continue  # the database is down: the store logs the outage once; keep what we have
        except Exception:  # a bug here must not stop the refresh for the life of the server
            log.exception("refreshing the swarm allow-list from the database failed")
            continue
        swarms = app[SWARMS]
        for keys in torrents:
            # One allow() per torrent: its keys (a hybrid's v1 and v2 hashes) name one swarm;
            # keys of different torrents in one call would be merged into one swarm.
            if not all(swarms.is_allowed(k) for k in keys):
                swarms.allow(keys)
        current = {k for keys in torrents for k in keys}
        if known is not None and (gone := known - current):
            swarms.disallow(gone)
        known = current


def _tracker_keys(info_hash: dict) -> list[bytes]:
    keys = []
    if info_hash.get("v1"):
        keys.append(bytes.fromhex(info_hash["v1"]))
    if info_hash.get("v2"):
        keys.append(bytes.fromhex(info_hash["v2"])[:20])
    return keys


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """Connect this zone's registry to its parent (``TrackerConfig.upstream``); see tracker/federation.py."""
    cfg = app[CONFIG]

    async def save(manifest: Manifest, torrent: bytes, tag: str | None) -> None:
        async with app[WRITE_LOCK]:
            await asyncio.to_thread(app[STORE].pull_through, manifest, torrent, upstream.url, tag)
            await settle(app[SWARMS].allow(manifest.info_hash.tracker_keys()))

    upstream = Upstream(cfg.upstream, cfg.upstream_token, app[STORE], save, tag_ttl_s=cfg.upstream_tag_ttl_s,
                        ca=cfg.ca)
    app[UPSTREAM] = upstream
    log.info("zone registry: unknown references are pulled through from %s", upstream.url)
    try:
        yield
    finally:
        await upstream.close()


async def _udp_tracker_ctx(app: web.Application) -> AsyncIterator[None]:
    """Serve the BEP 15 UDP tracker beside HTTP, on the same swarms, when configured."""
    cfg = app[CONFIG]
    if cfg.udp_port is None:
        yield
        return
    tracker = UdpTracker(app[SWARMS], interval=cfg.announce_interval_s, default_numwant=cfg.default_numwant,
                         max_numwant=cfg.max_numwant, policy=PeerPolicy(cfg.trusted_proxies, cfg.origin_seeds), node_keys=app[NODE_KEYS])
    endpoint = await start_udp_tracker(tracker, cfg.udp_host or cfg.host, cfg.udp_port)
    app[UDP_TRACKER] = endpoint
    host, port = endpoint.address
    log.info("UDP tracker on udp://%s:%d/announce", f"[{host}]" if ":" in host else host, port)
    try:
        yield
    finally:
        endpoint.close()
        log.info("UDP tracker stopped: %s", tracker.stats)


def make_app(cfg: TrackerConfig) -> web.Application:
    """Build the registry + tracker application for ``cfg`` (used by :func:`serve` and tests)."""
    # Metrics outermost: they see the status the error middleware's answer has.
    app = web.Application(middlewares=[metrics_middleware, error_middleware], client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = cfg
    app[METRICS] = RegistryMetrics(app)
    app[SWARMS] = make_swarm_store(cfg.swarm_store, zone_gateways=cfg.zone_gateways, peer_ttl_s=cfg.peer_ttl_s)
    app[NODE_KEYS] = NodeKeys()
    app[RELAYS] = make_relay_registry(app[SWARMS], cfg.trusted_proxies)
    app[TRACKER] = TrackerEndpoint(cfg, app[SWARMS], app[NODE_KEYS])
    app[STATS] = Stats()
    app[ORIGINS] = OriginCache(cfg.s3_endpoint)
    app[WEBSEED_CACHE] = OrderedDict()
    app[FIRST_COPY] = make_gate_store(app[SWARMS], app[RELAYS])
    app[WRITE_LOCK] = asyncio.Lock()
    app[NODES] = NodeBook()
    setup_file_sending(app)  # the web seed's sending threads and open blobs, closed at cleanup
    app.cleanup_ctx.append(_registry_ctx)
    app.cleanup_ctx.append(peer_expiry_ctx)
    if cfg.upstream:
        validate_upstream(cfg.upstream)  # a bad URL fails at start, not on the first pull
        app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_udp_tracker_ctx)
    app.router.add_get("/v1/health", api.health)
    app.router.add_get("/v1/stats", api.stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/artifacts", api.publish)
    app.router.add_post("/v1/auth/check", api.check_token)
    app.router.add_get("/v1/artifacts", api.list_artifacts)
    app.router.add_get("/v1/resolve", api.resolve)
    app.router.add_get("/v1/artifacts/{digest}", api.get_manifest)
    app.router.add_get("/v1/artifacts/{digest}/torrent", api.get_torrent)
    app.router.add_get("/v1/webseed/{digest}/{tail:.*}", webseed)
    app.router.add_delete("/v1/artifacts/{digest}", api.delete_artifact)
    app.router.add_delete("/v1/tags/{ref:.+}", api.delete_tag)
    app.router.add_get("/announce", announce)
    app.router.add_get("/scrape", scrape)
    app.router.add_post("/v1/nodes/{node_id}/heartbeat", node_heartbeat)
    app.router.add_delete("/v1/nodes/{node_id}", node_leave)
    add_fleet_routes(app)  # GET /v1/nodes, /v1/rollout/{digest}: what nodes report with their heartbeats
    add_console_routes(app)  # /ui
    app[METRICS].prime_routes(app.router)
    return app


SHUTDOWN_TIMEOUT_S = 5.0


@dataclass
class RunningServer:
    """A started registry + tracker: aiohttp behind the announce fast path, on one listening socket."""

    runner: web.AppRunner
    server: asyncio.Server
    fast: FastPathServer
    bounded: BoundedServer

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, close the fast path's connections, then aiohttp's; cleanup_ctx runs last."""
        self.server.close()
        self.fast.close()
        log.info("fast path answered %d tracker requests; %d connections went on to aiohttp",
                 self.fast.answered, self.fast.handed_off)
        await self.runner.cleanup()


async def start_server(app: web.Application, host: str, port: int, *, head_timeout_s: float | None = None,
                       keepalive_timeout_s: float | None = None, limits: ServerLimits = REGISTRY_LIMITS,
                       ssl_context: ssl.SSLContext | None = None) -> RunningServer:
    """Start ``app`` (from :func:`make_app`) on ``host:port`` (0: any free port), as :func:`serve` runs it.

    Each connection is sniffed: plain announce and scrape GETs are answered by
    :mod:`tracker.fastpath`, everything else is handed to aiohttp's request handler.  Both
    hold to ``limits`` (:mod:`adapters.http_server`: head, body and keep-alive timeouts,
    connection caps; the registry's trusted proxies are exempt from the per-address cap);
    ``head_timeout_s`` and ``keepalive_timeout_s`` override its timeouts.
    With ``ssl_context`` the socket speaks TLS: asyncio does the handshake, and both the
    fast path and aiohttp (the same transport, handed over) see the plaintext.
    """
    if head_timeout_s is not None:
        limits = replace(limits, header_timeout_s=head_timeout_s)
    if keepalive_timeout_s is not None:
        limits = replace(limits, keepalive_timeout_s=keepalive_timeout_s)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        endpoint = app[TRACKER]
        bounded = BoundedServer(runner.server, limits, log, "registry",
                                exempt=parse_networks(app[CONFIG].trusted_proxies, "--trusted-proxy"))
        # Node heartbeats and leaves are answered there too, through the handlers' own functions.
        fast = FastPathServer(bounded, {b"/announce": endpoint.announce, b"/scrape": endpoint.scrape},
                              head_timeout_s=limits.header_timeout_s, keepalive_timeout_s=limits.keepalive_timeout_s,
                              limiter=bounded.limiter, api=FastNodeRoutes(app),
                              max_api_body=MAX_HEARTBEAT_BODY, webseed=partial(fast_webseed, app))
        server = await asyncio.get_running_loop().create_server(
            fast, host, port, ssl=ssl_context,
            # A handshake that never completes holds a connection no longer than a request head may.
            ssl_handshake_timeout=limits.header_timeout_s if ssl_context is not None else None)
    except BaseException:
        await runner.cleanup()
        raise
    return RunningServer(runner, server, fast, bounded)


def serve(cfg: TrackerConfig) -> None:
    """Run the registry and tracker on ``cfg.host:cfg.port`` until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(cfg))


async def _serve(cfg: TrackerConfig) -> None:
    # SIGINT and SIGTERM end the wait; the finally then runs cleanup_ctx, so the
    # database is closed cleanly and the process exits with status 0.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    ssl_context = server_context(cfg.tls)
    scheme = "https" if ssl_context is not None else "http"
    try:
        running = await start_server(make_app(cfg), cfg.host, cfg.port, ssl_context=ssl_context)
    except OSError as exc:
        # A taken port or an address this host lacks: one line the operator can act on.
        raise ModelcastError(f"cannot listen on {host}:{cfg.port}: {exc.strerror or exc}; "
                             "choose another --listen address or port") from exc
    try:
        log.info("registry and tracker on %s://%s:%d", scheme, host, running.port)
        if ssl_context is None:
            log.info("plain HTTP: tokens and bytes cross the network in the clear; --tls-cert and --tls-key serve TLS")
        if not cfg.token:
            log.warning("writes are OPEN: anyone who can reach %s:%d may publish, move tags and delete artifacts; "
                        "set MODELCAST_TOKEN (or --token-file) to require a token", host, running.port)
        if not cfg.read_token:
            log.info("reads are open (resolve, torrents, web seed); set MODELCAST_READ_TOKEN to require a token")
        if cfg.node_token_loopback_free:
            where = (f"in {Path(cfg.data_dir) / NODE_TOKEN_FILE} (mode 0600; `modelcast node-token --data "
                     f"{cfg.data_dir}` prints it)") if (Path(cfg.data_dir) / NODE_TOKEN_FILE).exists() else "in memory only"
            log.info("nodes on this machine enrol without a token; nodes elsewhere need the node token kept %s, in "
                     "their env MODELCAST_NODE_TOKEN; set MODELCAST_NODE_TOKEN here to require it of every node",
                     where)
        else:
            log.info("nodes enrol only with the node token (MODELCAST_NODE_TOKEN); then their own key proves them")
        await stop.wait()
        log.info("stopping: closing connections, then the database")
    finally:
        await running.stop()
