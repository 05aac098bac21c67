"""The registry's HTTP API (``/v1/…``, JSON): publish, resolve, manifests, torrents, lists, deletes.

Handlers are thin: they parse with :mod:`modelcast`, call the store in a thread (its database
driver blocks) and, on a zone registry, pull unknown references through from the parent
(:mod:`tracker.federation`).  Errors are raised as :mod:`modelcast.errors` and become
``{"error": {"code", "message"}}`` JSON in the application's middleware.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import random
from typing import Any
from urllib.parse import urlparse

from aiohttp import web

from adapters.http_server import read_body
from modelcast.errors import ArtifactNotFound, BadRequest, InvalidManifest, ModelcastError
from modelcast.manifest import Manifest, canonical_json
from modelcast.reference import Reference, validate_digest, validate_name, validate_tag

from .auth import check_auth
from .bencode import set_announce
from .state import CONFIG, FIRST_COPY, STATS, STORE, SWARMS, UPSTREAM, WEBSEED_CACHE, WRITE_LOCK
from .swarmstore import settle
from .store import MAX_LIST_LIMIT, ArtifactRecord, Found
from .torrent_check import check_torrent

log = logging.getLogger("modelcast.tracker")

# Torrents of very large artifacts carry v2 piece layers; base64 adds a third.  64 MiB
# leaves room for any realistic torrent while bounding what one publish can make us buffer.
MAX_PUBLISH_BODY = 64 * 1024 * 1024


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


def digest_param(request: web.Request) -> str:
    """The ``{digest}`` of the request's route, checked (``sha256:`` and 64 hex digits)."""
    return validate_digest(request.match_info["digest"])


def _not_found(ref: str) -> ArtifactNotFound:
    return ArtifactNotFound(f"artifact {ref} not found in registry")


# ---------------------------------------------------------------------------------------
# Handlers


async def health(request: web.Request) -> web.Response:
    """``GET /v1/health``."""
    return web.json_response({"ok": True})


async def check_token(request: web.Request) -> web.Response:
    """``POST /v1/auth/check``: 200 if the bearer token may write, so a publisher fails before hashing."""
    check_auth(request)
    return web.json_response({"ok": True})


async def stats(request: web.Request) -> web.Response:
    """``GET /v1/stats`` (read access: it names nodes and zones)."""
    check_auth(request, read=True)
    app = request.app
    swarms = app[SWARMS]
    return web.json_response({
        "origin_bytes_served": app[STATS].origin_bytes_served,
        "origin_bytes_redirected": app[STATS].origin_bytes_redirected,
        "origin_bytes_through_registry": app[STATS].origin_bytes_through_registry,
        "origin_requests": app[STATS].origin_requests,
        "origin_refused_repeats": app[FIRST_COPY].refused,
        "origin_relayed_across_zones": app[FIRST_COPY].relayed,
        "origin_pushed_across_zones": app[FIRST_COPY].pushed,
        "announces": swarms.announces,
        "swarms": swarms.swarm_totals()[1],
    })


async def publish(request: web.Request) -> web.Response:
    """``POST /v1/artifacts``: validate manifest, torrent and origin, then store and tag."""
    check_auth(request)
    body = _parse_json_body(await read_body(request, MAX_PUBLISH_BODY, "publish body"))
    manifest = _parse_manifest(body.get("manifest"))
    torrent_b64 = body.get("torrent")
    if not isinstance(torrent_b64, str):
        raise BadRequest("'torrent' must be the base64 of the .torrent file")
    try:
        torrent = base64.b64decode(torrent_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"'torrent' is not valid base64: {exc}") from None
    origin_url, s3_endpoint = _validate_origin(body.get("origin"))
    cfg = request.app[CONFIG]
    allowed = {e.rstrip("/") for e in (cfg.s3_endpoint, *cfg.allowed_s3_endpoints) if e}
    if s3_endpoint is not None and s3_endpoint.rstrip("/") not in allowed:
        # The registry signs requests to this endpoint with its own credentials and streams
        # what comes back: a publisher must not choose where (issue #15).
        raise BadRequest(f"origin s3_endpoint {s3_endpoint!r} is not one this registry uses; start it with "
                         f"--s3-endpoint {s3_endpoint} or --allow-s3-endpoint {s3_endpoint}")
    tag = body.get("tag")
    if tag is not None:
        if not isinstance(tag, str):
            raise BadRequest("'tag' must be a string or null")
        validate_tag(tag)
    await asyncio.to_thread(check_torrent, torrent, manifest)
    store = request.app[STORE]
    async with request.app[WRITE_LOCK]:
        result = await asyncio.to_thread(store.publish, manifest, torrent, origin_url, s3_endpoint, tag)
        await settle(request.app[SWARMS].allow(manifest.info_hash.tracker_keys()))
    log.info("published %s as %s%s (%s)", result.digest, manifest.name, f":{tag}" if tag else "",
             "new" if result.created else "existing")
    return web.json_response(
        {"digest": result.digest, "name": result.name, "tag": result.tag, "created": result.created},
        status=201 if result.created else 200,
    )


async def lookup(app: web.Application, ref: Reference) -> Found:
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
    check_auth(request, read=True)
    ref_s = request.query.get("ref")
    if not ref_s:
        raise BadRequest("resolve needs ?ref=NAME:TAG, NAME@sha256:HEX or sha256:HEX")
    found = await lookup(request.app, Reference.parse(ref_s))
    # One read gave digest and manifest together, so a tag never points at a missing manifest.
    return web.json_response({"digest": found.digest, "name": found.name, "manifest": json.loads(found.manifest)})


async def stored_record(app: web.Application, digest: str) -> ArtifactRecord:
    """The stored artifact ``digest``, pulled through from the upstream registry if this is a zone."""
    found = await lookup(app, Reference(None, None, digest))
    record = await asyncio.to_thread(app[STORE].get, found.digest)
    if record is None:  # Deleted between the two reads.
        raise _not_found(digest)
    return record


async def get_manifest(request: web.Request) -> web.Response:
    """``GET /v1/artifacts/{digest}``: the canonical manifest bytes, exactly as hashed."""
    check_auth(request, read=True)
    digest = digest_param(request)
    data = (await lookup(request.app, Reference(None, None, digest))).manifest
    return web.Response(body=data, content_type="application/json",
                        headers={"Cache-Control": "public, max-age=31536000, immutable"})


async def get_torrent(request: web.Request) -> web.Response:
    """``GET /v1/artifacts/{digest}/torrent``: the torrent, announcing to this registry."""
    check_auth(request, read=True)
    record = await stored_record(request.app, digest_param(request))
    # The announce URL follows how the client reached us, so a registry behind any
    # hostname or port hands out a tracker URL that the same client can reach.
    # Every other replica (--replica) follows in the announce-list, shuffled so that the
    # clients of a dead replica spread over the others (BEP 12; outside the info dict).
    here = f"{request.scheme}://{request.host}"
    others = [f"{url}/announce" for url in request.app[CONFIG].replicas if url != here]
    random.shuffle(others)
    body = set_announce(record.torrent, f"{here}/announce", others)
    return web.Response(body=body, content_type="application/x-bittorrent")


async def list_artifacts(request: web.Request) -> web.Response:
    """``GET /v1/artifacts?name=&content_key=&limit=&after=``: one page, ordered by (name, digest)."""
    check_auth(request, read=True)
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
    check_auth(request)
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
    check_auth(request)
    digest = digest_param(request)
    force = _flag(request, "force")
    name = request.query.get("name") or None
    if name is not None:
        validate_name(name)
    app = request.app
    async with app[WRITE_LOCK]:
        deleted = await asyncio.to_thread(app[STORE].delete_artifact, digest, force=force, name=name)
        if deleted is not None:
            await settle(app[SWARMS].disallow(deleted.dropped_keys))
    if deleted is None:
        raise _not_found(f"{name}@{digest}" if name else digest)
    app[WEBSEED_CACHE].pop(digest, None)
    log.info("deleted %s (%s)%s", digest, deleted.name, f" and its tags {', '.join(deleted.tags)}" if deleted.tags else "")
    return web.json_response({"digest": digest, "name": deleted.name, "tags_removed": deleted.tags})

