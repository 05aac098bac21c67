"""Filling a download from the origin: the thin fetcher the piece picker drives.

:class:`OriginFill` runs beside each download.  It asks libtorrent what is missing and
which connected peers have what, lets :func:`node_cache.picker.plan_requests` choose, and
has :class:`OriginFetcher` fetch each choice with one HTTP range request to the registry's
web seed (BEP 19), handing the pieces to libtorrent, which checks their hashes.  A plain
``http://`` registry's answers are read in worker threads, off the event loop
(node_cache/origin_http.py); TLS registries and S3 redirects through aiohttp.  It wakes
when a fetch ends (a slot is free: the next request leaves at once), when a peer connects
or leaves, when the tracker replies and when libtorrent's state changes; otherwise it looks
again every 50 ms while fetches are under way, as peers' pieces change who has what.

A lone node hands the origin to libtorrent instead (:meth:`OriginFill._url_seed_run`): the
registry's web seed as the torrent's BEP 19 URL seed, so the bytes go from the socket to the
disk inside libtorrent, never through Python (about half the CPU per byte; issue #13).  Whether
a download is alone is asked of the tracker before its torrent is added (a scrape: nobody in
the swarm, any zone), since the URL seed (with the node's headers) can only be added then.
It is dropped when the registry refuses it (another node asked for the artifact, or the origin is not a file origin)
or when it stalls; the loop below then asks for what it has not brought.

Requests marked first-copy may get 409 from the origin: another node of the zone just took
the piece and it will come through the swarm (:class:`ServedElsewhere`), or a node of
another zone holds it and we fetch it from there (:class:`RelayFrom`, then
:meth:`OriginFetcher.relay_fetch`, falling back to the origin).  A reply naming nodes of
other zones (``X-Modelcast-Relay-To``) makes us push each piece to each of them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import aiohttp

from adapters.torrent import URL_SEED_FAILED, URL_SEED_RUNNING, PieceSpan, TorrentEngine, UrlSeed
from modelcast.config import NodeConfig, is_wildcard
from modelcast.errors import Unreachable
from modelcast.wire import (ACCEPT_REDIRECT_HEADER, FIRST_COPY_HEADER, NODE_ID_HEADER, NODE_KEY_HEADER,
                            RELAY_FROM_HEADER, RELAY_FROM_TOKEN_HEADER, RELAY_HEADER, RELAY_TO_HEADER,
                            RELAY_TO_TOKEN_HEADER, URL_SEED_HEADER, ZONE_HEADER, bearer)

from .jobs import PullJob
from .metrics import NodeCounters
from .origin_http import CONNECTION_ERRORS, Aborted, PlainRange
from .picker import STALL_S, SwarmView, is_alone, parallel_requests, plan_requests, run_limit_bytes
from .relay import Relay

if TYPE_CHECKING:
    from tracker.client import RegistryClient

log = logging.getLogger("modelcast.node")

BUSY_LOOK_S = 0.05  # how often to look again while pieces are wanted and slots are free
IDLE_LOOK_S = 0.25  # ... and while peers deliver everything else or every slot is busy
FIRST_BITFIELDS_S = 0.05  # after the grace, a moment for the first peers' bitfields
FAILURE_BACKOFF_S = 0.5  # after a failed origin request
# A node the tracker told of nobody, still without a peer this long into its fill (or told by
# the registry that other nodes pull), announces once more: two nodes whose first announces
# crossed are each told of nobody, and would otherwise each take the whole artifact from the
# origin until their next announce (30 s).
LONE_RECHECK_S = 1.0
PLAIN_READERS = 16  # worker threads reading plain-HTTP origin answers (4 requests in flight per lone download)


class RegistryUnreachable(Unreachable):
    """The registry replica at ``url`` failed (no connection, or a 5xx): the next replica takes over."""

    def __init__(self, message: str, url: str):
        super().__init__(message)
        self.url = url


class ServedElsewhere(Exception):
    """The origin served this piece to another node moments ago; take it from peers."""


class RelayFrom(Exception):
    """The origin served this piece to a node of another zone moments ago: fetch it from that node."""

    def __init__(self, holder: str, token: str):
        super().__init__(holder)
        self.holder = holder
        self.token = token  # the registry's permission for this fetch (modelcast/relay_auth.py)


class TokenBucket:
    """Bytes-per-second limit for origin fetches (libtorrent limits peer traffic itself)."""

    def __init__(self, rate: int):
        self.rate = rate
        self.tokens = float(rate) / 10
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.rate / 4, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n or self.tokens >= self.rate / 4:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)  # until enough tokens have accrued



def _gate_answer(status: int, header, run: list[PieceSpan], first_copy: bool) -> list[tuple[str, str]]:
    """What the first-copy gate said in an answer's headers (``header(name, default)``; tracker/firstcopy.py).

    A 409 to a first-copy request raises :class:`RelayFrom` (fetch this one piece from a node of
    another zone) or :class:`ServedElsewhere` (the swarm will bring it); otherwise the nodes
    of other zones to push the pieces to, each with the token for its listener (a registry
    without tokens: none).
    """
    if status == 409 and first_copy:
        holder, token = header(RELAY_FROM_HEADER, None), header(RELAY_FROM_TOKEN_HEADER, None)
        if holder and token and len(run) == 1:
            raise RelayFrom(holder, token)
        raise ServedElsewhere(run[0].piece)
    return list(zip(header(RELAY_TO_HEADER, "").split(), header(RELAY_TO_TOKEN_HEADER, "").split()))


def _padded(piece: bytes, span: PieceSpan) -> bytes:
    """A piece's bytes as libtorrent wants them: a file's last piece completed with the pad file's zeros."""
    return piece + bytes(span.size - len(piece)) if len(piece) < span.size else piece

class OriginFetcher:
    """Range requests to the registry's web seed, and relay fetches, for every download of the node."""

    def __init__(self, cfg: NodeConfig, counters: NodeCounters, relay: Relay):
        self.cfg = cfg
        self.counters = counters
        self.relay = relay
        self.bucket = TokenBucket(cfg.download_limit) if cfg.download_limit else None
        self.run_bytes = run_limit_bytes(cfg.download_limit)
        self.engine: TorrentEngine | None = None
        self.http: aiohttp.ClientSession | None = None
        self.identity: tuple[str, str] | None = None  # (node id, node key): the gate counts proven nodes only
        # Plain-HTTP answers are read in these threads (origin_http.py); from the node's peer
        # address, like its other connections.
        self.source_address = None if is_wildcard(cfg.peer_host) else (cfg.peer_host, 0)
        self._pool = ThreadPoolExecutor(max_workers=PLAIN_READERS, thread_name_prefix="origin-read")
        self._plain: set[PlainRange] = set()  # answers being read, aborted when the node stops

    def attach(self, engine: TorrentEngine, http: aiohttp.ClientSession) -> None:
        self.engine, self.http = engine, http

    def url_seed(self, base: str) -> UrlSeed | None:
        """The URL seed a download may hand its origin bytes to (libtorrent fetches them itself,
        never through Python), or None where the node's own requests must: a TLS registry
        (libtorrent would not check it against the node's CA), a download limit (the
        token bucket is the node's), no URL seed configured."""
        if not self.cfg.url_seed or self.bucket is not None or not base.startswith("http://"):
            return None
        headers = {**self._headers(), URL_SEED_HEADER: "1"}
        headers.pop(ACCEPT_REDIRECT_HEADER)  # libtorrent would send the node's headers to the object store
        return UrlSeed(base, list(headers.items()))

    def _headers(self) -> dict[str, str]:
        headers = {ZONE_HEADER: self.cfg.zone, ACCEPT_REDIRECT_HEADER: "1",
                   **bearer(self.cfg.token or self.cfg.node_token)}
        if self.identity is not None:
            headers[NODE_ID_HEADER], headers[NODE_KEY_HEADER] = self.identity
        if self.relay.url:
            headers[RELAY_HEADER] = self.relay.url  # where the origin may send nodes of other zones
        return headers

    async def fetch_run(self, job: PullJob, base: str, run: list[PieceSpan], first_copy: bool = False) -> None:
        """Fetch consecutive pieces of one file with one range request and hand them to libtorrent.

        With ``first_copy`` the origin may answer 409: another node just took this piece,
        and it will reach us through the swarm, or, if that node is in another zone, from
        that node (:class:`RelayFrom`; tracker/firstcopy.py).
        """
        first, last = run[0], run[-1]
        start, end = first.file_offset, last.file_offset + last.length - 1
        url = base + "/".join(aiohttp.helpers.quote(part, safe="") for part in first.path.split("/"))
        headers = {"Range": f"bytes={start}-{end}", **self._headers()}
        if first_copy:
            headers[FIRST_COPY_HEADER] = "1"
        if url.startswith("http://"):
            await self._fetch_plain(job, url, headers, run, first_copy)
            return
        from_store = False  # reading from the object store a 307 pointed to, not from the registry
        try:
            async with self.http.get(url, headers=headers, allow_redirects=False) as resp:
                targets = _gate_answer(resp.status, resp.headers.get, run, first_copy)
                if resp.status == 307 and (location := resp.headers.get("Location")):
                    from_store = True
                    await self._fetch_stored(job, location, headers["Range"], run, start, end, targets)
                else:
                    if resp.status >= 500:
                        raise RegistryUnreachable(f"origin answered HTTP {resp.status} for {first.path}", url)
                    await self._take_pieces(job, resp, run, start, end, targets, "origin")
        except RegistryUnreachable:
            raise
        except (aiohttp.ClientError, asyncio.IncompleteReadError, TimeoutError) as exc:
            if from_store or isinstance(exc, aiohttp.ClientSSLError) or not isinstance(
                    exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError,
                          TimeoutError)):
                raise Unreachable(f"origin fetch of {first.path} failed: {exc}") from exc
            # The registry replica went away (or hangs): the next one takes over.
            raise RegistryUnreachable(f"origin fetch of {first.path} failed: {exc}", url) from exc

    async def _fetch_stored(self, job: PullJob, location: str, byte_range: str, run: list[PieceSpan], start: int,
                            end: int, targets: list[tuple[str, str]]) -> None:
        """An S3 origin: the registry admitted the range and presigned it; read it from the object
        store ourselves, with only the signed Range header (no bearer token, no modelcast
        headers: they are not for the store)."""
        async with self.http.get(location, headers={"Range": byte_range}, allow_redirects=False) as stored:
            await self._take_pieces(job, stored, run, start, end, targets, "the object store")

    async def _fetch_plain(self, job: PullJob, url: str, headers: dict[str, str], run: list[PieceSpan],
                           first_copy: bool) -> None:
        """:meth:`fetch_run` for a plain ``http://`` registry: the answer is read in a worker thread.

        The same answers as through aiohttp (409, 307, 5xx, short answers), the same errors
        (:class:`RegistryUnreachable` for a broken connection or a 5xx, :class:`Unreachable`
        otherwise); the bytes never pass through the event loop (node_cache/origin_http.py).
        """
        first, last = run[0], run[-1]
        start, end = first.file_offset, last.file_offset + last.length - 1
        loop = asyncio.get_running_loop()
        answer = PlainRange(url, headers, self.source_address)
        self._plain.add(answer)
        handed_off = False  # the worker thread reading the body closes the answer itself
        try:
            await loop.run_in_executor(self._pool, answer.open)
            targets = _gate_answer(answer.status, answer.header, run, first_copy)
            if answer.status == 307 and (location := answer.header("Location")):
                answer.close()
                try:
                    await self._fetch_stored(job, location, headers["Range"], run, start, end, targets)
                except (aiohttp.ClientError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    raise Unreachable(f"origin fetch of {first.path} failed: {exc}") from exc
                return
            if answer.status >= 500:
                raise RegistryUnreachable(f"origin answered HTTP {answer.status} for {first.path}", url)
            self._check_answer(answer.status, answer.content_length, run, start, end, "origin")
            handed_off = True
            await loop.run_in_executor(self._pool, self._take_plain, loop, job, answer, run, start, targets)
        except asyncio.CancelledError:
            answer.abort()  # the worker thread, blocked in recv or not, ends now
            raise
        except Unreachable:  # a ConnectionError too, but said already
            raise
        except CONNECTION_ERRORS as exc:
            # The registry replica went away (or hangs): the next one takes over.
            raise RegistryUnreachable(f"origin fetch of {first.path} failed: {exc}", url) from exc
        except Aborted:
            raise Unreachable(f"origin fetch of {first.path} was abandoned: the node stops") from None
        finally:
            self._plain.discard(answer)
            if not handed_off:
                answer.close()

    def _take_plain(self, loop: asyncio.AbstractEventLoop, job: PullJob, answer: PlainRange, run: list[PieceSpan],
                    start: int, targets: list[tuple[str, str]]) -> None:
        """In a worker thread: read each piece of a 200/206 answer and hand it to libtorrent.

        Counters and relay pushes are the event loop's: each piece is passed there before
        libtorrent gets it.  Pieces taken before the connection breaks are kept.
        """
        try:
            if answer.status == 200:
                answer.skip(start)
            for span in run:
                if self.bucket is not None:
                    asyncio.run_coroutine_threadsafe(self.bucket.take(span.length), loop).result()
                piece = _padded(answer.read(span.length), span)
                if answer.aborted.is_set():
                    raise Aborted()
                loop.call_soon_threadsafe(self._took, job, span, piece, targets)
                try:
                    self.engine.add_piece(job.digest, span.piece, piece)
                except RuntimeError:  # the torrent went away meanwhile (removed, the node stops)
                    raise Aborted() from None
        finally:
            answer.close()

    def _took(self, job: PullJob, span: PieceSpan, piece: bytes, targets: list[tuple[str, str]]) -> None:
        """On the loop: count a piece read from the origin and push it to the nodes of other zones."""
        job.bytes_from_origin += span.length
        self.counters.bytes_from_origin += span.length
        for target, token in targets:
            self.relay.push(job.digest, target, token, span.piece, piece)

    def close(self) -> None:
        """The node stops: end every fetch still reading in a worker thread."""
        for answer in list(self._plain):
            answer.abort()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _check_answer(status: int, content_length: int | None, run: list[PieceSpan], start: int, end: int,
                      source: str) -> None:
        """Raise :class:`Unreachable` for an answer that does not carry the range asked for."""
        path = run[0].path
        if status not in (200, 206):
            raise Unreachable(f"{source} answered HTTP {status} for {path}")
        if status == 200:  # the whole file, ranges ignored: we skip to ours
            if content_length is not None and content_length < end + 1:
                raise Unreachable(f"{source} sent {content_length} bytes of {path}, expected at least {end + 1}")
        elif content_length is not None and content_length != end - start + 1:
            raise Unreachable(f"{source} sent {content_length} bytes of {path}, expected {end - start + 1}")

    async def _take_pieces(self, job: PullJob, resp: aiohttp.ClientResponse, run: list[PieceSpan], start: int,
                           end: int, targets: list[tuple[str, str]], source: str) -> None:
        """Hand each piece of a 200/206 answer to libtorrent (and push it on) as soon as it has arrived.

        Each piece is read as one ``bytes`` straight from the connection's buffer (one copy
        in Python, not a copy of the whole run and a slice of it), and libtorrent hashes and
        writes it while the rest of the run is still on its way.  Pieces taken before a
        connection breaks are kept; Unreachable says what is missing.
        """
        self._check_answer(resp.status, resp.content_length, run, start, end, source)
        if resp.status == 200:  # the whole file, ranges ignored: skip to ours
            skip = start
            while skip:
                skip -= len(await self._read(resp, min(skip, 1 << 20)))
        for span in run:
            piece = await self._read(resp, span.length)
            piece = _padded(piece, span)
            self._took(job, span, piece, targets)
            self.engine.add_piece(job.digest, span.piece, piece)

    async def _read(self, resp: aiohttp.ClientResponse, n: int) -> bytes:
        """The next ``n`` bytes of an answer's body, under the node's download limit."""
        if self.bucket is not None:
            await self.bucket.take(n)
        return await resp.content.readexactly(n)

    async def relay_fetch(self, job: PullJob, base: str, holder: str, token: str, span: PieceSpan) -> None:
        """Fetch one piece from ``holder``, a node of another zone; from the origin if that fails."""
        try:
            data = await self.relay.fetch(holder, token, job.digest, span)
        except Unreachable:
            await self.fetch_run(job, base, [span])
            return
        if self.bucket is not None:
            await self.bucket.take(len(data))
        if not await self.relay.add_relayed(job, span.piece, data):
            # A holder that sent bytes failing the piece hash: never handed to libtorrent.
            self.relay.warn(holder, f"piece {span.piece} of {job.digest} from {holder} does not match its hash; "
                                    "fetching it from the origin")
            await self.fetch_run(job, base, [span])


class OriginFill:
    """Fetches from the origin, for one download, the pieces that no connected peer can give it."""

    def __init__(self, job: PullJob, spans: list[PieceSpan], registry: "RegistryClient", fetcher: OriginFetcher,
                 cfg: NodeConfig):
        self.job = job
        self.spans = spans
        self.registry = registry  # the web seed of its current replica; the next one's when that fails
        self.fetcher = fetcher
        self.engine = fetcher.engine
        self.cfg = cfg
        self._wake = asyncio.Event()
        self._rng = random.Random()
        self._crowded = False  # the registry said other nodes pull this artifact

    @property
    def base(self) -> str:
        return self.registry.webseed_url(self.job.digest)

    def _failover(self, failure: BaseException) -> None:
        """A replica failed a fetch: requests go to the next one from now on."""
        if isinstance(failure, RegistryUnreachable):
            for replica in self.registry.replicas():
                if failure.url.startswith(replica + "/"):
                    self.registry.failed(replica)

    def _left_already(self, failure: BaseException) -> bool:
        """Whether ``failure`` is of a registry replica that is no longer the current one."""
        return (isinstance(failure, RegistryUnreachable) and len(self.registry.base_urls) > 1
                and not failure.url.startswith(self.registry.base_url + "/"))

    def poke(self) -> None:
        """Something changed (peers, tracker, state, a fetch ended): look again now."""
        self._wake.set()

    async def _wait(self, timeout: float) -> None:
        """Until poked, or ``timeout`` seconds.  Callers clear the event before they look."""
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def run(self) -> None:
        engine, digest, loop = self.engine, self.job.digest, asyncio.get_running_loop()
        if (seed := engine.url_seed(digest)) is not None and seed.state == URL_SEED_RUNNING:
            await self._url_seed_run()
        if self.cfg.p2p:
            # Give peers a moment to connect and show what they have, unless the tracker
            # already said nobody else is in the swarm.
            grace_end = loop.time() + self.cfg.webseed_grace_s
            while True:
                self._wake.clear()
                if (loop.time() >= grace_end or engine.tracker_peers(digest) == 0
                        or ((p := engine.progress(digest)) and p.peers > 0)):
                    break
                await self._wait(grace_end - loop.time())
            await asyncio.sleep(FIRST_BITFIELDS_S)
        # While libtorrent re-checks files already on disk, every piece looks missing.
        while True:
            self._wake.clear()
            if (p := engine.progress(digest)) is None or not p.state.startswith("checking"):
                break
            await self._wait(IDLE_LOOK_S)
        claimed: dict[int, asyncio.Task] = {}  # piece -> the fetch that covers it
        relays: set[asyncio.Task] = set()  # fetches from nodes of other zones, among claimed's
        fetched_at: dict[int, float] = {}
        last_done, last_change = -1, loop.time()
        last_connected = started = loop.time()  # when a peer was last connected (or the fill started)
        ever_connected = reannounced = False
        try:
            while not engine.finished(digest):
                self._wake.clear()
                failure = self._collect(claimed, relays, fetched_at)
                if failure is not None:
                    if self._left_already(failure):
                        continue  # a fetch from a replica already failed over from: the current one takes it
                    log.warning("origin fetch failed: %s", failure)
                    self._failover(failure)
                    await asyncio.sleep(FAILURE_BACKOFF_S)
                    continue
                now = loop.time()
                p, missing, avail = engine.swarm_view(digest)
                if p.done_bytes != last_done:
                    last_done, last_change = p.done_bytes, now
                if p.peers:
                    last_connected, ever_connected = now, True
                told_of = engine.tracker_peers(digest)
                if (not reannounced and not ever_connected and told_of == 0
                        and (self._crowded or now - started >= LONE_RECHECK_S)):
                    engine.reannounce(digest, at_once=True)  # see LONE_RECHECK_S
                    reannounced = True
                if self._crowded or ever_connected:
                    # As if the tracker had named peers: marked requests until they (re)connect, or
                    # for ALONE_AFTER_S.  A peer that finished leaves the swarm for a moment (its
                    # torrent re-added as a seed: node_cache/daemon.py); one the tracker never named
                    # us (it connected to us) is no less there.
                    told_of = max(told_of or 0, 1)
                view = SwarmView(missing, avail, alone=is_alone(p.peers, told_of, now - last_connected))
                in_flight = len(set(claimed.values()) - relays)
                requests, wanted = plan_requests(
                    view, self.spans, claimed=claimed.keys(), fetched_at=fetched_at, now=now,
                    stalled=now - last_change > STALL_S, in_flight=in_flight, run_bytes=self.fetcher.run_bytes,
                    rng=self._rng)
                for request in requests:
                    task = self._start(self.fetcher.fetch_run(self.job, self.base, list(request.spans),
                                                              first_copy=request.first_copy))
                    for span in request.spans:
                        claimed[span.piece] = task
                if not wanted or in_flight + len(requests) >= parallel_requests(view.alone):
                    # Peers are delivering everything else, or every slot is busy: a fetch
                    # ending, a peer or the tracker pokes us.  (Looking at 20 Hz here while a
                    # fetch was under way cost each node of a 16-node fan-out three calls into
                    # libtorrent's thread per look.)
                    await self._wait(IDLE_LOOK_S)
                else:
                    await self._wait(BUSY_LOOK_S)
        finally:
            for task in set(claimed.values()):
                task.cancel()

    async def _url_seed_run(self) -> None:
        """Alone, let libtorrent fetch from the origin itself; the moment that ends, ask ourselves.

        A lone node's bytes then go from the socket to the disk inside libtorrent, hashed
        there, never through Python (issue #13: half the CPU per byte).  It ends when the
        download finishes, when the registry refuses the URL seed (another node asked for
        the artifact: the first copy is then shared through marked requests; or the origin
        is not a file origin: tracker/webseed.py), or after :data:`STALL_S` without
        progress.  Not when a peer connects: a range being sent would be lost half way,
        and a peer that asks the origin makes the registry refuse the next range anyway.
        Its connection closes then, and what it has not brought yet the loop below asks for.
        """
        engine, digest, loop = self.engine, self.job.digest, asyncio.get_running_loop()
        last_done, last_change, why = -1, loop.time(), "the download finished"
        try:
            while not engine.finished(digest):
                self._wake.clear()
                seed = engine.url_seed(digest)
                if seed is None:
                    return
                if seed.state == URL_SEED_FAILED:
                    why = f"the registry ended it ({seed.error})"
                    # 409: other nodes pull (tracker/webseed.py): not alone, whatever the tracker said.
                    self._crowded = seed.status == 409
                    break
                now = loop.time()
                if (p := engine.progress(digest)) is not None and p.done_bytes != last_done:
                    last_done, last_change = p.done_bytes, now
                if now - last_change > STALL_S:
                    why = f"no progress for {STALL_S:g} s"
                    break
                await self._wait(IDLE_LOOK_S)
        finally:
            if engine.url_seed(digest) is not None:
                engine.drop_url_seed(digest)
                log.info("%s: libtorrent's own origin fetching stopped after %d bytes: %s", digest,
                         engine.url_seed_bytes(digest), why)

    def _start(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        task.add_done_callback(lambda _: self.poke())
        return task

    def _collect(self, claimed: dict[int, asyncio.Task], relays: set[asyncio.Task],
                 fetched_at: dict[int, float]) -> BaseException | None:
        """Forget finished fetches; start relay fetches the origin pointed to; return a failure, if any."""
        failure = None
        now = asyncio.get_running_loop().time()
        for piece, task in list(claimed.items()):
            if not task.done():
                continue
            del claimed[piece]
            relays.discard(task)
            exc = None if task.cancelled() else task.exception()
            if exc is None or isinstance(exc, (ServedElsewhere, RelayFrom)):
                # On its way to libtorrent (or through the swarm, or a relay): not asked for again
                # for a while.  A failed fetch brought nothing: its pieces are wanted at once.
                fetched_at[piece] = now
            if isinstance(exc, RelayFrom):
                relay = self._start(self.fetcher.relay_fetch(self.job, self.base, exc.holder, exc.token,
                                                             self.spans[piece]))
                claimed[piece] = relay
                relays.add(relay)
            elif exc is not None and not isinstance(exc, ServedElsewhere) and failure is None:
                failure = exc
        return failure
