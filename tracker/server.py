"""The registry HTTP API and BitTorrent tracker as one aiohttp application.

Handlers are thin: they parse with :mod:`tracker.protocol` or :mod:`modelcast`, call the
store (in a thread: SQLite blocks) or the swarm registry (in memory, fast), and encode the
answer.  Errors become ``{"error": {"code", "message"}}`` JSON in one middleware; tracker
routes answer a bencoded ``failure reason`` instead, as BitTorrent clients expect.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import urlparse

from aiohttp import web

from modelcast.config import TrackerConfig
from modelcast.errors import (ArtifactNotFound, BadRequest, InvalidManifest, ModelcastError, OriginError, Unauthorized,
                              error_body)
from modelcast.manifest import FileEntry, Manifest, canonical_json
from modelcast.origin import Origin, open_origin
from modelcast.reference import Reference, validate_digest, validate_name, validate_tag

from .protocol import (ProtocolError, encode_announce, encode_failure, encode_scrape, normalize_ip, parse_announce,
                       parse_scrape, set_announce)
from .store import MAX_LIST_LIMIT, RegistryStore
from .swarm import SwarmRegistry
from .firstcopy import HEADER as FIRST_COPY_HEADER, FirstCopyGate
from .torrent_check import check_torrent

log = logging.getLogger("modelcast.tracker")

# Torrents of very large artifacts carry v2 piece layers; base64 adds a third.  64 MiB
# leaves room for any realistic torrent while bounding what one request can make us buffer.
MAX_BODY_BYTES = 64 * 1024 * 1024
MANIFEST_CACHE_SIZE = 1024
BENCODE_TYPE = "text/plain"


@dataclass
class Stats:
    """Counters reported by ``GET /v1/stats``."""

    origin_bytes_served: int = 0
    origin_requests: int = 0


@dataclass(frozen=True)
class WebseedArtifact:
    """What the web seed needs of an artifact: where its bytes live and its file table."""

    origin_url: str
    s3_endpoint: str | None
    torrent_name: str
    files: dict[str, FileEntry]


@dataclass
class OriginCache:
    """Origins by (url, endpoint), built once: an S3 client is slow to create and thread-safe."""

    default_s3_endpoint: str | None
    origins: dict[tuple[str, str | None], Origin] = field(default_factory=dict)

    async def get(self, url: str, s3_endpoint: str | None) -> Origin:
        key = (url, s3_endpoint or self.default_s3_endpoint)
        origin = self.origins.get(key)
        if origin is None:
            origin = await asyncio.to_thread(open_origin, *key)
            origin = self.origins.setdefault(key, origin)
        return origin


CONFIG = web.AppKey("config", TrackerConfig)
STORE = web.AppKey("store", RegistryStore)
SWARMS = web.AppKey("swarms", SwarmRegistry)
STATS = web.AppKey("stats", Stats)
ORIGINS = web.AppKey("origins", OriginCache)
WEBSEED_CACHE = web.AppKey("webseed_cache", OrderedDict)
FIRST_COPY = web.AppKey("first_copy", FirstCopyGate)


# ---------------------------------------------------------------------------------------
# Middleware, auth and helpers

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "too_large"}


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Turn every error into a JSON error body; an unexpected one is logged, never fatal."""
    try:
        return await handler(request)
    except ModelcastError as exc:
        return web.json_response(error_body(exc), status=exc.http_status)
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


def _check_auth(request: web.Request) -> None:
    token = request.app[CONFIG].token
    if not token:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized(f"{request.method} {request.path} needs 'Authorization: Bearer TOKEN' "
                           "(set MODELCAST_TOKEN or pass --token)")
    # Constant-time comparison so the token cannot be guessed byte by byte from timings.
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized(f"{request.method} {request.path}: the bearer token is wrong")


def _bencoded(body: bytes) -> web.Response:
    return web.Response(body=body, content_type=BENCODE_TYPE)


def _parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object with 'manifest', 'torrent', 'origin' and 'tag'")
    return body


def _validate_origin(origin: Any) -> tuple[str, str | None]:
    if not isinstance(origin, dict) or not isinstance(origin.get("url"), str):
        raise BadRequest("'origin' must be an object with a 'url' (file:///DIR or s3://BUCKET/PREFIX)")
    url = origin["url"]
    endpoint = origin.get("s3_endpoint")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise BadRequest(f"origin {url!r}: file URLs must be file:///absolute/path")
    elif parsed.scheme == "s3":
        if not parsed.netloc:
            raise BadRequest(f"origin {url!r}: expected s3://BUCKET/PREFIX")
    else:
        raise BadRequest(f"origin {url!r}: expected file:///DIR or s3://BUCKET/PREFIX")
    if endpoint is not None:
        if not isinstance(endpoint, str) or urlparse(endpoint).scheme not in ("http", "https"):
            raise BadRequest(f"origin s3_endpoint {endpoint!r} must be an http(s) URL or null")
    return url, endpoint


def _parse_manifest(obj: Any) -> Manifest:
    if not isinstance(obj, dict):
        raise InvalidManifest("'manifest' must be a JSON object")
    try:
        manifest = Manifest.from_json(obj)
    except ModelcastError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise InvalidManifest(f"manifest is malformed: {exc}") from exc
    # The digest is the hash of the canonical form; if what was sent differs from it
    # (extra or defaulted fields), the publisher's idea of the digest would be wrong.
    if canonical_json(obj) != manifest.canonical_bytes():
        extra = sorted(set(obj) - set(manifest.body()))
        raise InvalidManifest(
            "manifest is not in canonical form" + (f" (unknown fields: {', '.join(extra)})" if extra else "")
            + "; send Manifest.body()"
        )
    return manifest


def _digest_param(request: web.Request) -> str:
    return validate_digest(request.match_info["digest"])


def _not_found(ref: str) -> ArtifactNotFound:
    return ArtifactNotFound(f"artifact {ref} not found in registry")


# ---------------------------------------------------------------------------------------
# Registry API


async def health(request: web.Request) -> web.Response:
    """``GET /v1/health``."""
    return web.json_response({"ok": True})


async def check_token(request: web.Request) -> web.Response:
    """``POST /v1/auth/check``: 200 if the bearer token may write, so a publisher fails before hashing."""
    _check_auth(request)
    return web.json_response({"ok": True})


async def stats(request: web.Request) -> web.Response:
    """``GET /v1/stats``."""
    app = request.app
    swarms = app[SWARMS]
    return web.json_response({
        "origin_bytes_served": app[STATS].origin_bytes_served,
        "origin_requests": app[STATS].origin_requests,
        "origin_refused_repeats": app[FIRST_COPY].refused,
        "announces": swarms.announces,
        "swarms": swarms.active_swarms(),
    })


async def publish(request: web.Request) -> web.Response:
    """``POST /v1/artifacts``: validate manifest, torrent and origin, then store and tag."""
    _check_auth(request)
    body = _parse_json_body(await request.read())
    manifest = _parse_manifest(body.get("manifest"))
    torrent_b64 = body.get("torrent")
    if not isinstance(torrent_b64, str):
        raise BadRequest("'torrent' must be the base64 of the .torrent file")
    try:
        torrent = base64.b64decode(torrent_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"'torrent' is not valid base64: {exc}") from None
    origin_url, s3_endpoint = _validate_origin(body.get("origin"))
    tag = body.get("tag")
    if tag is not None:
        if not isinstance(tag, str):
            raise BadRequest("'tag' must be a string or null")
        validate_tag(tag)
    await asyncio.to_thread(check_torrent, torrent, manifest)
    store = request.app[STORE]
    result = await asyncio.to_thread(store.publish, manifest, torrent, origin_url, s3_endpoint, tag)
    request.app[SWARMS].allow(manifest.info_hash.tracker_keys())
    log.info("published %s as %s%s (%s)", result.digest, manifest.name, f":{tag}" if tag else "",
             "new" if result.created else "existing")
    return web.json_response(
        {"digest": result.digest, "name": result.name, "tag": result.tag, "created": result.created},
        status=201 if result.created else 200,
    )


async def resolve(request: web.Request) -> web.Response:
    """``GET /v1/resolve?ref=``: a reference to its digest and manifest."""
    ref_s = request.query.get("ref")
    if not ref_s:
        raise BadRequest("resolve needs ?ref=NAME:TAG, NAME@sha256:HEX or sha256:HEX")
    ref = Reference.parse(ref_s)
    store = request.app[STORE]
    if ref.tag is not None:
        digest = await asyncio.to_thread(store.resolve_tag, ref.name, ref.tag)
        if digest is None:
            raise _not_found(str(ref))
    else:
        digest = ref.digest
        name = await asyncio.to_thread(store.artifact_name, digest)
        if name is None:
            raise _not_found(str(ref))
        if ref.name is not None and name != ref.name:
            raise ArtifactNotFound(f"artifact {ref} not found in registry: digest {digest} is published as {name!r}")
    data = await asyncio.to_thread(store.manifest_bytes, digest)
    if data is None:  # The artifact vanished between the two reads; artifacts are never deleted.
        raise _not_found(str(ref))
    manifest = json.loads(data)
    return web.json_response({"digest": digest, "name": manifest["name"], "manifest": manifest})


async def get_manifest(request: web.Request) -> web.Response:
    """``GET /v1/artifacts/{digest}``: the canonical manifest bytes, exactly as hashed."""
    digest = _digest_param(request)
    data = await asyncio.to_thread(request.app[STORE].manifest_bytes, digest)
    if data is None:
        raise _not_found(digest)
    return web.Response(body=data, content_type="application/json",
                        headers={"Cache-Control": "public, max-age=31536000, immutable"})


async def get_torrent(request: web.Request) -> web.Response:
    """``GET /v1/artifacts/{digest}/torrent``: the torrent, announcing to this registry."""
    digest = _digest_param(request)
    record = await asyncio.to_thread(request.app[STORE].get, digest)
    if record is None:
        raise _not_found(digest)
    # The announce URL follows how the client reached us, so a registry behind any
    # hostname or port hands out a tracker URL that the same client can reach.
    body = set_announce(record.torrent, f"{request.scheme}://{request.host}/announce")
    return web.Response(body=body, content_type="application/x-bittorrent")


async def list_artifacts(request: web.Request) -> web.Response:
    """``GET /v1/artifacts?name=&content_key=&limit=&after=``: one page, ordered by (name, digest)."""
    q = request.query
    name = q.get("name") or None
    if name is not None:
        validate_name(name)
    content_key = q.get("content_key") or None
    if content_key is not None:
        validate_digest(content_key)
    limit_s = q.get("limit") or "100"
    if not limit_s.isdigit() or not 1 <= int(limit_s) <= MAX_LIST_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}, got {limit_s!r}")
    items, nxt = await asyncio.to_thread(
        request.app[STORE].list, name=name, content_key=content_key, limit=int(limit_s), after=q.get("after") or None
    )
    return web.json_response({"artifacts": items, "next": nxt})


# ---------------------------------------------------------------------------------------
# Web seed (BEP 19)


async def _webseed_artifact(app: web.Application, digest: str) -> WebseedArtifact:
    cache: OrderedDict[str, WebseedArtifact] = app[WEBSEED_CACHE]
    art = cache.get(digest)
    if art is not None:
        cache.move_to_end(digest)
        return art
    record = await asyncio.to_thread(app[STORE].get, digest)
    if record is None:
        raise _not_found(digest)
    manifest = Manifest.from_bytes(record.manifest)
    # Artifacts are immutable, so a cached entry can never go stale.
    art = WebseedArtifact(record.origin_url, record.s3_endpoint, manifest.torrent_name,
                          {f.path: f for f in manifest.files})
    cache[digest] = art
    if len(cache) > MANIFEST_CACHE_SIZE:
        cache.popitem(last=False)
    return art


def _local_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _byte_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte asked for, None for the whole file.

    Raises HTTPRequestRangeNotSatisfiable for a malformed, multi-part or out-of-bounds range.
    """
    unsatisfiable = web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    try:
        rng = request.http_range
    except ValueError:
        raise unsatisfiable from None
    if rng.start is None and rng.stop is None:
        return None
    if rng.start < 0:  # suffix range "bytes=-N": the last N bytes
        first, last = max(0, size + rng.start), size - 1
    else:
        first = rng.start
        last = size - 1 if rng.stop is None else min(rng.stop - 1, size - 1)
    if first >= size or last < first:
        raise unsatisfiable
    return first, last


async def webseed(request: web.Request) -> web.StreamResponse:
    """``GET /v1/webseed/{digest}/{torrent_name}/{path}``: file bytes from the origin.

    Nodes never hold origin credentials; the registry reads the origin for them.  A
    file origin is served with sendfile; an S3 origin is streamed from a worker thread.
    """
    digest = _digest_param(request)
    tail = request.match_info["tail"]
    art = await _webseed_artifact(request.app, digest)
    prefix = art.torrent_name + "/"
    entry = art.files.get(tail[len(prefix):]) if tail.startswith(prefix) else None
    if entry is None:
        raise ArtifactNotFound(f"file {tail!r} is not in artifact {digest} (paths start with {prefix!r})")
    span = _byte_range(request, entry.size) if entry.size else None
    first_byte, last_byte = span if span is not None else (0, max(entry.size - 1, 0))
    if not request.app[FIRST_COPY].admit(digest, tail, first_byte, last_byte,
                                         first_copy=request.headers.get(FIRST_COPY_HEADER) == "1"):
        # Another node fetched these bytes moments ago; they will come from the swarm.
        return web.json_response({"error": {"code": "served_elsewhere",
                                            "message": f"{tail} bytes {first_byte}-{last_byte} were just served to "
                                                       "another node; take them from peers"}}, status=409)
    origin = await request.app[ORIGINS].get(art.origin_url, art.s3_endpoint)
    local = origin.blob_local_path(entry.xxh3_128)
    if local is not None:
        size = await asyncio.to_thread(_local_size, local)
        if size != entry.size:
            raise OriginError(
                f"blob {entry.xxh3_128} of {tail!r} in origin {origin.url} is "
                f"{'missing' if size is None else f'{size} bytes'}, expected {entry.size} bytes; re-publish the artifact"
            )
        return web.FileResponse(local, headers={"Accept-Ranges": "bytes"})
    return await _stream_remote(request, origin, entry)


async def _stream_remote(request: web.Request, origin: Origin, entry: FileEntry) -> web.StreamResponse:
    size = entry.size
    span = _byte_range(request, size)
    first, last = span if span is not None else (0, size - 1)
    headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    if span is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    resp = web.StreamResponse(status=206 if span is not None else 200, headers=headers)
    resp.content_length = last - first + 1 if size else 0
    if size == 0 or request.method == "HEAD":
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    chunks = origin.read_blob(entry.xxh3_128, first, last)
    try:
        # Read the first chunk before sending headers, so an origin failure still becomes
        # a proper JSON error instead of a cut-off 200.
        chunk = await asyncio.to_thread(next, chunks, None)
        await resp.prepare(request)
        sent = 0
        try:
            while chunk is not None:
                await resp.write(chunk)
                sent += len(chunk)
                chunk = await asyncio.to_thread(next, chunks, None)
            if sent != resp.content_length:
                raise OriginError(f"origin {origin.url} sent {sent} of {resp.content_length} bytes "
                                  f"of blob {entry.xxh3_128}")
        except OriginError as exc:
            # Headers are gone, so no error body is possible: cut the connection, which
            # tells the client the body is short, and let it retry elsewhere.
            log.warning("web seed of %s aborted after %d bytes: %s", entry.path, sent, exc)
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp
    finally:
        await asyncio.to_thread(chunks.close)


async def _count_origin_bytes(request: web.Request, response: web.StreamResponse) -> None:
    route = request.match_info.route
    if (getattr(route, "name", None) == "webseed" and request.method == "GET"
            and response.status in (200, 206)):
        stats = request.app[STATS]
        stats.origin_requests += 1
        stats.origin_bytes_served += response.content_length or 0


# ---------------------------------------------------------------------------------------
# BitTorrent tracker


async def announce(request: web.Request) -> web.Response:
    """``GET /announce`` (BEP 3/23/7), with modelcast's ``zone=`` extension."""
    cfg = request.app[CONFIG]
    try:
        a = parse_announce(request.rel_url.raw_query_string, default_numwant=cfg.default_numwant,
                           max_numwant=cfg.max_numwant)
        ip = a.ip or normalize_ip(request.remote)
        if ip is None:
            raise ProtocolError("cannot tell the client's IP address; pass ip=")
        result = request.app[SWARMS].announce(a, ip, time.monotonic())
    except ModelcastError as exc:
        return _bencoded(encode_failure(str(exc)))
    return _bencoded(encode_announce(
        result.peers, result.counts, interval=cfg.announce_interval_s, min_interval=cfg.min_announce_interval_s,
        compact=a.compact, no_peer_id=a.no_peer_id,
    ))


async def scrape(request: web.Request) -> web.Response:
    """``GET /scrape`` (BEP 48)."""
    try:
        hashes = parse_scrape(request.rel_url.raw_query_string)
    except ModelcastError as exc:
        return _bencoded(encode_failure(str(exc)))
    return _bencoded(encode_scrape(request.app[SWARMS].scrape(hashes)))


# ---------------------------------------------------------------------------------------
# Application


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    store = await asyncio.to_thread(RegistryStore, Path(cfg.data_dir))
    app[STORE] = store
    # Swarm state is not persisted (peers re-announce within one interval), but the
    # allow-list is: without it every announce after a restart would be refused.
    swarms = app[SWARMS]
    for ih in await asyncio.to_thread(store.all_info_hashes):
        swarms.allow(_tracker_keys(ih))
    expiry = asyncio.create_task(_expire_peers(app), name="modelcast-peer-expiry")
    log.info("registry database %s; %d published swarms", store.path, len(swarms.swarms()))
    try:
        yield
    finally:
        expiry.cancel()
        try:
            await expiry
        except asyncio.CancelledError:
            pass
        await asyncio.to_thread(store.close)


def _tracker_keys(info_hash: dict) -> list[bytes]:
    keys = []
    if info_hash.get("v1"):
        keys.append(bytes.fromhex(info_hash["v1"]))
    if info_hash.get("v2"):
        keys.append(bytes.fromhex(info_hash["v2"])[:20])
    return keys


async def _expire_peers(app: web.Application) -> None:
    """Drop peers that stopped announcing; off the announce path, on a timer."""
    cfg = app[CONFIG]
    period = max(0.1, min(cfg.peer_ttl_s / 4, 5.0))
    while True:
        await asyncio.sleep(period)
        try:
            gone = app[SWARMS].expire(time.monotonic(), cfg.peer_ttl_s)
            if gone:
                log.debug("expired %d silent peers", gone)
        except Exception:  # A bug here must not stop expiry for the life of the server.
            log.exception("peer expiry failed")


def make_app(cfg: TrackerConfig) -> web.Application:
    """Build the registry + tracker application for ``cfg`` (used by :func:`serve` and tests)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = cfg
    app[SWARMS] = SwarmRegistry()
    app[STATS] = Stats()
    app[ORIGINS] = OriginCache(cfg.s3_endpoint)
    app[WEBSEED_CACHE] = OrderedDict()
    app[FIRST_COPY] = FirstCopyGate()
    app.cleanup_ctx.append(_registry_ctx)
    app.on_response_prepare.append(_count_origin_bytes)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/stats", stats)
    app.router.add_post("/v1/artifacts", publish)
    app.router.add_post("/v1/auth/check", check_token)
    app.router.add_get("/v1/artifacts", list_artifacts)
    app.router.add_get("/v1/resolve", resolve)
    app.router.add_get("/v1/artifacts/{digest}", get_manifest)
    app.router.add_get("/v1/artifacts/{digest}/torrent", get_torrent)
    app.router.add_get("/v1/webseed/{digest}/{tail:.*}", webseed, name="webseed")
    app.router.add_get("/announce", announce)
    app.router.add_get("/scrape", scrape)
    return app


def serve(cfg: TrackerConfig) -> None:
    """Run the registry and tracker on ``cfg.host:cfg.port`` until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # run_app turns SIGINT and SIGTERM into a graceful exit that runs cleanup_ctx, so
    # the database is closed cleanly and the process exits with status 0.
    web.run_app(make_app(cfg), host=cfg.host, port=cfg.port, access_log=None, shutdown_timeout=5.0,
                print=lambda msg: log.info("%s", msg.strip()))
