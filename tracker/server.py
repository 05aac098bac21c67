"""The registry HTTP API and BitTorrent tracker as one aiohttp application.

Handlers are thin: they parse with :mod:`tracker.protocol` or :mod:`modelcast`, call the
store (in a thread: SQLite blocks) or the swarm registry (in memory, fast), and encode the
answer.  Errors become ``{"error": {"code", "message"}}`` JSON in one middleware; tracker
routes answer a bencoded ``failure reason`` instead, as BitTorrent clients expect.

:func:`serve` puts :mod:`tracker.fastpath` in front of aiohttp on the same socket: plain
announce and scrape GETs are answered there, through the same :class:`TrackerEndpoint`
as the aiohttp handlers, and every other request goes to aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import urlparse, urlsplit

from aiohttp import web

from modelcast.config import TrackerConfig
from modelcast.errors import (ArtifactNotFound, BadRequest, InvalidManifest, ModelcastError, OriginError, Unauthorized,
                              error_body)
from modelcast.manifest import FileEntry, Manifest, canonical_json
from adapters.origin import Origin, open_origin
from modelcast.reference import Reference, validate_digest, validate_name, validate_tag
from modelcast.wire import FIRST_COPY_HEADER, RELAY_FROM_HEADER, RELAY_HEADER, RELAY_TO_HEADER, ZONE_HEADER

from .protocol import (ZONE_RE, ProtocolError, encode_announce, encode_failure, encode_scrape, normalize_ip,
                       parse_announce, parse_scrape, set_announce, validate_node_id)
from .store import MAX_LIST_LIMIT, ArtifactRecord, Found, RegistryStore
from .swarm import SwarmRegistry
from .firstcopy import FirstCopyGate
from .torrent_check import check_torrent
from .federation import Upstream, UpstreamUnreachable, is_upstream_origin, validate_upstream
from .udp import UdpTracker, UdpTrackerProtocol, start_udp_tracker
from .fastpath import HEAD_TIMEOUT_S, KEEPALIVE_TIMEOUT_S, FastPathServer

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
RELAY_TO = "modelcast.relay_to"  # request key: the nodes a web-seed answer's bytes go on to
# Held around every store write that changes which artifacts exist together with the
# swarm allow-list update that follows it, so the allow-list changes in commit order (a
# publish and a delete of one artifact racing must not leave a deleted artifact allowed).
WRITE_LOCK = web.AppKey("write_lock", asyncio.Lock)
# The parent registry when this one is a zone (TrackerConfig.upstream), else absent.
UPSTREAM = web.AppKey("upstream", Upstream)
# The BEP 15 endpoint when TrackerConfig.udp_port is set; tests read its bound port.
UDP_TRACKER = web.AppKey("udp_tracker", UdpTrackerProtocol)


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


def _check_auth(request: web.Request, *, read: bool = False) -> None:
    """Raise Unauthorized unless the request's bearer token may write (or, with ``read``, read).

    Writes need ``TrackerConfig.token``.  Reads are open unless ``read_token`` is set;
    then they need it or the write token.  Announce and scrape never call this: BitTorrent
    clients cannot send headers, and the private torrents' info-hash allow-list guards them.
    """
    cfg = request.app[CONFIG]
    if read:
        if not cfg.read_token:
            return
        tokens = [t for t in (cfg.read_token, cfg.token) if t]
    else:
        if not cfg.token:
            return
        tokens = [cfg.token]
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized(f"{request.method} {request.path} needs 'Authorization: Bearer TOKEN' "
                           "(set MODELCAST_TOKEN or pass --token)")
    # Constant-time comparison so the token cannot be guessed byte by byte from timings;
    # every token is compared, so timing does not tell which one nearly matched either.
    given_b = given.strip().encode("utf-8", "surrogateescape")
    matches = [hmac.compare_digest(given_b, t.encode()) for t in tokens]
    if not any(matches):
        raise Unauthorized(f"{request.method} {request.path}: the bearer token is wrong"
                           + (" (reads need the registry's read token or write token)" if read else ""))


def _bencoded(body: bytes) -> web.Response:
    return web.Response(body=body, content_type=BENCODE_TYPE)


def _parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object with 'manifest', 'torrent', 'origin' and 'tag'")
    return body


def _validate_origin(origin: Any) -> tuple[str, str | None]:
    if not isinstance(origin, dict) or not isinstance(origin.get("url"), str):
        raise BadRequest("'origin' must be an object with a 'url' (file:///DIR or s3://BUCKET/PREFIX)")
    url = origin["url"]
    endpoint = origin.get("s3_endpoint")
    try:
        parsed = urlparse(url)
        endpoint_scheme = urlparse(endpoint).scheme if isinstance(endpoint, str) else None
    except ValueError as exc:  # e.g. an unbalanced '[' in the host
        raise BadRequest(f"origin {url!r} or its s3_endpoint is not a valid URL: {exc}") from None
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise BadRequest(f"origin {url!r}: file URLs must be file:///absolute/path")
    elif parsed.scheme == "s3":
        if not parsed.netloc:
            raise BadRequest(f"origin {url!r}: expected s3://BUCKET/PREFIX")
    else:
        raise BadRequest(f"origin {url!r}: expected file:///DIR or s3://BUCKET/PREFIX")
    if endpoint is not None:
        if not isinstance(endpoint, str) or endpoint_scheme not in ("http", "https"):
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
    try:
        canonical = manifest.canonical_bytes() == canonical_json(obj)
    except (ValueError, RecursionError) as exc:  # lone surrogates cannot be UTF-8; absurd nesting
        raise InvalidManifest(f"manifest cannot be serialised canonically: {exc.__class__.__name__}: {exc}") from None
    if not canonical:
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
        "origin_relayed_across_zones": app[FIRST_COPY].relayed,
        "origin_pushed_across_zones": app[FIRST_COPY].pushed,
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
    async with request.app[WRITE_LOCK]:
        result = await asyncio.to_thread(store.publish, manifest, torrent, origin_url, s3_endpoint, tag)
        request.app[SWARMS].allow(manifest.info_hash.tracker_keys())
    log.info("published %s as %s%s (%s)", result.digest, manifest.name, f":{tag}" if tag else "",
             "new" if result.created else "existing")
    return web.json_response(
        {"digest": result.digest, "name": result.name, "tag": result.tag, "created": result.created},
        status=201 if result.created else 200,
    )


async def _lookup(app: web.Application, ref: Reference) -> Found:
    """What ``ref`` names here, pulled through from the upstream registry if this is a zone."""
    found = await asyncio.to_thread(app[STORE].lookup, ref)
    upstream = app.get(UPSTREAM)
    if upstream is not None and upstream.wants(ref, found):
        found = await upstream.refresh(ref, found)
    if found is None:
        raise _not_found(str(ref))
    if ref.name is not None and found.name != ref.name:
        raise ArtifactNotFound(f"artifact {ref} not found in registry: digest {found.digest} is published as "
                               f"{found.name!r}")
    return found


async def resolve(request: web.Request) -> web.Response:
    """``GET /v1/resolve?ref=``: a reference to its digest and manifest."""
    _check_auth(request, read=True)
    ref_s = request.query.get("ref")
    if not ref_s:
        raise BadRequest("resolve needs ?ref=NAME:TAG, NAME@sha256:HEX or sha256:HEX")
    found = await _lookup(request.app, Reference.parse(ref_s))
    # One read gave digest and manifest together, so a tag never points at a missing manifest.
    return web.json_response({"digest": found.digest, "name": found.name, "manifest": json.loads(found.manifest)})


async def _record(app: web.Application, digest: str) -> ArtifactRecord:
    """The stored artifact ``digest``, pulled through from the upstream registry if this is a zone."""
    found = await _lookup(app, Reference(None, None, digest))
    record = await asyncio.to_thread(app[STORE].get, found.digest)
    if record is None:  # Deleted between the two reads.
        raise _not_found(digest)
    return record


async def get_manifest(request: web.Request) -> web.Response:
    """``GET /v1/artifacts/{digest}``: the canonical manifest bytes, exactly as hashed."""
    _check_auth(request, read=True)
    digest = _digest_param(request)
    data = (await _lookup(request.app, Reference(None, None, digest))).manifest
    return web.Response(body=data, content_type="application/json",
                        headers={"Cache-Control": "public, max-age=31536000, immutable"})


async def get_torrent(request: web.Request) -> web.Response:
    """``GET /v1/artifacts/{digest}/torrent``: the torrent, announcing to this registry."""
    _check_auth(request, read=True)
    record = await _record(request.app, _digest_param(request))
    # The announce URL follows how the client reached us, so a registry behind any
    # hostname or port hands out a tracker URL that the same client can reach.
    body = set_announce(record.torrent, f"{request.scheme}://{request.host}/announce")
    return web.Response(body=body, content_type="application/x-bittorrent")


async def list_artifacts(request: web.Request) -> web.Response:
    """``GET /v1/artifacts?name=&content_key=&limit=&after=``: one page, ordered by (name, digest)."""
    _check_auth(request, read=True)
    q = request.query
    name = q.get("name") or None
    if name is not None:
        validate_name(name)
    content_key = q.get("content_key") or None
    if content_key is not None:
        validate_digest(content_key)
    limit_s = q.get("limit") or "100"
    # isascii: str.isdigit() also accepts digits such as '²' that int() refuses.
    if not (limit_s.isascii() and limit_s.isdigit() and len(limit_s) < 8) or not 1 <= int(limit_s) <= MAX_LIST_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}, got {limit_s!r}")
    items, nxt = await asyncio.to_thread(
        request.app[STORE].list, name=name, content_key=content_key, limit=int(limit_s), after=q.get("after") or None
    )
    return web.json_response({"artifacts": items, "next": nxt})


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "")
    if value not in ("", "0", "1", "true", "false"):
        raise BadRequest(f"?{name}= must be 1 or 0, got {value[:40]!r}")
    return value in ("1", "true")


async def delete_tag(request: web.Request) -> web.Response:
    """``DELETE /v1/tags/{name}:{tag}``: remove a tag; the artifact stays, reachable by digest.

    The name may contain '/', so the route takes the rest of the path as a ``NAME:TAG``
    reference (the tag follows the last ':').
    """
    _check_auth(request)
    ref = Reference.parse(request.match_info["ref"])
    if ref.tag is None:
        raise BadRequest(f"DELETE /v1/tags/ takes NAME:TAG, got {str(ref)!r}; "
                         "delete an artifact with DELETE /v1/artifacts/{digest}")
    digest = await asyncio.to_thread(request.app[STORE].delete_tag, ref.name, ref.tag)
    if digest is None:
        raise ArtifactNotFound(f"tag {ref} not found in registry")
    log.info("deleted tag %s (was %s)", ref, digest)
    return web.json_response({"name": ref.name, "tag": ref.tag, "digest": digest})


async def delete_artifact(request: web.Request) -> web.Response:
    """``DELETE /v1/artifacts/{digest}?force=&name=``: remove an artifact (409 while tagged, unless force).

    With ``force=1`` its tags go too.  ``name=`` makes the delete apply only to the
    artifact of that name (``modelcast rm NAME@DIGEST``).  Its info-hashes leave the swarm
    allow-list unless another artifact has the same torrent.  Origin blobs are kept:
    other artifacts may share them.
    """
    _check_auth(request)
    digest = _digest_param(request)
    force = _flag(request, "force")
    name = request.query.get("name") or None
    if name is not None:
        validate_name(name)
    app = request.app
    async with app[WRITE_LOCK]:
        deleted = await asyncio.to_thread(app[STORE].delete_artifact, digest, force=force, name=name)
        if deleted is not None:
            app[SWARMS].disallow(deleted.dropped_keys)
    if deleted is None:
        raise _not_found(f"{name}@{digest}" if name else digest)
    app[WEBSEED_CACHE].pop(digest, None)
    log.info("deleted %s (%s)%s", digest, deleted.name, f" and its tags {', '.join(deleted.tags)}" if deleted.tags else "")
    return web.json_response({"digest": digest, "name": deleted.name, "tags_removed": deleted.tags})


# ---------------------------------------------------------------------------------------
# Web seed (BEP 19)


async def _webseed_artifact(app: web.Application, digest: str) -> WebseedArtifact:
    cache: OrderedDict[str, WebseedArtifact] = app[WEBSEED_CACHE]
    art = cache.get(digest)
    if art is not None:
        cache.move_to_end(digest)
        return art
    record = await _record(app, digest)
    manifest = Manifest.from_bytes(record.manifest)
    # Artifacts are immutable, so a cached entry can only go stale by a delete, which evicts it.
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


def _relay_url(value: str | None) -> str | None:
    """A node's relay URL as given in its header, if it is a plain http(s)://host[:port] URL."""
    if not value or len(value) > 256:
        return None
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.query or parts.fragment \
            or parts.path not in ("", "/"):
        return None
    return f"{parts.scheme}://{parts.netloc}"


async def webseed(request: web.Request) -> web.StreamResponse:
    """``GET /v1/webseed/{digest}/{torrent_name}/{path}``: file bytes from the origin.

    Nodes never hold origin credentials; the registry reads the origin for them.  A
    file origin is served with sendfile; an S3 origin is streamed from a worker thread;
    an artifact pulled through from a parent registry is streamed from the parent's web seed.
    """
    _check_auth(request, read=True)
    digest = _digest_param(request)
    tail = request.match_info["tail"]
    art = await _webseed_artifact(request.app, digest)
    prefix = art.torrent_name + "/"
    entry = art.files.get(tail[len(prefix):]) if tail.startswith(prefix) else None
    if entry is None:
        raise ArtifactNotFound(f"file {tail!r} is not in artifact {digest} (paths start with {prefix!r})")
    span = _byte_range(request, entry.size) if entry.size else None
    first_byte, last_byte = span if span is not None else (0, max(entry.size - 1, 0))
    zone = request.headers.get(ZONE_HEADER)
    admission = request.app[FIRST_COPY].admit(
        digest, tail, first_byte, last_byte, first_copy=request.headers.get(FIRST_COPY_HEADER) == "1",
        zone=zone if zone is not None and ZONE_RE.fullmatch(zone) else None,
        relay=_relay_url(request.headers.get(RELAY_HEADER)))
    if not admission.serve:
        # Another node fetched these bytes moments ago: they come from the swarm, or, for
        # the first node of another zone to ask, from that node (tracker/firstcopy.py).
        if admission.relay_from:
            return web.json_response({"error": {"code": "relay", "message": f"{tail} bytes {first_byte}-{last_byte} "
                                                f"were just served to a node of another zone; fetch them from it "
                                                f"({admission.relay_from})"}},
                                     status=409, headers={RELAY_FROM_HEADER: admission.relay_from})
        return web.json_response({"error": {"code": "served_elsewhere",
                                            "message": f"{tail} bytes {first_byte}-{last_byte} were just served to "
                                                       "another node; take them from peers"}}, status=409)
    if admission.relay_to:
        request[RELAY_TO] = " ".join(admission.relay_to)  # added as the response is prepared
    if is_upstream_origin(art.origin_url):
        return await _stream_upstream(request, art, digest, tail, entry)
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


async def _range_response(request: web.Request, size: int) -> tuple[web.StreamResponse, int, int]:
    """A streamed answer for the asked byte range of a ``size``-byte file: (response, first, last).

    An empty file or a HEAD request is answered at once (the response comes back prepared,
    with nothing more to send); otherwise the caller prepares and writes it.
    """
    span = _byte_range(request, size) if size else None
    first, last = span if span is not None else (0, size - 1)
    headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    if span is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    resp = web.StreamResponse(status=206 if span is not None else 200, headers=headers)
    resp.content_length = last - first + 1 if size else 0
    if size == 0 or request.method == "HEAD":
        await resp.prepare(request)
        await resp.write_eof()
    return resp, first, last


async def _stream_remote(request: web.Request, origin: Origin, entry: FileEntry) -> web.StreamResponse:
    resp, first, last = await _range_response(request, entry.size)
    if resp.prepared:
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


async def _stream_upstream(request: web.Request, art: WebseedArtifact, digest: str, tail: str,
                           entry: FileEntry) -> web.StreamResponse:
    """Relay bytes of a pulled-through artifact from the parent registry's web seed."""
    upstream = request.app.get(UPSTREAM)
    if upstream is None:
        raise UpstreamUnreachable(f"artifact {digest} was pulled through from {art.origin_url}, but this registry "
                                  f"runs without --upstream; restart it with --upstream {art.origin_url}")
    resp, first, last = await _range_response(request, entry.size)
    if resp.prepared:
        return resp
    sent = 0
    try:
        async with upstream.webseed(art.origin_url, digest, tail, first, last, entry.size) as chunks:
            # The first chunk arrives before our headers go out, so a parent that fails
            # at once still gives the node a proper JSON error.
            chunk = await anext(chunks, None)
            await resp.prepare(request)
            while chunk is not None:
                await resp.write(chunk)
                sent += len(chunk)
                chunk = await anext(chunks, None)
            if sent != resp.content_length:
                raise UpstreamUnreachable(f"upstream {art.origin_url} sent {sent} of {resp.content_length} bytes "
                                          f"of {tail} in {digest}")
    except ModelcastError as exc:
        if not resp.prepared:
            raise
        # Headers are gone: cut the connection so the node sees a short body and retries.
        log.warning("web seed relay of %s aborted after %d bytes: %s", tail, sent, exc)
        if request.transport is not None:
            request.transport.close()
        return resp
    await resp.write_eof()
    return resp


async def _count_origin_bytes(request: web.Request, response: web.StreamResponse) -> None:
    route = request.match_info.route
    if (getattr(route, "name", None) == "webseed" and request.method == "GET"
            and response.status in (200, 206)):
        stats = request.app[STATS]
        stats.origin_requests += 1
        stats.origin_bytes_served += response.content_length or 0
        relay_to = request.get(RELAY_TO)
        if relay_to:
            response.headers[RELAY_TO_HEADER] = relay_to


# ---------------------------------------------------------------------------------------
# BitTorrent tracker


class TrackerEndpoint:
    """Announce and scrape from raw query to bencoded answer, shared by the aiohttp handlers and the fast path.

    Never raises for bad input: a malformed request or an unknown info-hash becomes a
    bencoded ``failure reason``, as BitTorrent clients expect.
    """

    def __init__(self, cfg: TrackerConfig, swarms: SwarmRegistry) -> None:
        self._cfg = cfg
        self._swarms = swarms

    def announce(self, raw_query: str | bytes, remote: str | None) -> bytes:
        """``GET /announce`` (BEP 3/23/7), with modelcast's extensions; ``remote``: the client's socket address."""
        cfg = self._cfg
        try:
            a = parse_announce(raw_query, default_numwant=cfg.default_numwant, max_numwant=cfg.max_numwant)
            ip = a.ip or normalize_ip(remote)
            if ip is None:
                raise ProtocolError("cannot tell the client's IP address; pass ip=")
            result = self._swarms.announce(a, ip, time.monotonic())
        except ModelcastError as exc:
            return encode_failure(str(exc))
        return encode_announce(result.peers, result.counts, interval=cfg.announce_interval_s,
                               min_interval=cfg.min_announce_interval_s, compact=a.compact, no_peer_id=a.no_peer_id)

    def scrape(self, raw_query: str | bytes, remote: str | None = None) -> bytes:
        """``GET /scrape`` (BEP 48)."""
        try:
            hashes = parse_scrape(raw_query)
        except ModelcastError as exc:
            return encode_failure(str(exc))
        return encode_scrape(self._swarms.scrape(hashes))


TRACKER = web.AppKey("tracker", TrackerEndpoint)


async def announce(request: web.Request) -> web.Response:
    """``GET /announce`` through aiohttp (the fast path answers most announces before they get here)."""
    return _bencoded(request.app[TRACKER].announce(request.rel_url.raw_query_string, request.remote))


async def scrape(request: web.Request) -> web.Response:
    """``GET /scrape`` through aiohttp."""
    return _bencoded(request.app[TRACKER].scrape(request.rel_url.raw_query_string))


# ---------------------------------------------------------------------------------------
# Node liveness

MAX_HEARTBEAT_BODY = 4096


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
    _check_auth(request, read=True)
    node_id = validate_node_id(request.match_info["node_id"])
    if (request.content_length or 0) > MAX_HEARTBEAT_BODY:
        raise BadRequest(f"heartbeat body is {request.content_length} bytes; at most {MAX_HEARTBEAT_BODY} are read")
    try:
        body = json.loads(await request.read() or b"{}")
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"heartbeat body is not valid JSON: {exc}") from None
    ttl = _heartbeat_ttl(body, request.app[CONFIG])
    entries = request.app[SWARMS].heartbeat(node_id, time.monotonic(), ttl)
    return web.json_response({"ok": True, "ttl_s": ttl, "entries": entries})


async def node_leave(request: web.Request) -> web.Response:
    """``DELETE /v1/nodes/{node_id}``: the node stops; its entries leave every swarm at once."""
    _check_auth(request, read=True)
    node_id = validate_node_id(request.match_info["node_id"])
    removed = request.app[SWARMS].leave(node_id)
    log.info("node %s left %d swarm entries", node_id, removed)
    return web.json_response({"ok": True, "removed": removed})


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


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """Connect this zone's registry to its parent (``TrackerConfig.upstream``); see tracker/federation.py."""
    cfg = app[CONFIG]

    async def save(manifest: Manifest, torrent: bytes, tag: str | None) -> None:
        async with app[WRITE_LOCK]:
            await asyncio.to_thread(app[STORE].pull_through, manifest, torrent, upstream.url, tag)
            app[SWARMS].allow(manifest.info_hash.tracker_keys())

    upstream = Upstream(cfg.upstream, cfg.upstream_token, app[STORE], save, tag_ttl_s=cfg.upstream_tag_ttl_s)
    app[UPSTREAM] = upstream
    log.info("zone registry: unknown references are pulled through from %s", upstream.url)
    try:
        yield
    finally:
        await upstream.close()


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
            gone = app[SWARMS].expire(time.monotonic(), cfg.peer_ttl_s)
            if gone:
                log.debug("expired %d swarm entries of dead nodes and silent peers", gone)
        except Exception:  # A bug here must not stop expiry for the life of the server.
            log.exception("peer expiry failed")


async def _udp_tracker_ctx(app: web.Application) -> AsyncIterator[None]:
    """Serve the BEP 15 UDP tracker beside HTTP, on the same swarms, when configured."""
    cfg = app[CONFIG]
    if cfg.udp_port is None:
        yield
        return
    tracker = UdpTracker(app[SWARMS], interval=cfg.announce_interval_s, default_numwant=cfg.default_numwant,
                         max_numwant=cfg.max_numwant)
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
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = cfg
    app[SWARMS] = SwarmRegistry(zone_gateways=cfg.zone_gateways)
    app[TRACKER] = TrackerEndpoint(cfg, app[SWARMS])
    app[STATS] = Stats()
    app[ORIGINS] = OriginCache(cfg.s3_endpoint)
    app[WEBSEED_CACHE] = OrderedDict()
    app[FIRST_COPY] = FirstCopyGate()
    app[WRITE_LOCK] = asyncio.Lock()
    app.cleanup_ctx.append(_registry_ctx)
    if cfg.upstream:
        validate_upstream(cfg.upstream)  # a bad URL fails at start, not on the first pull
        app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_udp_tracker_ctx)
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
    app.router.add_delete("/v1/artifacts/{digest}", delete_artifact)
    app.router.add_delete("/v1/tags/{ref:.+}", delete_tag)
    app.router.add_get("/announce", announce)
    app.router.add_get("/scrape", scrape)
    app.router.add_post("/v1/nodes/{node_id}/heartbeat", node_heartbeat)
    app.router.add_delete("/v1/nodes/{node_id}", node_leave)
    return app


SHUTDOWN_TIMEOUT_S = 5.0


@dataclass
class RunningServer:
    """A started registry + tracker: aiohttp behind the announce fast path, on one listening socket."""

    runner: web.AppRunner
    server: asyncio.Server
    fast: FastPathServer

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


async def start_server(app: web.Application, host: str, port: int, *, head_timeout_s: float = HEAD_TIMEOUT_S,
                       keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S) -> RunningServer:
    """Start ``app`` (from :func:`make_app`) on ``host:port`` (0: any free port), as :func:`serve` runs it.

    Each connection is sniffed: plain announce and scrape GETs are answered by
    :mod:`tracker.fastpath`, everything else is handed to aiohttp's request handler.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        endpoint = app[TRACKER]
        fast = FastPathServer(runner.server, {b"/announce": endpoint.announce, b"/scrape": endpoint.scrape},
                              head_timeout_s=head_timeout_s, keepalive_timeout_s=keepalive_timeout_s)
        server = await asyncio.get_running_loop().create_server(fast, host, port)
    except BaseException:
        await runner.cleanup()
        raise
    return RunningServer(runner, server, fast)


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
    try:
        running = await start_server(make_app(cfg), cfg.host, cfg.port)
    except OSError as exc:
        # A taken port or an address this host lacks: one line the operator can act on.
        raise ModelcastError(f"cannot listen on {host}:{cfg.port}: {exc.strerror or exc}; "
                             "choose another --listen address or port") from exc
    try:
        log.info("registry and tracker on http://%s:%d", host, running.port)
        await stop.wait()
        log.info("stopping: closing connections, then the database")
    finally:
        await running.stop()
