"""Federation: a zone's registry resolves what it does not know from a parent registry and keeps it.

``modelcast tracker --upstream URL`` makes this registry a zone of the registry at URL.
A reference that is not stored here (a tag, ``name@digest`` or a digest asked for by
resolve, manifest, torrent or web seed) is fetched from the parent, checked exactly as a
publish is checked (the manifest hashes to its digest and is valid, the torrent describes
exactly its files), stored here (pull-through), and its info-hashes join this zone's
swarm allow-list.  Nodes are configured with their zone's registry only: the torrent
endpoint names this registry as the tracker, so each zone's nodes form their own swarm.

Refresh policy:

- An artifact (a digest) never changes meaning, so once pulled it is kept for good: it
  resolves, lists and serves even while the parent is down or after the parent deleted it.
- A tag pulled through is re-checked at the parent when it was last checked more than
  ``upstream_tag_ttl_s`` seconds ago (on the next request that needs it): moved there,
  it moves here; deleted there, it is deleted here; parent unreachable, the kept value
  is served (stale rather than down), and for ``min(ttl, 5 s)`` kept values are served
  without trying the parent again, so an outage does not add a timeout to every read.
- A tag published to this registry directly is local and never consulted upstream.
- Deleting a pulled-through tag or artifact here forgets it here only: the next read of
  it pulls it through again while the parent has it.
- Listing shows what this registry holds (published here or pulled through); it does not
  page through the parent.

Bytes: the parent does not disclose its origin, and its credentials stay with it (as
nodes' never leave their registry).  So a pulled-through artifact's origin is the parent
registry itself, and this registry's web seed proxies the parent's (streamed, with the
byte range passed on); the zone's own first-copy gate keeps its nodes from asking for the
same piece twice, so the parent sees about one copy per zone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import quote, urlparse

import aiohttp

from modelcast.errors import ArtifactNotFound, BadRequest, ModelcastError, Unauthorized, Unreachable
from adapters.http import raise_for_answer
from adapters.tls import connector_ssl
from modelcast.wire import bearer
from modelcast.manifest import Manifest
from modelcast.reference import Reference

from .client import RegistryClient
from .store import Found, RegistryStore
from .torrent_check import check_torrent

log = logging.getLogger("modelcast.tracker.federation")

# Web-seed bytes are relayed in chunks of this size; a slow reader on either side must
# not make the proxy buffer more.
PROXY_CHUNK = 256 * 1024
# After the parent failed, kept tags are served without asking it for this long (at most
# the tag ttl): a parent that swallows packets would otherwise cost every read a timeout.
RETRY_AFTER_S = 5.0
NEGATIVE_TTL_S = 5.0  # a reference the parent said it lacks is not asked for again this soon
MAX_NEGATIVE = 10_000  # references remembered as missing (the oldest forgotten first)


class UpstreamUnreachable(Unreachable):
    """The parent registry could not be reached, refused this zone's token, or sent something invalid.

    Its wire code stays ``unreachable`` (HTTP 502), so a node treats it like a registry
    outage: it is not the node's request that was wrong.
    """


def validate_upstream(url: str) -> str:
    """Return ``url`` without a trailing slash if it is an http(s) registry URL, else raise BadRequest."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BadRequest(f"--upstream {url!r} must be the parent registry's http(s) URL, e.g. http://parent:7070")
    return url.rstrip("/")


def is_upstream_origin(origin_url: str) -> bool:
    """True if a stored origin URL names a parent registry (the artifact was pulled through)."""
    return urlparse(origin_url).scheme in ("http", "https")


class Upstream:
    """The parent registry of this zone: fetch, check, keep.

    ``save`` stores a checked artifact (and tag) and allows its info-hashes in this
    zone's swarm; the server passes a function that does so under its write lock, so
    that the swarm allow-list follows the database in commit order.
    """

    def __init__(self, url: str, token: str | None, store: RegistryStore,
                 save: Callable[[Manifest, bytes, str | None], Awaitable[None]], *, tag_ttl_s: float = 30.0,
                 timeout_s: float = 10.0, ca: Path | None = None):
        self.url = validate_upstream(url)
        self.token = token
        self.tag_ttl_s = tag_ttl_s
        self._store = store
        self._save = save
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                              connector=aiohttp.TCPConnector(ssl=connector_ssl(ca)))
        self._client = RegistryClient(self.url, token, session=self._session)
        # One fetch per reference at a time: a zone of many nodes asking for a new tag
        # at once costs the parent one round of requests, not one per node.
        self._inflight: dict[str, asyncio.Task] = {}
        self._quiet_until = 0.0  # monotonic; see RETRY_AFTER_S
        self._missing: dict[str, float] = {}  # reference -> monotonic time until which it is known missing
        self.pulls = 0

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._session.close()

    # -- resolving ----------------------------------------------------------------------

    def wants(self, ref: Reference, found: Found | None, now: float | None = None) -> bool:
        """True if ``ref`` must be looked up at the parent: unknown here, or a pulled tag due a check."""
        if found is None:
            return True
        if ref.tag is None or found.pulled_from is None:
            return False
        if time.monotonic() < self._quiet_until:
            return False
        now = time.time() if now is None else now
        return now - (found.checked_at or 0.0) >= self.tag_ttl_s

    async def refresh(self, ref: Reference, found: Found | None) -> Found:
        """Fetch ``ref`` from the parent (see the module's refresh policy) and return it as now stored.

        Raises ArtifactNotFound naming the parent when neither registry has it, and
        UpstreamUnreachable when the parent cannot answer and nothing is kept here.
        """
        key = str(ref)
        now = time.monotonic()
        if found is None:
            # Negative caching (issue #15): with the parent down, or for names it lacks, a
            # stream of unknown references must not become a stream of requests to it.
            if self._missing.get(key, 0.0) > now:
                raise ArtifactNotFound(f"artifact {ref} not found in registry nor in its upstream registry {self.url}")
            if now < self._quiet_until:
                raise UpstreamUnreachable(f"upstream registry {self.url} failed moments ago; not asking it again for "
                                          f"{self._quiet_until - now:.1f} s")
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(ref), name=f"modelcast-upstream {key}")
            self._inflight[key] = task
            task.add_done_callback(lambda t, key=key: self._forget(key, t))
        try:
            # Shielded: a node hanging up must not cancel the fetch other requests share.
            await asyncio.shield(task)
        except ArtifactNotFound:
            if found is not None and ref.tag is not None and found.pulled_from is not None:
                # The parent deleted the tag: follow it, unless the tag moved meanwhile.
                if await asyncio.to_thread(self._store.drop_pulled_tag, ref.name, ref.tag, found.digest):
                    log.info("%s was removed from upstream %s; removed here too", ref, self.url)
            if found is None:
                self._missing[key] = time.monotonic() + NEGATIVE_TTL_S
                while len(self._missing) > MAX_NEGATIVE:
                    del self._missing[next(iter(self._missing))]
            raise ArtifactNotFound(f"artifact {ref} not found in registry nor in its upstream registry {self.url}") from None
        except UpstreamUnreachable as exc:
            self._quiet_until = time.monotonic() + min(self.tag_ttl_s, RETRY_AFTER_S)
            if found is not None:
                log.warning("serving %s as last checked, %.0f s ago: %s", ref, time.time() - (found.checked_at or 0), exc)
                return found
            raise
        stored = await asyncio.to_thread(self._store.lookup, ref)
        if stored is None:  # Deleted here between the fetch and this read.
            raise ArtifactNotFound(f"artifact {ref} not found in registry")
        return stored

    def _forget(self, key: str, task: asyncio.Task) -> None:
        self._inflight.pop(key, None)
        # Every waiter may have gone (nodes hung up); fetch the outcome so that asyncio
        # does not log it as never retrieved.
        if not task.cancelled():
            task.exception()

    async def _fetch(self, ref: Reference) -> None:
        what = f"pull-through of {ref} from upstream registry {self.url}"
        try:
            if ref.tag is not None:
                digest, manifest = await self._client.resolve(ref)
                if manifest.name != ref.name:
                    raise UpstreamUnreachable(f"{what}: it answered with an artifact named {manifest.name!r}")
            else:
                digest = ref.digest
                data = await self._client.manifest_bytes(digest)
                manifest = Manifest.from_bytes(data, expected_digest=digest)
            stored = await asyncio.to_thread(self._store.get, digest)
            torrent = stored.torrent if stored is not None else await self._client.torrent(digest)
            # The same check a publish gets: a parent is trusted no more than a publisher.
            await asyncio.to_thread(check_torrent, torrent, manifest)
        except (ArtifactNotFound, UpstreamUnreachable):
            raise
        except Unauthorized as exc:
            raise UpstreamUnreachable(f"{what}: the parent refused this zone's token ({exc}); "
                                      "pass the parent's token with --upstream-token") from exc
        except Unreachable as exc:
            raise UpstreamUnreachable(f"{what}: {exc}") from exc
        except ModelcastError as exc:
            # An invalid manifest or torrent, or an error status: the parent's fault, not the caller's.
            raise UpstreamUnreachable(f"{what} failed: {exc}") from exc
        await self._save(manifest, torrent, ref.tag)
        self.pulls += 1
        log.info("pulled %s (%s) through from %s", ref, digest, self.url)

    # -- web seed -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def webseed(self, base_url: str, digest: str, tail: str, first: int, last: int,
                      size: int) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open bytes ``first..last`` of ``tail`` in artifact ``digest`` at the parent's web seed.

        Yields an iterator of chunks.  Failures before the first byte raise a
        ModelcastError (ArtifactNotFound, UpstreamUnreachable); failures while streaming
        raise UpstreamUnreachable, which the caller answers by cutting the connection.
        The first-copy header is not passed on: the parent's gate guards other zones'
        swarms, and a piece refused there would never come from this zone's peers.
        """
        # The token goes only to the parent it belongs to, not to a registry that an
        # artifact was pulled from under an earlier --upstream.
        token = self.token if base_url.rstrip("/") == self.url else None
        url = f"{base_url.rstrip('/')}/v1/webseed/{digest}/{quote(tail)}"
        headers = {"Range": f"bytes={first}-{last}", **bearer(token)}
        # No total timeout: a large range takes as long as it takes; a stalled read does not.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
        what = f"web seed of {tail} in {digest} from upstream registry {base_url}"
        try:
            async with self._session.get(url, headers=headers, timeout=timeout) as resp:
                whole = resp.status == 200 and first == 0 and last == size - 1
                if resp.status != 206 and not whole:
                    try:
                        await raise_for_answer(resp, what)
                    except ArtifactNotFound:
                        raise
                    except ModelcastError as exc:
                        raise UpstreamUnreachable(str(exc)) from exc
                    raise UpstreamUnreachable(f"{what}: answered HTTP {resp.status} to a range request")
                if resp.content_length is not None and resp.content_length != last - first + 1:
                    raise UpstreamUnreachable(f"{what}: sent {resp.content_length} bytes for a range of "
                                              f"{last - first + 1}")
                yield resp.content.iter_chunked(PROXY_CHUNK)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnreachable(f"{what} failed: {exc.__class__.__name__}: {exc}") from exc
