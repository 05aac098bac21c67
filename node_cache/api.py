"""The node's local HTTP API: thin handlers over :class:`~node_cache.daemon.NodeDaemon`, and the app's lifecycle.

Routes: ``POST /v1/pull``, ``GET /v1/pulls/{digest}``, ``GET /v1/artifacts``,
``DELETE /v1/artifacts/{digest}`` (evict now), ``POST /v1/artifacts/{digest}/hf`` (lay out
in a Hugging Face hub cache, :mod:`node_cache.hf`),
``POST /v1/artifacts/{digest}/verify``, ``POST /v1/verify``, ``GET /v1/resolve``,
``GET|POST /v1/pins``, ``DELETE /v1/pins/{digest}``, ``GET /v1/health``, ``GET /metrics``,
and ``/v1/runtime/*`` (:mod:`node_cache.runtime`).  Pieces for nodes of other zones are on
the relay listener (:mod:`node_cache.relay`), not here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from adapters.http_server import MAX_JSON_BODY, NODE_API_LIMITS, bind_socket, read_json, start_bounded
from adapters.tls import server_context
from modelcast.config import NodeConfig
from modelcast.errors import ArtifactNotFound, BadRequest, ModelcastError
from modelcast.hf import HfName

from .daemon import NodeDaemon
from .jobs import PullJob, PullState
from .metrics import CONTENT_TYPE
from .middleware import errors_middleware
from .runtime import add_runtime_routes

DAEMON = web.AppKey("daemon", NodeDaemon)
log = logging.getLogger("modelcast.node")


async def _json_body(request: web.Request, example: str) -> dict:
    body = await read_json(request, MAX_JSON_BODY, "request body", example)
    if not isinstance(body, dict) or not isinstance(body.get("ref"), str):
        raise BadRequest(f"body needs a string field \"ref\": {example}")
    return body


def _digest(request: web.Request) -> str:
    return "sha256:" + request.match_info["hex"]


HF_EXAMPLE = '{"repo": "org/name@revision", "cache": "/abs/hub/cache"} (repo "": as published; cache: the node\'s)'


def _hf_request(value: object) -> tuple[HfName | None, Path | None]:
    """``"org/name[@rev]"``, ``""`` (the repo the artifact was published from), or ``{"repo", "cache"}``."""
    if isinstance(value, str):
        value = {"repo": value}
    if not isinstance(value, dict) or set(value) - {"repo", "cache"}:
        raise BadRequest(f"\"hf\" must be a repo id string or {HF_EXAMPLE}")
    repo, cache = value.get("repo") or None, value.get("cache") or None
    if repo is not None and not isinstance(repo, str):
        raise BadRequest(f"\"hf\".repo must be a string like \"org/name\": {HF_EXAMPLE}")
    if cache is not None and (not isinstance(cache, str) or not os.path.isabs(cache)):
        raise BadRequest(f"\"hf\".cache must be an absolute path: {HF_EXAMPLE}")
    return (HfName.parse(repo) if repo else None), (Path(cache) if cache else None)


async def handle_pull(request: web.Request) -> web.Response:
    body = await _json_body(request, '{"ref": "name:tag", "wait": true, "pin": "holder", "hf": "org/name"}')
    pin = body.get("pin")
    if pin is not None and not isinstance(pin, str):
        raise BadRequest("\"pin\" must be a string naming who holds the pin")
    wait = body.get("wait", True)
    hf = _hf_request(body["hf"]) if body.get("hf") is not None else None
    if hf is not None and not wait:
        raise BadRequest("\"hf\" needs \"wait\": true (or, once the pull is ready, "
                         "POST /v1/artifacts/<digest>/hf)")
    daemon = request.app[DAEMON]
    job = await daemon.pull(body["ref"], pin=pin)
    if wait:
        await job.wait()
        if job.state is PullState.FAILED:
            raise job.error
    answer = {}
    if hf is not None:
        answer["hf"] = await daemon.lay_out_hf(job.digest, *hf)
    return web.json_response({**daemon.job_json(job), **answer},
                             status=200 if job.state is PullState.READY else 202)


async def handle_hf(request: web.Request) -> web.Response:
    """Lay a ready artifact out in a Hugging Face hub cache (again: it is idempotent)."""
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        raise BadRequest(f"body must be JSON: {HF_EXAMPLE}") from None
    name, cache = _hf_request(body if body else {})
    return web.json_response(await request.app[DAEMON].lay_out_hf(_digest(request), name, cache))


async def handle_evict(request: web.Request) -> web.Response:
    """Delete a complete artifact now (not pinned, not in use); its Hugging Face layouts go first."""
    return web.json_response(await request.app[DAEMON].evict(_digest(request)))


def _job(request: web.Request) -> PullJob:
    digest = _digest(request)
    job = request.app[DAEMON].jobs.get(digest)
    if job is None:
        raise ArtifactNotFound(f"{digest} is not on this node")
    return job


async def handle_pull_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[DAEMON].job_json(_job(request)))


async def handle_list(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    return web.json_response({"artifacts": d.listing(), "quota_bytes": d.cfg.quota,
                              "used_bytes": d.upkeep.used_bytes(), "unpacked_bytes": d.upkeep.unpacked_total(),
                              "node_id": d.node_id, "zone": d.cfg.zone})


async def handle_pin(request: web.Request) -> web.Response:
    body = await _json_body(request, '{"ref": "name:tag", "holder": "cli"}')
    d = request.app[DAEMON]
    digest, _ = await d.resolve(body["ref"])
    await d.pins.pin(digest, str(body.get("holder") or "user"))
    return web.json_response({"digest": digest, "pinned_by": d.pins.holders(digest)})


async def handle_unpin(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    digest = _digest(request)
    await d.pins.unpin(digest, request.query.get("holder"))
    return web.json_response({"digest": digest, "pinned_by": d.pins.holders(digest)})


async def handle_resolve(request: web.Request) -> web.Response:
    ref = request.query.get("ref")
    if not ref:
        raise BadRequest("resolve needs ?ref=NAME:TAG")
    digest, manifest = await request.app[DAEMON].resolve(ref)
    return web.json_response({"digest": digest, "name": manifest.name})


async def handle_pins(request: web.Request) -> web.Response:
    return web.json_response({"pins": request.app[DAEMON].pins.to_json()})


async def handle_verify(request: web.Request) -> web.Response:
    """Full re-check of one artifact; a reader that saw a problem calls this too."""
    return web.json_response(await request.app[DAEMON].upkeep.verify(_digest(request)))


async def handle_verify_all(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    results = [await d.upkeep.verify(dg) for dg, j in list(d.jobs.items())
               if j.state is PullState.READY and not j.busy]
    return web.json_response({"results": results})


async def handle_health(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    return web.json_response({"ok": True, "node_id": d.node_id, "zone": d.cfg.zone,
                              "peer_listen": f"{d.cfg.peer_host}:{d.engine.listen_port}", "relay": d.relay.url,
                              "cache": str(d.store.root), "registry": d.cfg.registry})


async def handle_metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DAEMON].metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})


def make_app(cfg: NodeConfig) -> web.Application:
    app = web.Application(middlewares=[errors_middleware])

    async def lifecycle(app: web.Application):
        daemon = NodeDaemon(cfg)
        relay = await daemon.relay.start_listener()
        try:
            await daemon.start()
            app[DAEMON] = daemon
            yield
            await daemon.stop()
        finally:
            if relay is not None:
                await relay.stop()

    app.cleanup_ctx.append(lifecycle)
    digest = "sha256:{hex:[0-9a-f]{64}}"
    app.router.add_post("/v1/pull", handle_pull)
    app.router.add_get(f"/v1/pulls/{digest}", handle_pull_status)
    app.router.add_get("/v1/artifacts", handle_list)
    app.router.add_post(f"/v1/artifacts/{digest}/verify", handle_verify)
    app.router.add_post(f"/v1/artifacts/{digest}/hf", handle_hf)
    app.router.add_delete(f"/v1/artifacts/{digest}", handle_evict)
    app.router.add_post("/v1/verify", handle_verify_all)
    app.router.add_get("/v1/resolve", handle_resolve)
    app.router.add_get("/v1/pins", handle_pins)
    app.router.add_post("/v1/pins", handle_pin)
    app.router.add_delete(f"/v1/pins/{digest}", handle_unpin)
    app.router.add_get("/v1/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    add_runtime_routes(app, DAEMON)
    return app


def serve(cfg: NodeConfig) -> None:
    """Run the node daemon and its API on ``cfg.api_host:cfg.api_port`` until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(cfg))


async def _serve(cfg: NodeConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # The API's address first: the daemon starts listeners of its own (the relay, on an
    # ephemeral port by default), and one could otherwise be handed the API's port.
    try:
        sock = bind_socket(cfg.api_host, cfg.api_port)
    except OSError as exc:
        raise ModelcastError(f"cannot serve the node API on {cfg.api_host}:{cfg.api_port}: "
                             f"{exc.strerror or exc}; pick another --api address or port") from None
    # No access log: clients poll pull status several times a second.
    runner = web.AppRunner(make_app(cfg), access_log=None, shutdown_timeout=2)
    try:
        await runner.setup()  # starts the daemon (the app's cleanup_ctx)
    except BaseException:
        sock.close()
        raise
    try:
        site = await start_bounded(runner, cfg.api_host, cfg.api_port, NODE_API_LIMITS, log, "node API",
                                    ssl_context=server_context(cfg.tls), sock=sock)
        await stop.wait()
        site.server.close()
    finally:
        await runner.cleanup()  # closes the connections, then stops the daemon
