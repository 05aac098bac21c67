"""A lean HTTP/1.1 path for tracker announces and scrapes, in front of aiohttp on the same socket.

Announces are most of what a tracker serves, and each is tiny: through aiohttp, its
request object, router, middleware and response machinery cost several times the
announce itself.  :class:`FastPathProtocol` sniffs each request on a connection: a plain
``GET /announce?...`` or ``GET /scrape?...`` is answered here, with the same pure
functions as the aiohttp handlers; at the first request that is anything else, the
connection is handed to aiohttp's own request handler, bytes and all, so every other
route (and every odd request, which aiohttp answers with its usual 400) still goes
through aiohttp.

What this path answers is deliberately narrow: ``GET``, HTTP/1.0 or 1.1, a request
target of printable ASCII, header lines of ``name: value`` ended by CRLF, no body
(no ``Transfer-Encoding``, no ``Content-Length`` but 0, no ``Expect``/``Upgrade``), and
a ``Host`` header on HTTP/1.1.  Keep-alive follows HTTP/1.1 (``Connection: close``
closes); HTTP/1.0 always closes.  Requests may be pipelined; answers go out in order,
at most :data:`MAX_PIPELINED` per read, and reading pauses while the client does not
read them.  A request that has not arrived whole within ``head_timeout_s`` of its first
byte closes the connection with a 408; a connection idle for ``keepalive_timeout_s``
closes, and one whose client has read none of our answers for that long is aborted.
Bytes held per connection stay bounded: a head longer than :data:`MAX_HEAD` goes to
aiohttp (which refuses it), and nothing more is read while answers wait to be sent.
Connections are counted here, in all and per client address, by the ``limiter`` (a
:class:`adapters.http_server.ConnectionLimiter`); a connection handed to aiohttp keeps its
place, and aiohttp's handler (:class:`adapters.http_server.BoundedRequestHandler`) bounds
heads, bodies and keep-alive from then on.

A node's ``GET /v1/webseed/...`` (HTTP/1.1, no body) is given to the ``webseed`` route
(tracker/webseed.py, ``fast_webseed``) with the request still in the buffer and nothing
more read; the route answers it on the transport itself (a range sent from a thread), or
declines having sent nothing, and the connection is handed to aiohttp from that request on.

The request parsing is :func:`parse_head`, pure and tested without sockets.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import logging
import re
import time
from typing import Awaitable, Callable, Mapping, NamedTuple

from adapters.http_server import ConnectionLimiter, ServerLimits, Slot

from .announce import encode_failure

log = logging.getLogger("modelcast.tracker.fastpath")

# aiohttp's own limit on a request line (and on one header line); a longer request goes to
# aiohttp, which answers it with a 400 as it always did.
MAX_LINE = 8190
MAX_HEAD = 32 * 1024
# How many pipelined requests are answered before the loop serves other connections.
MAX_PIPELINED = 64
# The defaults of every modelcast listener (adapters/http_server.py); the registry passes its own.
HEAD_TIMEOUT_S = ServerLimits.header_timeout_s
KEEPALIVE_TIMEOUT_S = ServerLimits.keepalive_timeout_s

# Given the request target's query (after "?", raw bytes) and the client's IP address
# (as the socket reports it, or None), return the bencoded answer, or an awaitable of it
# (a swarm store over the network; the connection's later answers wait for it, in order).
# Must not raise for bad input: malformed requests become a bencoded "failure reason" answer.
Route = Callable[[bytes, "str | None"], "bytes | Awaitable[bytes]"]

# An API request with a body (a node's heartbeat, its leave): given the request's header
# lines this path keeps (lowercased name -> value, each sent once), its body, the client's
# address and its connection (a :class:`FastPathProtocol`, whose ``proven`` the route may
# read and set: what it proved on this connection), the status, JSON body and extra headers
# of the answer, or an awaitable of them (a swarm store over the network).  Must not raise
# for bad input: errors are answers (4xx with a JSON error body).
Answer = "tuple[int, bytes, Mapping[str, str]]"
ApiRoute = Callable[[Mapping[bytes, bytes], bytes, "str | None", "FastPathProtocol"],
                    "tuple[int, bytes, Mapping[str, str]] | Awaitable"]
# Given method and path (no query), the route that answers it here, or None (aiohttp's).
ApiMatch = Callable[[bytes, bytes], "ApiRoute | None"]
# A web seed GET (tracker/webseed.py, fast_webseed): given the request target, its header lines
# (lowercased name -> value), the client's address, the transport and whether the connection
# stays open after it, answers the request itself on the transport and returns whether the
# connection stays open; or returns None having sent nothing, and aiohttp answers the request.
WebseedRoute = Callable[[bytes, Mapping[bytes, bytes], "str | None", asyncio.Transport, bool],
                        "Awaitable[bool | None]"]
# The header lines an API route is given (other lines are read past).
API_HEADERS = frozenset((b"authorization", b"x-modelcast-node-key", b"content-length", b"connection", b"host",
                         b"x-forwarded-for"))

# Printable ASCII but "#": a target with anything else goes to aiohttp, which decides.
_TARGET_BYTES = bytes(b for b in range(0x21, 0x7F) if b != ord("#"))
# One header line: a token, a colon, a value without CR, LF or NUL, each within aiohttp's limits.
_FIELD = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}:[^\r\n\x00]{0," + str(MAX_LINE).encode() + rb"}"
_HEADERS_RE = re.compile(_FIELD + rb"(?:\r\n" + _FIELD + rb")*")
# A body, or a protocol switch: not for this path.
_BODY_HEADERS = (b"\r\ntransfer-encoding:", b"\r\nexpect:", b"\r\nupgrade:")
_BODY_HEADER_NAMES = frozenset(name[2:-1] for name in _BODY_HEADERS)
_API_OR_BODY_HEADERS = API_HEADERS | _BODY_HEADER_NAMES


class Head(NamedTuple):
    """A request head this path answers."""

    path: bytes
    query: bytes
    http11: bool
    keep_alive: bool


_GET = (b"GET",)
_API_METHODS = (b"POST", b"DELETE")


def _request_line(head: bytes, line_end: int, methods: tuple[bytes, ...]) -> tuple[bytes, bytes, bool] | None:
    """(method, target, HTTP/1.1?) of a request line with one of ``methods``; None for anything else.

    The target is printable ASCII only, so no CR, LF or NUL hides in the request line
    either (what is left after deleting the allowed bytes must be nothing).
    """
    line = head if line_end < 0 else head[:line_end]
    if len(line) > MAX_LINE:
        return None
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] not in methods:
        return None
    target, version = parts[1], parts[2]
    if version == b"HTTP/1.1":
        http11 = True
    elif version == b"HTTP/1.0":
        http11 = False
    else:
        return None
    if not target.startswith(b"/") or target.translate(None, _TARGET_BYTES):
        return None
    return parts[0], target, http11


def parse_head(head: bytes, paths: frozenset[bytes] | set[bytes]) -> Head | None:
    """Parse a request head (everything before the blank line, CRLFs inside) for this path.

    Returns None for anything this path leaves to aiohttp: another method or path, a
    body, odd framing (bare CR or LF, NUL, folded or malformed header lines), a missing
    or repeated ``Host`` on HTTP/1.1, or a request line longer than :data:`MAX_LINE`.
    """
    line_end = head.find(b"\r\n")
    request = _request_line(head, line_end, _GET)
    if request is None:
        return None
    _, target, http11 = request
    path, _, query = target.partition(b"?")
    if path not in paths:
        return None
    keep_alive = http11
    hosts = 0
    if line_end >= 0:
        block = head[line_end + 2:]
        # Every line "token: value" (one regex over the block, not a loop over lines).
        if not _HEADERS_RE.fullmatch(block):
            return None
        # Searched as "\r\nname:" in the lowered block, so a name matches only whole, at a line start.
        block = b"\r\n" + block.lower()
        for name in _BODY_HEADERS:
            if block.find(name) >= 0:
                return None
        at = block.find(b"\r\ncontent-length:")
        if at >= 0:
            end = block.find(b"\r\n", at + 2)
            if (block[at + 17:end if end >= 0 else None].strip() != b"0"
                    or block.find(b"\r\ncontent-length:", at + 2) >= 0):
                return None
        at = block.find(b"\r\nconnection:")
        while at >= 0:
            end = block.find(b"\r\n", at + 2)
            if block.find(b"close", at + 14, end if end >= 0 else len(block)) >= 0:
                keep_alive = False
            at = block.find(b"\r\nconnection:", at + 2)
        hosts = block.count(b"\r\nhost:")
    if http11 and hosts != 1:
        return None
    return Head(path, query, http11, keep_alive)


class ApiHead(NamedTuple):
    """An API request head this path answers: its route, framing and the header lines the route reads."""

    route: ApiRoute
    http11: bool
    keep_alive: bool
    content_length: int
    headers: dict[bytes, bytes]


def parse_api_head(head: bytes, match: ApiMatch, max_body: int) -> ApiHead | None:
    """Parse the head of a ``POST``/``DELETE`` API request for this path (see :func:`parse_head`).

    Returns None for anything this path leaves to aiohttp: a method or path ``match``
    has no route for, a query, a chunked body or one over ``max_body`` (aiohttp answers
    413), a repeated header this path reads, odd framing, no single ``Host`` on HTTP/1.1.
    """
    line_end = head.find(b"\r\n")
    request = _request_line(head, line_end, _API_METHODS)
    if request is None or b"?" in request[1]:
        return None
    method, target, http11 = request
    route = match(method, target)
    if route is None:
        return None
    headers: dict[bytes, bytes] = {}
    keep_alive = http11
    if line_end >= 0:
        block = head[line_end + 2:]
        if not _HEADERS_RE.fullmatch(block):
            return None
        for field in block.split(b"\r\n"):
            name, _, value = field.partition(b":")
            name = name.lower()
            if name in _API_OR_BODY_HEADERS:
                if name in _BODY_HEADER_NAMES:
                    return None
                if name in headers:
                    if name == b"connection":
                        headers[name] += b"," + value.strip()
                        continue
                    return None
                headers[name] = value.strip()
    if b"close" in headers.get(b"connection", b"").lower():
        keep_alive = False
    if http11 and b"host" not in headers:
        return None
    length = headers.get(b"content-length", b"0")
    if not length.isdigit() or len(length) > 12 or int(length) > max_body:
        return None
    return ApiHead(route, http11, keep_alive, int(length), headers)


class WebseedHead(NamedTuple):
    """A web seed request head this path may answer: its target and every header line (lowercased names)."""

    target: bytes
    headers: dict[bytes, bytes]
    keep_alive: bool


def parse_webseed_head(head: bytes) -> WebseedHead | None:
    """Parse the head of a ``GET /v1/webseed/...`` for this path (see :func:`parse_head`).

    Returns None for anything this path leaves to aiohttp: HTTP/1.0, a body, a header line
    given twice, odd framing, no single ``Host``.  Whether the request itself is one the
    fast web seed answers is the route's to say (tracker/webseed.py, :func:`fast_webseed`).
    """
    line_end = head.find(b"\r\n")
    request = _request_line(head, line_end, _GET)
    if request is None or not request[2] or line_end < 0:
        return None
    block = head[line_end + 2:]
    if not _HEADERS_RE.fullmatch(block):
        return None
    headers: dict[bytes, bytes] = {}
    for field in block.split(b"\r\n"):
        name, _, value = field.partition(b":")
        name = name.lower()
        if name in headers or name in (b"transfer-encoding", b"expect", b"upgrade"):
            return None
        headers[name] = value.strip()
    if b"host" not in headers or headers.get(b"content-length", b"0") != b"0":
        return None
    return WebseedHead(request[1], headers, b"close" not in headers.get(b"connection", b"").lower())


_PREFIXES = (b"GET /announce?", b"GET /announce ", b"GET /scrape?", b"GET /scrape ")
_API_PREFIXES = (b"POST /v1/nodes/", b"DELETE /v1/nodes/")
_WEBSEED_PREFIX = b"GET /v1/webseed/"
_ALL_PREFIXES = _PREFIXES + _API_PREFIXES


def _sniff(buf: bytes, api: bool = False, webseed: bool = False) -> bool | None:
    """Whether the request that ``buf`` starts with may be for this path; None: too short to tell."""
    prefixes = _ALL_PREFIXES if api else _PREFIXES
    if webseed:
        prefixes += (_WEBSEED_PREFIX,)
    if buf.startswith(prefixes):
        return True
    if len(buf) < 18 and any(p.startswith(buf) for p in prefixes):
        return None
    return False


class _HttpDate:
    """The ``Date`` header value, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(now, usegmt=True).encode("ascii")
        return self._value


_http_date = _HttpDate()


def _response(status: bytes, body: bytes, http11: bool, keep_alive: bool,
              content_type: bytes = b"text/plain", extra: bytes = b"") -> bytes:
    return b"HTTP/1.%d %b\r\nContent-Type: %b\r\nContent-Length: %d\r\nDate: %b\r\n%b%b\r\n%b" % (
        1 if http11 else 0, status, content_type, len(body), _http_date(), extra,
        b"" if keep_alive else b"Connection: close\r\n", body)


_STATUS_LINES = {code.value: b"%d %b" % (code.value, code.phrase.encode("ascii")) for code in http.HTTPStatus}
JSON_TYPE = b"application/json; charset=utf-8"


# What every ``200`` API answer on a keep-alive HTTP/1.1 connection starts with (as _response writes it).
_API_OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: " + JSON_TYPE + b"\r\nContent-Length: "


def _api_response(answer: "tuple[int, bytes, Mapping[str, str]]", http11: bool, keep_alive: bool) -> bytes:
    status, body, headers = answer
    if status == 200 and http11 and keep_alive and not headers:  # the common case, in one formatting
        return b"%b%d\r\nDate: %b\r\n\r\n%b" % (_API_OK_HEAD, len(body), _http_date(), body)
    extra = b"".join(b"%b: %b\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())
    return _response(_STATUS_LINES.get(status, b"%d Status" % status), body, http11, keep_alive, JSON_TYPE, extra)


def _tracker_response(body: "bytes | tuple[bytes, bytes]", http11: bool, keep_alive: bool) -> bytes:
    if isinstance(body, tuple):  # (status line, body): an internal error
        return _response(body[0], body[1], http11, keep_alive)
    return _response(b"200 OK", body, http11, keep_alive)


def _tracker_error(exc: BaseException) -> tuple[bytes, bytes]:
    return (b"500 Internal Server Error",
            encode_failure(f"internal error in the tracker: {exc.__class__.__name__}: {exc}"))


def _internal_error(exc: BaseException) -> "tuple[int, bytes, Mapping[str, str]]":
    body = json.dumps({"error": {"code": "internal", "message": f"internal error in the registry: "
                                                             f"{exc.__class__.__name__}: {exc}"}}).encode()
    return 500, body, {}


class FastPathServer:
    """The protocol factory for ``loop.create_server``, and the set of connections still on this path.

    ``fallback`` makes the protocol that takes over a connection this path does not
    answer: aiohttp's ``AppRunner.server`` (a ``web.Server``, whose call makes a
    ``RequestHandler``), or, with a ``limiter``, an
    :class:`adapters.http_server.BoundedServer`, called with the connection's slot.  ``routes`` maps a path (``b"/announce"``) to its :data:`Route`.
    """

    def __init__(self, fallback: Callable[..., asyncio.Protocol], routes: Mapping[bytes, Route], *,
                 head_timeout_s: float = HEAD_TIMEOUT_S, keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
                 limiter: ConnectionLimiter | None = None, api: ApiMatch | None = None,
                 max_api_body: int = 64 * 1024, webseed: WebseedRoute | None = None) -> None:
        self.fallback = fallback
        # A node's web seed ranges answered here (tracker/webseed.py), the rest handed to aiohttp.
        self.webseed = webseed
        # POST/DELETE requests with small bodies answered here (node heartbeats and leaves).
        self.api = api
        self.max_api_body = max_api_body
        self.limiter = limiter
        self.routes = dict(routes)
        self.paths = frozenset(self.routes)
        self.head_timeout_s = head_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.connections: set[FastPathProtocol] = set()
        self.answered = 0
        self.handed_off = 0

    def __call__(self) -> FastPathProtocol:
        return FastPathProtocol(self)

    def close(self) -> None:
        """Close every connection still on this path; answers already written go out first."""
        for conn in list(self.connections):
            conn.close()


class FastPathProtocol(asyncio.Protocol):
    """One client connection: tracker requests answered here until one is not, then aiohttp's."""

    def __init__(self, server: FastPathServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._remote: str | None = None
        self._buf = b""
        self._closing = False
        self._write_paused = False
        self._read_paused = False
        self._idle_since = 0.0  # when the buffer last became empty
        self._head_since = 0.0  # when the request now in the buffer began
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._slot: Slot | None = None
        self._pending: asyncio.Future | None = None  # an answer being worked out; nothing else is read meanwhile
        # The last API request head parsed on this connection, and what it parsed to: a client
        # that sends the same head again (a node daemon's heartbeats) is not parsed again.
        self._api_head_bytes = b""
        self._api_head: ApiHead | None = None
        # What an API route proved on this connection (tracker/liveness.py: a node's key).
        self.proven: object = None

    # ---- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) and peer else None
        limiter = self._server.limiter
        if limiter is not None:
            self._slot = limiter.admit(transport, self._remote)
            if self._slot is None:  # over a cap: answered 503 and closed
                self._closing = True
                return
        self._transport = transport  # type: ignore[assignment]
        self._server.connections.add(self)
        self._idle_since = time.monotonic()
        self._arm(self._idle_since + self._server.keepalive_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        fresh = not self._buf
        self._buf = self._buf + data if self._buf else data
        if self._write_paused or self._pending is not None:
            # The client sends more while our answers have not drained (or one is being
            # worked out): stop reading.
            if not self._read_paused:
                self._read_paused = True
                self._transport.pause_reading()
            return
        self._process(fresh)

    def eof_received(self) -> bool | None:
        return None  # close; answers already written are sent first

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._detach()
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume()

    # ---- the request loop --------------------------------------------------------------
    def _process(self, fresh: bool) -> None:
        """Answer the complete requests in the buffer; ``fresh``: the buffer was empty before this read."""
        try:
            self._answer_all(fresh)
        except Exception:  # a bug here must cost one connection, not leak a trace to the client
            log.exception("fast path failed on a connection from %s", self._remote)
            self._buf = b""
            self.close()

    def _answer_all(self, fresh: bool) -> None:
        server = self._server
        buf = self._buf
        out: list[bytes] = []
        answered = 0
        api = server.api
        while buf:
            ours = _sniff(buf, api is not None, server.webseed is not None)
            if ours is None:
                break
            if not ours:
                self._flush(out)
                self._hand_off(buf)
                return
            end = buf.find(b"\r\n\r\n", 0, MAX_HEAD)
            if end < 0:
                if len(buf) >= MAX_HEAD:
                    self._flush(out)
                    self._hand_off(buf)  # aiohttp answers an oversize head with its 400
                    return
                break
            if buf.startswith(_WEBSEED_PREFIX) and server.webseed is not None:
                ws_head = parse_webseed_head(buf[:end])
                if ws_head is None or self._transport.get_extra_info("sslcontext") is not None:
                    self._flush(out)
                    self._hand_off(buf)
                    return
                # Answered (or handed to aiohttp) once the route has worked it out; the request
                # stays in the buffer until then, and nothing more is read meanwhile.
                self._buf = buf
                self._flush(out)
                self._serve_file(ws_head, end + 4)
                return
            if api is not None and not buf.startswith(b"GET "):
                head_bytes = buf[:end]
                if head_bytes == self._api_head_bytes:
                    api_head = self._api_head  # parsing is a pure function of the head's bytes
                else:
                    api_head = parse_api_head(head_bytes, api, server.max_api_body)
                    if api_head is None:
                        self._flush(out)
                        self._hand_off(buf)
                        return
                    self._api_head_bytes, self._api_head = head_bytes, api_head
                total = end + 4 + api_head.content_length
                if len(buf) < total:
                    # The body comes in more than one read: aiohttp, which bounds how long
                    # each of its bytes may take, reads it (and answers through the same route).
                    self._flush(out)
                    self._hand_off(buf)
                    return
                body, buf = buf[end + 4:total], buf[total:]
                try:
                    answer = api_head.route(api_head.headers, body, self._remote, self)
                except Exception as exc:  # a bug, not bad input: routes answer bad input themselves
                    log.exception("unexpected error on an API request")
                    answer = _internal_error(exc)
                    api_head = api_head._replace(keep_alive=False)
                server.answered += 1
                answered += 1
                if not isinstance(answer, tuple):
                    # Worked out elsewhere (a swarm store over the network): nothing more is
                    # read or answered on this connection until it is, so answers stay in order.
                    self._buf = buf
                    self._flush(out)
                    self._await(answer, api_head.http11, api_head.keep_alive, _api_response, _internal_error)
                    return
                out.append(_api_response(answer, api_head.http11, api_head.keep_alive))
                if not api_head.keep_alive:
                    self._buf = b""
                    self._flush(out)
                    self.close()
                    return
                if answered >= MAX_PIPELINED:
                    break
                continue
            head = parse_head(buf[:end], server.paths)
            if head is None:
                self._flush(out)
                self._hand_off(buf)
                return
            buf = buf[end + 4:]
            try:
                body = server.routes[head.path](head.query, self._remote)
                status = b"200 OK"
            except Exception as exc:  # a bug, not bad input: the routes answer bad input themselves
                log.exception("unexpected error on GET %s", head.path.decode("ascii", "replace"))
                body = encode_failure(f"internal error in the tracker: {exc.__class__.__name__}: {exc}")
                status = b"500 Internal Server Error"
                head = head._replace(keep_alive=False)
            server.answered += 1
            answered += 1
            if not isinstance(body, bytes):  # an awaitable: see the API requests above
                self._buf = buf
                self._flush(out)
                self._await(body, head.http11, head.keep_alive, _tracker_response, _tracker_error)
                return
            out.append(_response(status, body, head.http11, head.keep_alive))
            if not head.keep_alive:
                self._buf = b""
                self._flush(out)
                self.close()
                return
            if answered >= MAX_PIPELINED:
                break
        self._buf = buf
        self._flush(out)
        now = time.monotonic()
        if answered or not buf:
            self._idle_since = now
        if not buf:
            return
        # A request has begun (in this read, or after the ones just answered): it must
        # arrive whole within head_timeout_s.
        if fresh or answered:
            self._head_since = now
            self._arm(now + server.head_timeout_s)
        if answered >= MAX_PIPELINED or self._write_paused:
            # Many pipelined requests: let other connections have the loop (and, if our
            # answers are not draining, wait for them), reading nothing meanwhile.
            if not self._read_paused:
                self._read_paused = True
                self._transport.pause_reading()
            if not self._write_paused:
                self._loop.call_soon(self._resume)

    def _await(self, answer, http11: bool, keep_alive: bool, respond: Callable, fail: Callable) -> None:
        """Send ``answer`` (an awaitable) when it is ready, then go on with what the client sent meanwhile.

        ``respond(result, http11, keep_alive)`` makes the response's bytes; ``fail(exc)`` the
        result that stands for an unexpected error (the connection closes after it).
        """
        self._work_out(answer, lambda fut: self._answered(fut, http11, keep_alive, respond, fail))

    def _work_out(self, answer, done: Callable[[asyncio.Future], None]) -> None:
        """Read nothing more until ``answer`` (an awaitable) is done, then call ``done`` with it."""
        if not self._read_paused:
            self._read_paused = True
            self._transport.pause_reading()
        self._pending = asyncio.ensure_future(answer)
        self._pending.add_done_callback(done)

    def _answered(self, fut: asyncio.Future, http11: bool, keep_alive: bool, respond: Callable,
                  fail: Callable) -> None:
        if not self._claim(fut):
            return
        try:
            answer = fut.result()
        except Exception as exc:
            log.exception("unexpected error on a request answered later")
            answer, keep_alive = fail(exc), False
        self._transport.write(respond(answer, http11, keep_alive))
        self._go_on(keep_alive)

    def _claim(self, fut: asyncio.Future) -> bool:
        """Whether the answer ``fut`` worked out is still this open connection's to send."""
        if self._pending is not fut:
            return False  # the connection went away meanwhile
        self._pending = None
        return self._transport is not None and not self._closing

    def _go_on(self, keep_alive: bool) -> None:
        """After an answer worked out later: close, or go on with what the client sent meanwhile."""
        self._idle_since = time.monotonic()
        if not keep_alive or self._transport.is_closing():
            self._buf = b""
            self.close()
            return
        self._resume()

    def _serve_file(self, head: WebseedHead, length: int) -> None:
        """Let the web seed route answer the request that starts the buffer (``length`` bytes long)."""
        self._work_out(self._server.webseed(head.target, head.headers, self._remote, self._transport,
                                            head.keep_alive), lambda fut: self._served_file(fut, length))

    def _served_file(self, fut: asyncio.Future, length: int) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result() is not None:
            self._server.answered += 1  # (the client may have closed already, having read it all)
        if not self._claim(fut):
            return
        try:
            keep_alive = fut.result()
        except Exception:  # a bug, not bad input: the route answers bad input (or leaves it to aiohttp)
            log.exception("unexpected error on a web seed request from %s", self._remote)
            self._buf = b""
            self.close()
            return
        if keep_alive is None:  # not one for this path: aiohttp answers it, from its first byte
            self._hand_off(self._buf)
            return
        self._buf = self._buf[length:]
        self._go_on(keep_alive)

    def _resume(self) -> None:
        if self._write_paused or self._transport is None or self._closing or self._pending is not None:
            return
        if self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()
        if self._buf:
            self._process(True)

    def _flush(self, out: list[bytes]) -> None:
        if out:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _hand_off(self, data: bytes) -> None:
        """Give the connection to aiohttp from this request on, with the bytes read so far."""
        transport = self._transport
        self._detach()
        self._server.handed_off += 1
        slot, self._slot = self._slot, None  # the connection keeps its place under aiohttp
        handler = self._server.fallback() if slot is None else self._server.fallback(slot)
        handler.connection_made(transport)
        transport.set_protocol(handler)
        if self._read_paused:
            transport.resume_reading()
        handler.data_received(data)

    # ---- timeouts and closing ----------------------------------------------------------
    # One timer per connection.  A request only records the time (one C call); the timer,
    # when it fires, works out the deadline that applies now and sleeps again until then,
    # so a busy keep-alive connection costs no timer churn.
    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._transport is None or self._closing:
            return
        server = self._server
        if self._pending is not None:  # an answer is being worked out: its request is whole
            self._idle_since = time.monotonic()
            self._arm(self._idle_since + server.keepalive_timeout_s)
            return
        # A partial request must complete within head_timeout_s; a connection that is idle,
        # or whose client reads none of our answers, goes after keepalive_timeout_s.
        waiting_for_client_to_read = self._read_paused or self._write_paused
        partial = self._buf and not waiting_for_client_to_read
        deadline = (self._head_since + server.head_timeout_s if partial
                    else self._idle_since + server.keepalive_timeout_s)
        if time.monotonic() < deadline:
            self._arm(deadline)
            return
        if partial:
            # Slowloris: a request that never completes.  Tell the client why, then close.
            self._transport.write(_response(b"408 Request Timeout", b"", True, False))
        elif waiting_for_client_to_read:
            # Closing would wait for our unread answers to drain, which they never do.
            self._closing = True
            self._transport.abort()
            return
        self.close()

    def close(self) -> None:
        """Close the connection after what was written (while it is still on this path)."""
        if self._transport is not None and not self._closing:
            self._closing = True
            self._transport.close()

    def _detach(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.connections.discard(self)
        self._transport = None
