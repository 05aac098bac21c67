"""Pieces across zones: push to and fetch from nodes of other zones, and the relay listener.

The tracker hands a node only peers of its own zone; pieces cross zones as the origin's
first-copy gate directs (tracker/firstcopy.py).  A node the origin serves pushes each
piece to the node of each other zone the gate names (``PUT
/v1/artifacts/{digest}/pieces/{n}`` on that node's relay listener), and a node asking the
origin for a piece already served to another zone is told which node holds it and fetches
it from there (``GET`` of the same path, waiting up to ``?wait=S`` for it to arrive).  The
listener is apart from the local API, by default on the peer address: nodes of other zones
reach it where they reach this node's peers, and reach nothing else.  Bytes relayed are
hash-checked by libtorrent like any others.

Authenticated (issue #15).  The node registers its relay URL with each heartbeat
(tracker/relaytokens.py) and learns its own relay secret from the answer; every target the
registry names comes with a short-lived token for exactly that node, artifact, file range
and direction (modelcast/relay_auth.py says why tokens checked locally rather than a round
trip to the registry).  The listener answers a PUT or GET without a valid, unexpired token
covering the piece with 401/403 before reading a byte of its body, and logs each cause once
a minute.  The bounds stay: pushes pending (bytes), waiters, each exchange's time.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from aiohttp import web

from adapters.tls import server_context
from adapters.http_server import RELAY_LIMITS, BoundedSite, start_bounded
from adapters.torrent import PieceSpan, TorrentEngine
from modelcast.config import NodeConfig, is_wildcard
from modelcast.errors import ArtifactNotFound, BadRequest, Busy, Conflict, ModelcastError, Unauthorized, Unreachable
from modelcast.relay_auth import RELAY_TOKEN_HEADER, check_token

from .jobs import PullJob, PullState
from .metrics import NodeCounters
from .middleware import errors_middleware

log = logging.getLogger("modelcast.node")

RELAY_PARALLEL = 8  # pieces fetched at once from nodes of other zones
RELAY_WAIT_S = 10.0  # a relay request waits this long for the holder to have the piece
# Relay requests waiting for a piece at once (each on a future libtorrent's alert resolves,
# none polling); more are answered 503 at once and the asking node goes to the origin.
# Nodes of other zones fetch at most RELAY_PARALLEL pieces each at a time.
MAX_RELAY_WAITERS = 128
PUSH_PARALLEL = 8  # pieces pushed at once to nodes of other zones, as the origin directs
# Bytes of pushes waiting or under way (each holds its piece in memory): beyond this a push
# is dropped (the other zone makes the piece up from the origin once it stops progressing).
# A target that never answers can hold no more than this of this node's memory.  Room for
# what a node's origin requests bring at once (4 runs of up to 16 MiB, each pushed on; a node
# under a download limit asks for ¼ s of it per run): a cap of 32 pieces dropped most of a
# two-zone fan-out's pushes (efficiency 0.87 -> 0.64).
MAX_PENDING_PUSH_BYTES = 64 << 20
PUSH_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=5)
FAILURE_LOG_S = 60.0  # failed exchanges with one node are logged once a minute


class RelayForbidden(ModelcastError, PermissionError):
    """A relay request whose token does not allow it (expired, forged, for another piece)."""

    code = "forbidden"
    http_status = 403


def advertised_relay_url(cfg: NodeConfig, host: str, port: int) -> str | None:
    """The base URL nodes of other zones use to reach this node's relay listener at ``host:port``.

    ``cfg.relay_url`` if set (for an address others see, e.g. behind NAT); none for a
    wildcard listener, whose address for others this node cannot know.  https:// when
    the node serves TLS (``cfg.tls``).
    """
    if cfg.relay_url:
        return cfg.relay_url.rstrip("/")
    if is_wildcard(host):
        return None
    scheme = "https" if cfg.tls is not None else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class Relay:
    """This node's side of cross-zone traffic: pushes, relay fetches, and the listener serving both."""

    def __init__(self, cfg: NodeConfig, counters: NodeCounters, jobs: dict[str, PullJob]):
        self.cfg = cfg
        self.counters = counters
        self.jobs = jobs
        self.url: str | None = None  # set by start_listener()
        self.engine: TorrentEngine | None = None
        self.http: aiohttp.ClientSession | None = None
        self._attached = asyncio.Event()
        self._fetch_slots = asyncio.Semaphore(RELAY_PARALLEL)
        self._push_slots = asyncio.Semaphore(PUSH_PARALLEL)
        self._pushes: set[asyncio.Task] = set()
        self.pending_push_bytes = 0
        self._failures: dict[str, float] = {}  # node -> when its failures were last logged
        self.waiting = 0  # relay requests waiting for a piece to arrive
        # This node's id and relay secret (from its heartbeat answer): the key of the tokens it accepts.
        self.node_id: str | None = None
        self.secret: str | None = None
        self.refused: dict[str, int] = {}  # relay requests refused, by cause (modelcast/relay_auth.py)
        self._refusals_logged: dict[str, float] = {}

    def attach(self, engine: TorrentEngine, http: aiohttp.ClientSession) -> None:
        """Use the daemon's libtorrent engine and HTTP client (both made at start)."""
        self.engine, self.http = engine, http
        self._attached.set()

    async def start_listener(self) -> BoundedSite | None:
        """Serve pieces to nodes of other zones on the relay address (the peer address by default).

        Its URL goes with every origin request (tracker/firstcopy.py).
        """
        if not self.cfg.p2p or self.cfg.relay_url == "":
            return None
        host = self.cfg.peer_host if self.cfg.relay_host is None else self.cfg.relay_host
        # Bodies are pieces: a PUT must say its size (the piece's) and is read no further.
        app = web.Application(middlewares=[errors_middleware])
        app[RELAY] = self
        add_relay_routes(app)
        # At stop, relay requests still waiting for a piece get a second, then are cancelled.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = await start_bounded(runner, host, self.cfg.relay_port, RELAY_LIMITS, log, "relay listener",
                                        ssl_context=server_context(self.cfg.tls))
        except OSError as exc:
            await runner.cleanup()
            raise ModelcastError(f"cannot serve relays on {host}:{self.cfg.relay_port}: {exc.strerror or exc}; "
                                 "pick another --relay-listen") from None
        self.url = advertised_relay_url(self.cfg, host, site.port)
        log.info("relay for other zones on %s:%d (advertised as %s)", host, site.port, self.url or "nothing")
        return site

    def registered(self, node_id: str, answer: dict) -> None:
        """Take this node's relay secret from a heartbeat answer (tracker/relaytokens.py)."""
        secret = answer.get("relay_secret") if isinstance(answer, dict) else None
        if isinstance(secret, str) and secret:
            self.node_id, self.secret = node_id, secret
        if self.url and isinstance(answer, dict) and answer.get("relay") != self.url:
            self.warn("registry", f"the registry did not register this node's relay URL {self.url} (it must be at "
                                  "the address the registry sees the heartbeat come from); nodes of other zones "
                                  "will not relay pieces with it")

    def warn(self, node: str, message: str) -> None:
        """Log a failed exchange with a node of another zone, once a minute per node (a dead one fails them all)."""
        now = time.monotonic()
        if now - self._failures.get(node, -1e9) > FAILURE_LOG_S:
            self._failures[node] = now
            log.warning("%s; further failures with %s are not logged for a minute", message, node)

    # ---- outgoing ----------------------------------------------------------------------
    def push(self, digest: str, target: str, token: str, piece: int, data: bytes) -> None:
        """Hand a piece the origin just served us to ``target``, a node of another zone, in the background."""
        if self.pending_push_bytes + len(data) > MAX_PENDING_PUSH_BYTES:
            self.warn(target, f"not pushing piece {piece} of {digest} to {target}: {len(self._pushes)} pushes "
                              f"({self.pending_push_bytes >> 20} MiB) are still pending")
            return
        task = asyncio.create_task(self._push(digest, target, token, piece, data))
        self._pushes.add(task)
        self.pending_push_bytes += len(data)

        def done(t: asyncio.Task, n: int = len(data)) -> None:
            self._pushes.discard(t)
            self.pending_push_bytes -= n

        task.add_done_callback(done)

    async def _push(self, digest: str, target: str, token: str, piece: int, data: bytes) -> None:
        url = f"{target}/v1/artifacts/{digest}/pieces/{piece}"
        try:
            async with self._push_slots, self.http.put(url, data=data, timeout=PUSH_TIMEOUT,
                                                        headers={RELAY_TOKEN_HEADER: token}) as resp:
                if resp.status == 204:
                    self.counters.bytes_relayed += len(data)
                    return
                if resp.status == 409:  # it has the piece, or no longer pulls
                    return
                problem = f"HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            problem = str(exc) or type(exc).__name__
        # Its zone makes the piece up from the origin once it stops progressing (picker.STALL_S).
        self.warn(target, f"pushing piece {piece} of {digest} to {target} failed ({problem})")

    async def fetch(self, holder: str, token: str, digest: str, span: PieceSpan) -> bytes:
        """Piece ``span`` of ``digest`` from ``holder``, a node of another zone; Unreachable (logged) if that fails."""
        url = f"{holder}/v1/artifacts/{digest}/pieces/{span.piece}?wait={RELAY_WAIT_S:g}"
        try:
            async with self._fetch_slots, self.http.get(
                    url, timeout=aiohttp.ClientTimeout(total=RELAY_WAIT_S + 30),
                    headers={RELAY_TOKEN_HEADER: token}) as resp:
                if resp.status != 200:
                    raise Unreachable(f"HTTP {resp.status}")
                # Never more than the piece: a holder that promises or sends more is not read on.
                if resp.content_length != span.size:
                    raise Unreachable(f"answer of {resp.content_length} bytes, expected {span.size}")
                try:
                    data = await resp.content.readexactly(span.size)
                except asyncio.IncompleteReadError as exc:
                    raise Unreachable(f"{len(exc.partial)} bytes, expected {span.size}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, Unreachable) as exc:
            self.warn(holder, f"piece {span.piece} of {digest} from {holder} failed ({exc}); "
                              "fetching it from the origin")
            raise Unreachable(f"relay fetch from {holder} failed: {exc}") from exc
        return data

    async def add_relayed(self, job: PullJob, piece: int, data: bytes) -> bool:
        """Hand libtorrent a piece from a node of another zone and count it; False if it fails its hash."""
        if not await self.engine.add_piece_checked(job.digest, piece, data):
            return False
        job.bytes_from_relay += len(data)
        self.counters.bytes_from_relay += len(data)
        return True

    # ---- incoming ----------------------------------------------------------------------
    def authorize(self, request: web.Request, digest: str, piece: int) -> None:
        """Refuse (401 without a token, 403 with a bad one) a relay request the registry did not allow.

        Runs before the body of a PUT is read: nothing unauthenticated costs a piece's bytes.
        """
        token = request.headers.get(RELAY_TOKEN_HEADER)
        span = self.engine.piece_span(digest, piece) if self.engine is not None and token else None
        if token and span is None:
            # A token, for a piece this node does not have: nothing to check it against.
            if request.method == "PUT":
                raise Conflict(f"{digest} is not being pulled on this node")
            raise ArtifactNotFound(f"piece {piece} of {digest} is not on this node")
        cause = "missing" if not token else check_token(self.secret, token, request.method, self.node_id, digest,
                                                         span.path, span.file_offset, span.length, time.time())
        if cause is None:
            return
        self.refused[cause] = self.refused.get(cause, 0) + 1
        now = time.monotonic()
        if now - self._refusals_logged.get(cause, -1e9) > FAILURE_LOG_S:
            self._refusals_logged[cause] = now
            log.warning("relay %s of piece %d of %s from %s refused: token %s (further such refusals are not "
                        "logged for a minute)", request.method, piece, digest, request.remote, cause)
        if cause in ("missing", "unready"):
            raise Unauthorized(f"relay requests need a registry-issued token ({RELAY_TOKEN_HEADER})"
                               + (" that this node can check yet" if cause == "unready" else ""))
        raise RelayForbidden(f"relay token refused ({cause}): it does not allow {request.method} of piece {piece} "
                        f"of {digest} here now")

    async def read_piece(self, digest: str, piece: int, wait_s: float) -> bytes:
        """``piece`` of ``digest`` (padding included), waiting up to ``wait_s`` for it to arrive here."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        if not (self._attached.is_set() and self.engine.have_piece(digest, piece)):
            if wait_s > 0 and self.waiting >= MAX_RELAY_WAITERS:
                raise Busy(f"{self.waiting} relay requests are already waiting for pieces here (at most "
                           f"{MAX_RELAY_WAITERS}); fetch piece {piece} of {digest} from the origin")
            self.waiting += 1
            try:
                async with asyncio.timeout_at(deadline):
                    await self._attached.wait()
                    while not self.engine.have_piece(digest, piece):
                        # Event-driven: libtorrent's piece alert resolves the future (no polling).  No
                        # await between the check and the wait: the arrival cannot slip between.
                        await self.engine.piece_arrival(digest, piece)
            except TimeoutError:
                raise ArtifactNotFound(f"piece {piece} of {digest} is not on this node (waited {wait_s:g}s)") \
                    from None
            finally:
                self.waiting -= 1
        data = await self.engine.read_piece(digest, piece)
        self.counters.bytes_relayed += len(data)
        return data

    def accept_piece(self, digest: str, piece: int, size: int | None) -> int:
        """The size a pushed piece must have, if this node wants it (else Conflict)."""
        job = self.jobs.get(digest)
        if job is None or job.state is not PullState.DOWNLOADING or self.engine is None or not self.engine.has(digest):
            raise Conflict(f"{digest} is not being pulled on this node")
        want = self.engine.piece_size(digest, piece)
        if want is None:
            raise BadRequest(f"{digest} has no piece {piece}")
        if size != want:
            raise BadRequest(f"piece {piece} of {digest} is {want} bytes; Content-Length says {size}")
        if self.engine.have_piece(digest, piece):
            raise Conflict(f"piece {piece} of {digest} is already here")
        return want

    async def pushed_piece(self, digest: str, piece: int, data: bytes) -> None:
        """A piece pushed by a node of another zone: libtorrent checks its hash like any other."""
        job = self.jobs.get(digest)
        if job is None or self.engine is None or not self.engine.has(digest):
            raise Conflict(f"{digest} is not being pulled on this node")
        if not await self.add_relayed(job, piece, data):
            # Never handed to libtorrent: it would blame the piece on honest peers (adapters/torrent.py).
            raise BadRequest(f"piece {piece} of {digest} does not match its hash; not taken")


# ---- the relay listener's routes ---------------------------------------------------------
RELAY = web.AppKey("relay", Relay)


async def handle_piece(request: web.Request) -> web.Response:
    """``GET /v1/artifacts/{digest}/pieces/{n}?wait=S``: one piece, for a node of another zone."""
    digest = "sha256:" + request.match_info["hex"]
    piece = int(request.match_info["piece"])  # the route admits digits only
    try:
        wait_s = float(request.query.get("wait", "0"))
    except ValueError:
        raise BadRequest("?wait= must be a number of seconds") from None
    if not 0 <= wait_s <= 60:
        raise BadRequest(f"?wait={wait_s:g} must be between 0 and 60 seconds")
    relay = request.app[RELAY]
    relay.authorize(request, digest, piece)
    data = await relay.read_piece(digest, piece, wait_s)
    return web.Response(body=data, content_type="application/octet-stream")


async def handle_piece_put(request: web.Request) -> web.Response:
    """``PUT /v1/artifacts/{digest}/pieces/{n}``: a piece pushed by a node of another zone."""
    digest = "sha256:" + request.match_info["hex"]
    piece = int(request.match_info["piece"])
    relay = request.app[RELAY]
    relay.authorize(request, digest, piece)  # before a byte of the body is read
    size = relay.accept_piece(digest, piece, request.content_length)
    try:
        data = await request.content.readexactly(size)
    except asyncio.IncompleteReadError:
        raise BadRequest(f"piece {piece} of {digest}: the body ended early") from None
    await relay.pushed_piece(digest, piece, data)
    return web.Response(status=204)


def add_relay_routes(app: web.Application) -> None:
    """The routes of the relay listener (:meth:`Relay.start_listener`): pieces for nodes of other zones."""
    piece = "/v1/artifacts/sha256:{hex:[0-9a-f]{64}}/pieces/{piece:[0-9]{1,9}}"
    app.router.add_get(piece, handle_piece)
    app.router.add_put(piece, handle_piece_put)
