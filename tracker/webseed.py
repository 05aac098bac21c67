"""The BEP 19 web seed: file bytes from the origin, behind the first-copy gate.

``GET /v1/webseed/{digest}/{torrent_name}/{path}`` answers byte ranges of a published
file.  Nodes never hold origin credentials; the registry reads the origin for them: a
file origin is served with sendfile; an S3 origin answers a node that accepts redirects
(``X-Modelcast-Accept-Redirect``) with a 307 to a presigned URL for exactly the range the
gate admitted, valid for seconds (``--presign-ttl``), so no payload byte passes through
the registry, and streams from a worker thread to anyone else; an artifact pulled through
from a parent registry is streamed from the parent's web seed.

Before any byte goes out, :class:`~tracker.firstcopy.FirstCopyGate` decides whether the
origin serves it at all (about one copy per zone) and which nodes of other zones the
served node should push it to.  Every answer that carries origin bytes is one of this
module's response classes, which count the bytes in :class:`~tracker.state.Stats` and
name those relay targets (``X-Modelcast-Relay-To``) as their headers go out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from adapters.origin import Origin
from modelcast.errors import ArtifactNotFound, ModelcastError, OriginError, error_body, retry_after
from modelcast.manifest import FileEntry, Manifest
from modelcast.reference import DIGEST_RE
from modelcast.wire import (ACCEPT_REDIRECT_HEADER, FIRST_COPY_HEADER, NODE_ID_HEADER, NODE_KEY_HEADER,
                            RELAY_FROM_HEADER, RELAY_FROM_TOKEN_HEADER, RELAY_HEADER, RELAY_TO_HEADER,
                            RELAY_TO_TOKEN_HEADER, URL_SEED_HEADER, ZONE_HEADER)

from .announce import ZONE_RE
from .auth import check_auth, may_read
from .fastpath import _api_response, _http_date, _internal_error
from .federation import UpstreamUnreachable, is_upstream_origin
from .filesend import FILE_SENDING, Blob, send_buffered
from .firstcopy import Admission
from .metrics import METRICS
from .registry_api import digest_param, stored_record
from .state import (CONFIG, FIRST_COPY, NODE_KEYS, ORIGINS, RELAYS, STATS, UPSTREAM, WEBSEED_CACHE, Stats,
                    WebseedArtifact)

log = logging.getLogger("modelcast.tracker")

MANIFEST_CACHE_SIZE = 1024


# ---------------------------------------------------------------------------------------
# Answers that carry origin bytes


@dataclass(frozen=True)
class OriginTally:
    """Where one web seed answer's origin bytes are counted, and the nodes they go on to (one per other zone)."""

    stats: Stats
    relay_to: tuple[str, ...] = ()
    relay_to_tokens: tuple[str, ...] = ()  # one per relay_to target: the token for its relay listener
    zone: str | None = None  # the requesting node's zone, if it named a valid one


class _OriginBytes(web.StreamResponse):
    """An answer of origin bytes: counted, and labelled with its relay targets, as its headers go out.

    ``prepare`` is the one moment when status and length are final and the headers not
    yet sent.  A FileResponse settles both (200, 206, 304, 416, ...) only inside its own
    ``prepare``, which ends by calling this one: :class:`OriginFile` puts this class after
    ``web.FileResponse`` in its bases for that.  HEAD requests and answers without bytes
    are not counted.
    """

    tally: OriginTally

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if not self.prepared and request.method == "GET" and self.status in (200, 206):
            self.tally.stats.served(self.tally.zone, self.content_length or 0)
            if self.tally.relay_to:
                self.headers[RELAY_TO_HEADER] = " ".join(self.tally.relay_to)
                self.headers[RELAY_TO_TOKEN_HEADER] = " ".join(self.tally.relay_to_tokens)
        return await super().prepare(request)


class OriginStream(_OriginBytes):
    """A streamed answer of origin bytes (S3 origin, or a parent registry's web seed)."""

    def __init__(self, tally: OriginTally, *, status: int, headers: dict[str, str]) -> None:
        super().__init__(status=status, headers=headers)
        self.tally = tally


def origin_redirect(tally: OriginTally, url: str, nbytes: int) -> web.Response:
    """A 307 to a presigned object-store URL for ``nbytes`` origin bytes: counted as served, and as redirected."""
    tally.stats.served(tally.zone, nbytes, redirected=True)
    headers = {"Location": url, "Cache-Control": "no-store"}
    if tally.relay_to:
        headers[RELAY_TO_HEADER] = " ".join(tally.relay_to)
        headers[RELAY_TO_TOKEN_HEADER] = " ".join(tally.relay_to_tokens)
    return web.Response(status=307, headers=headers)


class OriginFile(_OriginBytes):
    """A file origin's blob: range and conditional headers answered here, the bytes sent with sendfile.

    Blobs are content-addressed, so the ETag is the blob's hash.  The bytes go out with one
    blocking ``sendfile`` per range from a bounded pool of threads, from a descriptor kept
    open for a few seconds (:mod:`tracker.filesend`); over TLS, from ``pread`` chunks.
    """

    def __init__(self, tally: OriginTally, path: Path, blob_hash: str, *, headers: dict[str, str]) -> None:
        super().__init__(status=200, headers=headers)
        self.tally = tally
        self.path = path
        self.blob_etag = f'"{blob_hash}"'

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        cache = request.app[FILE_SENDING].blobs
        blob = await cache.get(self.path)
        if blob is None:  # gone since the handler looked: a short, empty answer
            self.set_status(502)
            self.content_length = 0
            return await super().prepare(request)
        cache.hold(blob)
        try:
            return await self._answer(request, blob)
        finally:
            cache.release(blob)

    async def _answer(self, request: web.BaseRequest, blob: Blob) -> AbstractStreamWriter | None:
        headers = self.headers
        headers["ETag"] = self.blob_etag
        headers["Last-Modified"] = blob.last_modified
        headers["Accept-Ranges"] = "bytes"
        headers["Content-Type"] = "application/octet-stream"
        # RFC 9110 section 13.2.2: If-Match, else If-Unmodified-Since; If-None-Match, else If-Modified-Since.
        if_match, if_none_match = request.if_match, request.if_none_match
        if (not _etag_match(self.blob_etag, if_match, weak=False) if if_match is not None
                else (since := request.if_unmodified_since) is not None and blob.mtime > since.timestamp()):
            self.set_status(412)
            self.content_length = 0
            return await super().prepare(request)
        if (_etag_match(self.blob_etag, if_none_match, weak=True) if if_none_match is not None
                else (since := request.if_modified_since) is not None and blob.mtime <= since.timestamp()):
            self.set_status(304)
            return await super().prepare(request)
        try:
            span = _byte_range(request, blob.size) if blob.size and self._range_applies(request, blob) else None
        except web.HTTPRequestRangeNotSatisfiable as exc:
            self.set_status(416)
            self.headers["Content-Range"] = exc.headers["Content-Range"]
            self.content_length = 0
            return await super().prepare(request)
        first, last = span if span is not None else (0, blob.size - 1)
        if span is not None:
            self.set_status(206)
            self.headers["Content-Range"] = f"bytes {first}-{last}/{blob.size}"
        count = last - first + 1 if blob.size else 0
        self.content_length = count
        if count == 0 or request.method == "HEAD":
            return await super().prepare(request)
        sender = request.app[FILE_SENDING].sender
        transport = request.transport
        threaded = sender.usable(transport)
        writer = await super().prepare(request)  # counts the bytes, sends the headers
        assert writer is not None and transport is not None
        if threaded and sender.usable(transport):
            await sender.send(transport, blob.fd, first, count)
        elif transport.get_extra_info("sslcontext") is None and transport.get_extra_info("socket") is not None:
            # The pool is busy (or the headers are still buffered): asyncio's sendfile on the event loop.
            with open(blob.fd, "rb", buffering=0, closefd=False) as f:
                await asyncio.get_running_loop().sendfile(transport, f, first, count)
        else:
            await send_buffered(writer, blob.fd, first, count)
        await super().write_eof()
        return writer

    def _range_applies(self, request: web.BaseRequest, blob: Blob) -> bool:
        """If-Range: the Range header counts only if the validator still holds (else the whole blob, 200)."""
        given = request.headers.get("If-Range")
        if given is None:
            return True
        given = given.strip()
        if given.startswith('"') or given.startswith("W/"):
            return given == self.blob_etag  # a strong comparison
        date = request.if_range
        return date is not None and blob.mtime <= date.timestamp()


def _etag_match(etag: str, given: tuple, *, weak: bool) -> bool:
    """Whether ``etag`` (quoted) is among ``given`` (aiohttp's parsed If-Match / If-None-Match)."""
    return any(tag.value == "*" or (f'"{tag.value}"' == etag and (weak or not tag.is_weak)) for tag in given)


# ---------------------------------------------------------------------------------------
# Request parsing


async def _webseed_artifact(app: web.Application, digest: str) -> WebseedArtifact:
    cache: OrderedDict[str, WebseedArtifact] = app[WEBSEED_CACHE]
    art = cache.get(digest)
    if art is not None:
        cache.move_to_end(digest)
        return art
    record = await stored_record(app, digest)
    manifest = Manifest.from_bytes(record.manifest)
    # Artifacts are immutable, so a cached entry can only go stale by a delete, which evicts it.
    art = WebseedArtifact(record.origin_url, record.s3_endpoint, manifest.torrent_name,
                          {f.path: f for f in manifest.files})
    cache[digest] = art
    if len(cache) > MANIFEST_CACHE_SIZE:
        cache.popitem(last=False)
    return art


def _byte_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte asked for, None for the whole file.

    Raises HTTPRequestRangeNotSatisfiable for a malformed, multi-part or out-of-bounds range.
    """
    def unsatisfiable() -> web.HTTPRequestRangeNotSatisfiable:  # made only when needed: an HTTPException costs
        return web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})

    try:
        rng = request.http_range
    except ValueError:
        raise unsatisfiable() from None
    if rng.start is None and rng.stop is None:
        return None
    if rng.start < 0:  # suffix range "bytes=-N": the last N bytes
        first, last = max(0, size + rng.start), size - 1
    else:
        first = rng.start
        last = size - 1 if rng.stop is None else min(rng.stop - 1, size - 1)
    if first >= size or last < first:
        raise unsatisfiable()
    return first, last


def _refusal(admission: Admission, tail: str, first_byte: int, last_byte: int, token: str | None) -> web.Response:
    """The 409 for bytes the gate will not serve again: take them from peers, or from the named node."""
    if admission.crowded:
        return _url_seed_refusal("crowded", "other nodes are pulling this artifact: ask as they do, so that "
                                            "the first copy is shared")
    # Another node fetched these bytes moments ago: they come from the swarm, or, for
    # the first node of another zone to ask, from that node (tracker/firstcopy.py).
    if admission.relay_from and token:
        return web.json_response({"error": {"code": "relay", "message": f"{tail} bytes {first_byte}-{last_byte} "
                                            f"were just served to a node of another zone; fetch them from it "
                                            f"({admission.relay_from})"}},
                                 status=409, headers={RELAY_FROM_HEADER: admission.relay_from,
                                                      RELAY_FROM_TOKEN_HEADER: token})
    return web.json_response({"error": {"code": "served_elsewhere",
                                        "message": f"{tail} bytes {first_byte}-{last_byte} were just served to "
                                                   "another node; take them from peers"}}, status=409)


def _url_seed_refusal(code: str, message: str, status: int = 409) -> web.Response:
    """The answer that sends a node's libtorrent URL seed back to the node's own origin requests:
    409 while other nodes pull (the node then asks as one of several), 421 where the origin
    is not a file origin."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


# ---------------------------------------------------------------------------------------
# The handler


async def _admit(app: web.Application, header: Callable[[str], str | None], remote: str | None, digest: str,
                 tail: str, first_byte: int, last_byte: int) -> web.Response | OriginTally:
    """Ask the first-copy gate for these bytes: the 409 that refuses them, or where to count them.

    ``header(name)`` reads a request header; shared by the aiohttp handler and the fast path.
    """
    zone = header(ZONE_HEADER)
    zone = zone if zone is not None and ZONE_RE.fullmatch(zone) else None
    # The gate counts (and refuses) only proven nodes: a zone named by anyone else is served
    # and forgotten, so nobody can make the gate refuse a zone by naming it (issue #15).
    node_id = header(NODE_ID_HEADER)
    proven = node_id is not None and app[NODE_KEYS].matches(node_id, header(NODE_KEY_HEADER))
    gate_zone = zone if proven else None
    relays = app[RELAYS]
    # Only a URL the node registered from this address (tracker/relaytokens.py) is handed
    # to nodes of other zones: never one pointing anywhere else (issue #15).
    relay = relays.believed(header(RELAY_HEADER), remote) if gate_zone is not None else None
    if relay is not None and not isinstance(relay, str):
        relay = await relay  # registrations in Redis (tracker/gate_redis.py)
    admission = app[FIRST_COPY].admit(
        digest, tail, first_byte, last_byte, first_copy=header(FIRST_COPY_HEADER) == "1",
        zone=gate_zone, relay=relay, node=node_id if proven else None, solo=header(URL_SEED_HEADER) == "1")
    if not isinstance(admission, Admission):
        admission = await admission  # the gate in Redis: one round trip
    if not admission.serve:
        token = None
        if admission.relay_from:  # the requester fetches from the holder: a token for the holder's listener
            token = relays.token(admission.relay_from, "GET", digest, tail, first_byte, last_byte)
        return _refusal(admission, tail, first_byte, last_byte, token)
    targets, tokens = [], []
    for target in admission.relay_to:  # the served node pushes to these: a token for each one's listener
        token = relays.token(target, "PUT", digest, tail, first_byte, last_byte)
        if token is not None:
            targets.append(target)
            tokens.append(token)
    return OriginTally(app[STATS], tuple(targets), zone=zone, relay_to_tokens=tuple(tokens))


async def webseed(request: web.Request) -> web.StreamResponse:
    """``GET /v1/webseed/{digest}/{torrent_name}/{path}``: file bytes from the origin."""
    check_auth(request, read=True)
    digest = digest_param(request)
    tail = request.match_info["tail"]
    art = await _webseed_artifact(request.app, digest)
    prefix = art.torrent_name + "/"
    entry = art.files.get(tail[len(prefix):]) if tail.startswith(prefix) else None
    if entry is None:
        raise ArtifactNotFound(f"file {tail!r} is not in artifact {digest} (paths start with {prefix!r})")
    span = _byte_range(request, entry.size) if entry.size else None
    first_byte, last_byte = span if span is not None else (0, max(entry.size - 1, 0))
    upstream = is_upstream_origin(art.origin_url)
    origin = None if upstream else await request.app[ORIGINS].get(art.origin_url, art.s3_endpoint)
    local = None if upstream else origin.blob_local_path(entry.xxh3_128)
    if local is None and request.headers.get(URL_SEED_HEADER) == "1":
        # A node's libtorrent neither follows the presigned redirect nor should make the
        # registry stream an object store's bytes: its own origin requests do both.
        return _url_seed_refusal("not_a_file_origin", "this artifact's origin is not a file origin of the "
                                                      "registry: ask with the node's own origin requests", status=421)
    tally = await _admit(request.app, request.headers.get, request.remote, digest, tail, first_byte, last_byte)
    if not isinstance(tally, OriginTally):
        return tally
    if upstream:
        return await _stream_upstream(request, tally, art, digest, tail, entry)
    if local is not None:
        blob = await request.app[FILE_SENDING].blobs.get(local)
        if blob is None or blob.size != entry.size:
            raise OriginError(
                f"blob {entry.xxh3_128} of {tail!r} in origin {origin.url} is "
                f"{'missing' if blob is None else f'{blob.size} bytes'}, expected {entry.size} bytes; "
                "re-publish the artifact"
            )
        return OriginFile(tally, local, entry.xxh3_128, headers={})
    ttl = request.app[CONFIG].presign_ttl_s
    if (ttl > 0 and entry.size > 0 and request.method == "GET"
            and request.headers.get(ACCEPT_REDIRECT_HEADER) == "1"):
        url = await asyncio.to_thread(origin.presign_range, entry.xxh3_128, first_byte, last_byte, ttl)
        if url is not None:
            return origin_redirect(tally, url, last_byte - first_byte + 1)
    return await _stream_remote(request, tally, origin, entry)


async def _range_response(request: web.Request, tally: OriginTally, size: int) -> tuple[OriginStream, int, int]:
    """A streamed answer for the asked byte range of a ``size``-byte file: (response, first, last).

    An empty file or a HEAD request is answered at once (the response comes back prepared,
    with nothing more to send); otherwise the caller prepares and writes it.
    """
    span = _byte_range(request, size) if size else None
    first, last = span if span is not None else (0, size - 1)
    headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    if span is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    resp = OriginStream(tally, status=206 if span is not None else 200, headers=headers)
    resp.content_length = last - first + 1 if size else 0
    if size == 0 or request.method == "HEAD":
        await resp.prepare(request)
        await resp.write_eof()
    return resp, first, last


async def _stream_remote(request: web.Request, tally: OriginTally, origin: Origin,
                         entry: FileEntry) -> web.StreamResponse:
    resp, first, last = await _range_response(request, tally, entry.size)
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


async def _stream_upstream(request: web.Request, tally: OriginTally, art: WebseedArtifact, digest: str, tail: str,
                           entry: FileEntry) -> web.StreamResponse:
    """Relay bytes of a pulled-through artifact from the parent registry's web seed."""
    upstream = request.app.get(UPSTREAM)
    if upstream is None:
        raise UpstreamUnreachable(f"artifact {digest} was pulled through from {art.origin_url}, but this registry "
                                  f"runs without --upstream; restart it with --upstream {art.origin_url}")
    resp, first, last = await _range_response(request, tally, entry.size)
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


# ---------------------------------------------------------------------------------------
# The fast path's web seed: a node's plain range request answered without aiohttp


WEBSEED_ROUTE = "/v1/webseed/{digest}/{tail}"  # the route's name in the metrics
_RANGE = re.compile(r"bytes=([0-9]{1,18})-([0-9]{1,18})")


async def fast_webseed(app: web.Application, target: bytes, headers: Mapping[bytes, bytes], remote: str | None,
                       transport: asyncio.Transport, keep_alive: bool) -> bool | None:
    """Answer a node's ``GET /v1/webseed/...`` range on ``transport`` (the fast path, tracker/fastpath.py).

    Through aiohttp each range cost the registry ~1 ms of Python (its protocol object, the
    request, the middlewares and the response), about what the kernel spends moving the
    range's 16 MiB.  The one answer nodes ask for (a file origin's blob, one ``bytes=A-B``
    range, no conditional headers, over plain HTTP/1.1) is answered here with the same
    checks, gate and counting as :func:`webseed`: its head and body go out together from a
    sending thread (``MSG_MORE``, then ``sendfile``), or the asyncio way when the pool is busy.

    Returns None, having sent nothing and changed nothing, when aiohttp should answer the
    request instead (anything else, and every error before the gate: aiohttp says why);
    else whether the connection stays open.  ``headers`` are the lowercased header lines.
    """
    start = time.perf_counter()
    path = target.decode("ascii")
    if ("%" in path or "?" in path or "//" in path or "/." in path  # aiohttp decodes and normalises these
            or any(name.startswith(b"if-") for name in headers)):
        return None
    rng = _RANGE.fullmatch(headers.get(b"range", b"").decode("latin-1"))
    if rng is None:
        return None
    digest, _, tail = path[len("/v1/webseed/"):].partition("/")
    if not may_read(app[CONFIG], headers.get(b"authorization", b"").decode("latin-1")):
        return None  # aiohttp's 401 says why
    if not DIGEST_RE.fullmatch(digest):
        return None
    try:
        art = await _webseed_artifact(app, digest)
    except Exception:  # nothing sent or changed yet: aiohttp answers (and logs) it
        return None
    prefix = art.torrent_name + "/"
    entry = art.files.get(tail[len(prefix):]) if tail.startswith(prefix) else None
    if entry is None or not entry.size or is_upstream_origin(art.origin_url):
        return None
    first, last = int(rng[1]), min(int(rng[2]), entry.size - 1)
    if first > last:  # out of bounds: aiohttp's 416
        return None
    sending = app[FILE_SENDING]
    try:
        origin = await app[ORIGINS].get(art.origin_url, art.s3_endpoint)
        local = origin.blob_local_path(entry.xxh3_128)
        blob = await sending.blobs.get(local) if local is not None else None
    except Exception:
        return None
    if blob is None or blob.size != entry.size or transport.is_closing():
        return None
    sending.blobs.hold(blob)  # before the next await: the cache may close a blob nobody holds
    status = 499  # what the metrics say if the client goes away first (nginx's code for it)
    try:
        def header(name: str) -> str | None:
            value = headers.get(name.lower().encode("latin-1"))
            return None if value is None else value.decode("latin-1")

        try:
            tally = await _admit(app, header, remote, digest, tail, first, last)
        except ModelcastError as exc:  # the gate's store failed: the error middleware's answer
            status = exc.http_status
            transport.write(_api_response((status, json.dumps(error_body(exc)).encode(), retry_after(exc)),
                                          True, keep_alive))
            return keep_alive
        except Exception as exc:  # a bug: as the error middleware answers it (tracker/app.py)
            log.exception("unexpected error on GET %s", path)
            answer = _internal_error(exc)
            status = answer[0]
            transport.write(_api_response(answer, True, False))
            return False
        if transport.is_closing():  # the client went away meanwhile
            return False
        if not isinstance(tally, OriginTally):  # the gate's 409
            status = tally.status
            extra = {k: v for k, v in tally.headers.items() if k.lower() not in ("content-type", "content-length")}
            transport.write(_api_response((status, tally.body, extra), True, keep_alive))
            return keep_alive
        status, count = 206, last - first + 1
        tally.stats.served(tally.zone, count)
        extra = {"Content-Type": "application/octet-stream", "Content-Range": f"bytes {first}-{last}/{blob.size}",
                 "ETag": f'"{entry.xxh3_128}"', "Last-Modified": blob.last_modified, "Accept-Ranges": "bytes"}
        if tally.relay_to:
            extra[RELAY_TO_HEADER] = " ".join(tally.relay_to)
            extra[RELAY_TO_TOKEN_HEADER] = " ".join(tally.relay_to_tokens)
        head = _range_head(extra, keep_alive, count)
        sender = sending.sender
        try:
            if sender.usable(transport):
                await sender.send(transport, blob.fd, first, count, head=head)
            else:  # the pool is busy: asyncio's sendfile on the event loop, as OriginFile does
                transport.write(head)
                with open(blob.fd, "rb", buffering=0, closefd=False) as f:
                    await asyncio.get_running_loop().sendfile(transport, f, first, count)
        except ConnectionError:
            transport.close()  # as aiohttp ends such a connection: quietly
            return False
        return keep_alive
    finally:
        sending.blobs.release(blob)
        app[METRICS].observe_route(WEBSEED_ROUTE, "GET", status, time.perf_counter() - start)


def _range_head(headers: Mapping[str, str], keep_alive: bool, length: int) -> bytes:
    """The head of a ``206`` answer whose ``length`` bytes follow it."""
    lines = ["HTTP/1.1 206 Partial Content", f"Content-Length: {length}", f"Date: {_http_date().decode()}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
